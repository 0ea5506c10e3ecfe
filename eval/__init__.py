"""Stream -> metrics -> report (`dst eval`, `dst score`): streaming inference with a KV cache, ProAssist's
metrics, the DST metrics, the threshold sweep and the HTML report. Imports core, pipeline and train."""

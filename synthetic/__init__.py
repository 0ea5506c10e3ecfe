"""Synthetic data in the real input formats, apart from the real data path: the demo's task videos, long videos
that overflow the context, synthetic frames files (`dst synth-frames`). Imports core and pipeline."""

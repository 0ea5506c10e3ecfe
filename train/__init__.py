"""Windows -> model -> losses -> loop (`dst train`), with the one prompt and sequence format (sequence) and the
variant table (variants) that eval imports too. Imports core and pipeline."""

"""featseq.sequence: read fixed-length sequences from a feature cache and train sequence models on them."""

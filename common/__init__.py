"""featseq.common: what featurize, sequence and the CLI share and that belongs to neither job: the user-error type
(exit code 2), crash-safe file writes, the inter-process file lock, signal handling and torchrun process groups.

Imports nothing heavy (no torch, h5py or numpy at import time): decode worker processes import it.
"""

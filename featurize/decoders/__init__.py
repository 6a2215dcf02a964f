"""Decoder backends, one module each, behind the interface in featurize/decoder.py; their names and featurize's
decode choices are here, importing nothing, so the command line and the configs list them without loading numpy."""

RESIZE_POLICIES = ("squash", "crop")
BACKENDS = ("pyav", "decord", "torchcodec")
DECODERS = ("auto",) + BACKENDS
DECODE_DEVICES = ("cpu", "cuda")
LEGACY_DECODER = "decord"  # what made a cache that records no decoder
# how frames are resized: each backend's own implementation of the named filter (swscale's, PIL's, torch's)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


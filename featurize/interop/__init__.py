"""Adapters between a featseq cache and the layouts peers use (``featseq cache export`` / ``featseq cache import``):
video_features' per-video npy triples, one npy per segment with an index CSV, one HDF5 with a dataset per video, and
webdataset tar shards. Never a second internal format: an import writes an ordinary cache with CacheWriter, an
export reads one through the cache readers, one segment at a time."""

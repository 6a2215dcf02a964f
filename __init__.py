"""featseq: cache per-frame CNN features of video segments once (featseq.featurize), then train many sequence models
on them in minutes (featseq.sequence); featseq.cli is the command line, featseq.common what both share.

The repository root is this package: an installed featseq claims the one top-level import name ``featseq``.
"""
__version__ = "0.1.0"

"""featseq.featurize: decode video segments, embed frames with a CNN, cache the embeddings in HDF5.

Kept free of heavy imports: the decode worker process imports this package and must not pull in torch.
"""

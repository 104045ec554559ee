"""The AutoSAM2 training set: kept pseudo-labels of every shard -> samples, binary masks, splits."""

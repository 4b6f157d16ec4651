"""Data: synthetic NIH-format generator, readers → one index table, splits, uint8 cache, loaders."""

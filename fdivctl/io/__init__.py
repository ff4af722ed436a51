"""File contracts: atomic writes, hashes, Parquet tables, the logit store, checkpoints."""

"""Data: the shard format, the synthetic demo data set and (elsewhere) the loader."""

"""Stage 2 (rules/cache.smk): activation caches of every decoder block's output, written and read as zarr."""

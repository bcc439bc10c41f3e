"""The teacher cache: top-k teacher targets built once (``fastdistill teacher-cache build``), stored as zstd Parquet
shards keyed by sequence content, and read by any later run (``teacher.cache: DIR``). See ``store`` (format),
``build`` (the build loop), ``source`` (the trainer's reader) and ``fastdistill.train.targets`` (the record)."""

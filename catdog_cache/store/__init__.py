"""A cache on object storage (`--cache s3://bucket/run/features.h5`): the URL parsed once (url.py), a local staging
copy written and uploaded shard by shard with the index last (staging.py, mirror.py), a read-through local copy for
readers."""

"""The HDF5 feature cache: the only package that imports h5py. format (schema, provenance, rows, index), validate
(opening and checking hostile files), read (index, features, blocks), parts (crash-safe parts, assembly), lock (one
writer per cache), layouts (the benchmark's alternative layouts). See format.py for the layout."""

from .format import (
    CHUNK_ROWS,
    CLASS_MAP,
    SCHEMA_VERSION,
    UNKNOWN_STAT,
    Index,
    Provenance,
    Refresh,
    Rows,
    encode_path,
    recorded,
    require_same,
)
from .layouts import rewrite_features, time_full_read
from .lock import locked
from .parts import assemble, list_parts, parts_dir, write_part
from .read import BlockReader, open_cache, read_features, read_index
from .validate import open_h5

__all__ = [
    "CHUNK_ROWS", "CLASS_MAP", "SCHEMA_VERSION", "UNKNOWN_STAT", "BlockReader", "Index", "Provenance", "Refresh",
    "Rows", "assemble", "encode_path", "list_parts", "locked", "open_cache", "open_h5", "parts_dir", "read_features",
    "read_index", "recorded", "require_same", "rewrite_features", "time_full_read", "write_part",
]

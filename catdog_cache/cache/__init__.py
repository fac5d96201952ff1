"""The HDF5 feature cache: the only package that imports h5py. Its modules, bottom-up (each imports only modules
named before it): format (schema, provenance, rows, index, classes), packed_index (the compact columns of a lean
open), chunk_reads (streamed feature reads by pread), validate (opening and checking hostile files), view (shards
merged into the logical rows; the one reader), shard_state (a sharded cache's index read and checked, its shards
opened), read (index, features, blocks), rowfile (the schema-1 writer), shards (the sharded layout's writers:
append, adopt, convert, compact; virtual: the index's datasets for plain h5py), parts (crash-safe parts, assembly
into one file), lock (one writer per cache), layouts (the benchmark's alternative layouts), export (rows to .npz or
Parquet). See format.py and shard_state.py for the layout."""

from .format import (
    CAT_DOG,
    CHUNK_ROWS,
    CLASS_MAP,
    INDEX_SCHEMA,
    MAX_CLASS_NAME,
    MAX_CLASSES,
    MAX_SOURCES,
    SCHEMA_VERSION,
    UNKNOWN_STAT,
    Index,
    Provenance,
    Recorded,
    Refresh,
    Rows,
    encode_path,
    encode_paths,
    merge_classes,
    recorded,
    require_same,
)
from .layouts import rewrite_features, time_full_read
from .lock import locked
from .opening import open_h5
from .parts import assemble, parts_dir, write_part
from .read import BlockReader, open_cache, read_features, read_index
from .shard_state import listed, shards_dir
from .shards import compact, finish, list_parts, remove_cache
from .view import View

__all__ = [
    "CAT_DOG", "CHUNK_ROWS", "CLASS_MAP", "INDEX_SCHEMA", "MAX_CLASSES", "MAX_CLASS_NAME", "MAX_SOURCES",
    "SCHEMA_VERSION", "UNKNOWN_STAT", "BlockReader", "Index", "Provenance", "Recorded", "Refresh", "Rows", "View",
    "assemble", "compact", "encode_path", "encode_paths", "finish", "list_parts", "listed", "locked", "merge_classes",
    "open_cache", "open_h5", "parts_dir", "read_features", "read_index", "recorded", "remove_cache", "require_same",
    "rewrite_features", "shards_dir", "time_full_read", "write_part",
]

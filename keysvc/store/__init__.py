"""The node's storage seam.

The hot path (`keysvc._fast`) reads only what `LmdbStore` exposes for it: resolved key
records by hash, the change log, and the counters environment. Everything else writes
records through `LmdbStore.write()`. A future source of truth (Postgres) replicates by
writing the same records through that same method, and the hot path never knows.
"""
from .errors import NewerSchemaError, StoreError, StoreFullError, StoreLockedError, StoreUnreadableError
from .lmdb import LmdbStore, StoreConfig

__all__ = [
    "LmdbStore",
    "NewerSchemaError",
    "StoreConfig",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreUnreadableError",
]

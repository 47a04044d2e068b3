"""What one worker process holds open: the store, the verifier over it, and the management
operations. Opened in the worker, after Granian has forked it."""
from __future__ import annotations

from keysvc._fast import Verifier
from keysvc.analytics.spool import Spool
from keysvc.config import Config
from keysvc.management import Management
from keysvc.metrics import WorkerMetrics
from keysvc.store import LmdbStore, StoreConfig

from .batching import VerifyBatcher


class Node:
    def __init__(self, config: Config, metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.store = LmdbStore(StoreConfig(
            data_dir=config.storage.data_dir,
            map_size=config.storage.map_size,
            counters_map_size=config.storage.counters_map_size,
        ))
        self.verifier = Verifier(self.store, cache_size=config.cache.keys)
        self.spool = None
        if config.analytics.enabled:
            self.spool = Spool(config.storage.data_dir, config.analytics.spool_map_size)
        self.batcher = VerifyBatcher(self.verifier, self.spool, metrics if metrics is not None and metrics.enabled
                                     else None)
        self.manage = Management(self.store)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.store.close()

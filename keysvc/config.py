"""keysvc's settings: typed, with defaults that serve on a single node with nothing else
installed. Loaded from YAML; every setting has its default here."""
from __future__ import annotations

import os
from pathlib import Path

import msgspec
import yaml

GiB = 1 << 30


class ConfigError(Exception):
    """A config that cannot be used; the message names the setting and where it came from."""


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 0  # 0: one per CPU
    max_body_bytes: int = 1 << 20


class StorageConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = "./keysvc-data"
    map_size: int = 64 * GiB
    counters_map_size: int = 8 * GiB


class CacheConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    keys: int = 200_000  # decoded key records per worker


class AnalyticsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # None: the embedded chDB engine, under <data_dir>/chdb. Else a ClickHouse server, e.g.
    # http://user:password@clickhouse:8123/default.
    clickhouse_url: str | None = None
    batch_size: int = 10_000  # rows per insert
    flush_interval: float = 5.0  # seconds: a smaller batch goes after this long
    spool_cap_bytes: int = 1 * GiB  # past it the oldest events are dropped (and counted)
    spool_map_size: int = 4 * GiB
    query_timeout: float = 10.0  # seconds, for analytics.get* queries
    drain_timeout: float = 10.0  # seconds the flusher may keep flushing after SIGTERM


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    analytics: AnalyticsConfig = msgspec.field(default_factory=AnalyticsConfig)

    def workers(self) -> int:
        return self.server.workers or os.cpu_count() or 1


def load(path: str | None) -> Config:
    if path is None:
        return Config()
    data = yaml.safe_load(Path(path).read_text()) or {}
    return msgspec.convert(data, Config)


def to_json(config: Config) -> bytes:
    return msgspec.json.encode(config)


def from_json(data: bytes | str) -> Config:
    return msgspec.json.decode(data, type=Config)

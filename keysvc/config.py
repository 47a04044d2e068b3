"""keysvc's settings: typed, with defaults that serve on a single node with nothing else
installed. Loaded from YAML; every setting has its default here."""
from __future__ import annotations

import os
from pathlib import Path

import msgspec
import yaml

GiB = 1 << 30


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


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)

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

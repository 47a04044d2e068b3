"""What the store holds, as msgspec structs encoded to msgpack (array-like: compact, fast).

Every record is self-contained and carries no LMDB detail, so that another source of truth
(Postgres, later) can produce the same records and replicate them in through `LmdbStore`.
"""
from __future__ import annotations

from typing import Any

import msgspec


class RatelimitConfig(msgspec.Struct, array_like=True, frozen=True):
    id: str
    name: str
    limit: int
    duration: int
    auto_apply: bool = False


class Refill(msgspec.Struct, array_like=True, frozen=True):
    interval: str  # "daily" | "monthly"
    amount: int
    refill_day: int | None = None  # set iff monthly


class Api(msgspec.Struct, array_like=True):
    id: str
    name: str
    keyspace_id: str
    created_at: int
    deleted_at: int | None = None
    default_prefix: str | None = None
    default_bytes: int | None = None


class Key(msgspec.Struct, array_like=True):
    id: str
    keyspace_id: str
    api_id: str  # "" for root keys
    hash: bytes  # digest of the full key string; never the key itself
    hash_alg: str  # "blake3" (ours) | "sha256" (imported from Unkey)
    start: str
    created_at: int
    updated_at: int | None = None
    deleted_at: int | None = None
    name: str | None = None
    meta: dict[str, Any] | None = None
    identity_id: str | None = None
    expires: int | None = None
    enabled: bool = True
    # The balance itself lives in the counters environment; this says whether there is one.
    has_credits: bool = False
    refill: Refill | None = None
    permission_ids: list[str] = []
    role_ids: list[str] = []
    ratelimits: list[RatelimitConfig] = []
    # Literal permission strings, for root keys (`api.*.create_key`, ...), which name no records.
    grants: list[str] = []


class Identity(msgspec.Struct, array_like=True):
    id: str
    external_id: str
    created_at: int
    meta: dict[str, Any] | None = None
    ratelimits: list[RatelimitConfig] = []


class Permission(msgspec.Struct, array_like=True):
    id: str
    name: str
    slug: str
    created_at: int
    description: str | None = None


class Role(msgspec.Struct, array_like=True):
    id: str
    name: str
    created_at: int
    description: str | None = None
    permission_ids: list[str] = []


class Namespace(msgspec.Struct, array_like=True):
    id: str
    name: str
    created_at: int
    deleted_at: int | None = None


class Override(msgspec.Struct, array_like=True):
    id: str
    namespace_id: str
    identifier: str
    limit: int
    duration: int
    created_at: int


class VerificationRecord(msgspec.Struct, array_like=True):
    """A key resolved for verification: the key plus what its identity, roles and
    permissions contribute, read in one snapshot. The hot path caches this, pre-parsed."""

    key: Key
    identity: Identity | None
    permission_slugs: list[str]  # direct ones, then those via roles (duplicates kept)
    role_names: list[str]

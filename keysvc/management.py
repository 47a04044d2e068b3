"""The management operations behind the API's write routes: the domain rules (defaults,
validation that needs the store, ids, what a key's creation implies) over `LmdbStore`.

Each operation is one durable store transaction (plus the credit balance, in the counters
environment, written and synced before the key that refers to it).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from keysvc._fast import REFILL_DAILY, REFILL_MONTHLY, apply_refill
from keysvc.errors import BadRequest, Conflict, NotFound
from keysvc.ids import new_id
from keysvc.keys import generate_key, key_digest, unkey_hash_to_digest
from keysvc.store import LmdbStore
from keysvc.store import records as r
from keysvc.store.lmdb import ReadTxn, WriteTxn

ROOT_KEYSPACE = "ks_root"
ROOT_KEY_PREFIX = "unkey_root"  # recognisable in logs and scanners, like Unkey's own root keys
MAX_CREDITS = (1 << 63) - 1


class _Unset:
    """Absent from a request, as opposed to null (contract: updateKey is tri-state)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class RatelimitSpec:
    name: str
    limit: int
    duration: int
    auto_apply: bool = False


@dataclass(frozen=True)
class CreditsSpec:
    remaining: int | None
    refill_interval: str | None = None  # "daily" | "monthly"
    refill_amount: int | None = None
    refill_day: int | None = None

    def refill(self) -> r.Refill | None:
        if self.refill_interval is None:
            return None
        if self.remaining is None:
            raise BadRequest("credits.refill needs credits.remaining to be set")
        if self.refill_amount is None or self.refill_amount < 1:
            raise BadRequest("credits.refill.amount must be at least 1")
        if self.refill_interval == "monthly":
            if self.refill_day is None:
                raise BadRequest("credits.refill.refillDay is required when the interval is monthly")
            if not 1 <= self.refill_day <= 31:
                raise BadRequest("credits.refill.refillDay must be between 1 and 31")
            return r.Refill("monthly", self.refill_amount, self.refill_day)
        if self.refill_interval != "daily":
            raise BadRequest("credits.refill.interval must be 'daily' or 'monthly'")
        return r.Refill("daily", self.refill_amount, None)


@dataclass
class KeySpec:
    """What createKey (and the import of keys) may set."""

    api_id: str
    prefix: str | None = None
    name: str | None = None
    byte_length: int | None = None
    external_id: str | None = None
    meta: dict[str, Any] | None = None
    roles: Sequence[str] = ()
    permissions: Sequence[str] = ()
    expires: int | None = None
    credits: CreditsSpec | None = None
    ratelimits: Sequence[RatelimitSpec] = ()
    enabled: bool = True
    grants: Sequence[str] = field(default_factory=list)


class Management:
    def __init__(self, store: LmdbStore) -> None:
        self.store = store

    # -- apis ------------------------------------------------------------------------------

    def create_api(self, name: str) -> r.Api:
        api = r.Api(id=new_id("api"), name=name, keyspace_id=new_id("ks"), created_at=now_ms())
        with self.store.write() as w:
            w.put_api(api)
        return api

    def get_api(self, api_id: str) -> r.Api:
        with self.store.read() as reader:
            return self._live_api(reader, api_id)

    def delete_api(self, api_id: str) -> None:
        with self.store.write() as w:
            api = self._live_api(w, api_id)
            api.deleted_at = now_ms()
            w.put_api(api)

    @staticmethod
    def _live_api(reader: ReadTxn, api_id: str) -> r.Api:
        api = reader.api(api_id)
        if api is None or api.deleted_at is not None:
            raise NotFound("api", f"The requested API '{api_id}' does not exist or has been deleted.")
        return api

    # -- keys --------------------------------------------------------------------------------

    def create_key(self, spec: KeySpec) -> tuple[r.Key, str]:
        """The new key's record and its plaintext, which is returned here and never stored."""
        now = now_ms()
        with self.store.read() as reader:
            api = self._live_api(reader, spec.api_id) if spec.api_id else None
        prefix = spec.prefix if spec.prefix is not None else (api.default_prefix if api else None)
        byte_length = spec.byte_length or (api.default_bytes if api else None) or 16
        plaintext, start = generate_key(prefix, byte_length)
        key = self._new_key_record(spec, api, key_digest(plaintext), "blake3", start, now)
        self._insert_keys([(key, spec)], now)
        return key, plaintext

    def create_root_key(self, grants: Iterable[str], name: str | None = None) -> tuple[r.Key, str]:
        spec = KeySpec(api_id="", prefix=ROOT_KEY_PREFIX, name=name, grants=sorted(set(grants)))
        now = now_ms()
        plaintext, start = generate_key(ROOT_KEY_PREFIX, 24)
        key = self._new_key_record(spec, None, key_digest(plaintext), "blake3", start, now)
        self._insert_keys([(key, spec)], now)
        return key, plaintext

    def import_keys(self, items: Sequence[tuple[KeySpec, bytes, str, str]]) -> list[r.Key]:
        """Insert keys by digest, (spec, digest, hash_alg, start) each, in one transaction: the
        path of migrateKeys (Unkey SHA-256 hashes), restores, and bulk loads."""
        now = now_ms()
        apis: dict[str, r.Api] = {}
        with self.store.read() as reader:
            for spec, *_ in items:
                if spec.api_id not in apis:
                    apis[spec.api_id] = self._live_api(reader, spec.api_id)
        keys = [
            (self._new_key_record(spec, apis[spec.api_id], digest, alg, start, now), spec)
            for spec, digest, alg, start in items
        ]
        self._insert_keys(keys, now)
        return [key for key, _ in keys]

    def migrate_keys(self, api_id: str, hashes: Sequence[tuple[str, KeySpec, str]]) -> list[r.Key]:
        """Import keys by their Unkey hash (SHA-256, base64): (hash, spec, start) each."""
        items = []
        for encoded, spec, start in hashes:
            try:
                digest = unkey_hash_to_digest(encoded)
            except ValueError as exc:
                raise BadRequest(f"invalid hash {encoded!r}: {exc}") from None
            spec.api_id = api_id
            items.append((spec, digest, "sha256", start))
        return self.import_keys(items)

    @staticmethod
    def _new_key_record(spec: KeySpec, api: r.Api | None, digest: bytes, alg: str, start: str, now: int) -> r.Key:
        refill = spec.credits.refill() if spec.credits is not None else None
        return r.Key(
            id=new_id("key"),
            keyspace_id=api.keyspace_id if api else ROOT_KEYSPACE,
            api_id=api.id if api else "",
            hash=digest,
            hash_alg=alg,
            start=start,
            created_at=now,
            name=spec.name,
            meta=spec.meta,
            expires=spec.expires,
            enabled=spec.enabled,
            has_credits=spec.credits is not None and spec.credits.remaining is not None,
            refill=refill,
            ratelimits=_ratelimit_configs(spec.ratelimits, []),
            grants=list(spec.grants),
        )

    def _insert_keys(self, keys: Sequence[tuple[r.Key, KeySpec]], now: int) -> None:
        # The balance first (synced), then the key: a crash in between leaves only an unused
        # balance under a key id that nobody will ever be given.
        balances = [(key.id, spec.credits.remaining) for key, spec in keys
                    if spec.credits is not None and spec.credits.remaining is not None]
        if balances:
            self.store.set_credits_many([(key_id, remaining, now) for key_id, remaining in balances])
        with self.store.write() as w:
            for key, spec in keys:
                if spec.external_id is not None:
                    key.identity_id = self._upsert_identity(w, spec.external_id, now).id
                key.permission_ids = self._permission_ids(w, spec.permissions, now)
                key.role_ids = self._role_ids(w, spec.roles)
                w.put_key(key)

    def get_key(self, key_id: str) -> r.Key:
        with self.store.read() as reader:
            return self._live_key(reader, key_id)

    @staticmethod
    def _live_key(reader: ReadTxn, key_id: str) -> r.Key:
        key = reader.key(key_id)
        if key is None or key.deleted_at is not None:
            raise NotFound("key", f"The requested key '{key_id}' does not exist or has been deleted.")
        return key

    def update_key(
        self,
        key_id: str,
        *,
        name: Any = UNSET,
        external_id: Any = UNSET,
        meta: Any = UNSET,
        expires: Any = UNSET,
        credits: Any = UNSET,
        ratelimits: Any = UNSET,
        enabled: Any = UNSET,
        roles: Any = UNSET,
        permissions: Any = UNSET,
    ) -> r.Key:
        """UNSET leaves a field alone, None clears it, a value sets it. ratelimits, roles and
        permissions replace the existing sets (ratelimits keep their ids by name)."""
        now = now_ms()
        if credits is not UNSET:
            self._set_credits_config(key_id, credits, now)
        with self.store.write() as w:
            key = self._live_key(w, key_id)
            if name is not UNSET:
                key.name = name
            if meta is not UNSET:
                key.meta = meta
            if expires is not UNSET:
                key.expires = expires
            if enabled is not UNSET:
                key.enabled = bool(enabled)
            if external_id is not UNSET:
                key.identity_id = None if external_id is None else self._upsert_identity(w, external_id, now).id
            if ratelimits is not UNSET:
                key.ratelimits = _ratelimit_configs(ratelimits or (), key.ratelimits)
            if roles is not UNSET:
                key.role_ids = self._role_ids(w, roles or ())
            if permissions is not UNSET:
                key.permission_ids = self._permission_ids(w, permissions or (), now)
            if credits is not UNSET:
                key.has_credits = credits is not None and credits.remaining is not None
                key.refill = credits.refill() if credits is not None else None
            key.updated_at = now
            w.put_key(key)
        return key

    def _set_credits_config(self, key_id: str, credits: CreditsSpec | None, now: int) -> None:
        if credits is not None:
            credits.refill()  # validate before anything is written
        remaining = None if credits is None else credits.remaining
        self.store.update_credits(key_id, lambda _: None if remaining is None else (remaining, now))

    def delete_key(self, key_id: str, permanent: bool = False) -> None:
        with self.store.write() as w:
            key = w.key(key_id)
            if key is None or (key.deleted_at is not None and not permanent):
                raise NotFound("key", f"The requested key '{key_id}' does not exist or has been deleted.")
            if permanent:
                w.delete_key(key_id)
            else:
                key.deleted_at = now_ms()
                w.put_key(key)
        if permanent:
            self.store.update_credits(key_id, lambda _: None)

    def update_credits(self, key_id: str, operation: str, value: int | None) -> tuple[r.Key, int | None]:
        """set / increment / decrement a key's balance; `set` to None makes it unlimited and
        clears its refill. Returns the key and the balance after the change."""
        now = now_ms()
        key = self.get_key(key_id)
        if operation == "set":
            if value is None:
                self.update_key(key_id, credits=None)
                return self.get_key(key_id), None
            if not key.has_credits:
                key = self.update_key(key_id, credits=CreditsSpec(remaining=value))
                return key, value
            self.store.update_credits(key_id, lambda _: (value, now))
            return key, value
        if operation not in ("increment", "decrement"):
            raise BadRequest("operation must be one of set, increment, decrement")
        if value is None:
            raise BadRequest(f"{operation} needs a value")
        if not key.has_credits:
            raise BadRequest(f"cannot {operation} the credits of a key with unlimited credits")
        kind, amount, day = _refill_args(key.refill)
        sign = 1 if operation == "increment" else -1

        def change(current: tuple[int, int] | None) -> tuple[int, int]:
            balance, last_refill = current if current is not None else (0, now)
            balance, last_refill = apply_refill(balance, last_refill, kind, amount, day, now)
            return max(0, min(MAX_CREDITS, balance + sign * value)), last_refill

        balance = self.store.update_credits(key_id, change)
        return key, balance[0]

    def credits(self, key: r.Key) -> int | None:
        """The key's balance now, refills applied (what verifyKey would start from)."""
        if not key.has_credits:
            return None
        stored = self.store.get_credits(key.id)
        if stored is None:
            return 0
        kind, amount, day = _refill_args(key.refill)
        return apply_refill(stored[0], stored[1], kind, amount, day, now_ms())[0]

    # -- identities ----------------------------------------------------------------------------

    def create_identity(self, external_id: str, meta: dict[str, Any] | None = None,
                        ratelimits: Sequence[RatelimitSpec] = ()) -> r.Identity:
        with self.store.write() as w:
            if w.identity_by_external_id(external_id) is not None:
                raise Conflict("identity", f"Identity with externalId '{external_id}' already exists.")
            identity = r.Identity(
                id=new_id("id"), external_id=external_id, created_at=now_ms(), meta=meta,
                ratelimits=_ratelimit_configs(ratelimits, []),
            )
            w.put_identity(identity)
        return identity

    def get_identity(self, id_or_external_id: str) -> r.Identity:
        with self.store.read() as reader:
            return self._find_identity(reader, id_or_external_id)

    @staticmethod
    def _find_identity(reader: ReadTxn, id_or_external_id: str) -> r.Identity:
        identity = reader.identity(id_or_external_id) or reader.identity_by_external_id(id_or_external_id)
        if identity is None:
            raise NotFound("identity", f"Identity '{id_or_external_id}' does not exist.")
        return identity

    def update_identity(self, id_or_external_id: str, *, meta: Any = UNSET, ratelimits: Any = UNSET) -> r.Identity:
        with self.store.write() as w:
            identity = self._find_identity(w, id_or_external_id)
            if meta is not UNSET:
                identity.meta = meta
            if ratelimits is not UNSET:
                identity.ratelimits = _ratelimit_configs(ratelimits or (), identity.ratelimits)
            w.put_identity(identity)
        return identity

    def delete_identity(self, id_or_external_id: str) -> None:
        with self.store.write() as w:
            identity = self._find_identity(w, id_or_external_id)
            for key_id in list(w.key_ids_of_identity(identity.id)):
                key = w.key(key_id)
                if key is not None:
                    key.identity_id = None
                    w.put_key(key)
            w.delete_identity(identity.id)

    @staticmethod
    def _upsert_identity(w: WriteTxn, external_id: str, now: int) -> r.Identity:
        identity = w.identity_by_external_id(external_id)
        if identity is None:
            identity = r.Identity(id=new_id("id"), external_id=external_id, created_at=now)
            w.put_identity(identity)
        return identity

    # -- permissions and roles ---------------------------------------------------------------------

    def create_permission(self, name: str, slug: str, description: str | None = None) -> r.Permission:
        with self.store.write() as w:
            if w.permission_by_slug(slug) is not None:
                raise Conflict("permission", f"A permission with slug '{slug}' already exists.")
            permission = r.Permission(id=new_id("perm"), name=name, slug=slug, created_at=now_ms(),
                                      description=description)
            w.put_permission(permission)
        return permission

    def create_role(self, name: str, description: str | None = None, permissions: Sequence[str] = ()) -> r.Role:
        now = now_ms()
        with self.store.write() as w:
            if w.role_by_name(name) is not None:
                raise Conflict("role", f"A role named '{name}' already exists.")
            role = r.Role(id=new_id("role"), name=name, created_at=now, description=description,
                          permission_ids=self._permission_ids(w, permissions, now))
            w.put_role(role)
        return role

    def set_role_permissions(self, role: str, permissions: Sequence[str]) -> r.Role:
        now = now_ms()
        with self.store.write() as w:
            found = w.role(role) or w.role_by_name(role)
            if found is None:
                raise NotFound("role", f"Role '{role}' does not exist.")
            found.permission_ids = self._permission_ids(w, permissions, now)
            w.put_role(found)
        return found

    @staticmethod
    def _permission_ids(w: WriteTxn, slugs: Iterable[str], now: int) -> list[str]:
        """Ids of these permissions (by slug or id), creating the missing ones (name = slug)."""
        ids = []
        for slug in dict.fromkeys(slugs):
            permission = w.permission(slug) or w.permission_by_slug(slug)
            if permission is None:
                permission = r.Permission(id=new_id("perm"), name=slug, slug=slug, created_at=now)
                w.put_permission(permission)
            ids.append(permission.id)
        return ids

    @staticmethod
    def _role_ids(w: WriteTxn, names: Iterable[str]) -> list[str]:
        ids = []
        for name in dict.fromkeys(names):
            role = w.role(name) or w.role_by_name(name)
            if role is None:
                raise NotFound("role", f"Role '{name}' does not exist.")
            ids.append(role.id)
        return ids


def _ratelimit_configs(specs: Iterable[RatelimitSpec], existing: Sequence[r.RatelimitConfig]) -> list[r.RatelimitConfig]:
    """Configs for these specs; a name that exists keeps its id (updates upsert by name)."""
    ids = {config.name: config.id for config in existing}
    configs = {}
    for spec in specs:
        if spec.limit < 1 or spec.duration < 1000:
            raise BadRequest(f"ratelimit '{spec.name}' needs limit >= 1 and duration >= 1000 ms")
        if spec.name in configs:
            raise BadRequest(f"ratelimit '{spec.name}' is given twice")
        configs[spec.name] = r.RatelimitConfig(
            id=ids.get(spec.name) or new_id("rl"), name=spec.name, limit=spec.limit, duration=spec.duration,
            auto_apply=spec.auto_apply,
        )
    return list(configs.values())


def _refill_args(refill: r.Refill | None) -> tuple[int, int, int]:
    if refill is None:
        return 0, 0, 0
    if refill.interval == "monthly":
        return REFILL_MONTHLY, refill.amount, refill.refill_day or 1
    return REFILL_DAILY, refill.amount, 0

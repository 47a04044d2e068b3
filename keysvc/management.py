"""The management operations behind the API's write routes: the domain rules (defaults,
validation that needs the store, ids, what a key's creation implies) over `LmdbStore`.

Each operation is one durable store transaction (plus the credit balance, in the counters
environment, written and synced before the key that refers to it).
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from keysvc._fast import REFILL_DAILY, REFILL_MONTHLY, apply_refill
from keysvc.errors import BadRequest, Conflict, Gone, NotFound
from keysvc.ids import new_id
from keysvc.keys import generate_key, key_digest, unkey_hash_to_digest
from keysvc.store import LmdbStore
from keysvc.store import records as r
from keysvc.store.lmdb import ReadTxn, WriteTxn

ROOT_KEYSPACE = "ks_root"
ROOT_KEY_PREFIX = "unkey_root"  # recognisable in logs and scanners, like Unkey's own root keys
MAX_CREDITS = (1 << 63) - 1
MAX_LIMIT = 10**15
MAX_DURATION = 2_592_000_000  # 30 days


# Absent from a request, as opposed to null (contract: updateKey is tri-state). msgspec's own
# sentinel, so that decoded requests pass straight through.
UNSET: Any = msgspec.UNSET


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
        return make_refill(self.refill_interval, self.refill_amount, self.refill_day)


def make_refill(interval: str, amount: int | None, refill_day: int | None) -> r.Refill:
    if amount is None or amount < 1:
        raise BadRequest("credits.refill.amount must be at least 1")
    if interval == "monthly":
        if refill_day is None:
            raise BadRequest("credits.refill.refillDay is required when the interval is monthly")
        if not 1 <= refill_day <= 31:
            raise BadRequest("credits.refill.refillDay must be between 1 and 31")
        return r.Refill("monthly", amount, refill_day)
    if interval != "daily":
        raise BadRequest("credits.refill.interval must be 'daily' or 'monthly'")
    return r.Refill("daily", amount, None)


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

    def migrate_keys(self, api_id: str, hashes: Sequence[tuple[str, KeySpec, str]]) -> tuple[list[tuple[str, r.Key]], list[str]]:
        """Import keys by their Unkey hash (SHA-256, base64): (hash, spec, start) each. Returns the
        (hash, key) imported and the hashes refused: already present, or given twice."""
        items = []
        accepted = []
        failed = []
        seen: set[bytes] = set()
        with self.store.read() as reader:
            for encoded, spec, start in hashes:
                try:
                    digest = unkey_hash_to_digest(encoded)
                except ValueError as exc:
                    raise BadRequest(f"invalid hash {encoded!r}: {exc}") from None
                if digest in seen or reader.key_id_by_hash(digest, "sha256") is not None:
                    failed.append(encoded)
                    continue
                seen.add(digest)
                spec.api_id = api_id
                items.append((spec, digest, "sha256", start))
                accepted.append(encoded)
        if not items:
            return [], failed
        return list(zip(accepted, self.import_keys(items))), failed

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
        """A live API key; root keys are not API keys, and are not found here."""
        key = reader.key(key_id)
        if key is None or key.deleted_at is not None or not key.api_id:
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
        remaining: Any = UNSET,
        refill: Any = UNSET,
        ratelimits: Any = UNSET,
        enabled: Any = UNSET,
        roles: Any = UNSET,
        permissions: Any = UNSET,
    ) -> r.Key:
        """UNSET leaves a field alone, None clears it, a value sets it. `remaining` None makes
        the key unlimited (and drops its refill); `refill` is an r.Refill or None. ratelimits,
        roles and permissions replace the existing sets (ratelimits keep their ids by name)."""
        now = now_ms()
        with self.store.write() as w:
            key = self._live_key(w, key_id)
            has_credits = key.has_credits if remaining is UNSET else remaining is not None
            if refill not in (UNSET, None) and not has_credits:
                raise BadRequest("credits.refill needs credits.remaining to be set")
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
            key.has_credits = has_credits
            if refill is not UNSET:
                key.refill = refill
            if not has_credits:
                key.refill = None
            key.updated_at = now
            w.put_key(key)
            # Last, once everything above is known to be valid, so that a refused update changes
            # nothing; still inside the record's transaction, which commits right after.
            if remaining is not UNSET:
                self.store.update_credits(key_id, lambda _: None if remaining is None else (remaining, now))
        return key

    def delete_key(self, key_id: str, permanent: bool = False) -> None:
        with self.store.write() as w:
            key = w.key(key_id)
            if key is None or not key.api_id or (key.deleted_at is not None and not permanent):
                raise NotFound("key", f"The requested key '{key_id}' does not exist or has been deleted.")
            if permanent:
                w.delete_key(key_id)
            else:
                key.deleted_at = now_ms()
                w.put_key(key)
        if permanent:
            self.store.update_credits(key_id, lambda _: None)

    def reroll_key(self, key_id: str, expiration_ms: int) -> tuple[r.Key, str]:
        """A new key with the old one's settings and balance; the old one expires `expiration_ms`
        from now, rounded up to the next whole minute (0: now)."""
        now = now_ms()
        old = self.get_key(key_id)
        api = self.get_api(old.api_id)
        prefix = old.start.rpartition("_")[0] or None
        plaintext, start = generate_key(prefix, api.default_bytes or 16)
        new = msgspec.structs.replace(
            old, id=new_id("key"), hash=key_digest(plaintext), hash_alg="blake3", start=start, created_at=now,
            updated_at=None, expires=None,
            ratelimits=[msgspec.structs.replace(rl, id=new_id("rl")) for rl in old.ratelimits],
        )
        if old.has_credits:
            stored = self.store.get_credits(old.id) or (0, now)
            self.store.set_credits_many([(new.id, self.credits(old) or 0, stored[1])])
        expires = now + expiration_ms
        if expiration_ms > 0 and expires % 60_000:
            expires += 60_000 - expires % 60_000
        with self.store.write() as w:
            current = self._live_key(w, key_id)
            w.put_key(new)
            current.expires = expires if current.expires is None else min(current.expires, expires)
            current.updated_at = now
            w.put_key(current)
        return new, plaintext

    def list_keys(self, api_id: str, limit: int, cursor: str | None = None,
                  external_id: str | None = None) -> tuple[list[r.Key], str | None]:
        """A page of the API's live keys in id order, and the cursor of the next page."""
        with self.store.read() as reader:
            api = self._live_api(reader, api_id)
            identity_id = None
            if external_id is not None:
                identity = reader.identity_by_external_id(external_id)
                if identity is None:
                    return [], None
                identity_id = identity.id
            keys: list[r.Key] = []
            for key_id in reader.key_ids_of_keyspace(api.keyspace_id, cursor or ""):
                key = reader.key(key_id)
                if key is None or key.deleted_at is not None:
                    continue
                if identity_id is not None and key.identity_id != identity_id:
                    continue
                if len(keys) == limit:
                    return keys, key.id
                keys.append(key)
            return keys, None

    def update_credits(self, key_id: str, operation: str, value: int | None) -> tuple[r.Key, int | None]:
        """set / increment / decrement a key's balance; `set` to None makes it unlimited and
        clears its refill. Returns the key and the balance after the change."""
        now = now_ms()
        key = self.get_key(key_id)
        if operation == "set":
            if value is None:
                return self.update_key(key_id, remaining=None), None
            if not key.has_credits:
                return self.update_key(key_id, remaining=value), value
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


    def get_permission(self, id_or_slug: str) -> r.Permission:
        with self.store.read() as reader:
            return self._find_permission(reader, id_or_slug)

    @staticmethod
    def _find_permission(reader: ReadTxn, id_or_slug: str) -> r.Permission:
        permission = reader.permission(id_or_slug) or reader.permission_by_slug(id_or_slug)
        if permission is None:
            raise NotFound("permission", f"Permission '{id_or_slug}' does not exist.")
        return permission

    def update_permission(self, id_or_slug: str, *, name: Any = UNSET, slug: Any = UNSET,
                          description: Any = UNSET) -> r.Permission:
        with self.store.write() as w:
            permission = self._find_permission(w, id_or_slug)
            if slug is not UNSET and slug != permission.slug:
                if w.permission_by_slug(slug) is not None:
                    raise Conflict("permission", f"A permission with slug '{slug}' already exists.")
                permission.slug = slug
            if name is not UNSET:
                permission.name = name
            if description is not UNSET:
                permission.description = description
            w.put_permission(permission)
        return permission

    def delete_permission(self, id_or_slug: str) -> None:
        with self.store.write() as w:
            w.delete_permission(self._find_permission(w, id_or_slug).id)

    def list_permissions(self, limit: int, cursor: str | None, search: str | None) -> tuple[list[r.Permission], str | None]:
        with self.store.read() as reader:
            return _page(reader.records_from("permissions", r.Permission, cursor or ""), limit,
                         lambda p: _matches(search, p.name, p.slug))

    def get_role(self, id_or_name: str) -> r.Role:
        with self.store.read() as reader:
            return self._find_role(reader, id_or_name)

    @staticmethod
    def _find_role(reader: ReadTxn, id_or_name: str) -> r.Role:
        role = reader.role(id_or_name) or reader.role_by_name(id_or_name)
        if role is None:
            raise NotFound("role", f"Role '{id_or_name}' does not exist.")
        return role

    def update_role(self, id_or_name: str, *, name: Any = UNSET, description: Any = UNSET) -> r.Role:
        with self.store.write() as w:
            role = self._find_role(w, id_or_name)
            if name is not UNSET and name != role.name:
                if w.role_by_name(name) is not None:
                    raise Conflict("role", f"A role named '{name}' already exists.")
                role.name = name
            if description is not UNSET:
                role.description = description
            w.put_role(role)
        return role

    def delete_role(self, id_or_name: str) -> None:
        with self.store.write() as w:
            w.delete_role(self._find_role(w, id_or_name).id)

    def list_roles(self, limit: int, cursor: str | None, search: str | None) -> tuple[list[r.Role], str | None]:
        with self.store.read() as reader:
            return _page(reader.records_from("roles", r.Role, cursor or ""), limit,
                         lambda role: _matches(search, role.name, role.description or ""))

    def list_identities(self, limit: int, cursor: str | None, search: str | None) -> tuple[list[r.Identity], str | None]:
        with self.store.read() as reader:
            return _page(reader.records_from("identities", r.Identity, cursor or ""), limit,
                         lambda identity: _matches(search, identity.external_id))

    # -- rate-limit namespaces and overrides ---------------------------------------------------------

    def namespace(self, id_or_name: str, create: bool = False) -> r.Namespace | None:
        """The namespace by id or name; created on first use when `create`; None if missing."""
        with self.store.read() as reader:
            found = reader.namespace(id_or_name) or reader.namespace_by_name(id_or_name)
        if found is not None or not create:
            return found
        with self.store.write() as w:
            found = w.namespace_by_name(id_or_name)
            if found is None:
                found = r.Namespace(id=new_id("rlns"), name=id_or_name, created_at=now_ms())
                w.put_namespace(found)
        return found

    def live_namespace(self, id_or_name: str) -> r.Namespace:
        namespace = self.namespace(id_or_name)
        if namespace is None:
            raise NotFound("ratelimit_namespace", f"Namespace '{id_or_name}' does not exist.")
        if namespace.deleted_at is not None:
            raise Gone(f"Namespace '{id_or_name}' has been deleted.")
        return namespace

    def set_override(self, namespace_id: str, identifier: str, limit: int, duration: int) -> r.Override:
        with self.store.write() as w:
            existing = w.override(namespace_id, identifier)
            override = r.Override(
                id=existing.id if existing else new_id("rlor"), namespace_id=namespace_id, identifier=identifier,
                limit=limit, duration=duration, created_at=existing.created_at if existing else now_ms(),
            )
            w.put_override(override)
        return override

    def get_override(self, namespace_id: str, identifier: str) -> r.Override:
        with self.store.read() as reader:
            override = reader.override(namespace_id, identifier)
        if override is None:
            raise NotFound("ratelimit_override", f"No override for '{identifier}' in this namespace.")
        return override

    def delete_override(self, namespace_id: str, identifier: str) -> None:
        with self.store.write() as w:
            if not w.delete_override(namespace_id, identifier):
                raise NotFound("ratelimit_override", f"No override for '{identifier}' in this namespace.")

    def list_overrides(self, namespace_id: str, limit: int, cursor: str | None) -> tuple[list[r.Override], str | None]:
        with self.store.read() as reader:
            items = reader.overrides(namespace_id, cursor or "")
            return _page(items, limit, lambda _: True, lambda o: o.identifier)

    def matching_override(self, namespace_id: str, identifier: str) -> r.Override | None:
        """The override for this identifier: an exact one, else the most specific glob (`*`)."""
        with self.store.read() as reader:
            exact = reader.override(namespace_id, identifier)
            if exact is not None:
                return exact
            best = None
            for override in reader.overrides(namespace_id):
                if "*" in override.identifier and _glob(override.identifier).fullmatch(identifier):
                    if best is None or len(override.identifier.replace("*", "")) > len(best.identifier.replace("*", "")):
                        best = override
            return best


    # -- root keys, for the command line ---------------------------------------------------------------

    def list_root_keys(self, include_revoked: bool = False) -> list[r.Key]:
        with self.store.read() as reader:
            keys = [reader.key(key_id) for key_id in reader.key_ids_of_keyspace(ROOT_KEYSPACE)]
        return [key for key in keys if key is not None and (include_revoked or key.deleted_at is None)]

    def revoke_root_key(self, key_id: str) -> r.Key:
        """Soft-delete a root key: the change log makes every worker refuse it at its next request."""
        with self.store.write() as w:
            key = w.key(key_id)
            if key is None or key.api_id or key.keyspace_id != ROOT_KEYSPACE or key.deleted_at is not None:
                raise NotFound("key", f"No live root key '{key_id}'.")
            key.deleted_at = now_ms()
            w.put_key(key)
        return key

    # -- restores ----------------------------------------------------------------------------------------

    def restore(self, records: Sequence[msgspec.Struct], balances: Sequence[tuple[str, int, int]] = ()) -> None:
        """Write records as they are (ids, hashes and timestamps kept), and (key id, remaining,
        last refill) balances, in one store transaction: what the import of an export does. A
        record whose id exists is replaced; one whose unique name (a key's hash, an identity's
        external id, a permission's slug, a role's or namespace's name) belongs to another record
        is refused with Conflict, and nothing of this call is written."""
        # Balances first (synced), as for new keys: a crash in between leaves balances of keys
        # that are not there yet, which nothing reads.
        with self.store.read() as reader:
            for record in records:
                _check_restorable(reader, record)
        if balances:
            self.store.set_credits_many(list(balances))
        with self.store.write() as w:
            for record in records:
                # Again inside the write transaction: another writer may have come in between.
                _check_restorable(w, record)
                put = _RESTORE_PUT.get(type(record))
                if put is None:
                    raise BadRequest(f"a {type(record).__name__} is not a record that can be restored")
                getattr(w, put)(record)


# The write transaction's method that stores each kind of record restore() takes.
_RESTORE_PUT: dict[type, str] = {
    r.Key: "put_key", r.Api: "put_api", r.Identity: "put_identity", r.Permission: "put_permission",
    r.Role: "put_role", r.Namespace: "put_namespace", r.Override: "put_override",
}


def _check_restorable(reader: ReadTxn, record: msgspec.Struct) -> None:
    """Conflict if the record's unique name is another record's: writing it would repoint that
    name's index and orphan the other record."""
    owner: Any = None
    if isinstance(record, r.Key):
        owner_id = reader.key_id_by_hash(record.hash, record.hash_alg)
        if owner_id is not None and owner_id != record.id:
            raise Conflict("key", f"key {record.id} has the hash of key {owner_id}, which exists already")
        return
    if isinstance(record, r.Identity):
        owner, what, name = reader.identity_by_external_id(record.external_id), "identity", record.external_id
    elif isinstance(record, r.Permission):
        owner, what, name = reader.permission_by_slug(record.slug), "permission", record.slug
    elif isinstance(record, r.Role):
        owner, what, name = reader.role_by_name(record.name), "role", record.name
    elif isinstance(record, r.Namespace):
        owner, what, name = reader.namespace_by_name(record.name), "ratelimit_namespace", record.name
    if owner is not None and owner.id != record.id:
        raise Conflict(what, f"{what} {record.id} is named {name!r}, which {owner.id} is already")

def _page(records: Iterable[Any], limit: int, keep: Any, key: Any = lambda record: record.id) -> tuple[list[Any], str | None]:
    """Up to `limit` kept records, and the key of the next one as the cursor of the next page."""
    page: list[Any] = []
    for record in records:
        if not keep(record):
            continue
        if len(page) == limit:
            return page, key(record)
        page.append(record)
    return page, None


def _matches(search: str | None, *fields: str) -> bool:
    return not search or any(search.lower() in field.lower() for field in fields)


_globs: dict[str, re.Pattern[str]] = {}


def _glob(pattern: str) -> re.Pattern[str]:
    compiled = _globs.get(pattern)
    if compiled is None:
        if len(_globs) > 10_000:
            _globs.clear()
        compiled = _globs[pattern] = re.compile(".*".join(map(re.escape, pattern.split("*"))), re.DOTALL)
    return compiled

def _ratelimit_configs(specs: Iterable[RatelimitSpec], existing: Sequence[r.RatelimitConfig]) -> list[r.RatelimitConfig]:
    """Configs for these specs; a name that exists keeps its id (updates upsert by name)."""
    ids = {config.name: config.id for config in existing}
    configs = {}
    for spec in specs:
        # The bounds of the wire contract, within which the limiter's 64-bit arithmetic is exact.
        if not 1 <= spec.limit <= MAX_LIMIT or not 1000 <= spec.duration <= MAX_DURATION:
            raise BadRequest(f"ratelimit '{spec.name}' needs a limit of 1 to {MAX_LIMIT} and a duration of "
                             f"1000 to {MAX_DURATION} ms")
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

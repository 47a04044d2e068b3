"""keys.*: create, read, update, delete, verify, reroll, credits, permissions and roles."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from keysvc._fast import VerifyResult
from keysvc.errors import BadRequest, NotFound
from keysvc.management import (
    CreditsSpec,
    KeySpec,
    RatelimitSpec,
    make_refill,
)
from keysvc.store import records as r

from ..auth import require, verify_scope
from ..routing import route
from ..wire import (
    REQUEST,
    RESPONSE,
    ApiId,
    Cost,
    Credits,
    Empty,
    Expires,
    ExternalId,
    Id,
    IdentityResponse,
    KeyCreditsRequest,
    KeyCreditsResponse,
    KeyResponseData,
    KeyString,
    LimitValue,
    MetaObject,
    Name,
    PermissionSlug,
    RatelimitRequest,
    RatelimitResponse,
    Refill,
    RefillResponse,
    RoleName,
    checked_meta,
    END_OF_STRING,
    unset_if_none,
)

# -- verifyKey ----------------------------------------------------------------------------------


class VerifyCredits(msgspec.Struct, **REQUEST):
    cost: Cost


class VerifyRatelimit(msgspec.Struct, **REQUEST):
    name: Annotated[str, Meta(min_length=3, max_length=255)]
    cost: Cost | UnsetType = UNSET
    limit: LimitValue | UnsetType = UNSET
    duration: Annotated[int, Meta(ge=1000, le=2_592_000_000)] | UnsetType = UNSET


class VerifyKeyRequest(msgspec.Struct, **REQUEST):
    key: KeyString
    tags: Annotated[list[Annotated[str, Meta(min_length=1, max_length=512)]], Meta(max_length=20)] | UnsetType = UNSET
    permissions: Annotated[str, Meta(min_length=1, max_length=1000)] | UnsetType = UNSET
    credits: VerifyCredits | UnsetType = UNSET
    ratelimits: Annotated[list[VerifyRatelimit], Meta(max_length=50)] | UnsetType = UNSET
    migration_id: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    keyspaces: Annotated[list[Id], Meta(max_length=100)] | UnsetType = UNSET


class VerifyKeyRatelimitData(msgspec.Struct, rename="camel", kw_only=True):
    exceeded: bool
    id: str
    name: str
    limit: int
    duration: int
    reset: int
    remaining: int
    auto_apply: bool


class VerifyKeyData(msgspec.Struct, **RESPONSE):
    valid: bool
    code: str
    key_id: str | UnsetType = UNSET
    keyspace_id: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    meta: dict[str, Any] | UnsetType = UNSET
    expires: int | UnsetType = UNSET
    credits: int | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    permissions: list[str] | UnsetType = UNSET
    roles: list[str] | UnsetType = UNSET
    identity: IdentityResponse | UnsetType = UNSET
    ratelimits: list[VerifyKeyRatelimitData] | UnsetType = UNSET


_NOT_FOUND = VerifyKeyData(valid=False, code="NOT_FOUND")
_NOWHERE: frozenset[str] = frozenset()


@route("/v2/keys.verifyKey", VerifyKeyRequest, VerifyKeyData)
async def verify_key(ctx: Any, body: VerifyKeyRequest) -> VerifyKeyData:
    """Verify a key: 200 with `valid` and `code` for every outcome."""
    scope = verify_scope(ctx.root)
    if scope == _NOWHERE:  # a root key that may verify nothing learns nothing
        return _NOT_FOUND
    ratelimits = None
    if body.ratelimits:
        ratelimits = [
            (rl.name, None if rl.cost is UNSET else rl.cost, None if rl.limit is UNSET else rl.limit,
             None if rl.duration is UNSET else rl.duration)
            for rl in body.ratelimits
        ]
    result = await ctx.node.batcher.verify((
        body.key,
        None if body.permissions is UNSET else body.permissions,
        -1 if body.credits is UNSET else body.credits.cost,
        ratelimits,
        scope,
        None if body.keyspaces is UNSET else frozenset(body.keyspaces),
    ), ctx.request_id, [] if body.tags is UNSET else body.tags)
    return verify_answer(result)


def verify_answer(result: VerifyResult) -> VerifyKeyData:
    view = result.key
    if view is None:
        return _NOT_FOUND
    record = view.record
    key = record.key
    limits = UNSET
    if result.ratelimits:
        limits = [
            VerifyKeyRatelimitData(exceeded=o.exceeded, id=o.id or "", name=o.name, limit=o.limit,
                                   duration=o.duration, reset=o.reset, remaining=o.remaining, auto_apply=o.auto_apply)
            for o in result.ratelimits
        ]
    return VerifyKeyData(
        valid=result.valid,
        code=result.code,
        key_id=key.id,
        keyspace_id=key.keyspace_id,
        name=unset_if_none(key.name),
        meta=unset_if_none(key.meta),
        expires=unset_if_none(key.expires),
        credits=unset_if_none(result.credits),
        enabled=key.enabled,
        permissions=record.permission_slugs or UNSET,
        roles=record.role_names or UNSET,
        identity=identity_answer(record.identity),
        ratelimits=limits,
    )


def identity_answer(identity: r.Identity | None) -> Any:
    if identity is None:
        return UNSET
    return IdentityResponse(
        id=identity.id,
        external_id=identity.external_id,
        meta=unset_if_none(identity.meta),
        ratelimits=[ratelimit_answer(rl) for rl in identity.ratelimits] or UNSET,
    )


def ratelimit_answer(rl: r.RatelimitConfig) -> RatelimitResponse:
    return RatelimitResponse(id=rl.id, name=rl.name, limit=rl.limit, duration=rl.duration, auto_apply=rl.auto_apply)


# -- createKey ---------------------------------------------------------------------------------


class CreateKeyRequest(msgspec.Struct, **REQUEST):
    api_id: ApiId
    prefix: Annotated[str, Meta(min_length=1, max_length=16, pattern=r"^[a-zA-Z0-9_]+" + END_OF_STRING)] | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    byte_length: Annotated[int, Meta(ge=16, le=255)] | UnsetType = UNSET
    external_id: ExternalId | UnsetType = UNSET
    meta: MetaObject | UnsetType = UNSET
    roles: Annotated[list[RoleName], Meta(max_length=100)] | UnsetType = UNSET
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)] | UnsetType = UNSET
    expires: Expires | UnsetType = UNSET
    credits: KeyCreditsRequest | UnsetType = UNSET
    ratelimits: Annotated[list[RatelimitRequest], Meta(max_length=50)] | UnsetType = UNSET
    enabled: bool = True
    recoverable: bool = False


class CreateKeyData(msgspec.Struct, rename="camel"):
    key_id: str
    key: str


def credits_spec(credits: KeyCreditsRequest | UnsetType) -> CreditsSpec | None:
    if credits is UNSET:
        return None
    refill = credits.refill
    if refill is UNSET or refill is None:
        return CreditsSpec(remaining=credits.remaining)
    return CreditsSpec(
        remaining=credits.remaining, refill_interval=refill.interval, refill_amount=refill.amount,
        refill_day=None if refill.refill_day is UNSET else refill.refill_day,
    )


def ratelimit_specs(items: Any) -> list[RatelimitSpec]:
    if items is UNSET or items is None:
        return []
    return [RatelimitSpec(rl.name, rl.limit, rl.duration, rl.auto_apply) for rl in items]


def value(field: Any, default: Any = None) -> Any:
    return default if field is UNSET else field


@route("/v2/keys.createKey", CreateKeyRequest, CreateKeyData, blocking=True)
def create_key(ctx: Any, body: CreateKeyRequest) -> CreateKeyData:
    """Create a key; the only time its plaintext is returned."""
    require(ctx.root, "api", "create_key", body.api_id)
    if body.recoverable:
        raise_precondition("recoverable keys need a vault, which keysvc does not run: keys are stored only as hashes")
    record, plaintext = ctx.node.manage.create_key(KeySpec(
        api_id=body.api_id,
        prefix=value(body.prefix),
        name=value(body.name),
        byte_length=value(body.byte_length),
        external_id=value(body.external_id),
        meta=checked_meta(value(body.meta)),
        roles=value(body.roles, ()),
        permissions=value(body.permissions, ()),
        expires=value(body.expires),
        credits=credits_spec(body.credits),
        ratelimits=ratelimit_specs(body.ratelimits),
        enabled=body.enabled,
    ))
    return CreateKeyData(key_id=record.id, key=plaintext)


def raise_precondition(detail: str) -> None:
    from ..errors import HttpError

    raise HttpError(412, "unkey/application/precondition_failed", detail)


# -- reading keys -------------------------------------------------------------------------------


class GetKeyRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    decrypt: bool = False


class WhoamiRequest(msgspec.Struct, **REQUEST):
    key: KeyString


def describe_key(ctx: Any, key: r.Key) -> KeyResponseData:
    """The key as getKey, whoami and listKeys show it."""
    with ctx.node.store.read() as reader:
        identity = reader.identity(key.identity_id) if key.identity_id else None
        permissions = [p.slug for p in map(reader.permission, key.permission_ids) if p is not None]
        roles = [role.name for role in map(reader.role, key.role_ids) if role is not None]
    return KeyResponseData(
        key_id=key.id,
        start=key.start,
        enabled=key.enabled,
        created_at=key.created_at,
        name=unset_if_none(key.name),
        meta=unset_if_none(key.meta),
        updated_at=unset_if_none(key.updated_at),
        expires=unset_if_none(key.expires),
        permissions=permissions or UNSET,
        roles=roles or UNSET,
        credits=credits_answer(key, ctx.node.manage.credits(key)) if key.has_credits else UNSET,
        identity=identity_answer(identity),
        ratelimits=[ratelimit_answer(rl) for rl in key.ratelimits] or UNSET,
    )


def credits_answer(key: r.Key, remaining: int | None) -> KeyCreditsResponse:
    refill = key.refill
    return KeyCreditsResponse(
        remaining=remaining,
        refill=UNSET if refill is None else RefillResponse(
            interval=refill.interval, amount=refill.amount, refill_day=unset_if_none(refill.refill_day)),
    )


@route("/v2/keys.getKey", GetKeyRequest, KeyResponseData)
def get_key(ctx: Any, body: GetKeyRequest) -> KeyResponseData:
    """Read a key by its id."""
    key = ctx.node.manage.get_key(body.key_id)
    require(ctx.root, "api", "read_key", key.api_id)
    if body.decrypt:
        require(ctx.root, "api", "decrypt_key", key.api_id)
    return describe_key(ctx, key)


@route("/v2/keys.whoami", WhoamiRequest, KeyResponseData)
def whoami(ctx: Any, body: WhoamiRequest) -> KeyResponseData:
    """Read a key by its plaintext (looked up by hash)."""
    view = ctx.node.verifier.lookup(body.key)
    if view is None or not view.api_id:
        raise NotFound("key", "The provided key does not exist.")
    require(ctx.root, "api", "read_key", view.api_id)
    return describe_key(ctx, view.record.key)


# -- updating and deleting keys -------------------------------------------------------------------


class UpdateCreditsData(msgspec.Struct, **REQUEST):
    remaining: Credits | None | UnsetType = UNSET
    refill: Refill | None | UnsetType = UNSET


class UpdateKeyRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    name: Name | None | UnsetType = UNSET
    external_id: ExternalId | None | UnsetType = UNSET
    meta: MetaObject | None | UnsetType = UNSET
    expires: Expires | None | UnsetType = UNSET
    credits: UpdateCreditsData | None | UnsetType = UNSET
    ratelimits: Annotated[list[RatelimitRequest], Meta(max_length=50)] | None | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET
    roles: Annotated[list[RoleName], Meta(max_length=100)] | UnsetType = UNSET
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)] | UnsetType = UNSET


def key_for_update(ctx: Any, key_id: str, action: str = "update_key") -> r.Key:
    key = ctx.node.manage.get_key(key_id)
    require(ctx.root, "api", action, key.api_id)
    return key


@route("/v2/keys.updateKey", UpdateKeyRequest, Empty, blocking=True)
def update_key(ctx: Any, body: UpdateKeyRequest) -> Empty:
    """Update a key: absent fields stay, null clears, a value sets."""
    key_for_update(ctx, body.key_id)
    remaining: Any = UNSET
    refill: Any = UNSET
    if body.credits is None:
        remaining = refill = None
    elif body.credits is not UNSET:
        remaining = body.credits.remaining
        if body.credits.refill is None:
            refill = None
        elif body.credits.refill is not UNSET:
            day = body.credits.refill.refill_day
            refill = make_refill(body.credits.refill.interval, body.credits.refill.amount,
                                 None if day is UNSET else day)
    ctx.node.manage.update_key(
        body.key_id,
        name=body.name,
        external_id=body.external_id,
        meta=checked_meta(body.meta),
        expires=body.expires,
        remaining=remaining,
        refill=refill,
        ratelimits=UNSET if body.ratelimits is UNSET else ratelimit_specs(body.ratelimits),
        enabled=body.enabled,
        roles=body.roles,
        permissions=body.permissions,
    )
    return Empty()


class DeleteKeyRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    permanent: bool = False


@route("/v2/keys.deleteKey", DeleteKeyRequest, Empty, blocking=True)
def delete_key(ctx: Any, body: DeleteKeyRequest) -> Empty:
    """Delete a key: soft by default, permanently when asked."""
    key_for_update(ctx, body.key_id, "delete_key")
    ctx.node.manage.delete_key(body.key_id, body.permanent)
    return Empty()


class RerollKeyRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    expiration: Expires


@route("/v2/keys.rerollKey", RerollKeyRequest, CreateKeyData, blocking=True)
def reroll_key(ctx: Any, body: RerollKeyRequest) -> CreateKeyData:
    """Replace a key with a new one of the same settings; the old one expires after `expiration` ms."""
    old = key_for_update(ctx, body.key_id, "create_key")
    require(ctx.root, "api", "update_key", old.api_id)
    record, plaintext = ctx.node.manage.reroll_key(body.key_id, body.expiration)
    return CreateKeyData(key_id=record.id, key=plaintext)


class UpdateCreditsRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    operation: str
    value: Credits | None | UnsetType = UNSET


@route("/v2/keys.updateCredits", UpdateCreditsRequest, KeyCreditsResponse, blocking=True)
def update_credits(ctx: Any, body: UpdateCreditsRequest) -> KeyCreditsResponse:
    """Set, increment or decrement a key's credits."""
    key_for_update(ctx, body.key_id)
    if body.operation not in ("set", "increment", "decrement"):
        raise BadRequest("operation must be one of set, increment, decrement")
    if body.operation != "set" and body.value in (UNSET, None):
        raise BadRequest(f"{body.operation} needs a value")
    key, remaining = ctx.node.manage.update_credits(body.key_id, body.operation, value(body.value))
    if remaining is None:
        return KeyCreditsResponse(remaining=None)
    answer = credits_answer(key, remaining)
    if key.refill is not None:  # as Unkey reports it: monthly iff a refill day is set
        answer.refill.interval = "monthly" if key.refill.refill_day else "daily"  # type: ignore[union-attr]
    return answer


# -- permissions and roles of a key ----------------------------------------------------------------


class KeyPermissionsRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)]


class KeyRolesRequest(msgspec.Struct, **REQUEST):
    key_id: Id
    roles: Annotated[list[RoleName], Meta(max_length=100)]


class PermissionData(msgspec.Struct, **RESPONSE):
    id: str
    name: str
    slug: str
    description: str | UnsetType = UNSET


class RoleData(msgspec.Struct, **RESPONSE):
    id: str
    name: str
    description: str | UnsetType = UNSET
    permissions: list[PermissionData] | UnsetType = UNSET


def permission_answer(permission: r.Permission) -> PermissionData:
    return PermissionData(id=permission.id, name=permission.name, slug=permission.slug,
                          description=unset_if_none(permission.description))


def key_permissions(ctx: Any, key_id: str) -> list[PermissionData]:
    key = ctx.node.manage.get_key(key_id)
    with ctx.node.store.read() as reader:
        return [permission_answer(p) for p in map(reader.permission, key.permission_ids) if p is not None]


def key_roles(ctx: Any, key_id: str) -> list[RoleData]:
    key = ctx.node.manage.get_key(key_id)
    with ctx.node.store.read() as reader:
        roles = [role for role in map(reader.role, key.role_ids) if role is not None]
        return [
            RoleData(id=role.id, name=role.name, description=unset_if_none(role.description),
                     permissions=[permission_answer(p) for p in map(reader.permission, role.permission_ids)
                                  if p is not None] or UNSET)
            for role in roles
        ]


def _current_slugs(ctx: Any, key: r.Key) -> list[str]:
    with ctx.node.store.read() as reader:
        return [p.slug for p in map(reader.permission, key.permission_ids) if p is not None]


def _current_role_names(ctx: Any, key: r.Key) -> list[str]:
    with ctx.node.store.read() as reader:
        return [role.name for role in map(reader.role, key.role_ids) if role is not None]


def _changed(current: list[str], given: list[str], change: str) -> list[str]:
    """The set after an add, remove or set, in order: what was there first, then what was added."""
    if change == "add":
        return current + [item for item in dict.fromkeys(given) if item not in current]
    if change == "remove":
        removed = set(given)
        return [item for item in current if item not in removed]
    return list(given)


def _change_permissions(ctx: Any, body: KeyPermissionsRequest, change: str) -> list[PermissionData]:
    key = key_for_update(ctx, body.key_id)
    ctx.node.manage.update_key(body.key_id, permissions=_changed(_current_slugs(ctx, key), body.permissions, change))
    return key_permissions(ctx, body.key_id)


def _change_roles(ctx: Any, body: KeyRolesRequest, change: str) -> list[RoleData]:
    key = key_for_update(ctx, body.key_id)
    ctx.node.manage.update_key(body.key_id, roles=_changed(_current_role_names(ctx, key), body.roles, change))
    return key_roles(ctx, body.key_id)


@route("/v2/keys.addPermissions", KeyPermissionsRequest, list[PermissionData], blocking=True)
def add_permissions(ctx: Any, body: KeyPermissionsRequest) -> list[PermissionData]:
    """Add direct permissions to a key (missing ones are created)."""
    return _change_permissions(ctx, body, "add")


@route("/v2/keys.removePermissions", KeyPermissionsRequest, list[PermissionData], blocking=True)
def remove_permissions(ctx: Any, body: KeyPermissionsRequest) -> list[PermissionData]:
    """Remove direct permissions from a key."""
    return _change_permissions(ctx, body, "remove")


@route("/v2/keys.setPermissions", KeyPermissionsRequest, list[PermissionData], blocking=True)
def set_permissions(ctx: Any, body: KeyPermissionsRequest) -> list[PermissionData]:
    """Replace a key's direct permissions."""
    return _change_permissions(ctx, body, "set")


@route("/v2/keys.addRoles", KeyRolesRequest, list[RoleData], blocking=True)
def add_roles(ctx: Any, body: KeyRolesRequest) -> list[RoleData]:
    """Add roles to a key (they must exist)."""
    return _change_roles(ctx, body, "add")


@route("/v2/keys.removeRoles", KeyRolesRequest, list[RoleData], blocking=True)
def remove_roles(ctx: Any, body: KeyRolesRequest) -> list[RoleData]:
    """Remove roles from a key."""
    return _change_roles(ctx, body, "remove")


@route("/v2/keys.setRoles", KeyRolesRequest, list[RoleData], blocking=True)
def set_roles(ctx: Any, body: KeyRolesRequest) -> list[RoleData]:
    """Replace a key's roles."""
    return _change_roles(ctx, body, "set")


# -- migrateKeys ----------------------------------------------------------------------------------


class MigrateKey(msgspec.Struct, **REQUEST):
    hash: Annotated[str, Meta(min_length=1, max_length=255)]
    name: Name | UnsetType = UNSET
    external_id: ExternalId | UnsetType = UNSET
    meta: MetaObject | UnsetType = UNSET
    roles: Annotated[list[RoleName], Meta(max_length=100)] | UnsetType = UNSET
    permissions: Annotated[list[PermissionSlug], Meta(max_length=1000)] | UnsetType = UNSET
    expires: Expires | UnsetType = UNSET
    enabled: bool = True
    credits: KeyCreditsRequest | UnsetType = UNSET
    ratelimits: Annotated[list[RatelimitRequest], Meta(max_length=50)] | UnsetType = UNSET


class MigrateKeysRequest(msgspec.Struct, **REQUEST):
    migration_id: Annotated[str, Meta(min_length=3, max_length=255)]
    api_id: ApiId
    keys: Annotated[list[MigrateKey], Meta(min_length=1, max_length=1000)]


class MigratedKey(msgspec.Struct, rename="camel"):
    hash: str
    key_id: str


class MigrateKeysData(msgspec.Struct, rename="camel"):
    migrated: list[MigratedKey]
    failed: list[str]


@route("/v2/keys.migrateKeys", MigrateKeysRequest, MigrateKeysData, blocking=True)
def migrate_keys(ctx: Any, body: MigrateKeysRequest) -> MigrateKeysData:
    """Import keys by their Unkey hash (SHA-256, base64): they verify with their old plaintext."""
    require(ctx.root, "api", "create_key", body.api_id)
    items = []
    for item in body.keys:
        spec = KeySpec(
            api_id=body.api_id, name=value(item.name), external_id=value(item.external_id),
            meta=checked_meta(value(item.meta), f"body.keys[{len(items)}].meta"), roles=value(item.roles, ()),
            permissions=value(item.permissions, ()),
            expires=value(item.expires), credits=credits_spec(item.credits),
            ratelimits=ratelimit_specs(item.ratelimits), enabled=item.enabled,
        )
        # The plaintext is unknown, and so is its start.
        items.append((item.hash, spec, ""))
    migrated, failed = ctx.node.manage.migrate_keys(body.api_id, items)
    return MigrateKeysData(migrated=[MigratedKey(hash=h, key_id=key.id) for h, key in migrated], failed=failed)

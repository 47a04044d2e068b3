"""identities.*: the end users or organisations keys belong to, and their shared limits."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from keysvc.store import records as r

from ..auth import require
from ..routing import META_ONLY, Page, route
from ..wire import (
    REQUEST,
    RESPONSE,
    Cursor,
    ExternalId,
    MetaObject,
    RatelimitRequest,
    RatelimitResponse,
    checked_meta,
    unset_if_none,
)
from .keys import ratelimit_answer, ratelimit_specs


class CreateIdentityRequest(msgspec.Struct, **REQUEST):
    external_id: ExternalId
    meta: MetaObject | UnsetType = UNSET
    ratelimits: Annotated[list[RatelimitRequest], Meta(max_length=50)] | UnsetType = UNSET


class CreateIdentityData(msgspec.Struct, rename="camel"):
    identity_id: str


class IdentityRef(msgspec.Struct, **REQUEST):
    identity: Annotated[str, Meta(min_length=1, max_length=255)]


class UpdateIdentityRequest(msgspec.Struct, **REQUEST):
    identity: Annotated[str, Meta(min_length=1, max_length=255)]
    meta: MetaObject | UnsetType = UNSET
    ratelimits: Annotated[list[RatelimitRequest], Meta(max_length=50)] | UnsetType = UNSET


class ListIdentitiesRequest(msgspec.Struct, **REQUEST):
    limit: Annotated[int, Meta(ge=1, le=100)] = 100
    cursor: Cursor | UnsetType = UNSET
    search: Annotated[str, Meta(max_length=255)] | UnsetType = UNSET


class IdentityData(msgspec.Struct, **RESPONSE):
    id: str
    external_id: str
    meta: dict[str, Any] | UnsetType = UNSET
    ratelimits: list[RatelimitResponse] = []


def identity_data(identity: r.Identity) -> IdentityData:
    return IdentityData(id=identity.id, external_id=identity.external_id, meta=unset_if_none(identity.meta),
                        ratelimits=[ratelimit_answer(rl) for rl in identity.ratelimits])


@route("/v2/identities.createIdentity", CreateIdentityRequest, CreateIdentityData, blocking=True)
def create_identity(ctx: Any, body: CreateIdentityRequest) -> CreateIdentityData:
    """Create an identity; its rate limits are shared by all its keys."""
    require(ctx.root, "identity", "create_identity")
    identity = ctx.node.manage.create_identity(
        body.external_id, None if body.meta is UNSET else checked_meta(body.meta), ratelimit_specs(body.ratelimits))
    return CreateIdentityData(identity_id=identity.id)


@route("/v2/identities.getIdentity", IdentityRef, IdentityData)
def get_identity(ctx: Any, body: IdentityRef) -> IdentityData:
    """Read an identity by id or external id."""
    require(ctx.root, "identity", "read_identity")
    return identity_data(ctx.node.manage.get_identity(body.identity))


@route("/v2/identities.updateIdentity", UpdateIdentityRequest, IdentityData, blocking=True)
def update_identity(ctx: Any, body: UpdateIdentityRequest) -> IdentityData:
    """Update an identity's meta or rate limits (limits are replaced, kept by name)."""
    require(ctx.root, "identity", "update_identity")
    identity = ctx.node.manage.update_identity(
        body.identity, meta=checked_meta(body.meta),
        ratelimits=UNSET if body.ratelimits is UNSET else ratelimit_specs(body.ratelimits),
    )
    return identity_data(identity)


@route("/v2/identities.deleteIdentity", IdentityRef, None, blocking=True)
def delete_identity(ctx: Any, body: IdentityRef) -> Any:
    """Delete an identity; its keys stay, without it."""
    require(ctx.root, "identity", "delete_identity")
    ctx.node.manage.delete_identity(body.identity)
    return META_ONLY


@route("/v2/identities.listIdentities", ListIdentitiesRequest, list[IdentityData], paginated=True)
def list_identities(ctx: Any, body: ListIdentitiesRequest) -> Page:
    """List identities in id order, optionally filtered by external id."""
    require(ctx.root, "identity", "read_identity")
    identities, cursor = ctx.node.manage.list_identities(
        body.limit, None if body.cursor is UNSET else body.cursor, None if body.search is UNSET else body.search)
    return Page([identity_data(i) for i in identities], cursor, cursor is not None)

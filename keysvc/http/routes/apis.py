"""apis.*: create, read and delete APIs (each with a keyspace), and list their keys."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ..auth import require
from ..routing import Page, route
from ..wire import REQUEST, ApiId, Cursor, Empty, ExternalId, KeyResponseData
from .keys import describe_key


class CreateApiRequest(msgspec.Struct, **REQUEST):
    name: Annotated[str, Meta(min_length=3, max_length=256)]


class CreateApiData(msgspec.Struct, rename="camel"):
    api_id: str


class GetApiRequest(msgspec.Struct, **REQUEST):
    api_id: ApiId


class ApiData(msgspec.Struct):
    id: str
    name: str


class ListKeysRequest(msgspec.Struct, **REQUEST):
    api_id: ApiId
    limit: Annotated[int, Meta(ge=1, le=100)] = 100
    cursor: Cursor | UnsetType = UNSET
    external_id: ExternalId | UnsetType = UNSET
    decrypt: bool = False
    revalidate_keys_cache: bool = False


@route("/v2/apis.createApi", CreateApiRequest, CreateApiData, blocking=True)
def create_api(ctx: Any, body: CreateApiRequest) -> CreateApiData:
    """Create an API, with the keyspace its keys live in."""
    require(ctx.root, "api", "create_api")
    return CreateApiData(api_id=ctx.node.manage.create_api(body.name).id)


@route("/v2/apis.getApi", GetApiRequest, ApiData)
def get_api(ctx: Any, body: GetApiRequest) -> ApiData:
    """Read an API."""
    require(ctx.root, "api", "read_api", body.api_id)
    api = ctx.node.manage.get_api(body.api_id)
    return ApiData(id=api.id, name=api.name)


@route("/v2/apis.deleteApi", GetApiRequest, Empty, blocking=True)
def delete_api(ctx: Any, body: GetApiRequest) -> Empty:
    """Delete an API; its keys no longer verify."""
    require(ctx.root, "api", "delete_api", body.api_id)
    ctx.node.manage.delete_api(body.api_id)
    return Empty()


@route("/v2/apis.listKeys", ListKeysRequest, list[KeyResponseData], paginated=True)
def list_keys(ctx: Any, body: ListKeysRequest) -> Page:
    """List an API's keys in id order, a page at a time."""
    require(ctx.root, "api", "read_key", body.api_id)
    if body.decrypt:
        require(ctx.root, "api", "decrypt_key", body.api_id)
    keys, cursor = ctx.node.manage.list_keys(
        body.api_id, body.limit, None if body.cursor is UNSET else body.cursor,
        None if body.external_id is UNSET else body.external_id,
    )
    return Page([describe_key(ctx, key) for key in keys], cursor, cursor is not None)

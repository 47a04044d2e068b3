"""Wire types shared by several routes, with the contract's limits as msgspec constraints:
the server validates with them and /openapi.json is generated from them, so neither drifts."""
from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

# Request structs refuse unknown fields (Unkey's schemas are additionalProperties: false), so
# a misspelt field is an error rather than silently ignored.
REQUEST = {"rename": "camel", "forbid_unknown_fields": True, "kw_only": True}
RESPONSE = {"rename": "camel", "omit_defaults": True, "kw_only": True}

MAX_INT64 = (1 << 63) - 1
MIN_INT64 = -(1 << 63)

# msgspec checks patterns with Python's re, where `$` also matches before a final newline; in
# JSON Schema's (ECMA-262) it does not. `$(?!\n)` is the end of the string in both.
END_OF_STRING = r"$(?!\n)"
MAX_EXPIRES = 4_102_444_800_000

Id = Annotated[str, Meta(min_length=3, max_length=255)]
ApiId = Annotated[str, Meta(min_length=3, max_length=255, pattern=r"^[a-zA-Z0-9_]+" + END_OF_STRING)]
ExternalId = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[a-zA-Z0-9_.-]+" + END_OF_STRING)]
Name = Annotated[str, Meta(min_length=1, max_length=255)]
KeyString = Annotated[str, Meta(min_length=1, max_length=512)]
PermissionSlug = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_:\-.*]+" + END_OF_STRING)]
RoleName = Annotated[str, Meta(min_length=1, max_length=128)]
Expires = Annotated[int, Meta(ge=0, le=MAX_EXPIRES)]
Credits = Annotated[int, Meta(ge=0, le=MAX_INT64)]
Cost = Annotated[int, Meta(ge=0, le=1_000_000_000_000)]
# Counts the limiter can hold exactly in 64 bits, however many windows add up.
LimitValue = Annotated[int, Meta(ge=0, le=1_000_000_000_000_000)]
Duration = Annotated[int, Meta(ge=1000, le=2_592_000_000)]
MetaObject = Annotated[dict[str, Any], Meta(max_length=100)]
Cursor = Annotated[str, Meta(min_length=1, max_length=1024)]


class RatelimitRequest(msgspec.Struct, **REQUEST):
    name: Annotated[str, Meta(min_length=3, max_length=128)]
    limit: Annotated[int, Meta(ge=1, le=1_000_000_000_000_000)]
    duration: Duration
    auto_apply: bool = False


class RatelimitResponse(msgspec.Struct, rename="camel", kw_only=True):
    # Every field is required by the SDK, `autoApply: false` included: nothing omitted.
    id: str
    name: str
    limit: int
    duration: int
    auto_apply: bool


class Refill(msgspec.Struct, **REQUEST):
    interval: str
    amount: Annotated[int, Meta(ge=1, le=MAX_INT64)]
    refill_day: Annotated[int, Meta(ge=1, le=31)] | UnsetType = UNSET


class KeyCreditsRequest(msgspec.Struct, **REQUEST):
    remaining: Credits | None
    refill: Refill | None | UnsetType = UNSET


class RefillResponse(msgspec.Struct, **RESPONSE):
    interval: str
    amount: int
    refill_day: int | UnsetType = UNSET


class KeyCreditsResponse(msgspec.Struct, rename="camel", kw_only=True):
    # `remaining` is required-but-nullable: always encoded, null for unlimited.
    remaining: int | None
    refill: RefillResponse | UnsetType = UNSET


class IdentityResponse(msgspec.Struct, **RESPONSE):
    id: str
    external_id: str
    meta: dict[str, Any] | UnsetType = UNSET
    ratelimits: list[RatelimitResponse] | UnsetType = UNSET


class KeyResponseData(msgspec.Struct, **RESPONSE):
    key_id: str
    start: str
    enabled: bool
    created_at: int
    name: str | UnsetType = UNSET
    meta: dict[str, Any] | UnsetType = UNSET
    updated_at: int | UnsetType = UNSET
    expires: int | UnsetType = UNSET
    permissions: list[str] | UnsetType = UNSET
    roles: list[str] | UnsetType = UNSET
    credits: KeyCreditsResponse | UnsetType = UNSET
    identity: IdentityResponse | UnsetType = UNSET
    ratelimits: list[RatelimitResponse] | UnsetType = UNSET


class Empty(msgspec.Struct):
    pass


def checked_meta(meta: Any, location: str = "body.meta") -> Any:
    """`meta` may hold any JSON, but it is stored as msgpack and read by 64-bit clients: its
    integers must fit 64 bits. Raises a 400 at `location` otherwise."""
    stack = [meta]
    while stack:
        value = stack.pop()
        if type(value) is int and not MIN_INT64 <= value <= MAX_INT64:
            from .errors import bad_request

            raise bad_request(f"{location} holds an integer outside the 64-bit range: {value}", location)
        if type(value) is dict:
            stack.extend(value.values())
        elif type(value) is list:
            stack.extend(value)
    return meta


def unset_if_none(value: Any) -> Any:
    return UNSET if value is None else value

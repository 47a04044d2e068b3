"""The response envelopes of the contract (section 2): `meta.requestId` on every answer,
`data` on success, `error` (RFC 9457-flavoured, with `errors[]` on 400s) on failure."""
from __future__ import annotations

import os
from typing import Any

import msgspec

from .errors import TITLES, HttpError

# Each random byte maps to one of 62 alphanumerics (256 = 4 * 62 + 8: a slight bias, which an
# id needs no protection from); bytes.translate does it in C.
_ALPHANUMERIC = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TO_ALPHANUMERIC = bytes(_ALPHANUMERIC[i % 62] for i in range(256))
JSON = b"application/json"
PROBLEM_JSON = b"application/problem+json"


class _RandomIds:
    """Request ids from a buffer of OS randomness, refilled every 1,024 ids: one syscall for
    many ids. Emptied in a forked child, which must never reuse its parent's bytes."""

    def __init__(self) -> None:
        self.buffer = b""
        self.offset = 0
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.buffer = b""
        self.offset = 0

    def __call__(self) -> str:
        offset = self.offset
        if offset >= len(self.buffer):
            self.buffer = os.urandom(9 * 1024).translate(_TO_ALPHANUMERIC)
            offset = 0
        self.offset = offset + 9
        return "req_" + self.buffer[offset:offset + 9].decode()


request_id = _RandomIds()
"""`req_` and 9 random alphanumerics, from the OS CSPRNG (they also dedupe analytics rows)."""


class Meta(msgspec.Struct):
    requestId: str


class Pagination(msgspec.Struct, omit_defaults=True):
    hasMore: bool
    cursor: str | msgspec.UnsetType = msgspec.UNSET


class Issue(msgspec.Struct, omit_defaults=True):
    location: str
    message: str
    fix: str | msgspec.UnsetType = msgspec.UNSET


class ErrorBody(msgspec.Struct, omit_defaults=True):
    title: str
    detail: str
    status: int
    type: str
    errors: list[Issue] | msgspec.UnsetType = msgspec.UNSET


class Success(msgspec.Struct):
    meta: Meta
    data: Any


class ListSuccess(msgspec.Struct):
    meta: Meta
    data: Any
    pagination: Pagination


class MetaOnly(msgspec.Struct):
    meta: Meta


class Failure(msgspec.Struct):
    meta: Meta
    error: ErrorBody


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def success(request_id: str, data: Any) -> bytes:
    return encode(Success(Meta(request_id), data))


def list_success(request_id: str, data: Any, cursor: str | None, has_more: bool) -> bytes:
    pagination = Pagination(has_more, cursor if cursor is not None else msgspec.UNSET)
    return encode(ListSuccess(Meta(request_id), data, pagination))


def meta_only(request_id: str) -> bytes:
    return encode(MetaOnly(Meta(request_id)))


def failure(request_id: str, error: HttpError) -> bytes:
    issues: list[Issue] | msgspec.UnsetType = msgspec.UNSET
    if error.status == 400:  # the SDK requires errors[] on every 400, even an empty one
        issues = [Issue(i.location, i.message, i.fix if i.fix is not None else msgspec.UNSET) for i in error.issues]
    body = ErrorBody(
        title=TITLES.get(error.status, "Error"),
        detail=error.detail,
        status=error.status,
        type=f"https://unkey.com/docs/errors/{error.code}",
        errors=issues,
    )
    return encode(Failure(Meta(request_id), body))


def error_content_type(accept: bytes | None) -> bytes:
    """problem+json when the client's Accept asks for it (or for anything), else JSON."""
    if accept and (b"problem+json" in accept or b"application/*" in accept or b"*/*" in accept):
        return PROBLEM_JSON
    return JSON

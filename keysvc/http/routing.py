"""The route table: each route names its request and response types, which the app decodes
and validates with and the OpenAPI document is generated from."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec


class Page:
    """A list answer: the list envelope with `pagination`."""

    __slots__ = ("items", "cursor", "has_more")

    def __init__(self, items: list[Any], cursor: str | None, has_more: bool) -> None:
        self.items = items
        self.cursor = cursor
        self.has_more = has_more


class Raw:
    """An answer sent as it is, outside the envelope (the OpenAPI document)."""

    __slots__ = ("body",)

    def __init__(self, body: bytes) -> None:
        self.body = body


class MetaOnlyAnswer:
    """An answer with `meta` and nothing else (identities.deleteIdentity)."""


META_ONLY = MetaOnlyAnswer()


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    handler: Callable[..., Any]
    request_type: Any  # a msgspec type, or None for routes without a body
    response_type: Any
    decoder: msgspec.json.Decoder | None
    summary: str
    # Writes fsync; they run in a thread so that verifications on the same worker never wait.
    blocking: bool = False
    auth: bool = True
    paginated: bool = False
    awaitable: bool = False  # an `async def` handler


ROUTES: dict[str, Route] = {}


def route(
    path: str,
    request_type: Any,
    response_type: Any,
    *,
    method: str = "POST",
    blocking: bool = False,
    auth: bool = True,
    paginated: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        decoder = msgspec.json.Decoder(request_type) if request_type is not None else None
        summary = (handler.__doc__ or "").strip().splitlines()[0] if handler.__doc__ else path
        ROUTES[path] = Route(path, method, handler, request_type, response_type, decoder, summary, blocking, auth,
                             paginated, inspect.iscoroutinefunction(handler))
        return handler

    return register

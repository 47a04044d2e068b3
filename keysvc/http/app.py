"""The ASGI app: route, read and bound the body, authenticate the root key, decode and
validate, call the handler, and wrap whatever comes back (or goes wrong) in the contract's
envelope. No request, however malformed, gets a 500 or an answer outside the envelope."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgspec

from keysvc._fast import PermissionQuerySyntaxError, RatelimitNotFoundError
from keysvc.config import Config, from_json
from keysvc.errors import KeysvcError
from keysvc.store import StoreError

from . import envelope, routes
from .auth import authenticate
from .errors import HttpError, ValidationIssue, bad_request
from .node import Node
from .routing import META_ONLY, ROUTES, Page, Raw, Route
from .types import Receive, Scope, Send

CONFIG_ENV = "KEYSVC_CONFIG_JSON"
log = logging.getLogger("keysvc.http")

routes.register_all()


class Context:
    """What a handler gets besides its decoded request."""

    __slots__ = ("node", "root", "request_id", "record_analytics")

    def __init__(self, node: Node, root: Any, request_id: str, record_analytics: bool) -> None:
        self.node = node
        self.root = root
        self.request_id = request_id
        # `X-Unkey-Metrics: disabled` asks that the ratelimit API record no event.
        self.record_analytics = record_analytics


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node: Node | None = None
        self.max_body = config.server.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    def open(self) -> Node:
        if self.node is None:
            self.node = Node(self.config)
        return self.node

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.open()
                except StoreError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.node is not None:
                    self.node.close()
                    self.node = None
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = envelope.request_id()
        accept = authorization = content_length = None
        record_analytics = True
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"accept":
                accept = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-unkey-metrics":
                record_analytics = value.strip().lower() != b"disabled"
        status = 200
        content_type = envelope.JSON
        headers: list[tuple[bytes, bytes]] = []
        try:
            route = ROUTES.get(scope["path"])
            if route is None:
                raise HttpError(404, "unkey/data/route_not_found",
                                f"No route {scope['method']} {scope['path']}: see /openapi.json for the API.")
            if scope["method"] != route.method:
                raise HttpError(405, "unkey/application/method_not_allowed",
                                f"{scope['path']} takes {route.method}, not {scope['method']}.",
                                headers=[(b"allow", route.method.encode())])
            body = await self.read_body(receive, content_length) if route.method == "POST" else b""
            payload = await self.dispatch(route, body, request_id, authorization, record_analytics)
        except HttpError as exc:
            status, payload, headers = exc.status, envelope.failure(request_id, exc), exc.headers
            content_type = envelope.error_content_type(accept)
        except Exception:
            log.exception("unexpected error in %s (request %s)", scope.get("path"), request_id)
            status = 500
            payload = envelope.failure(request_id, HttpError(500, "unkey/application/unexpected_error",
                                                             "An unexpected error occurred; it has been logged."))
            content_type = envelope.error_content_type(accept)
        headers.append((b"content-type", content_type))
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_body:
            raise self.too_large()
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise bad_request("The request body could not be read: the connection closed before its end, "
                                  "or its framing (Content-Length or chunked encoding) is broken.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self.too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def too_large(self) -> HttpError:
        return HttpError(413, "unkey/application/request_too_large",
                         f"The request body is larger than {self.max_body} bytes.")

    async def dispatch(self, route: Route, body: bytes, request_id: str, authorization: bytes | None,
                       record_analytics: bool) -> bytes:
        try:
            node = self.open()
            root = authenticate(node, authorization) if route.auth else None
            request = decode(route, body) if route.decoder is not None else None
            context = Context(node, root, request_id, record_analytics)
            if route.blocking:
                answer = await asyncio.get_running_loop().run_in_executor(None, route.handler, context, request)
            else:
                answer = route.handler(context, request)
                if route.awaitable:
                    answer = await answer
        except KeysvcError as exc:
            raise HttpError.from_domain(exc) from None
        except PermissionQuerySyntaxError as exc:
            raise bad_request(f"Syntax error in permission query: {exc}", "body.permissions",
                              code="user/bad_request/permissions_query_syntax_error") from None
        except RatelimitNotFoundError as exc:
            raise HttpError(412, "user/precondition_failed/ratelimit_not_found", str(exc)) from None
        except StoreError as exc:
            log.error("store error in %s (request %s): %s", route.path, request_id, exc)
            raise HttpError(503, "unkey/application/service_unavailable", str(exc)) from None
        if type(answer) is Raw:
            return answer.body
        if type(answer) is Page:
            return envelope.list_success(request_id, answer.items, answer.cursor, answer.has_more)
        if answer is META_ONLY:
            return envelope.meta_only(request_id)
        return envelope.success(request_id, answer)


def decode(route: Route, body: bytes) -> Any:
    try:
        return route.decoder.decode(body)  # type: ignore[union-attr]
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        location = "body" + where.rstrip("`")[1:] if where else "body"
        raise HttpError(400, "unkey/application/invalid_input", f"{message} at {location}",
                        [ValidationIssue(location, message)]) from None
    except msgspec.DecodeError as exc:
        detail = "The request body is empty." if not body else f"The request body is not valid JSON: {exc}"
        raise bad_request(detail) from None
    except UnicodeDecodeError:
        raise bad_request("The request body is not valid UTF-8.") from None
    except RecursionError:
        raise bad_request("The request body nests JSON too deeply.") from None


def create_app() -> App:
    """The factory Granian calls in each worker process."""
    raw = os.environ.get(CONFIG_ENV)
    return App(from_json(raw) if raw else Config())

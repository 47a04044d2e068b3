"""The ASGI app: route, read and bound the body, authenticate the root key, decode and
validate, call the handler, and wrap whatever comes back (or goes wrong) in the contract's
envelope. No request, however malformed, gets a 500 or an answer outside the envelope.

Each request is also counted (keysvc.metrics: its route and status; keys.verifyKey's latency;
ratelimit decisions) and logged with one access line (keysvc.logs.AccessLog) as its answer is
sent: a few writes into the worker's metrics file and a line appended to a buffer."""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from bisect import bisect_left
from time import perf_counter
from typing import Any

import lmdb
import msgspec

from keysvc import logs, metrics
from keysvc._fast import PermissionQuerySyntaxError, RatelimitNotFoundError
from keysvc.config import Config, from_json
from keysvc.errors import KeysvcError
from keysvc.store import StoreError
from keysvc.store.lmdb import translate_lmdb_error

from . import envelope, routes
from .auth import authenticate
from .errors import HttpError, ValidationIssue, bad_request
from .node import Node
from .routing import META_ONLY, ROUTES, Page, Raw, Route
from .types import Receive, Scope, Send

CONFIG_ENV = "KEYSVC_CONFIG_JSON"
CACHE_COUNTS_EVERY = 1.0  # seconds between two copies of the key cache's counts into the metrics file
METRICS_CONTENT_TYPE = metrics.CONTENT_TYPE.encode()
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


class Entry:
    """A path the app answers: its route (None for /metrics and unknown paths), the label it is
    counted and logged under, its first metrics slot, and what else is counted of it."""

    __slots__ = ("route", "label", "http_base", "verify", "observe")

    def __init__(self, route: Route | None, label: str, http_base: int, verify: bool = False,
                 observe: Any = None) -> None:
        self.route = route
        self.label = label
        self.http_base = http_base
        self.verify = verify  # keys.verifyKey: its latency goes into the histogram
        self.observe = observe  # called with the handler's answer (ratelimit decisions)


def _ratelimit_observer(counts: metrics.WorkerMetrics, api: str, attribute: str) -> Any:
    slots = counts.slots
    passed, denied = counts.ratelimit_slot[(api, True)], counts.ratelimit_slot[(api, False)]

    def observe(answer: Any) -> None:
        slots[passed if getattr(answer, attribute) else denied] += 1.0

    return observe


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.node: Node | None = None
        self.max_body = config.server.max_body_bytes
        enabled = config.metrics.enabled
        token = config.metrics.bearer_token if enabled else None
        self.metrics_token = token.encode() if token else None
        self.metrics = metrics.WorkerMetrics(config.storage.data_dir, enabled)
        self.slots = self.metrics.slots
        self.access = logs.AccessLog() if logs.access_enabled(config) else None
        self.observing = enabled or self.access is not None
        base = self.metrics.http_base
        observers = {
            "/v2/ratelimit.limit": _ratelimit_observer(self.metrics, "ratelimit.limit", "success"),
            "/v2/ratelimit.multiLimit": _ratelimit_observer(self.metrics, "ratelimit.multiLimit", "passed"),
        }
        unmatched = base[metrics.UNMATCHED_ROUTE]  # a route the layout does not know: counted there
        self.entries = {
            path: Entry(route, path, base.get(path, unmatched), path == "/v2/keys.verifyKey",
                        observers.get(path) if enabled else None)
            for path, route in ROUTES.items()
        }
        self.scrape_entry = Entry(None, metrics.METRICS_ROUTE, base[metrics.METRICS_ROUTE])
        self.unmatched = Entry(None, metrics.UNMATCHED_ROUTE, base[metrics.UNMATCHED_ROUTE])
        self.status_offsets = self.metrics.status_offsets
        self.verify_buckets = self.metrics.verify_buckets
        self.verify_bucket0 = self.metrics.verify_bucket0
        self.verify_sum = self.metrics.verify_sum
        self.ticker: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    def open(self) -> Node:
        if self.node is None:
            self.node = Node(self.config, self.metrics)
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
                if self.metrics.filed:
                    self.tick()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.ticker is not None:
                    self.ticker.cancel()
                    self.ticker = None
                if self.node is not None:
                    self.metrics.copy_cache_counts(self.node.verifier)
                    self.node.close()
                    self.node = None
                if self.access is not None:
                    self.access.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def tick(self) -> None:
        """Every CACHE_COUNTS_EVERY: the key cache's counts into the metrics file (verify batches
        copy them too; this catches the root-key lookups of the other routes)."""
        if self.node is not None:
            self.metrics.copy_cache_counts(self.node.verifier)
        self.ticker = asyncio.get_running_loop().call_later(CACHE_COUNTS_EVERY, self.tick)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = perf_counter()
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
        body = b""
        entry = self.entries.get(scope["path"])
        try:
            if entry is None:
                if scope["path"] == "/metrics" and self.metrics_token is not None:
                    entry = self.scrape_entry
                    payload = self.scrape(scope["method"], authorization)
                    content_type = METRICS_CONTENT_TYPE
                else:
                    entry = self.unmatched
                    raise HttpError(404, "unkey/data/route_not_found",
                                    f"No route {scope['method']} {scope['path']}: see /openapi.json for the API.")
            else:
                route = entry.route
                if scope["method"] != route.method:
                    raise HttpError(405, "unkey/application/method_not_allowed",
                                    f"{scope['path']} takes {route.method}, not {scope['method']}.",
                                    headers=[(b"allow", route.method.encode())])
                body = await self.read_body(receive, content_length) if route.method == "POST" else b""
                payload = await self.dispatch(entry, body, request_id, authorization, record_analytics)
        except HttpError as exc:
            status, payload, headers = exc.status, envelope.failure(request_id, exc), exc.headers
            content_type = envelope.error_content_type(accept)
        except Exception as exc:
            # The exception's text may hold what the request sent (a key, say): scrubbed of it.
            log.error("unexpected error in %s (request %s)", entry.label if entry else "?", request_id,
                      extra={"exc": logs.describe(exc, logs.taints(body, authorization))})
            status = 500
            payload = envelope.failure(request_id, HttpError(500, "unkey/application/unexpected_error",
                                                             "An unexpected error occurred; it has been logged."))
            content_type = envelope.error_content_type(accept)
        headers.append((b"content-type", content_type))
        headers.append((b"content-length", str(len(payload)).encode()))
        if self.observing:  # before the answer goes: a client that has it finds it counted
            elapsed = perf_counter() - started
            slots = self.slots
            slots[entry.http_base + self.status_offsets[status]] += 1.0
            if entry.verify:
                slots[self.verify_bucket0 + bisect_left(self.verify_buckets, elapsed)] += 1.0
                slots[self.verify_sum] += elapsed
            if self.access is not None:
                self.access.write(request_id, scope["method"], entry.label, status, elapsed)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def scrape(self, method: str, authorization: bytes | None) -> bytes:
        """GET /metrics on the API port, for the bearer of metrics.bearer_token."""
        if method != "GET":
            raise HttpError(405, "unkey/application/method_not_allowed", f"/metrics takes GET, not {method}.",
                            headers=[(b"allow", b"GET")])
        if not authorization:
            raise HttpError(401, "unkey/authentication/missing",
                            "Authorization header is missing: send 'Authorization: Bearer <metrics token>'.")
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise HttpError(401, "unkey/authentication/malformed",
                            "Authorization header is malformed: expected 'Bearer <metrics token>'.")
        if not hmac.compare_digest(token.strip(), self.metrics_token):  # type: ignore[arg-type]
            raise HttpError(403, "unkey/authorization/forbidden", "The provided metrics token is not valid.")
        try:
            node = self.open()
        except StoreError:
            return metrics.render(self.config.storage.data_dir)
        self.metrics.copy_cache_counts(node.verifier)
        return metrics.render_from_node(node)

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

    async def dispatch(self, entry: Entry, body: bytes, request_id: str, authorization: bytes | None,
                       record_analytics: bool) -> bytes:
        route: Route = entry.route  # type: ignore[assignment]
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
        except (StoreError, lmdb.Error) as exc:
            # lmdb.Error: the hot path (keysvc._fast) calls LMDB itself, e.g. a counters map full.
            exc = translate_lmdb_error(exc, self.config.storage.data_dir)
            log.error("store error in %s (request %s): %s", route.path, request_id, exc)
            raise HttpError(503, "unkey/application/service_unavailable", str(exc)) from None
        if entry.observe is not None:
            entry.observe(answer)
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
    config = from_json(raw) if raw else Config()
    logs.setup(config, "worker")
    return App(config)

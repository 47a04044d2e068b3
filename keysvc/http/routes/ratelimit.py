"""ratelimit.*: standalone rate limits by namespace and identifier, with overrides."""
from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from keysvc._fast import NAMESPACE_LIMITS, bucket_key
from keysvc.analytics import events
from keysvc.errors import NotFound
from keysvc.management import now_ms
from keysvc.store import records as r

from ..auth import allows, require
from ..routing import Page, route
from ..wire import REQUEST, Cost, Cursor, Duration, Empty, LimitValue

Text = Annotated[str, Meta(min_length=1, max_length=512)]


class LimitRequest(msgspec.Struct, **REQUEST):
    namespace: Text
    identifier: Text
    limit: Annotated[int, Meta(ge=1, le=1_000_000_000_000_000)]
    duration: Duration
    cost: Cost = 1


class LimitData(msgspec.Struct, rename="camel", omit_defaults=True):
    limit: int
    remaining: int
    reset: int
    success: bool
    override_id: str | UnsetType = UNSET


class MultiLimitCheck(msgspec.Struct, rename="camel", omit_defaults=True):
    namespace: str
    identifier: str
    limit: int
    remaining: int
    reset: int
    passed: bool
    override_id: str | UnsetType = UNSET


class MultiLimitData(msgspec.Struct):
    passed: bool
    limits: list[MultiLimitCheck]


class OverrideRequest(msgspec.Struct, **REQUEST):
    namespace: Text
    identifier: Text
    limit: LimitValue
    duration: Duration


class OverrideRef(msgspec.Struct, **REQUEST):
    namespace: Text
    identifier: Text


class SetOverrideData(msgspec.Struct, rename="camel"):
    override_id: str


class OverrideData(msgspec.Struct, rename="camel"):
    override_id: str
    identifier: str
    limit: int
    duration: int


class ListOverridesRequest(msgspec.Struct, **REQUEST):
    namespace: Text
    cursor: Cursor | UnsetType = UNSET
    limit: Annotated[int, Meta(ge=1, le=100)] = 10


def _namespace(ctx: Any, name: str) -> r.Namespace:
    """The namespace, once the root key may limit in it; a new one is created on first use only
    if the root key may also create namespaces (and limit in any)."""
    namespace = ctx.node.manage.namespace(name)
    if namespace is None:
        if not allows(ctx.root, "ratelimit", "create_namespace"):
            raise NotFound("ratelimit_namespace", f"Namespace '{name}' does not exist.")
        require(ctx.root, "ratelimit", "limit")
        namespace = ctx.node.manage.namespace(name, create=True)
    require(ctx.root, "ratelimit", "limit", namespace.id)
    return ctx.node.manage.live_namespace(namespace.id)


def _checks(ctx: Any, items: list[LimitRequest]) -> tuple[list[Any], list[tuple[r.Namespace, Any]]]:
    checks = []
    resolved = []
    for item in items:
        namespace = _namespace(ctx, item.namespace)
        override = ctx.node.manage.matching_override(namespace.id, item.identifier)
        limit, duration = (override.limit, override.duration) if override else (item.limit, item.duration)
        checks.append((bucket_key(NAMESPACE_LIMITS, namespace.id, item.identifier, duration), limit, duration,
                       item.cost))
        resolved.append((namespace, override))
    return checks, resolved


def _record(ctx: Any, items: list[LimitRequest], checks: list[Any], resolved: list[Any], outcomes: list[Any],
            now: int, started: float) -> None:
    if ctx.node.spool is None or not ctx.record_analytics:
        return
    latency = (time.perf_counter() - started) * 1000
    ctx.node.spool.append([
        events.encode(events.RatelimitEvent(
            ctx.request_id, now, namespace.id, item.identifier, o.passed, latency, override.id if override else "",
            o.limit, o.remaining, o.reset, check[3],
        ))
        for item, check, (namespace, override), o in zip(items, checks, resolved, outcomes)
    ])


@route("/v2/ratelimit.limit", LimitRequest, LimitData)
def limit(ctx: Any, body: LimitRequest) -> LimitData:
    """Count one request of an identifier against a limit (sliding window)."""
    started = time.perf_counter()
    checks, resolved = _checks(ctx, [body])
    now = now_ms()
    _, outcomes = ctx.node.verifier.limit(checks, now)
    _record(ctx, [body], checks, resolved, outcomes, now, started)
    outcome = outcomes[0]
    override = resolved[0][1]
    return LimitData(limit=outcome.limit, remaining=outcome.remaining, reset=outcome.reset, success=outcome.passed,
                     override_id=override.id if override else UNSET)


@route("/v2/ratelimit.multiLimit", Annotated[list[LimitRequest], Meta(min_length=1, max_length=100)], MultiLimitData)
def multi_limit(ctx: Any, body: list[LimitRequest]) -> MultiLimitData:
    """Several limits at once, all or nothing: counted only if every one passes."""
    started = time.perf_counter()
    checks, resolved = _checks(ctx, body)
    now = now_ms()
    passed, outcomes = ctx.node.verifier.limit(checks, now)
    _record(ctx, body, checks, resolved, outcomes, now, started)
    return MultiLimitData(passed=passed, limits=[
        MultiLimitCheck(namespace=item.namespace, identifier=item.identifier, limit=o.limit, remaining=o.remaining,
                        reset=o.reset, passed=o.passed, override_id=override.id if override else UNSET)
        for item, o, (_, override) in zip(body, outcomes, resolved)
    ])


def override_data(override: r.Override) -> OverrideData:
    return OverrideData(override_id=override.id, identifier=override.identifier, limit=override.limit,
                        duration=override.duration)


@route("/v2/ratelimit.setOverride", OverrideRequest, SetOverrideData, blocking=True)
def set_override(ctx: Any, body: OverrideRequest) -> SetOverrideData:
    """Set a different limit for an identifier or a glob of them (`*`); a limit of 0 denies all."""
    namespace = ctx.node.manage.live_namespace(body.namespace)
    require(ctx.root, "ratelimit", "set_override", namespace.id)
    override = ctx.node.manage.set_override(namespace.id, body.identifier, body.limit, body.duration)
    return SetOverrideData(override_id=override.id)


@route("/v2/ratelimit.getOverride", OverrideRef, OverrideData)
def get_override(ctx: Any, body: OverrideRef) -> OverrideData:
    """Read the override set for an identifier (exactly as set, globs included)."""
    namespace = ctx.node.manage.live_namespace(body.namespace)
    require(ctx.root, "ratelimit", "read_override", namespace.id)
    return override_data(ctx.node.manage.get_override(namespace.id, body.identifier))


@route("/v2/ratelimit.deleteOverride", OverrideRef, Empty, blocking=True)
def delete_override(ctx: Any, body: OverrideRef) -> Empty:
    """Delete an override."""
    namespace = ctx.node.manage.live_namespace(body.namespace)
    require(ctx.root, "ratelimit", "delete_override", namespace.id)
    ctx.node.manage.delete_override(namespace.id, body.identifier)
    return Empty()


@route("/v2/ratelimit.listOverrides", ListOverridesRequest, list[OverrideData], paginated=True)
def list_overrides(ctx: Any, body: ListOverridesRequest) -> Page:
    """List a namespace's overrides in identifier order."""
    namespace = ctx.node.manage.live_namespace(body.namespace)
    require(ctx.root, "ratelimit", "read_override", namespace.id)
    items, cursor = ctx.node.manage.list_overrides(namespace.id, body.limit,
                                                   None if body.cursor is UNSET else body.cursor)
    return Page([override_data(o) for o in items], cursor, cursor is not None)

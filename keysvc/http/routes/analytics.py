"""analytics.*: SQL over the verification and ratelimit events, checked and scoped to what the
root key may read (keysvc.analytics.sql), then run on ClickHouse by the analytics client."""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from keysvc.analytics.client import AnalyticsUnavailable, QueryFailed, run_query
from keysvc.analytics.schema import RATELIMIT_ALIASES, SCOPE_COLUMN, VERIFICATION_ALIASES
from keysvc.analytics.sql import QueryNotAllowed, check_query

from ..auth import ALL
from ..errors import HttpError, ValidationIssue
from ..routing import route
from ..wire import REQUEST

VERIFICATION_TABLES: dict[str, str] = {alias: SCOPE_COLUMN[alias] for alias in VERIFICATION_ALIASES}
RATELIMIT_TABLES: dict[str, str] = {alias: SCOPE_COLUMN[alias] for alias in RATELIMIT_ALIASES}
INVALID_QUERY = "user/bad_request/invalid_analytics_query"
UNAVAILABLE = "unkey/application/service_unavailable"


class AnalyticsQuery(msgspec.Struct, **REQUEST):
    query: Annotated[str, Meta(min_length=1, max_length=10_000)]


Rows = list[dict[str, Any]]


@route("/v2/analytics.getVerifications", AnalyticsQuery, Rows)
async def get_verifications(ctx: Any, body: AnalyticsQuery) -> Rows:
    """Run a SELECT over the key verification tables (key_verifications_v1, ..._per_{minute,hour,day,month}_v1)."""
    scope = _read_scope(ctx.root.permissions, "api")
    if scope is not None:
        scope = _keyspaces(ctx, scope)
    return await _run(ctx, body.query, VERIFICATION_TABLES, scope)


@route("/v2/analytics.getRatelimits", AnalyticsQuery, Rows)
async def get_ratelimits(ctx: Any, body: AnalyticsQuery) -> Rows:
    """Run a SELECT over the ratelimit tables (ratelimits_v1, ratelimits_per_{minute,hour,day,month}_v1)."""
    return await _run(ctx, body.query, RATELIMIT_TABLES, _read_scope(ctx.root.permissions, "ratelimit"))


def _read_scope(held: Any, group: str) -> frozenset[str] | None:
    """The resources whose analytics the root key may read: None for all of them; 403 if none."""
    if ALL in held or f"{group}.*.read_analytics" in held:
        return None
    prefix, suffix = f"{group}.", ".read_analytics"
    resources = frozenset(p[len(prefix):-len(suffix)] for p in held
                          if p.startswith(prefix) and p.endswith(suffix) and len(p) > len(prefix) + len(suffix))
    if not resources:
        what = "apiId" if group == "api" else "namespaceId"
        raise HttpError(403, "unkey/authorization/insufficient_permissions",
                        f"Missing permission: the root key needs '{group}.*.read_analytics' or "
                        f"'{group}.<{what}>.read_analytics' for this request.")
    return resources


def _keyspaces(ctx: Any, api_ids: frozenset[str]) -> frozenset[str]:
    """The key spaces of those APIs (deleted ones too: their history stays theirs). An API that
    does not exist adds nothing."""
    with ctx.node.store.read() as reader:
        apis = [reader.api(api_id) for api_id in api_ids]
    return frozenset(api.keyspace_id for api in apis if api is not None)


async def _run(ctx: Any, query: str, tables: Mapping[str, str], scope: frozenset[str] | None) -> Rows:
    loop = asyncio.get_running_loop()
    try:
        # Parsing is pure Python: off the event loop, so that a long query does not hold up
        # the verifications this worker is serving.
        sql = await loop.run_in_executor(None, check_query, query, tables, scope)
    except QueryNotAllowed as exc:
        raise _bad_query(str(exc)) from None
    analytics = ctx.node.config.analytics
    if not analytics.enabled:
        raise HttpError(503, UNAVAILABLE, "Analytics are disabled on this server (analytics.enabled: false), "
                                          "so there is nothing to query.")
    try:
        return await run_query(ctx.node.config.storage.data_dir, sql, analytics.query_timeout)
    except QueryFailed as exc:
        raise _bad_query(f"ClickHouse refused the query: {exc}") from None
    except AnalyticsUnavailable as exc:
        raise HttpError(503, UNAVAILABLE, f"Analytics are unavailable: {exc}") from None


def _bad_query(message: str) -> HttpError:
    return HttpError(400, INVALID_QUERY, message, [ValidationIssue("body.query", message)])

"""The ClickHouse schema: the raw tables the flusher writes, their rollups, and the public aliases
the analytics query API exposes. Created or migrated by `migrate()` when the flusher starts.

    key_verifications_raw_v2, ratelimits_raw_v2       MergeTree, the contract's columns (section 8)
      -> *_per_{minute,hour,day,month}_mv_*            materialized views, each straight from the raw table
      -> *_per_{minute,hour,day,month}_v3 / _v2         AggregatingMergeTree (count and sums; latency
                                                        avg/p75/p99 as t-digest states)
    key_verifications_v1, ..._per_*_v1, ratelimits_v1, ratelimits_per_*_v1
                                                       plain views with finalized values: what queries name

The raw tables keep `non_replicated_deduplication_window`, so that an insert retried with the same
`insert_deduplication_token` (the flusher's spool range) is dropped by ClickHouse, on a plain
MergeTree too; the rollups are fed only by inserts the raw table accepted.

The version reached is recorded in `keysvc_schema_versions`; a later schema change is a new entry
of MIGRATIONS (its statements idempotent: IF NOT EXISTS, or guarded), applied once in order.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("keysvc.analytics")

VERIFICATIONS_TABLE = "key_verifications_raw_v2"
RATELIMITS_TABLE = "ratelimits_raw_v2"
VERSIONS_TABLE = "keysvc_schema_versions"

# Insert order, as in the contract (and unkeyed/unkey's columns_generated.go).
VERIFICATION_COLUMNS = ("request_id", "time", "workspace_id", "key_space_id", "identity_id", "external_id", "key_id",
                        "region", "source", "app_id", "outcome", "tags", "spent_credits", "latency")
RATELIMIT_COLUMNS = ("request_id", "time", "workspace_id", "namespace_id", "identifier", "passed", "latency",
                     "override_id", "limit", "remaining", "reset_at", "tokens")
# Their types, given with each insert so that it needs no round trip to describe the table.
VERIFICATION_TYPES = ("String", "Int64", "String", "String", "String", "String", "String", "LowCardinality(String)",
                      "LowCardinality(String)", "LowCardinality(String)", "LowCardinality(String)", "Array(String)",
                      "Int64", "Float64")
RATELIMIT_TYPES = ("String", "Int64", "String", "String", "String", "Bool", "Float64", "String", "UInt64", "UInt64",
                   "Int64", "UInt64")

GRAINS = ("minute", "hour", "day", "month")
_BUCKET = {  # (column type, expression over the raw table's Int64 unix-ms `time`)
    "minute": ("DateTime", "toStartOfMinute(fromUnixTimestamp64Milli(r.time))"),
    "hour": ("DateTime", "toStartOfHour(fromUnixTimestamp64Milli(r.time))"),
    "day": ("Date", "toDate(fromUnixTimestamp64Milli(r.time))"),
    "month": ("Date", "toStartOfMonth(fromUnixTimestamp64Milli(r.time))"),
}
_TTL = {"minute": "7 DAY", "hour": "90 DAY", "day": "365 DAY", "month": "3650 DAY"}

# The public aliases, and per alias the column a query is scoped by (an API's key space, a
# ratelimit namespace): the query API filters on it.
VERIFICATION_ALIASES = ("key_verifications_v1",) + tuple(f"key_verifications_per_{g}_v1" for g in GRAINS)
RATELIMIT_ALIASES = ("ratelimits_v1",) + tuple(f"ratelimits_per_{g}_v1" for g in GRAINS)
VERIFICATION_SCOPE_COLUMN = "key_space_id"
RATELIMIT_SCOPE_COLUMN = "namespace_id"
SCOPE_COLUMN: dict[str, str] = {
    **{alias: VERIFICATION_SCOPE_COLUMN for alias in VERIFICATION_ALIASES},
    **{alias: RATELIMIT_SCOPE_COLUMN for alias in RATELIMIT_ALIASES},
}

# The columns each alias shows, in order.
_VERIFICATION_RAW_ALIAS_COLUMNS = ("request_id", "time", "workspace_id", "key_space_id", "identity_id", "external_id",
                                   "key_id", "outcome", "tags", "spent_credits", "latency")
_VERIFICATION_ROLLUP_ALIAS_COLUMNS = ("time", "key_space_id", "identity_id", "external_id", "key_id", "outcome",
                                      "tags", "count", "spent_credits", "latency_avg", "latency_p75", "latency_p99")
_RATELIMIT_RAW_ALIAS_COLUMNS = ("request_id", "time", "workspace_id", "namespace_id", "identifier", "passed",
                                "latency", "override_id", "limit", "remaining", "reset_at", "tokens")
_RATELIMIT_ROLLUP_ALIAS_COLUMNS = ("time", "namespace_id", "identifier", "passed", "total", "passed_tokens",
                                   "total_tokens", "latency_avg", "latency_p75", "latency_p99")
ALIAS_COLUMNS: dict[str, tuple[str, ...]] = {
    "key_verifications_v1": _VERIFICATION_RAW_ALIAS_COLUMNS,
    **{f"key_verifications_per_{g}_v1": _VERIFICATION_ROLLUP_ALIAS_COLUMNS for g in GRAINS},
    "ratelimits_v1": _RATELIMIT_RAW_ALIAS_COLUMNS,
    **{f"ratelimits_per_{g}_v1": _RATELIMIT_ROLLUP_ALIAS_COLUMNS for g in GRAINS},
}

DEDUPLICATION_WINDOW = 10_000  # inserts remembered per raw table


def _raw_tables() -> list[str]:
    return [
        f"""
CREATE TABLE IF NOT EXISTS {VERIFICATIONS_TABLE} (
    request_id String CODEC(ZSTD(1)),
    time Int64 CODEC(Delta, ZSTD(1)),
    workspace_id String CODEC(ZSTD(1)),
    key_space_id String CODEC(ZSTD(1)),
    identity_id String CODEC(ZSTD(1)),
    external_id String CODEC(ZSTD(1)),
    key_id String CODEC(ZSTD(1)),
    region LowCardinality(String) CODEC(ZSTD(1)),
    source LowCardinality(String) DEFAULT 'api' CODEC(ZSTD(1)),
    app_id LowCardinality(String) DEFAULT '' CODEC(ZSTD(1)),
    outcome LowCardinality(String) CODEC(ZSTD(1)),
    tags Array(String) DEFAULT [] CODEC(ZSTD(1)),
    spent_credits Int64 CODEC(ZSTD(1)),
    latency Float64 CODEC(ZSTD(1)),
    INDEX idx_request_id (request_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_identity_id (identity_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_external_id (external_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_key_id (key_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_tags (tags) TYPE bloom_filter GRANULARITY 1
) ENGINE = MergeTree
ORDER BY (workspace_id, time, key_space_id, outcome)
TTL toDateTime(fromUnixTimestamp64Milli(time)) + INTERVAL 90 DAY DELETE
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
        f"""
CREATE TABLE IF NOT EXISTS {RATELIMITS_TABLE} (
    request_id String,
    time Int64 CODEC(Delta, LZ4),
    workspace_id String,
    namespace_id String,
    identifier String,
    passed Bool,
    latency Float64,
    override_id String,
    limit UInt64,
    remaining UInt64,
    reset_at Int64 CODEC(Delta, LZ4),
    tokens UInt64,
    INDEX idx_request_id (request_id) TYPE bloom_filter GRANULARITY 1,
    INDEX idx_identifier (identifier) TYPE bloom_filter GRANULARITY 1
) ENGINE = MergeTree
ORDER BY (workspace_id, time, namespace_id)
TTL toDateTime(fromUnixTimestamp64Milli(time)) + INTERVAL 1 MONTH DELETE
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
    ]


def _latency_states(kind: str) -> str:
    if kind == "type":
        return """
    latency_avg AggregateFunction(avg, Float64),
    latency_p75 AggregateFunction(quantilesTDigest(0.75), Float64),
    latency_p99 AggregateFunction(quantilesTDigest(0.99), Float64)"""
    if kind == "state":
        return """
    avgState(r.latency) AS latency_avg,
    quantilesTDigestState(0.75)(r.latency) AS latency_p75,
    quantilesTDigestState(0.99)(r.latency) AS latency_p99"""
    return """
    avgMerge(t.latency_avg) AS latency_avg,
    quantilesTDigestMerge(0.75)(t.latency_p75)[1] AS latency_p75,
    quantilesTDigestMerge(0.99)(t.latency_p99)[1] AS latency_p99"""


def _verification_rollup(grain: str) -> list[str]:
    table, view, alias = (f"key_verifications_per_{grain}_v3", f"key_verifications_per_{grain}_mv_v3",
                          f"key_verifications_per_{grain}_v1")
    time_type, bucket = _BUCKET[grain]
    keys = "workspace_id, key_space_id, identity_id, external_id, key_id, outcome, tags, source, app_id"
    return [
        f"""
CREATE TABLE IF NOT EXISTS {table} (
    time {time_type},
    workspace_id String,
    key_space_id String,
    identity_id String,
    external_id String,
    key_id String,
    outcome LowCardinality(String),
    tags Array(String),
    source LowCardinality(String),
    app_id LowCardinality(String),
    count SimpleAggregateFunction(sum, Int64),
    spent_credits SimpleAggregateFunction(sum, Int64),{_latency_states("type")},
    INDEX idx_identity_id (identity_id) TYPE bloom_filter GRANULARITY 4,
    INDEX idx_key_id (key_id) TYPE bloom_filter GRANULARITY 4,
    INDEX idx_tags (tags) TYPE bloom_filter GRANULARITY 4
) ENGINE = AggregatingMergeTree
ORDER BY (workspace_id, time, key_space_id, identity_id, external_id, key_id, outcome, tags, source, app_id)
TTL time + INTERVAL {_TTL[grain]} DELETE
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
        _verification_feed(grain, view, table, keys, bucket),
        f"""
CREATE VIEW IF NOT EXISTS {alias} AS
SELECT
    time, key_space_id, identity_id, external_id, key_id, outcome, tags,
    sum(t.count) AS count,
    sum(t.spent_credits) AS spent_credits,{_latency_states("merge")}
FROM {table} AS t
GROUP BY time, key_space_id, identity_id, external_id, key_id, outcome, tags""",
    ]


# Each coarser rollup is fed by the one before it, not by the raw rows: an insert of 10,000 rows
# becomes one row per key, outcome and minute in the minute rollup, and only those go further.
_COARSER = {"hour": ("minute", "toStartOfHour(t.time)"), "day": ("hour", "toDate(t.time)"),
            "month": ("day", "toStartOfMonth(t.time)")}


def _verification_feed(grain: str, view: str, table: str, keys: str, bucket: str) -> str:
    if grain not in _COARSER:
        return f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS
SELECT
    {bucket} AS time,
    {keys},
    toInt64(count()) AS count,
    toInt64(sum(r.spent_credits)) AS spent_credits,{_latency_states("state")}
FROM {VERIFICATIONS_TABLE} AS r
GROUP BY time, {keys}"""
    finer, roll = _COARSER[grain]
    return f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS
SELECT
    {roll} AS time,
    {keys},
    toInt64(sum(t.count)) AS count,
    toInt64(sum(t.spent_credits)) AS spent_credits,
    avgMergeState(t.latency_avg) AS latency_avg,
    quantilesTDigestMergeState(0.75)(t.latency_p75) AS latency_p75,
    quantilesTDigestMergeState(0.99)(t.latency_p99) AS latency_p99
FROM key_verifications_per_{finer}_v3 AS t
GROUP BY time, {keys}"""


def _ratelimit_rollup(grain: str) -> list[str]:
    table, view, alias = (f"ratelimits_per_{grain}_v2", f"ratelimits_per_{grain}_mv_v2", f"ratelimits_per_{grain}_v1")
    time_type, bucket = _BUCKET[grain]
    return [
        f"""
CREATE TABLE IF NOT EXISTS {table} (
    time {time_type},
    workspace_id String,
    namespace_id String,
    identifier String,
    passed SimpleAggregateFunction(sum, Int64),
    total SimpleAggregateFunction(sum, Int64),
    passed_tokens SimpleAggregateFunction(sum, Int64),
    total_tokens SimpleAggregateFunction(sum, Int64),{_latency_states("type")},
    INDEX idx_identifier (identifier) TYPE bloom_filter GRANULARITY 1
) ENGINE = AggregatingMergeTree
ORDER BY (workspace_id, namespace_id, time, identifier)
TTL time + INTERVAL {_TTL[grain]} DELETE
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
        f"""
CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {table} AS
SELECT
    {bucket} AS time,
    workspace_id, namespace_id, identifier,
    toInt64(countIf(r.passed)) AS passed,
    toInt64(count()) AS total,
    toInt64(sumIf(r.tokens, r.passed)) AS passed_tokens,
    toInt64(sum(r.tokens)) AS total_tokens,{_latency_states("state")}
FROM {RATELIMITS_TABLE} AS r
GROUP BY time, workspace_id, namespace_id, identifier""",
        f"""
CREATE VIEW IF NOT EXISTS {alias} AS
SELECT
    time, namespace_id, identifier,
    sum(t.passed) AS passed,
    sum(t.total) AS total,
    sum(t.passed_tokens) AS passed_tokens,
    sum(t.total_tokens) AS total_tokens,{_latency_states("merge")}
FROM {table} AS t
GROUP BY time, namespace_id, identifier""",
    ]


def _raw_aliases() -> list[str]:
    return [
        f"CREATE VIEW IF NOT EXISTS key_verifications_v1 AS SELECT {', '.join(_VERIFICATION_RAW_ALIAS_COLUMNS)} "
        f"FROM {VERIFICATIONS_TABLE}",
        f"CREATE VIEW IF NOT EXISTS ratelimits_v1 AS SELECT {', '.join(_RATELIMIT_RAW_ALIAS_COLUMNS)} "
        f"FROM {RATELIMITS_TABLE}",
    ]


def _version_1() -> list[str]:
    statements = _raw_tables()
    for grain in GRAINS:
        statements += _verification_rollup(grain)
        statements += _ratelimit_rollup(grain)
    return statements + _raw_aliases()


# (version, statements): append only. Each statement must be safe to run again (a start-up that
# died half-way through a migration runs it again).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, _version_1()),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(client: Any) -> int:
    client.command(f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (version UInt32, applied_at DateTime64(3) "
                   f"DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version")
    return int(client.query(f"SELECT max(version) FROM {VERSIONS_TABLE}").result_rows[0][0] or 0)


def migrate(client: Any) -> int:
    """Bring the schema up to SCHEMA_VERSION; returns the version found before."""
    found = current_version(client)
    for version, statements in MIGRATIONS:
        if version <= found:
            continue
        for statement in statements:
            client.command(statement)
        client.command(f"INSERT INTO {VERSIONS_TABLE} (version) VALUES ({int(version)})")
        log.info("analytics schema migrated to version %d", version)
    if found > SCHEMA_VERSION:
        log.warning("the analytics schema is at version %d, newer than this keysvc's %d", found, SCHEMA_VERSION)
    return found

"""The ClickHouse schema: the raw tables the flusher writes, their rollups, and the public aliases
the analytics query API exposes. Created or migrated by `migrate()` when the flusher starts.

    key_verifications_raw_v2, ratelimits_raw_v2       MergeTree, the contract's columns (section 8)
      -> (embedded chDB: the flusher's rollups, keysvc.analytics.rollups: the raw rows of the insert blocks
          not rolled up yet, every rollup_interval and whenever the spool is empty; progress in
          keysvc_rollup_progress. A ClickHouse server: one materialized view per raw table)
      -> key_verifications_rollups_v1, ratelimits_rollups_v1
                                                       AggregatingMergeTree holding the minute, hour, day
                                                       and month grains (count and sums; latency avg and
                                                       one t-digest state for p75 and p99)
    key_verifications_v1, ..._per_*_v1, ratelimits_v1, ratelimits_per_*_v1
                                                       plain views with finalized values: what queries name

The flusher inserts the spooled events as they are (ClickHouse's MsgPack format, see events.py);
the columns the events do not carry (workspace_id, region, source, app_id) take their defaults.

The raw tables keep `non_replicated_deduplication_window`, so that an insert retried with the same
`insert_deduplication_token` (the flusher's spool range) is dropped by ClickHouse, on a plain
MergeTree too; the rollup tables too, for a rollup retried over the same range of insert blocks.
Until version 3 a materialized view per raw table built the rollups inside every insert; on a
ClickHouse server it still does (version 3 changes nothing there).

The version reached is recorded in `keysvc_schema_versions`; a later schema change is a new entry
of MIGRATIONS (its statements idempotent: IF NOT EXISTS, or guarded), applied once in order.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger("keysvc.analytics")

VERIFICATIONS_TABLE = "key_verifications_raw_v2"
RATELIMITS_TABLE = "ratelimits_raw_v2"
VERSIONS_TABLE = "keysvc_schema_versions"

# The raw tables' columns the events do not carry take these defaults: one workspace per node.
WORKSPACE = "ws_local"
REGION = "local"

# Insert order, as in the contract (and unkeyed/unkey's columns_generated.go).
VERIFICATION_COLUMNS = ("request_id", "time", "workspace_id", "key_space_id", "identity_id", "external_id", "key_id",
                        "region", "source", "app_id", "outcome", "tags", "spent_credits", "latency")
RATELIMIT_COLUMNS = ("request_id", "time", "workspace_id", "namespace_id", "identifier", "passed", "latency",
                     "override_id", "limit", "remaining", "reset_at", "tokens")
VERIFICATION_TYPES = ("String", "Int64", "String", "String", "String", "String", "String", "LowCardinality(String)",
                      "LowCardinality(String)", "LowCardinality(String)", "LowCardinality(String)", "Array(String)",
                      "Int64", "Float64")
RATELIMIT_TYPES = ("String", "Int64", "String", "String", "String", "Bool", "Float64", "String", "UInt64", "UInt64",
                   "Int64", "UInt64")
_TYPES = {VERIFICATIONS_TABLE: dict(zip(VERIFICATION_COLUMNS, VERIFICATION_TYPES)),
          RATELIMITS_TABLE: dict(zip(RATELIMIT_COLUMNS, RATELIMIT_TYPES))}


def types_of(table: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The ClickHouse types of some columns of a raw table, given with an insert so that it needs no
    round trip to describe the table."""
    return tuple(_TYPES[table][column] for column in columns)


GRAINS = ("minute", "hour", "day", "month")
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
    workspace_id String DEFAULT '{WORKSPACE}' CODEC(ZSTD(1)),
    key_space_id String CODEC(ZSTD(1)),
    identity_id String CODEC(ZSTD(1)),
    external_id String CODEC(ZSTD(1)),
    key_id String CODEC(ZSTD(1)),
    region LowCardinality(String) DEFAULT '{REGION}' CODEC(ZSTD(1)),
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
    workspace_id String DEFAULT '{WORKSPACE}',
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


# The rollups: one AggregatingMergeTree per event kind holds all four grains, so that a rollup
# writes one part, not four: a part costs ClickHouse milliseconds whatever its size, and then merges.
# The rollup's query first aggregates the raw rows to minutes, then fans the minutes out to their
# hour, day and month, so that the coarser grains cost one row per minute group, not one per event.
GRAIN_CODES = {"minute": 1, "hour": 2, "day": 3, "month": 4}
_GRAIN_TYPE = "Enum8(" + ", ".join(f"'{grain}' = {code}" for grain, code in GRAIN_CODES.items()) + ")"
_FAN_OUT = """ARRAY JOIN [(1, m.minute), (2, toStartOfHour(m.minute)), (3, toStartOfDay(m.minute)),
            (4, toDateTime(toStartOfMonth(m.minute), 'UTC'))] AS g"""
_GRAIN_TTL = ",\n    ".join(f"time + INTERVAL {_TTL[grain]} DELETE WHERE grain = '{grain}'" for grain in GRAINS)
# The alias's `time`: minutes and hours as DateTime, days and months as Date.
_ALIAS_TIME = {"minute": "t.time", "hour": "t.time", "day": "toDate(t.time, 'UTC')",
               "month": "toDate(t.time, 'UTC')"}
_MINUTE = "toStartOfMinute(fromUnixTimestamp64Milli(r.time, 'UTC'))"
# One t-digest state answers both quantiles: half the work of one state per quantile.
_QUANTILES = "quantilesTDigest(0.75, 0.99)"
_QUANTILES_STATE = "quantilesTDigestState(0.75, 0.99)"
_QUANTILES_MERGE_STATE = "quantilesTDigestMergeState(0.75, 0.99)"
_QUANTILES_MERGE = "quantilesTDigestMerge(0.75, 0.99)"

VERIFICATION_ROLLUPS = "key_verifications_rollups_v1"
RATELIMIT_ROLLUPS = "ratelimits_rollups_v1"
_VERIFICATION_KEYS = "workspace_id, key_space_id, identity_id, external_id, key_id, outcome, tags, source, app_id"
_RATELIMIT_KEYS = "workspace_id, namespace_id, identifier"
_VERIFICATION_SUMS = [("count", "count()"), ("spent_credits", "sum(r.spent_credits)")]
_RATELIMIT_SUMS = [("passed", "countIf(r.passed)"), ("total", "count()"),
                   ("passed_tokens", "sumIf(r.tokens, r.passed)"), ("total_tokens", "sum(r.tokens)")]


def _verification_rollups() -> list[str]:
    keys = _VERIFICATION_KEYS
    statements = [
        f"""
CREATE TABLE IF NOT EXISTS {VERIFICATION_ROLLUPS} (
    grain {_GRAIN_TYPE},
    time DateTime('UTC'),
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
    spent_credits SimpleAggregateFunction(sum, Int64),
    latency_avg AggregateFunction(avg, Float64),
    latency_quantiles AggregateFunction({_QUANTILES}, Float64),
    INDEX idx_identity_id (identity_id) TYPE bloom_filter GRANULARITY 4,
    INDEX idx_key_id (key_id) TYPE bloom_filter GRANULARITY 4,
    INDEX idx_tags (tags) TYPE bloom_filter GRANULARITY 4
) ENGINE = AggregatingMergeTree
ORDER BY (grain, workspace_id, time, key_space_id, identity_id, external_id, key_id, outcome, tags, source, app_id)
TTL {_GRAIN_TTL}
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
        _rollup_feed(VERIFICATION_ROLLUPS, VERIFICATIONS_TABLE, keys, _VERIFICATION_SUMS),
    ]
    return statements + _rollup_aliases("key_verifications", VERIFICATION_ROLLUPS,
                                        "key_space_id, identity_id, external_id, key_id, outcome, tags",
                                        ["count", "spent_credits"])


def _ratelimit_rollups() -> list[str]:
    keys = _RATELIMIT_KEYS
    statements = [
        f"""
CREATE TABLE IF NOT EXISTS {RATELIMIT_ROLLUPS} (
    grain {_GRAIN_TYPE},
    time DateTime('UTC'),
    workspace_id String,
    namespace_id String,
    identifier String,
    passed SimpleAggregateFunction(sum, Int64),
    total SimpleAggregateFunction(sum, Int64),
    passed_tokens SimpleAggregateFunction(sum, Int64),
    total_tokens SimpleAggregateFunction(sum, Int64),
    latency_avg AggregateFunction(avg, Float64),
    latency_quantiles AggregateFunction({_QUANTILES}, Float64),
    INDEX idx_identifier (identifier) TYPE bloom_filter GRANULARITY 1
) ENGINE = AggregatingMergeTree
ORDER BY (grain, workspace_id, namespace_id, time, identifier)
TTL {_GRAIN_TTL}
SETTINGS non_replicated_deduplication_window = {DEDUPLICATION_WINDOW}""",
        _rollup_feed(RATELIMIT_ROLLUPS, RATELIMITS_TABLE, keys, _RATELIMIT_SUMS),
    ]
    return statements + _rollup_aliases("ratelimits", RATELIMIT_ROLLUPS, "namespace_id, identifier",
                                        ["passed", "total", "passed_tokens", "total_tokens"])


def _rollup_feed(rollups: str, raw: str, keys: str, sums: list[tuple[str, str]]) -> str:
    """Version 1's materialized view from a raw table into its rollups (dropped by version 3)."""
    return f"CREATE MATERIALIZED VIEW IF NOT EXISTS {rollups}_mv TO {rollups} AS" + rollup_select(raw, keys, sums, "")


def rollup_select(raw: str, keys: str, sums: list[tuple[str, str]], where: str) -> str:
    """The rollups of the raw rows `r` that `where` selects: `sums` are (column, aggregate over the
    raw rows), summed again from minutes to every grain; the latency states beside them."""
    inner = "".join(f"\n        {expression} AS {name}," for name, expression in sums)
    outer = "".join(f"\n    toInt64(sum(m.{name})) AS {name}," for name, _ in sums)
    return f"""
SELECT
    g.1 AS grain, g.2 AS time, {keys},{outer}
    avgMergeState(m.latency_avg) AS latency_avg,
    {_QUANTILES_MERGE_STATE}(m.latency_quantiles) AS latency_quantiles
FROM (
    SELECT
        {_MINUTE} AS minute, {keys},{inner}
        avgState(r.latency) AS latency_avg,
        {_QUANTILES_STATE}(r.latency) AS latency_quantiles
    FROM {raw} AS r{where}
    GROUP BY minute, {keys}
) AS m
{_FAN_OUT}
GROUP BY grain, time, {keys}"""


def _rollup_aliases(prefix: str, rollups: str, columns: str, sums: list[str]) -> list[str]:
    """`<prefix>_per_<grain>_v1` for each grain: that grain's rows, finalized."""
    totals = "".join(f"\n    sum(t.{name}) AS {name}," for name in sums)
    return [f"""
CREATE VIEW IF NOT EXISTS {prefix}_per_{grain}_v1 AS
SELECT
    {_ALIAS_TIME[grain]} AS time, {columns},{totals}
    avgMerge(t.latency_avg) AS latency_avg,
    {_QUANTILES_MERGE}(t.latency_quantiles)[1] AS latency_p75,
    {_QUANTILES_MERGE}(t.latency_quantiles)[2] AS latency_p99
FROM {rollups} AS t
WHERE t.grain = '{grain}'
GROUP BY time, {columns}""" for grain in GRAINS]


def _raw_aliases() -> list[str]:
    return [
        f"CREATE VIEW IF NOT EXISTS key_verifications_v1 AS SELECT {', '.join(_VERIFICATION_RAW_ALIAS_COLUMNS)} "
        f"FROM {VERIFICATIONS_TABLE}",
        f"CREATE VIEW IF NOT EXISTS ratelimits_v1 AS SELECT {', '.join(_RATELIMIT_RAW_ALIAS_COLUMNS)} "
        f"FROM {RATELIMITS_TABLE}",
    ]


def _version_1() -> list[str]:
    return _raw_tables() + _verification_rollups() + _ratelimit_rollups() + _raw_aliases()


MERGE_SELECTOR_BASE = 10
MERGE_TREE_TABLES = (VERIFICATIONS_TABLE, RATELIMITS_TABLE, VERIFICATION_ROLLUPS, RATELIMIT_ROLLUPS)


def _merge_less(client: Any) -> list[str]:
    """Version 2: fewer, larger merges. The tables grow by one small part per insert (a batch), and
    ClickHouse's default merge_selector_base (5) rewrote each row about 3.4 times in a loaded
    minute; at 10, half the rows merged and ~10% less of the flusher's CPU (bench/README.md). A
    ClickHouse server that does not know the setting keeps its default."""
    known = client.command("SELECT count() FROM system.merge_tree_settings WHERE name = 'merge_selector_base'")
    if not int(known):
        return []
    return [f"ALTER TABLE {table} MODIFY SETTING merge_selector_base = {MERGE_SELECTOR_BASE}"
            for table in MERGE_TREE_TABLES]


# Version 3, on the embedded chDB: the flusher builds the rollups from ranges of the raw tables'
# inserts (keysvc.analytics.rollups) and the materialized views go. The raw rows keep their insert's
# block number (`_block_number`, persisted through merges), which is what the ranges are of; each
# source's progress starts at the blocks the views have already rolled up. A ClickHouse server keeps
# the views: several nodes' flushers may insert into it, and block ranges would need them to agree;
# the views need no agreement, and their CPU is the server's, not the node's.
ROLLUP_PROGRESS_TABLE = "keysvc_rollup_progress"


class RollupSource(NamedTuple):
    raw: str
    rollups: str
    keys: str
    sums: list[tuple[str, str]]


ROLLUP_SOURCES = (
    RollupSource(VERIFICATIONS_TABLE, VERIFICATION_ROLLUPS, _VERIFICATION_KEYS, _VERIFICATION_SUMS),
    RollupSource(RATELIMITS_TABLE, RATELIMIT_ROLLUPS, _RATELIMIT_KEYS, _RATELIMIT_SUMS),
)


def max_block_sql(raw: str) -> str:
    """The newest insert block of a raw table (0 for none)."""
    return (f"SELECT toUInt64(max(max_block_number)) AS b FROM system.parts WHERE database = currentDatabase() "
            f"AND table = '{raw}' AND active")


def embedded(client: Any) -> bool:
    """Whether this is the node's own chDB (written by its flusher alone), not a ClickHouse server."""
    from clickhouse_connect.driver.httpclient import HttpClient

    return not isinstance(client, HttpClient)


def _periodic_rollups(client: Any) -> list[str]:
    if not embedded(client):
        return []
    statements = [f"ALTER TABLE {source.raw} MODIFY SETTING enable_block_number_column = 1"
                  for source in ROLLUP_SOURCES]
    statements.append(f"""
CREATE TABLE IF NOT EXISTS {ROLLUP_PROGRESS_TABLE} (
    source String,
    done UInt64,
    planned UInt64,
    seq UInt64,
    at DateTime64(6) DEFAULT now64(6)
) ENGINE = ReplacingMergeTree(seq)
ORDER BY source""")
    for source in ROLLUP_SOURCES:
        # Once per source: a migration run again after a crash finds the row and adds none.
        statements.append(
            f"INSERT INTO {ROLLUP_PROGRESS_TABLE} (source, done, planned, seq) "
            f"SELECT '{source.raw}', b, b, 1 FROM ({max_block_sql(source.raw)}) "
            f"WHERE (SELECT count() FROM {ROLLUP_PROGRESS_TABLE} WHERE source = '{source.raw}') = 0")
    statements += [f"DROP VIEW IF EXISTS {source.rollups}_mv" for source in ROLLUP_SOURCES]
    return statements


# (version, statements): append only. Each statement must be safe to run again (a start-up that
# died half-way through a migration runs it again); a callable gives its statements when the
# migration runs, from what the ClickHouse it is given knows.
Statements = list[str] | Callable[[Any], list[str]]
MIGRATIONS: list[tuple[int, Statements]] = [
    (1, _version_1()),
    (2, _merge_less),
    (3, _periodic_rollups),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def statements_of(statements: Statements, client: Any) -> list[str]:
    """A migration's SQL, for this client's ClickHouse (`client.command(sql)` answers a scalar)."""
    return statements(client) if callable(statements) else statements


def current_version(client: Any) -> int:
    """0 for a new database. Reads only: a write on a full disk is for migrate() to avoid."""
    if not int(client.command(f"EXISTS TABLE {VERSIONS_TABLE}")):
        return 0
    return int(client.query(f"SELECT max(version) FROM {VERSIONS_TABLE}").result_rows[0][0] or 0)


def migrate(client: Any, before: Callable[[], None] = lambda: None) -> int:
    """Bring the schema up to SCHEMA_VERSION; returns the version found before. `before` runs
    first when there is something to migrate (and may refuse by raising)."""
    found = current_version(client)
    if found < SCHEMA_VERSION:
        before()
        client.command(f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (version UInt32, applied_at DateTime64(3) "
                       f"DEFAULT now64(3)) ENGINE = ReplacingMergeTree ORDER BY version")
    for version, statements in MIGRATIONS:
        if version <= found:
            continue
        for statement in statements_of(statements, client):
            client.command(statement)
        client.command(f"INSERT INTO {VERSIONS_TABLE} (version) VALUES ({int(version)})")
        log.info("analytics schema migrated to version %d", version)
    if found > SCHEMA_VERSION:
        log.warning("the analytics schema is at version %d, newer than this keysvc's %d", found, SCHEMA_VERSION)
    return found

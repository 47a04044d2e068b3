"""keysvc.analytics.sql: what the analytics query API lets through, and how it scopes a query to a
root key's APIs or namespaces. No server; the scoping is also checked by running the rewritten
SQL on an embedded ClickHouse (chDB) over the real schema, with rows in several key spaces."""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from keysvc.analytics import schema
from keysvc.analytics.sql import QueryNotAllowed, check_query

VERIFICATIONS = {alias: schema.SCOPE_COLUMN[alias] for alias in schema.VERIFICATION_ALIASES}
RATELIMITS = {alias: schema.SCOPE_COLUMN[alias] for alias in schema.RATELIMIT_ALIASES}
BOTH = {**VERIFICATIONS, **RATELIMITS}
SCOPE = frozenset({"ks_a"})


def refused(sql: str, scope: frozenset[str] | None = None, allowed: dict[str, str] = VERIFICATIONS) -> str:
    with pytest.raises(QueryNotAllowed) as caught:
        check_query(sql, allowed, scope)
    return str(caught.value)


def tables_read(sql: str) -> set[str]:
    return {t.name for t in sqlglot.parse_one(sql, read="clickhouse").find_all(exp.Table)}


# -- what is refused, and that the message says what ----------------------------------------------

REFUSED = [
    # other tables, and any database-qualified name
    ("SELECT * FROM system.tables", "Database-qualified table names are not allowed ('system.tables')"),
    ("SELECT name FROM system.users", "'system.users'"),
    ("SELECT * FROM default.key_verifications_v1", "Database-qualified table names are not allowed"),
    ("SELECT * FROM `system`.`tables`", "Database-qualified table names are not allowed"),
    ("SELECT * FROM key_verifications_raw_v2", "Table 'key_verifications_raw_v2' is not allowed"),
    ("SELECT * FROM ratelimits_v1", "Table 'ratelimits_v1' is not allowed"),  # the other endpoint's
    ("SELECT * FROM keysvc_schema_versions", "Table 'keysvc_schema_versions' is not allowed"),
    ("SELECT * FROM KEY_VERIFICATIONS_V1", "Table 'KEY_VERIFICATIONS_V1' is not allowed"),  # names are exact
    ('SELECT * FROM "system.tables"', "Table 'system.tables' is not allowed"),
    ("SELECT * FROM key_verifications_v1 WHERE key_id IN (SELECT name FROM system.tables)",
     "'system.tables'"),
    ("SELECT (SELECT count() FROM system.processes)", "'system.processes'"),
    ("SELECT * FROM key_verifications_v1 AS k JOIN system.one AS o ON 1 = 1", "'system.one'"),
    ("SELECT * FROM key_verifications_v1, key_verifications_raw_v2", "'key_verifications_raw_v2'"),
    ("SELECT system.one.dummy", "Database-qualified names are not allowed ('system.one.dummy')"),
    # table functions
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "Table functions are not allowed (file())"),
    ("SELECT * FROM url('http://example.com/x.csv', CSV)", "Table functions are not allowed (url())"),
    ("SELECT * FROM remote('127.0.0.1', system.tables)", "Table functions are not allowed (remote())"),
    ("SELECT * FROM s3('https://bucket/x.csv')", "Table functions are not allowed (s3())"),
    ("SELECT * FROM numbers(10)", "Table functions are not allowed (numbers())"),
    ("SELECT * FROM merge('system', '.*')", "Table functions are not allowed (merge())"),
    ("SELECT * FROM key_verifications_v1 JOIN file('x') AS f ON 1 = 1", "Table functions are not allowed (file())"),
    ("SELECT * FROM VALUES('a UInt8', 1)", "Reading FROM VALUES is not allowed"),
    # functions that read outside the query's rows
    ("SELECT file('/etc/hostname')", "Function file() is not allowed"),
    ("SELECT FILE('/etc/hostname')", "Function FILE() is not allowed"),
    ("SELECT dictGet('dict', 'attr', 1)", "Function dictGet() is not allowed"),
    ("SELECT joinGet('join_table', 'v', 1)", "Function joinGet() is not allowed"),
    ("SELECT hasColumnInTable('system', 'tables', 'name')", "Function hasColumnInTable() is not allowed"),
    ("SELECT getSetting('max_threads')", "Function getSetting() is not allowed"),
    ("SELECT key_id FROM key_verifications_v1 WHERE notIn(key_id, key_verifications_raw_v2)",
     "Function notIn() is not allowed"),
    ("SELECT sleepEachRow(3) FROM key_verifications_v1", "Function sleepEachRow() is not allowed"),
    # IN <table name>: ClickHouse reads the table
    ("SELECT * FROM key_verifications_v1 WHERE key_id IN key_verifications_raw_v2", "IN with a name on its right"),
    ("SELECT * FROM key_verifications_v1 WHERE key_id IN (key_verifications_raw_v2)", "IN with a name"),
    ("SELECT * FROM key_verifications_v1 WHERE key_id IN ((system.tables))", "IN with a name"),
    ("SELECT * FROM key_verifications_v1 WHERE key_id GLOBAL NOT IN `key_verifications_v1`", "IN with a name"),
    # several statements, and statements other than SELECT
    ("SELECT 1; SELECT 2", "Only one statement is allowed; the query has 2"),
    ("SELECT * FROM key_verifications_v1; DROP TABLE key_verifications_raw_v2", "Only one statement"),
    ("DROP TABLE key_verifications_raw_v2", "Only SELECT queries are allowed, not DROP"),
    ("TRUNCATE TABLE key_verifications_raw_v2", "Only SELECT queries are allowed"),
    ("CREATE TABLE x (a Int8) ENGINE = Memory", "Only SELECT queries are allowed, not CREATE"),
    ("ALTER TABLE key_verifications_raw_v2 DELETE WHERE 1", "Only SELECT queries are allowed"),
    ("INSERT INTO key_verifications_raw_v2 (request_id) VALUES ('x')", "Only SELECT queries are allowed, not INSERT"),
    ("INSERT INTO key_verifications_raw_v2 SELECT * FROM key_verifications_v1", "not INSERT"),
    ("DELETE FROM key_verifications_raw_v2 WHERE 1", "Only SELECT queries are allowed"),
    ("SET max_memory_usage = 1", "Only SELECT queries are allowed, not SET"),
    ("USE system", "Only SELECT queries are allowed, not USE"),
    ("SHOW TABLES", "Only SELECT queries are allowed, not SHOW"),
    ("EXPLAIN SELECT 1", "Only SELECT queries are allowed, not EXPLAIN"),
    ("DESCRIBE key_verifications_v1", "Only SELECT queries are allowed, not DESCRIBE"),
    ("OPTIMIZE TABLE key_verifications_raw_v2", "Only SELECT queries are allowed"),
    ("SYSTEM FLUSH LOGS", "Only SELECT queries are allowed"),
    # clauses
    ("SELECT * FROM key_verifications_v1 SETTINGS max_threads = 64", "SETTINGS clauses are not allowed"),
    ("SELECT * FROM key_verifications_v1 UNION ALL SELECT * FROM key_verifications_v1 SETTINGS readonly = 0",
     "SETTINGS clauses are not allowed"),
    ("SELECT (SELECT 1 SETTINGS max_threads = 64)", "SETTINGS clauses are not allowed"),
    ("SELECT * FROM key_verifications_v1 FORMAT TabSeparated", "FORMAT clauses are not allowed"),
    ("SELECT * FROM key_verifications_v1 INTO OUTFILE '/tmp/x'", "INTO OUTFILE is not allowed"),
    ("SELECT * FROM key_verifications_v1 INTO /* hidden */ OUTFILE '/tmp/x' FORMAT CSV", "INTO OUTFILE"),
    ("SELECT * INTO copy FROM key_verifications_v1", "SELECT ... INTO is not allowed"),
    # CTEs may not take an alias's name, nor recurse
    ("WITH key_verifications_v1 AS (SELECT 1 AS a) SELECT * FROM key_verifications_v1",
     "A WITH clause may not define 'key_verifications_v1'"),
    ("WITH 1 AS key_verifications_v1 SELECT key_verifications_v1", "may not define 'key_verifications_v1'"),
    ("WITH 'ks_b' AS key_space_id SELECT * FROM key_verifications_v1",
     "A WITH clause may not define 'key_space_id': that name is the column queries are scoped by"),
    ("WITH RECURSIVE r AS (SELECT 1) SELECT * FROM r", "WITH RECURSIVE is not allowed"),
    # a CTE's own name, inside its body, is the real table; a later CTE is not yet defined; a CTE
    # from another subquery is out of scope
    ("WITH key_verifications_raw_v2 AS (SELECT * FROM key_verifications_raw_v2) "
     "SELECT * FROM key_verifications_raw_v2", "Table 'key_verifications_raw_v2' is not allowed"),
    ("WITH b AS (SELECT * FROM ratelimits_raw_v2), ratelimits_raw_v2 AS (SELECT 1) SELECT * FROM b",
     "Table 'ratelimits_raw_v2' is not allowed"),
    ("SELECT * FROM (WITH ratelimits_raw_v2 AS (SELECT 1) SELECT * FROM ratelimits_raw_v2) AS a, ratelimits_raw_v2",
     "Table 'ratelimits_raw_v2' is not allowed"),
    # what cannot be parsed: the parser's message, without terminal escapes
    ("SELECT (", "The query could not be parsed"),
    ("SELECT * FROM", "The query could not be parsed"),
    ("SELEC * FROM key_verifications_v1", "The query could not be parsed"),
    ("SELECT 'unterminated", "The query could not be read"),
    ("   ", "The query is empty"),
    ("-- just a comment", "The query is empty"),
    ("SELECT " + "(" * 5000 + "1" + ")" * 5000, "The query"),
]


@pytest.mark.parametrize("sql, message", REFUSED, ids=[sql[:60] for sql, _ in REFUSED])
@pytest.mark.parametrize("scoped", [False, True], ids=["all", "scoped"])
def test_refused(sql: str, message: str, scoped: bool) -> None:
    text = refused(sql, SCOPE if scoped else None)
    assert message in text
    assert "\x1b" not in text  # sqlglot highlights errors with terminal escapes: not in our answers


def test_refusal_names_the_tables_that_may_be_queried() -> None:
    text = refused("SELECT * FROM key_verifications_raw_v2")
    for alias in VERIFICATIONS:
        assert alias in text
    assert "ratelimits_v1" in refused("SELECT * FROM x", allowed=RATELIMITS)


def test_parse_error_says_where() -> None:
    text = refused("SELECT a FROM key_verifications_v1 WHERE (")
    assert re.search(r"line 1, column \d+", text), text


# -- what is allowed -----------------------------------------------------------------------------

ALLOWED = [
    "SELECT count(*) FROM key_verifications_v1",
    "SELECT outcome, count() AS c FROM key_verifications_v1 GROUP BY outcome ORDER BY c DESC, outcome LIMIT 10",
    "SELECT key_id, countIf(outcome = 'VALID') AS valid, sum(spent_credits) FROM key_verifications_v1 "
    "WHERE time >= 1700000000000 AND time < 4000000000000 AND key_id IN ('key_a1', 'key_b1') "
    "GROUP BY key_id HAVING count() > 0 ORDER BY key_id",
    "SELECT * FROM key_verifications_v1 WHERE external_id = 'O''Brien' OR external_id = 'a\\'b' LIMIT 5 OFFSET 1",
    "SELECT toStartOfHour(fromUnixTimestamp64Milli(time)) AS hour, count() FROM key_verifications_v1 "
    "GROUP BY hour ORDER BY hour",
    "SELECT time, sum(count) AS total FROM key_verifications_per_day_v1 GROUP BY time ORDER BY time",
    "SELECT sum(count) FROM key_verifications_per_minute_v1",
    "SELECT sum(count) FROM key_verifications_per_hour_v1 WHERE outcome != 'VALID'",
    "SELECT sum(count) FROM key_verifications_per_month_v1",
    "SELECT quantile(0.5)(latency), avg(latency), max(latency) FROM key_verifications_v1",
    "SELECT arrayJoin(tags) AS tag, count() FROM key_verifications_v1 GROUP BY tag ORDER BY tag",
    "SELECT tag, count() FROM key_verifications_v1 ARRAY JOIN tags AS tag GROUP BY tag ORDER BY tag",
    "WITH per_key AS (SELECT key_id, count() AS c FROM key_verifications_v1 GROUP BY key_id) "
    "SELECT max(c) FROM per_key",
    "WITH a AS (SELECT key_id FROM key_verifications_v1), b AS (SELECT * FROM a) SELECT count() FROM b",
    "WITH 'VALID' AS wanted SELECT count() FROM key_verifications_v1 WHERE outcome = wanted",
    "WITH a AS (SELECT key_id FROM key_verifications_v1) SELECT * FROM (SELECT * FROM a) AS inner_a ORDER BY key_id",
    "SELECT key_id FROM key_verifications_v1 UNION ALL SELECT key_id FROM key_verifications_per_day_v1 ORDER BY key_id",
    "SELECT count() FROM (SELECT key_id FROM key_verifications_v1 WHERE outcome = 'VALID') AS v",
    "SELECT count() FROM key_verifications_v1 WHERE key_id IN (SELECT key_id FROM key_verifications_per_day_v1)",
    "SELECT k.key_id, d.count FROM key_verifications_v1 AS k JOIN key_verifications_per_day_v1 AS d "
    "ON k.key_id = d.key_id ORDER BY k.key_id",
    "SELECT key_verifications_v1.key_id FROM key_verifications_v1 ORDER BY key_verifications_v1.key_id",
    "SELECT count() FROM `key_verifications_v1`",
    'SELECT count() FROM "key_verifications_v1"',
    "SELECT count() FROM key_verifications_v1 PREWHERE outcome = 'VALID' WHERE key_id != ''",
    "SELECT EXISTS (SELECT 1 FROM key_verifications_v1) AS any_rows",
    "SELECT (SELECT count() FROM key_verifications_v1) AS n",
    "SELECT count() FROM key_verifications_v1 /* a comment */ WHERE 1 = 1 -- another",
    "SELECT key_id FROM key_verifications_v1 ORDER BY time DESC LIMIT 1 BY key_id",
    "SELECT now(), version(), toDate('2024-01-01'), 1 IN (1, 2), 'a' IN tuple('a', 'b')",
]


@pytest.mark.parametrize("sql", ALLOWED, ids=[sql[:60] for sql in ALLOWED])
def test_allowed(sql: str) -> None:
    out = check_query(sql, VERIFICATIONS, None)
    assert tables_read(out) <= set(VERIFICATIONS) | {"per_key", "a", "b"}
    assert check_query(out, VERIFICATIONS, None) == out  # stable: what runs passes the check again


def test_comments_never_reach_clickhouse() -> None:
    out = check_query("SELECT 1 -- */ FROM system.tables\n FROM key_verifications_v1 /* x */", VERIFICATIONS, None)
    assert "--" not in out and "/*" not in out and "system" not in out


def test_ratelimit_tables() -> None:
    out = check_query("SELECT namespace_id, countIf(passed) FROM ratelimits_v1 GROUP BY namespace_id",
                      RATELIMITS, frozenset({"rlns_1"}))
    assert "\"namespace_id\" IN ('rlns_1')" in out
    assert "key_verifications_v1" in refused("SELECT * FROM key_verifications_v1", allowed=RATELIMITS)


# -- the scope rewrite ---------------------------------------------------------------------------


def test_scope_wraps_every_reference() -> None:
    out = check_query("SELECT * FROM key_verifications_v1 JOIN key_verifications_per_day_v1 AS d USING (key_id) "
                      "WHERE key_id IN (SELECT key_id FROM key_verifications_v1)", VERIFICATIONS,
                      frozenset({"ks_b", "ks_a"}))
    scoped = "(SELECT * FROM \"{}\" WHERE \"key_space_id\" IN ('ks_a', 'ks_b'))"
    assert out.count(scoped.format("key_verifications_v1")) == 2
    assert out.count(scoped.format("key_verifications_per_day_v1") + " AS d") == 1
    tree = sqlglot.parse_one(out, read="clickhouse")
    for table in tree.find_all(exp.Table):  # every table read is inside its scope filter
        select = table.find_ancestor(exp.Select)
        assert select.args["where"].sql("clickhouse") == "WHERE \"key_space_id\" IN ('ks_a', 'ks_b')"


def test_empty_scope_matches_nothing() -> None:
    out = check_query("SELECT count() FROM key_verifications_v1", VERIFICATIONS, frozenset())
    assert out == 'SELECT count() FROM (SELECT * FROM "key_verifications_v1" WHERE FALSE) AS "key_verifications_v1"'


def test_scope_values_are_quoted() -> None:
    out = check_query("SELECT 1 FROM key_verifications_v1", VERIFICATIONS, frozenset({"x') OR 1=1 --", "a\\", "b'"}))
    tree = sqlglot.parse_one(out, read="clickhouse")
    values = {lit.this for lit in tree.find(exp.In).expressions}
    assert values == {"x') OR 1=1 --", "a\\", "b'"}
    assert "--" not in out.replace("x'') OR 1=1 --'", "")


def test_scope_keeps_the_alias_and_moves_final_and_prewhere() -> None:
    out = check_query("SELECT k.key_id FROM key_verifications_v1 AS k FINAL PREWHERE k.outcome = 'VALID'",
                      VERIFICATIONS, SCOPE)
    assert out == ("SELECT k.key_id FROM (SELECT * FROM \"key_verifications_v1\" FINAL WHERE \"key_space_id\" "
                   "IN ('ks_a')) AS k WHERE k.outcome = 'VALID'")


def test_prewhere_becomes_where() -> None:
    # The aliases are views, which ClickHouse refuses PREWHERE on; as a filter it is WHERE.
    out = check_query("SELECT 1 FROM key_verifications_v1 PREWHERE outcome = 'VALID' OR 1 WHERE key_id = 'k' OR 1",
                      VERIFICATIONS, None)
    assert out == "SELECT 1 FROM key_verifications_v1 WHERE (key_id = 'k' OR 1) AND (outcome = 'VALID' OR 1)"


ESCAPES = [
    # a subquery, a CTE, a nested CTE: each reference is scoped wherever it is
    "SELECT * FROM (SELECT * FROM key_verifications_v1) AS key_verifications_v1",
    "WITH v AS (SELECT * FROM key_verifications_v1) SELECT * FROM v",
    "WITH v AS (WITH w AS (SELECT * FROM key_verifications_v1) SELECT * FROM w) SELECT * FROM v",
    "SELECT * FROM key_verifications_v1 WHERE 1 UNION ALL SELECT * FROM key_verifications_v1 WHERE key_space_id = 'ks_b'",
    "SELECT * FROM key_verifications_v1 WHERE key_space_id = 'ks_b' OR 1 = 1",
    "SELECT * FROM key_verifications_v1 AS key_space_id WHERE key_space_id.key_space_id != ''",
    # quoting tricks: the same table under other quotes is still the table
    "SELECT * FROM `key_verifications_v1`",
    'SELECT * FROM "key_verifications_v1" AS "ks_a"',
    # comments around and inside the name
    "SELECT * FROM /* x */ key_verifications_v1 /* WHERE key_space_id IN ('ks_a') */",
    "SELECT * FROM key_verifications_v1 -- ) AS key_verifications_v1\n",
    # aliases named like the scope column, in every place ClickHouse might look for one
    "SELECT key_id, 'ks_a' AS key_space_id FROM key_verifications_v1",
    "SELECT key_id FROM key_verifications_v1 WHERE ('ks_a' AS key_space_id) != ''",
    "SELECT key_id, key_space_id FROM key_verifications_v1 ARRAY JOIN ['ks_a'] AS key_space_id",
    "SELECT arrayMap(key_space_id -> key_space_id, ['ks_a']) AS m, key_id FROM key_verifications_v1",
    "WITH x AS (SELECT 'ks_a' AS key_space_id) SELECT key_id, x.key_space_id FROM key_verifications_v1, x",
    # a scalar subquery and EXISTS
    "SELECT (SELECT groupArray(key_id) FROM key_verifications_v1) AS everything",
    "SELECT key_id FROM key_verifications_v1 AS a WHERE EXISTS (SELECT 1 FROM key_verifications_v1 AS b "
    "WHERE b.key_id = a.key_id)",
]


@pytest.mark.parametrize("sql", ESCAPES, ids=[sql[:60] for sql in ESCAPES])
def test_scope_cannot_be_escaped(sql: str) -> None:
    out = check_query(sql, VERIFICATIONS, SCOPE)
    tree = sqlglot.parse_one(out, read="clickhouse")
    tables = list(tree.find_all(exp.Table))
    assert tables
    for table in tables:
        if table.name in VERIFICATIONS:
            select = table.find_ancestor(exp.Select)
            assert select.args["from_"].this is table or select.args["from_"].this is table.parent
            assert select.args["where"].sql("clickhouse") == "WHERE \"key_space_id\" IN ('ks_a')"


# -- hypothesis: whatever comes in, only QueryNotAllowed or SQL that passes the check again -------

SQL_WORDS = ["SELECT", "FROM", "WHERE", "WITH", "AS", "UNION", "ALL", "IN", "JOIN", "ON", "(", ")", ",", ";", "*",
             "'x'", "1", "key_verifications_v1", "system.tables", "file('x')", "SETTINGS", "FORMAT", "INTO",
             "OUTFILE", "--", "/*", "*/", "`", '"', "\\", "=", "GROUP BY", "ORDER BY", "LIMIT", "DROP", "TABLE",
             "key_space_id", "a", "b", "FINAL", "ARRAY JOIN", "tags", "PREWHERE", "EXISTS", "\n"]


def _outcome(sql: str, scope: frozenset[str] | None) -> None:
    try:
        out = check_query(sql, VERIFICATIONS, scope)
    except QueryNotAllowed as exc:
        assert str(exc)
        return
    assert isinstance(out, str)
    assert tables_read(out) - set(VERIFICATIONS) <= {t.alias for t in
                                                      sqlglot.parse_one(out, read="clickhouse").find_all(exp.CTE)}
    check_query(out, VERIFICATIONS, None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300), st.sampled_from([None, SCOPE]))
def test_garbage_text(sql: str, scope: frozenset[str] | None) -> None:
    _outcome(sql, scope)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SQL_WORDS), max_size=40), st.sampled_from([None, SCOPE]))
def test_garbage_sql_words(words: list[str], scope: frozenset[str] | None) -> None:
    _outcome(" ".join(words), scope)


# -- the rewritten SQL on ClickHouse (chDB), over the real schema ----------------------------------

ROWS = [  # (key_space_id, key_id, outcome, tags)
    ("ks_a", "key_a1", "VALID", ["x"]),
    ("ks_a", "key_a2", "RATE_LIMITED", []),
    ("ks_a", "key_a2", "VALID", ["x", "y"]),
    ("ks_b", "key_b1", "VALID", ["secret"]),
    ("ks_b", "key_b1", "DISABLED", []),
    ("k's\\ \"odd", "key_odd", "VALID", []),
]


class Chdb:
    def __init__(self, path: Path) -> None:
        from chdb import session

        self.session = session.Session(str(path))

    def rows(self, sql: str) -> list[dict[str, Any]]:
        out = self.session.query(sql, "JSONEachRow").bytes().decode()
        return [json.loads(line) for line in out.split("\n") if line]

    def command(self, sql: str) -> str:
        """The answer as text, as clickhouse-connect's command() gives a scalar (a migration asks one)."""
        return self.session.query(sql, "TabSeparated").bytes().decode().strip()


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chdb]:
    db = Chdb(tmp_path_factory.mktemp("chdb"))
    for _, statements in schema.MIGRATIONS:
        for statement in schema.statements_of(statements, db):
            db.command(statement)
    values = []
    now = int(time.time() * 1000)
    for i, (ks, key_id, outcome, tags) in enumerate(ROWS):
        row = {"request_id": f"req_{i}", "time": now - i,  # recent: the raw table's TTL is 90 days "workspace_id": "ws_local",
               "key_space_id": ks, "identity_id": "", "external_id": "", "key_id": key_id, "region": "local",
               "source": "api", "app_id": "", "outcome": outcome, "tags": tags, "spent_credits": 1, "latency": 0.5}
        values.append(json.dumps(row))
    columns = ", ".join(schema.VERIFICATION_COLUMNS)
    db.command(f"INSERT INTO {schema.VERIFICATIONS_TABLE} ({columns}) FORMAT JSONEachRow " + "\n".join(values))
    for source in schema.ROLLUP_SOURCES:  # what the flusher's rollups (keysvc.analytics.rollups) insert
        db.command(f"INSERT INTO {source.rollups}" + schema.rollup_select(source.raw, source.keys, source.sums, ""))
    yield db
    db.session.close()


def run(ch: Chdb, sql: str, scope: frozenset[str] | None) -> list[dict[str, Any]]:
    return ch.rows(check_query(sql, VERIFICATIONS, scope))


@pytest.mark.parametrize("sql", ALLOWED, ids=[sql[:60] for sql in ALLOWED])
@pytest.mark.parametrize("scope", [None, SCOPE, frozenset()], ids=["all", "scoped", "empty"])
def test_allowed_runs_on_clickhouse(ch: Chdb, sql: str, scope: frozenset[str] | None) -> None:
    run(ch, sql, scope)  # ClickHouse accepts what we generate, scoped or not


def test_scope_on_clickhouse(ch: Chdb) -> None:
    def n(sql: str, scope: frozenset[str] | None) -> int:
        [row] = run(ch, sql, scope)
        return int(row["n"])

    count = "SELECT count() AS n FROM key_verifications_v1"
    assert n(count, None) == 6
    assert n(count, SCOPE) == 3
    assert n(count, frozenset({"ks_b"})) == 2
    assert n(count, frozenset({"ks_a", "ks_b"})) == 5
    assert n(count, frozenset({"k's\\ \"odd"})) == 1
    assert n(count, frozenset({"ks_c"})) == 0
    assert n(count, frozenset()) == 0
    per_day = "SELECT sum(count) AS n FROM key_verifications_per_day_v1"
    assert n(per_day, None) == 6
    assert n(per_day, SCOPE) == 3
    keys = run(ch, "SELECT DISTINCT key_id FROM key_verifications_v1 ORDER BY key_id", SCOPE)
    assert keys == [{"key_id": "key_a1"}, {"key_id": "key_a2"}]


@pytest.mark.parametrize("sql", ESCAPES, ids=[sql[:60] for sql in ESCAPES])
def test_escapes_on_clickhouse_see_only_the_scope(ch: Chdb, sql: str) -> None:
    rows = run(ch, sql, SCOPE)
    text = json.dumps(rows)
    assert "key_b1" not in text and "secret" not in text and "odd" not in text
    assert "ks_b" not in text


def test_string_literals_mean_the_same_to_clickhouse(ch: Chdb) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
    def roundtrip(value: str) -> None:
        quoted = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"  # ClickHouse's own escaping
        out = check_query(f"SELECT {quoted} AS v FROM key_verifications_v1 LIMIT 1", VERIFICATIONS, SCOPE)
        assert ch.rows(out) == [{"v": value}]

    roundtrip()

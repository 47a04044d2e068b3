"""analytics.getVerifications / analytics.getRatelimits against real `keysvc serve` processes.

- The session's `server` fixture: every refused class of query gets a 400 whose message says what
  is not allowed (location body.query), a root key without the read_analytics permission a 403.
- A server whose ClickHouse cannot be reached, and one with analytics disabled: a valid query is a
  503, while the refused ones are still the same 400s; so a refusal comes before anything runs.
- A server flushing every 0.2 s, with verifications and ratelimit decisions in two APIs and two
  namespaces: a valid query returns rows as objects, a root key scoped to one API (or namespace)
  sees only its rows whatever the query tries, and a query ClickHouse rejects is a 400 with
  ClickHouse's message, not a 500.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from unkey.py import Unkey, errors

from server import Server, create_root_key, free_port
from test_http_errors import FORBIDDEN, assert_error, data_of

VERIFICATIONS = "/v2/analytics.getVerifications"
RATELIMITS = "/v2/analytics.getRatelimits"
INVALID_QUERY = "user/bad_request/invalid_analytics_query"
UNAVAILABLE = "unkey/application/service_unavailable"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def ask(server: Server, path: str, query: Any, auth: str = "root") -> tuple[int, dict[str, str], bytes]:
    return server.request("POST", path, {"query": query}, auth=auth)


def rows(server: Server, path: str, query: str, auth: str = "root") -> list[dict[str, Any]]:
    data = data_of(ask(server, path, query, auth))
    assert isinstance(data, list) and all(isinstance(row, dict) for row in data), data
    return data


def refused_query(answer: tuple[int, dict[str, str], bytes], message: str) -> str:
    error = assert_error(answer, 400, code=INVALID_QUERY)
    assert message in error["detail"], error
    assert error["errors"] == [{"location": "body.query", "message": error["detail"]}], error
    return error["detail"]


def unavailable(answer: tuple[int, dict[str, str], bytes]) -> str:
    status, headers, body = answer
    assert status == 503, body[:500]
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["meta"]["requestId"].startswith("req_")
    error = doc["error"]
    assert (error["status"], error["title"]) == (503, "Service Unavailable")
    assert error["type"] == "https://unkey.com/docs/errors/" + UNAVAILABLE
    assert "errors" not in error
    return error["detail"]


def config_file(directory: Path, **analytics: Any) -> Path:
    path = directory / f"keysvc-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"analytics": analytics}))
    return path


# -- refused, on the session's server ------------------------------------------------------------

# (endpoint, query, what the message says)
REFUSED = [
    (VERIFICATIONS, "SELECT name FROM system.tables", "Database-qualified table names are not allowed ('system.tables')"),
    (VERIFICATIONS, "SELECT * FROM key_verifications_raw_v2", "Table 'key_verifications_raw_v2' is not allowed"),
    (VERIFICATIONS, "SELECT * FROM ratelimits_v1", "Table 'ratelimits_v1' is not allowed"),
    (RATELIMITS, "SELECT * FROM key_verifications_v1", "Table 'key_verifications_v1' is not allowed"),
    (VERIFICATIONS, "SELECT * FROM file('/etc/hostname', 'LineAsString')", "Table functions are not allowed (file())"),
    (VERIFICATIONS, "SELECT * FROM url('http://127.0.0.1:1/x', CSV)", "Table functions are not allowed (url())"),
    (RATELIMITS, "SELECT * FROM numbers(3)", "Table functions are not allowed (numbers())"),
    (VERIFICATIONS, "SELECT file('/etc/hostname')", "Function file() is not allowed"),
    (VERIFICATIONS, "SELECT count() FROM key_verifications_v1 WHERE key_id IN (SELECT name FROM system.tables)",
     "'system.tables'"),
    (VERIFICATIONS, "SELECT count() FROM key_verifications_v1 WHERE key_id IN key_verifications_raw_v2",
     "IN with a name on its right"),
    (VERIFICATIONS, "SELECT 1; SELECT 2", "Only one statement is allowed"),
    (VERIFICATIONS, "SELECT * FROM key_verifications_v1; DROP TABLE key_verifications_raw_v2",
     "Only one statement is allowed"),
    (VERIFICATIONS, "DROP TABLE key_verifications_raw_v2", "Only SELECT queries are allowed, not DROP"),
    (RATELIMITS, "INSERT INTO ratelimits_raw_v2 (request_id) VALUES ('x')", "Only SELECT queries are allowed, not INSERT"),
    (VERIFICATIONS, "ALTER TABLE key_verifications_raw_v2 DELETE WHERE 1", "Only SELECT queries are allowed"),
    (VERIFICATIONS, "CREATE TABLE t (a Int8) ENGINE = Memory", "Only SELECT queries are allowed, not CREATE"),
    (VERIFICATIONS, "SELECT count() FROM key_verifications_v1 SETTINGS readonly = 0", "SETTINGS clauses are not allowed"),
    (VERIFICATIONS, "SELECT count() FROM key_verifications_v1 FORMAT CSV", "FORMAT clauses are not allowed"),
    (VERIFICATIONS, "SELECT * FROM key_verifications_v1 INTO OUTFILE '/tmp/out.csv'", "INTO OUTFILE is not allowed"),
    (VERIFICATIONS, "WITH key_verifications_v1 AS (SELECT 1) SELECT * FROM key_verifications_v1",
     "A WITH clause may not define 'key_verifications_v1'"),
    (VERIFICATIONS, "SELECT count( FROM key_verifications_v1", "The query could not be parsed"),
    (VERIFICATIONS, "SELECT 'unterminated", "The query could not be read"),
    (VERIFICATIONS, "-- nothing but a comment", "The query is empty"),
]


@pytest.mark.parametrize("path, query, message", REFUSED, ids=[f"{p[14:]}-{q[:50]}" for p, q, _ in REFUSED])
def test_refused_query_is_a_400_that_says_why(server: Server, path: str, query: str, message: str) -> None:
    refused_query(ask(server, path, query), message)


def test_body_is_validated(server: Server) -> None:
    for body in ({"query": ""}, {"query": "x" * 10_001}, {"query": 1}, {}, {"query": "SELECT 1", "extra": 1}):
        assert_error(server.request("POST", VERIFICATIONS, body), 400, code="unkey/application/invalid_input")
    assert_error(server.request("POST", RATELIMITS, {"query": ""}), 400, code="unkey/application/invalid_input")


def test_needs_a_valid_root_key(server: Server) -> None:
    assert_error(ask(server, VERIFICATIONS, "SELECT 1", auth="unkey_not_a_root_key"), 401)
    assert_error(server.request("POST", RATELIMITS, {"query": "SELECT 1"}, auth=None), 400, issues=False)


@pytest.fixture(scope="module")
def limited_keys(server: Server) -> dict[str, str]:
    """Root keys with every permission but the one each endpoint needs."""
    return {
        "none": create_root_key(server.data_dir, "api.*.create_key", "api.*.verify_key", "ratelimit.*.limit"),
        "verifications_only": create_root_key(server.data_dir, "api.*.read_analytics"),
        "ratelimits_only": create_root_key(server.data_dir, "ratelimit.*.read_analytics"),
        "other_action": create_root_key(server.data_dir, "api.*.read_key", "ratelimit.*.read_override"),
    }


@pytest.mark.parametrize("who, path, permission", [
    ("none", VERIFICATIONS, "api.*.read_analytics"),
    ("none", RATELIMITS, "ratelimit.*.read_analytics"),
    ("other_action", VERIFICATIONS, "api.<apiId>.read_analytics"),
    ("other_action", RATELIMITS, "ratelimit.<namespaceId>.read_analytics"),
    ("ratelimits_only", VERIFICATIONS, "api.*.read_analytics"),
    ("verifications_only", RATELIMITS, "ratelimit.*.read_analytics"),
])
def test_missing_permission_is_a_403(server: Server, limited_keys: dict[str, str], who: str, path: str,
                                     permission: str) -> None:
    table = "key_verifications_v1" if path == VERIFICATIONS else "ratelimits_v1"
    error = assert_error(ask(server, path, f"SELECT count() FROM {table}", auth=limited_keys[who]), 403,
                         code=FORBIDDEN)
    assert permission in error["detail"]
    # The permission check comes first: a refused query from such a key is a 403 too.
    assert_error(ask(server, path, "SELECT * FROM system.tables", auth=limited_keys[who]), 403, code=FORBIDDEN)


def test_openapi_documents_both_routes(server: Server) -> None:
    status, _, body = server.request("GET", "/openapi.json", auth=None)
    assert status == 200
    doc = json.loads(body)
    for path in (VERIFICATIONS, RATELIMITS):
        operation = doc["paths"][path]["post"]
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["properties"]["data"] == {"type": "array", "items": {"type": "object"}}
        request = operation["requestBody"]["content"]["application/json"]["schema"]
        assert request["$ref"].endswith("/AnalyticsQuery")
    schema = doc["components"]["schemas"]["AnalyticsQuery"]
    assert schema["properties"]["query"] == {"type": "string", "minLength": 1, "maxLength": 10000}
    assert schema["required"] == ["query"]


# -- refused before anything runs: servers whose analytics cannot answer ----------------------------

@pytest.fixture(scope="module")
def unreachable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """ClickHouse at a port nobody listens on: the flusher never gets its schema up."""
    directory = tmp_path_factory.mktemp("unreachable")
    config = config_file(directory, clickhouse_url=f"http://127.0.0.1:{free_port()}/", flush_interval=0.2)
    running = Server(directory / "data", workers=2, extra=("--config", str(config)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def disabled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("disabled")
    running = Server(directory / "data", workers=2, extra=("--config", str(config_file(directory, enabled=False))))
    yield running
    running.stop()


def test_unreachable_clickhouse_is_a_503(unreachable: Server) -> None:
    for path, table in ((VERIFICATIONS, "key_verifications_v1"), (RATELIMITS, "ratelimits_v1")):
        assert "Analytics are unavailable" in unavailable(ask(unreachable, path, f"SELECT count() FROM {table}"))


def test_disabled_analytics_is_a_503_that_says_so(disabled: Server) -> None:
    for path, table in ((VERIFICATIONS, "key_verifications_v1"), (RATELIMITS, "ratelimits_v1")):
        detail = unavailable(ask(disabled, path, f"SELECT count() FROM {table}"))
        assert "disabled" in detail and "analytics.enabled" in detail


@pytest.mark.parametrize("path, query, message", REFUSED, ids=[f"{p[14:]}-{q[:50]}" for p, q, _ in REFUSED])
def test_refusal_comes_before_anything_runs(unreachable: Server, disabled: Server, path: str, query: str,
                                            message: str) -> None:
    refused_query(ask(unreachable, path, query), message)
    refused_query(ask(disabled, path, query), message)


# -- with rows: a server flushing every 0.2 s --------------------------------------------------------

class World:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.apis: dict[str, str] = {}  # name -> apiId
        self.keyspaces: dict[str, str] = {}  # name -> keyspace id
        self.keys: dict[str, str] = {}  # name -> keyId
        self.namespaces: dict[str, str] = {}  # name -> namespace name (unique)
        self.namespace_ids: dict[str, str] = {}  # name -> rlns_ id
        self.tag = unique("run")


def call(server: Server, path: str, body: Any) -> Any:
    status, payload = server.call(path, body)
    assert status == 200, payload
    return payload["data"]


def rows_once_up(server: Server, path: str, query: str) -> list[dict[str, Any]] | None:
    """The rows, or None while the flusher is still starting (503)."""
    answer = ask(server, path, query)
    return None if answer[0] == 503 else rows(server, path, query)


def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("analytics")
    running = Server(directory / "data", workers=2,
                     extra=("--config", str(config_file(directory, flush_interval=0.2))))
    w = World(running)
    try:
        # APIs a and b: a has 3 VALID verifications and 1 DISABLED; b has 2 VALID.
        for name, valid, disabled_count in (("a", 3, 1), ("b", 2, 0)):
            api_id = call(running, "/v2/apis.createApi", {"name": unique(f"api_{name}")})["apiId"]
            w.apis[name] = api_id
            created = call(running, "/v2/keys.createKey", {"apiId": api_id, "name": f"key_{name}"})
            w.keys[name] = created["keyId"]
            for _ in range(valid):
                result = call(running, "/v2/keys.verifyKey", {"key": created["key"], "tags": [w.tag, f"api={name}"]})
                assert result["valid"] is True
                w.keyspaces[name] = result["keyspaceId"]
            if disabled_count:
                call(running, "/v2/keys.updateKey", {"keyId": created["keyId"], "enabled": False})
                for _ in range(disabled_count):
                    result = call(running, "/v2/keys.verifyKey", {"key": created["key"], "tags": [w.tag]})
                    assert result["code"] == "DISABLED"
        # Namespaces x and y: x has 2 passed and 1 denied; y has 1 passed.
        for name, passed, denied in (("x", 2, 1), ("y", 1, 0)):
            namespace = unique(f"ns_{name}")
            w.namespaces[name] = namespace
            for i in range(passed + denied):
                result = call(running, "/v2/ratelimit.limit",
                              {"namespace": namespace, "identifier": f"{w.tag}-{name}", "limit": passed,
                               "duration": 60_000})
                assert result["success"] is (i < passed)
        # Wait for the flusher: every event in ClickHouse.
        wait_until(lambda: rows_once_up(running, VERIFICATIONS, f"SELECT count() AS n FROM key_verifications_v1 "
                                                                f"WHERE has(tags, '{w.tag}')") == [{"n": 6}],
                   "the verification events")
        wait_until(lambda: rows_once_up(running, RATELIMITS, f"SELECT count() AS n FROM ratelimits_v1 "
                                                             f"WHERE startsWith(identifier, '{w.tag}')") == [{"n": 4}],
                   "the ratelimit events")
        # ... and rolled up (keysvc.analytics.rollups: once the spool is empty).
        wait_until(lambda: rows_once_up(running, VERIFICATIONS, f"SELECT sum(count) AS n FROM "
                                                                f"key_verifications_per_minute_v1 "
                                                                f"WHERE has(tags, '{w.tag}')") == [{"n": 6}],
                   "the verification rollups")
        wait_until(lambda: rows_once_up(running, RATELIMITS, f"SELECT sum(total) AS n FROM ratelimits_per_minute_v1 "
                                                             f"WHERE startsWith(identifier, '{w.tag}')") == [{"n": 4}],
                   "the ratelimit rollups")
        found = rows(running, RATELIMITS, f"SELECT DISTINCT namespace_id, identifier FROM ratelimits_v1 "
                                          f"WHERE startsWith(identifier, '{w.tag}')")
        for row in found:
            w.namespace_ids[row["identifier"].rsplit("-", 1)[1]] = row["namespace_id"]
        assert set(w.namespace_ids) == {"x", "y"}
        yield w
    finally:
        running.stop()


def root_key(world: World, *permissions: str) -> str:
    return create_root_key(world.server.data_dir, *permissions)


def test_valid_query_returns_rows_as_objects(world: World) -> None:
    got = rows(world.server, VERIFICATIONS,
               f"SELECT key_space_id, outcome, count() AS n, sum(spent_credits) AS credits "
               f"FROM key_verifications_v1 WHERE has(tags, '{world.tag}') "
               f"GROUP BY key_space_id, outcome ORDER BY n DESC, outcome")
    a, b = world.keyspaces["a"], world.keyspaces["b"]
    assert got == [
        {"key_space_id": a, "outcome": "VALID", "n": 3, "credits": 0},
        {"key_space_id": b, "outcome": "VALID", "n": 2, "credits": 0},
        {"key_space_id": a, "outcome": "DISABLED", "n": 1, "credits": 0},
    ]
    per_day = rows(world.server, VERIFICATIONS,
                   f"SELECT key_id, sum(count) AS n FROM key_verifications_per_day_v1 "
                   f"WHERE key_space_id IN ('{a}', '{b}') GROUP BY key_id ORDER BY n DESC")
    assert per_day == [{"key_id": world.keys["a"], "n": 4}, {"key_id": world.keys["b"], "n": 2}]
    limits = rows(world.server, RATELIMITS,
                  f"SELECT identifier, countIf(passed) AS passed, count() AS total FROM ratelimits_v1 "
                  f"WHERE startsWith(identifier, '{world.tag}') GROUP BY identifier ORDER BY identifier")
    assert limits == [{"identifier": f"{world.tag}-x", "passed": 2, "total": 3},
                      {"identifier": f"{world.tag}-y", "passed": 1, "total": 1}]
    assert rows(world.server, VERIFICATIONS, "SELECT 1 AS one FROM key_verifications_v1 WHERE 0") == []


# Queries that try to read beyond the key's scope; each row counts the verifications it can see.
SCOPE_ESCAPES = [
    "SELECT count() AS n FROM key_verifications_v1",
    "SELECT count() AS n FROM key_verifications_v1 WHERE key_space_id = '{b}' OR 1 = 1",
    "SELECT count() AS n FROM (SELECT * FROM key_verifications_v1) AS key_verifications_v1",
    "WITH everything AS (SELECT * FROM key_verifications_v1) SELECT count() AS n FROM everything",
    "SELECT sum(c) AS n FROM (SELECT count() AS c FROM key_verifications_v1 "
    "UNION ALL SELECT count() AS c FROM key_verifications_v1 WHERE key_space_id = '{b}')",
    "SELECT count() AS n FROM `key_verifications_v1` /* WHERE key_space_id IN ('{b}') */",
    "SELECT count() AS n FROM \"key_verifications_v1\" -- ) AS x UNION ALL SELECT * FROM key_verifications_v1\n",
    "SELECT (SELECT count() FROM key_verifications_v1) AS n",
    "SELECT count() AS n, '{b}' AS key_space_id FROM key_verifications_v1",
]


@pytest.mark.parametrize("template", SCOPE_ESCAPES, ids=[t[:60] for t in SCOPE_ESCAPES])
def test_api_scoped_key_sees_only_its_api(world: World, template: str) -> None:
    scoped = root_key(world, f"api.{world.apis['a']}.read_analytics")
    query = template.format(b=world.keyspaces["b"]).replace("count()", f"countIf(has(tags, '{world.tag}'))")
    assert rows(world.server, VERIFICATIONS, query, auth=scoped)[0]["n"] == 4  # a's 4, none of b's 2
    assert rows(world.server, VERIFICATIONS, query)[0]["n"] >= 6  # the unscoped key sees both


def test_api_scoped_key_rows(world: World) -> None:
    a, b = world.keyspaces["a"], world.keyspaces["b"]
    scoped_b = root_key(world, f"api.{world.apis['b']}.read_analytics")
    query = "SELECT DISTINCT key_space_id, key_id FROM key_verifications_v1 ORDER BY key_id"
    assert rows(world.server, VERIFICATIONS, query, auth=scoped_b) == [{"key_space_id": b, "key_id": world.keys["b"]}]
    both = root_key(world, f"api.{world.apis['a']}.read_analytics", f"api.{world.apis['b']}.read_analytics")
    assert {r["key_space_id"] for r in rows(world.server, VERIFICATIONS, query, auth=both)} == {a, b}
    nowhere = root_key(world, "api.api_doesnotexist.read_analytics")
    assert rows(world.server, VERIFICATIONS, query, auth=nowhere) == []
    # The rollups are scoped the same way.
    per_day = rows(world.server, VERIFICATIONS, "SELECT key_space_id, sum(count) AS n FROM "
                   "key_verifications_per_day_v1 GROUP BY key_space_id", auth=scoped_b)
    assert per_day == [{"key_space_id": b, "n": 2}]
    # A scoped key is still refused what everyone is refused.
    refused_query(ask(world.server, VERIFICATIONS, "SELECT * FROM key_verifications_raw_v2", auth=scoped_b),
                  "Table 'key_verifications_raw_v2' is not allowed")


def test_namespace_scoped_key_sees_only_its_namespace(world: World) -> None:
    x, y = world.namespace_ids["x"], world.namespace_ids["y"]
    scoped = root_key(world, f"ratelimit.{x}.read_analytics")
    query = "SELECT namespace_id, count() AS n FROM ratelimits_v1 GROUP BY namespace_id"
    assert rows(world.server, RATELIMITS, query, auth=scoped) == [{"namespace_id": x, "n": 3}]
    escape = f"SELECT count() AS n FROM ratelimits_v1 WHERE namespace_id = '{y}' OR 1"
    assert rows(world.server, RATELIMITS, escape, auth=scoped) == [{"n": 3}]
    per_minute = rows(world.server, RATELIMITS,
                      "SELECT namespace_id, sum(total) AS n FROM ratelimits_per_minute_v1 GROUP BY namespace_id",
                      auth=scoped)
    assert per_minute == [{"namespace_id": x, "n": 3}]
    # read_analytics on a namespace says nothing about verifications.
    assert_error(ask(world.server, VERIFICATIONS, "SELECT 1", auth=scoped), 403, code=FORBIDDEN)


def test_query_clickhouse_rejects_is_a_400_with_its_message(world: World) -> None:
    detail = refused_query(ask(world.server, VERIFICATIONS, "SELECT no_such_column FROM key_verifications_v1"),
                           "ClickHouse refused the query")
    assert "no_such_column" in detail and "UNKNOWN_IDENTIFIER" in detail, detail
    detail = refused_query(ask(world.server, RATELIMITS, "SELECT toDate('not a date') FROM ratelimits_v1 LIMIT 1"),
                           "ClickHouse refused the query")
    assert "Code:" in detail
    # The scoped rewrite passes ClickHouse's message through the same way.
    scoped = root_key(world, f"api.{world.apis['a']}.read_analytics")
    detail = refused_query(ask(world.server, VERIFICATIONS, "SELECT nope FROM key_verifications_v1", auth=scoped),
                           "ClickHouse refused the query")
    assert "nope" in detail


def test_sdk_reads_rows(world: World) -> None:
    with Unkey(root_key=world.server.root_key, server_url=world.server.url) as unkey:
        result = unkey.analytics.get_verifications(
            query=f"SELECT outcome, count() AS n FROM key_verifications_v1 WHERE has(tags, '{world.tag}') "
                  f"GROUP BY outcome ORDER BY outcome")
        assert result.data == [{"outcome": "DISABLED", "n": 1}, {"outcome": "VALID", "n": 5}]
        assert result.meta.request_id.startswith("req_")
        limits = unkey.analytics.get_ratelimits(
            query=f"SELECT count() AS n FROM ratelimits_v1 WHERE startsWith(identifier, '{world.tag}')")
        assert limits.data == [{"n": 4}]
        with pytest.raises(errors.BadRequestErrorResponse) as raised:
            unkey.analytics.get_verifications(query="SELECT * FROM system.tables")
        assert raised.value.data.error.errors[0].location == "body.query"

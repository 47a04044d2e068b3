"""GET /metrics on a real `keysvc serve --workers 2`: the counts of every worker (and of the
flusher) summed, exactly; the bearer token on the API port; the listener of its own; valid
Prometheus text; counters kept across a worker's death and reset by a restart."""
from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from keysvc.metrics import files_of, metrics_dir, read_file, worker_layout
from server import Server, free_port

TOKEN = "metrics-token-3f9a7c"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# -- a strict reader of the Prometheus text format (0.0.4) ---------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)(?: -?\d+)?")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Inf)|NaN")
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "untyped": ("",)}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """({family: type}, {(sample name, sorted labels): value}), or an AssertionError at the first
    line the format does not allow: TYPE before a family's samples and once, samples of a family
    together, suffixes of its type, no series twice, histograms' buckets cumulative up to +Inf,
    which equals _count."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    seen_families: list[str] = []
    current = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        assert line and line == line.strip(), where
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helps, where
            helps.add(name)
        elif line.startswith("# TYPE "):
            parts = line.split(" ")
            assert len(parts) == 4 and re.fullmatch(_NAME, parts[2]), where
            name, kind = parts[2], parts[3]
            assert kind in _SUFFIXES and name not in types, where
            types[name] = kind
            current = name
        elif line.startswith("#"):
            continue
        else:
            match = _SAMPLE.fullmatch(line)
            assert match and _VALUE.fullmatch(match[3]), where
            name = match[1]
            family = next((f for f in (name, *(name[: -len(s)] for s in ("_bucket", "_sum", "_count")
                                                  if name.endswith(s))) if f in types), None)
            assert family is not None and family == current, f"{where}: not under its family's TYPE"
            assert name[len(family):] in _SUFFIXES[types[family]], where
            if types[family] == "counter":
                assert family.endswith("_total"), where
            if not seen_families or seen_families[-1] != family:
                assert family not in seen_families, f"{where}: samples of {family} are not together"
                seen_families.append(family)
            pairs = _PAIR.findall(match[2] or "")
            labels = tuple(sorted(pairs))
            assert len({k for k, _ in pairs}) == len(pairs), f"{where}: a label twice"
            is_bucket = name.endswith("_bucket") and types[family] == "histogram"
            assert is_bucket == any(k == "le" for k, _ in pairs), where
            key = (name, labels)
            assert key not in samples, f"{where}: the series twice"
            samples[key] = float(match[3].replace("Inf", "inf"))
    for family, kind in types.items():
        if kind != "histogram":
            continue
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for (name, labels), value in samples.items():
            if name == f"{family}_bucket":
                rest = tuple(p for p in labels if p[0] != "le")
                groups.setdefault(rest, []).append((float(dict(labels)["le"].replace("Inf", "inf")), value))
        for rest, buckets in groups.items():
            buckets.sort()
            assert buckets[-1][0] == math.inf, f"{family}{rest}: no +Inf bucket"
            values = [v for _, v in buckets]
            assert values == sorted(values), f"{family}{rest}: buckets not cumulative"
            assert samples[(f"{family}_count", rest)] == values[-1], f"{family}{rest}: _count is not the +Inf bucket"
            assert (f"{family}_sum", rest) in samples
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_the_reader_refuses_what_the_format_does_not_allow():
    good = "# HELP a_total x\n# TYPE a_total counter\na_total{b=\"1\"} 2\n"
    assert parse(good)[1] == {("a_total", (("b", "1"),)): 2.0}
    for bad in (good[:-1], good + "a_total{b=\"1\"} 3\n", "a_total 1\n", good.replace("counter", "counters"),
                good.replace('{b="1"}', "{b=1}"), good + "# TYPE c gauge\nc 1\na_total 1\n",
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 0\nh_count 1\n"):
        with pytest.raises(AssertionError):
            parse(bad)


# -- the node ----------------------------------------------------------------------------------------------

def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


class Node:
    def __init__(self, server: Server, metrics_port: int) -> None:
        self.server = server
        self.metrics_port = metrics_port

    def scrape(self) -> Samples:
        status, headers, body = get(self.metrics_port)
        assert status == 200 and headers["content-type"] == CONTENT_TYPE, (status, body[:300])
        return parse(body.decode())[1]

    def scrape_api(self) -> Samples:
        status, headers, body = get(self.server.port, headers={"authorization": f"Bearer {TOKEN}"})
        assert status == 200 and headers["content-type"] == CONTENT_TYPE, (status, body[:300])
        return parse(body.decode())[1]

    def per_worker(self) -> dict[str, float]:
        """Verifications counted in each worker's own file (by file name: worker-<pid>.bin)."""
        layout = worker_layout()
        family = layout.verifications
        counts = {}
        for path in files_of(metrics_dir(self.server.data_dir), layout):
            slots = read_file(path, layout)
            assert slots is not None, path
            counts[os.path.basename(path)] = sum(slots[family.offset:family.offset + len(family.labelsets)])
        return counts


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    metrics_port = free_port()
    home = tmp_path_factory.mktemp("metrics")
    cwd = os.getcwd()
    os.chdir(home)  # as conftest does for each test: the processes import the installed package
    try:
        server = Server(home / "data", workers=2, env={
            "KEYSVC_METRICS__PORT": str(metrics_port),
            "KEYSVC_METRICS__BEARER_TOKEN": TOKEN,
            "KEYSVC_ANALYTICS__FLUSH_INTERVAL": "0.2",
        })
    finally:
        os.chdir(cwd)
    yield Node(server, metrics_port)
    server.stop()


def create_keys(server: Server) -> dict[str, str]:
    """A key for each outcome: {code: key}."""
    status, body = server.call("/v2/apis.createApi", {"name": "metrics"})
    assert status == 200, body
    api_id = body["data"]["apiId"]
    keys = {}
    for code, spec in (("VALID", {}), ("DISABLED", {"enabled": False}),
                       ("USAGE_EXCEEDED", {"credits": {"remaining": 0}})):
        status, body = server.call("/v2/keys.createKey", {"apiId": api_id, "prefix": "mt", **spec})
        assert status == 200, body
        keys[code] = body["data"]["key"]
    keys["NOT_FOUND"] = "mt_1111111111111111111111"
    return keys


def test_verifications_on_every_worker_are_counted_exactly(node: Node):
    keys = create_keys(node.server)
    before, before_api = node.scrape(), node.scrape_api()
    files_before = node.per_worker()
    made: Counter[str] = Counter()
    for _ in range(40):  # until both workers have verified some (each request on a fresh connection)
        for code, key in keys.items():
            for _ in range(3):
                status, body = node.server.call("/v2/keys.verifyKey", {"key": key})
                assert status == 200 and body["data"]["code"] == code, body
                made[code] += 1
        grown = {name for name, count in node.per_worker().items() if count > files_before.get(name, 0)}
        if len(grown) >= 2:
            break
    assert len(grown) >= 2, f"one worker served every connection: {node.per_worker()}"
    after, after_api = node.scrape(), node.scrape_api()
    n = sum(made.values())
    for code in ("VALID", "NOT_FOUND", "FORBIDDEN", "USAGE_EXCEEDED", "RATE_LIMITED", "DISABLED", "EXPIRED",
                 "INSUFFICIENT_PERMISSIONS", "other"):
        for now, then in ((after, before), (after_api, before_api)):
            delta = value(now, "keysvc_verifications_total", code=code) - value(then, "keysvc_verifications_total",
                                                                                code=code)
            assert delta == made.get(code, 0), (code, delta, made)
    # Each worker's file holds its own share; the exposition is their sum.
    shares = {name: count - files_before.get(name, 0) for name, count in node.per_worker().items()}
    assert sum(shares.values()) == n and sum(1 for share in shares.values() if share) >= 2, shares
    for now, then in ((after, before), (after_api, before_api)):
        route = {"route": "/v2/keys.verifyKey", "status": "200"}
        assert value(now, "keysvc_http_requests_total", **route) - value(then, "keysvc_http_requests_total",
                                                                         **route) == n
        assert value(now, "keysvc_verify_duration_seconds_count") - value(
            then, "keysvc_verify_duration_seconds_count") == n
        assert value(now, "keysvc_verify_duration_seconds_sum") > value(then, "keysvc_verify_duration_seconds_sum")
    # Every lookup of the unknown key misses; the others hit, mostly.
    assert total(after, "keysvc_key_cache_misses_total") - total(before, "keysvc_key_cache_misses_total") >= \
        made["NOT_FOUND"]
    assert total(after, "keysvc_key_cache_hits_total") > total(before, "keysvc_key_cache_hits_total")
    assert value(after, "keysvc_process_starts_total", role="worker") >= 2


def test_ratelimit_decisions_and_status_codes_are_counted(node: Node):
    before = node.scrape()
    for _ in range(3):
        assert node.server.call("/v2/ratelimit.limit", {"namespace": "metrics-ns", "identifier": "user",
                                                        "limit": 2, "duration": 60_000})[0] == 200
    status, body = node.server.call("/v2/ratelimit.multiLimit", [
        {"namespace": "metrics-ns", "identifier": "other", "limit": 5, "duration": 60_000}])
    assert status == 200 and body["data"]["passed"]
    assert node.server.call("/v2/keys.verifyKey", {"nokey": 1})[0] == 400
    assert node.server.request("GET", "/v2/keys.verifyKey")[0] == 405
    assert node.server.request("GET", "/no/such/route")[0] == 404
    after = node.scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("keysvc_ratelimit_decisions_total", api="ratelimit.limit", outcome="passed") == 2
    assert delta("keysvc_ratelimit_decisions_total", api="ratelimit.limit", outcome="denied") == 1
    assert delta("keysvc_ratelimit_decisions_total", api="ratelimit.multiLimit", outcome="passed") == 1
    assert delta("keysvc_ratelimit_decisions_total", api="ratelimit.multiLimit", outcome="denied") == 0
    assert delta("keysvc_http_requests_total", route="/v2/ratelimit.limit", status="200") == 3
    assert delta("keysvc_http_requests_total", route="/v2/keys.verifyKey", status="400") == 1
    assert delta("keysvc_http_requests_total", route="/v2/keys.verifyKey", status="405") == 1
    # A path of no route is counted as such, never by its text.
    assert delta("keysvc_http_requests_total", route="unmatched", status="404") == 1
    assert not any("/no/such/route" in str(labels) for _, labels in after)


def test_the_api_port_serves_metrics_only_to_the_bearer_of_the_token(node: Node):
    port = node.server.port
    for headers, status, code in (({}, 401, "unkey/authentication/missing"),
                                  ({"authorization": "Basic " + TOKEN}, 401, "unkey/authentication/malformed"),
                                  ({"authorization": "Bearer wrong-token"}, 403, "unkey/authorization/forbidden"),
                                  ({"authorization": "Bearer " + TOKEN[:-1]}, 403, "unkey/authorization/forbidden")):
        answer = get(port, headers=headers)
        assert answer[0] == status, answer
        envelope = json.loads(answer[2])
        assert envelope["meta"]["requestId"].startswith("req_")
        assert envelope["error"]["status"] == status and envelope["error"]["type"].endswith(code), envelope
    status, headers, body = get(port, headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 200 and headers["content-type"] == CONTENT_TYPE
    types, _ = parse(body.decode())
    assert types["keysvc_verifications_total"] == "counter"
    # POST is not GET.
    status, _, body = node.server.request("POST", "/metrics", {}, auth=None,
                                          headers={"authorization": f"Bearer {TOKEN}"})
    assert status == 405 and json.loads(body)["error"]["status"] == 405


def test_the_metrics_listener_serves_valid_prometheus_text(node: Node):
    status, headers, body = get(node.metrics_port)
    assert status == 200 and headers["content-type"] == CONTENT_TYPE
    types, samples = parse(body.decode())
    assert types["keysvc_verify_duration_seconds"] == "histogram"
    for name in ("keysvc_verifications_total", "keysvc_http_requests_total", "keysvc_ratelimit_decisions_total",
                 "keysvc_key_cache_hits_total", "keysvc_key_cache_misses_total", "keysvc_verify_batches_total",
                 "keysvc_analytics_flush_batches_total", "keysvc_analytics_flushed_events_total",
                 "keysvc_analytics_flush_failures_total", "keysvc_analytics_evicted_events_total",
                 "keysvc_analytics_dropped_events_total", "keysvc_process_starts_total"):
        assert types[name] == "counter", name
    for name in ("keysvc_analytics_spool_events", "keysvc_analytics_spool_bytes", "keysvc_lmdb_map_used_bytes",
                 "keysvc_lmdb_map_size_bytes", "keysvc_build_info"):
        assert types[name] == "gauge", name
    for env in ("store", "counters", "spool"):
        used = value(samples, "keysvc_lmdb_map_used_bytes", env=env)
        assert 0 < used < value(samples, "keysvc_lmdb_map_size_bytes", env=env), env
    assert value(samples, "keysvc_lmdb_map_size_bytes", env="store") == 64 << 30  # the configured map size
    assert get(node.metrics_port, "/elsewhere")[0] == 404


def test_the_flusher_counts_its_batches_and_the_spool_empties(node: Node):
    keys = create_keys(node.server)
    for _ in range(5):
        assert node.server.call("/v2/keys.verifyKey", {"key": keys["VALID"]})[0] == 200
    deadline = time.monotonic() + 60
    while True:
        samples = node.scrape()
        flushed = value(samples, "keysvc_analytics_flushed_events_total")
        if flushed >= 5 and value(samples, "keysvc_analytics_spool_events") == 0:
            break
        assert time.monotonic() < deadline, f"flushed {flushed}, spooled {samples}"
        time.sleep(0.2)
    assert value(samples, "keysvc_analytics_flush_batches_total") >= 1
    assert value(samples, "keysvc_process_starts_total", role="flusher") == 1
    assert value(samples, "keysvc_analytics_dropped_events_total") == 0


def test_counts_outlive_a_killed_worker(node: Node):
    keys = create_keys(node.server)
    for _ in range(6):
        assert node.server.call("/v2/keys.verifyKey", {"key": keys["VALID"]})[0] == 200
    before = node.scrape()
    starts = value(before, "keysvc_process_starts_total", role="worker")
    workers = node.server.worker_pids()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30

    def scrape_while_replaced() -> str:
        # A connection the killed worker had accepted and not answered is reset: ask again.
        while True:
            try:
                return node.scrape()
            except ConnectionError:
                assert time.monotonic() < deadline, "no answer after the worker was killed"
                time.sleep(0.05)

    while value(after := scrape_while_replaced(), "keysvc_process_starts_total", role="worker") < starts + 1:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.05)
    assert value(after, "keysvc_process_starts_total", role="worker") == starts + 1
    assert workers[0] not in node.server.worker_pids()
    for code in ("VALID", "NOT_FOUND", "DISABLED", "USAGE_EXCEEDED"):
        assert value(after, "keysvc_verifications_total", code=code) == value(before, "keysvc_verifications_total",
                                                                              code=code)
    for _ in range(4):
        assert node.server.call("/v2/keys.verifyKey", {"key": keys["VALID"]})[0] == 200
    assert value(node.scrape(), "keysvc_verifications_total", code="VALID") == \
        value(before, "keysvc_verifications_total", code="VALID") + 4


# -- without the token, without the listener --------------------------------------------------------------

def test_a_restart_starts_from_zero_and_no_token_means_no_metrics_on_the_api_port(tmp_path: Path):
    data_dir = tmp_path / "data"
    (data_dir / "metrics").mkdir(mode=0o700, parents=True)
    os.chmod(data_dir, 0o700)
    stale = data_dir / "metrics" / "worker-1.bin"
    stale.write_bytes(b"\0" * 64)  # a file of the last run
    server = Server(data_dir, workers=1, env={"KEYSVC_METRICS__PORT": "null", "KEYSVC_ANALYTICS__ENABLED": "false"})
    try:
        assert not stale.exists()
        for headers in ({}, {"authorization": f"Bearer {TOKEN}"}):
            status, _, body = get(server.port, headers=headers)
            assert status == 404 and json.loads(body)["error"]["status"] == 404
        assert len(files_of(metrics_dir(data_dir), worker_layout())) == 1
    finally:
        assert server.stop() == 0


def test_flush_failures_and_the_waiting_spool_are_counted(tmp_path: Path):
    with socket.socket() as closed:  # a port nothing listens on: ClickHouse is unreachable
        closed.bind(("127.0.0.1", 0))
        unreachable = closed.getsockname()[1]
    metrics_port = free_port()
    server = Server(tmp_path / "data", workers=1, env={
        "KEYSVC_METRICS__PORT": str(metrics_port),
        "KEYSVC_ANALYTICS__CLICKHOUSE_URL": f"http://127.0.0.1:{unreachable}",
        "KEYSVC_ANALYTICS__FLUSH_INTERVAL": "0.1",
        "KEYSVC_ANALYTICS__DRAIN_TIMEOUT": "0.5",
    })
    node = Node(server, metrics_port)
    try:
        keys = create_keys(server)
        for _ in range(3):
            assert server.call("/v2/keys.verifyKey", {"key": keys["VALID"]})[0] == 200
        deadline = time.monotonic() + 30
        while value(samples := node.scrape(), "keysvc_analytics_flush_failures_total") < 2:
            assert time.monotonic() < deadline, "no flush failure counted"
            time.sleep(0.1)
        assert value(samples, "keysvc_analytics_spool_events") == 3
        assert value(samples, "keysvc_analytics_spool_bytes") > 0
        assert value(samples, "keysvc_analytics_flush_batches_total") == 0
    finally:
        assert server.stop() == 0


def test_a_taken_metrics_port_is_a_clear_error(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "keysvc", "serve", "--data-dir", str(tmp_path / "data"), "--port", str(free_port()),
             "--workers", "1"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "KEYSVC_METRICS__PORT": str(port), "KEYSVC_ANALYTICS__ENABLED": "false"})
    assert result.returncode == 2, result
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_metrics_off_means_no_files_and_no_route(tmp_path: Path):
    """metrics.enabled: false, in-process: nothing filed, /metrics a 404 even with a token."""
    from keysvc.config import Config
    from keysvc.http.app import App

    config = Config()
    config.storage.data_dir = str(tmp_path / "data")
    config.storage.map_size = config.storage.counters_map_size = 1 << 26
    config.analytics.enabled = False
    config.metrics.enabled = False
    config.metrics.bearer_token = TOKEN
    config.logging.access = False
    app = App(config)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics",
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode())]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 404
    assert not metrics_dir(config.storage.data_dir).exists()

"""Logs: JSON lines (or a human format on a TTY), one access line per request, and never a
plaintext key or root key, in any line of any process, whatever the request got wrong."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import secrets
import select
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from keysvc import logs
from keysvc.keys import base58
from server import Server, create_root_key, free_port
from sparse import data_chunks

ACCESS_FIELDS = {"ts", "level", "logger", "msg", "pid", "role", "request_id", "method", "route", "status", "latency_ms"}


def random_key(prefix: str, size: int = 16) -> str:
    return f"{prefix}_{base58(secrets.token_bytes(size))}"


# -- a whole run, grepped ----------------------------------------------------------------------------------

def test_no_log_line_of_a_run_holds_a_key_it_used(tmp_path: Path):
    """A server with two workers and the flusher; keys created and verified, valid and not,
    inside malformed bodies, in headers, paths and wrong Authorization headers; then every byte the
    run wrote (serve's output, which its workers and flusher share, and every file of the data
    dir) is searched for each plaintext key and root key used: none may appear."""
    data_dir = tmp_path / "data"
    cwd = os.getcwd()
    token = "metrics-" + secrets.token_hex(12)
    server = Server(data_dir, workers=2, env={"KEYSVC_METRICS__PORT": str(free_port()),
                                              "KEYSVC_METRICS__BEARER_TOKEN": token,
                                              "KEYSVC_ANALYTICS__FLUSH_INTERVAL": "0.2",
                                              "KEYSVC_SERVER__MAX_BODY_BYTES": str(64 << 10)})
    assert os.getcwd() == cwd
    narrow_root = create_root_key(data_dir, "api.*.read_key")  # may not create keys: 403s
    used = [server.root_key, narrow_root, token]
    answers: list[tuple[str, int, str]] = []  # (request id, status, route) of every answer

    def send(path: str, body: Any = None, *, auth: str | None = "root", raw: bytes | None = None,
             headers: dict[str, str] | None = None, method: str = "POST", route: str | None = None) -> dict:
        status, _, payload = server.request(method, path, body, auth=auth, raw=raw, headers=headers)
        answer = json.loads(payload)
        answers.append((answer["meta"]["requestId"], status, route or path))
        return {"status": status, **answer}

    try:
        api_id = send("/v2/apis.createApi", {"name": "logs"})["data"]["apiId"]
        keys = [send("/v2/keys.createKey", {"apiId": api_id, **spec})["data"]["key"]
                for spec in ({"prefix": "sk"}, {"prefix": "sk", "credits": {"remaining": 1}}, {},
                             {"prefix": "long", "byteLength": 64})]
        disabled = send("/v2/keys.createKey", {"apiId": api_id, "enabled": False})["data"]["key"]
        used += [*keys, disabled]
        unknown = [random_key("sk"), random_key("unkey_root", 24), base58(secrets.token_bytes(16))]
        used += unknown
        for key in [*keys, disabled, *unknown] * 2:
            assert send("/v2/keys.verifyKey", {"key": key})["status"] == 200
            assert send("/v2/keys.whoami", {"key": key})["status"] in (200, 404)
        key = keys[0]
        bad_bodies = [
            ("truncated", f'{{"key": "{key}'.encode()),
            ("no JSON", f"key={key}".encode()),
            ("unknown field named by a key", json.dumps({"key": "x" * 8, key: 1}).encode()),
            ("a key where a number goes", json.dumps({"key": key, "credits": {"cost": key}}).encode()),
            ("a key as a permission query", json.dumps({"key": key, "permissions": f"(({keys[1]}"}).encode()),
            ("a key as a ratelimit's name", json.dumps({"key": key, "ratelimits": [{"name": keys[2]}]}).encode()),
            ("not UTF-8", b'{"key": "' + key.encode() + b'\xff\xfe"}'),
            ("escaped", ('{"key": "' + "".join(f"\\u{ord(c):04x}" for c in keys[3]) + '"').encode()),
            ("too long", json.dumps({"key": key + "A" * 600}).encode()),
            ("too large", json.dumps({"key": key, "tags": ["x" * 1024] * 70}).encode()),
        ]
        for _, raw in bad_bodies:
            assert send("/v2/keys.verifyKey", raw=raw)["status"] in (400, 412, 413)
        # Keys where root keys go.
        for authorization in (f"Bearer {key}", f"Bearer {unknown[1]}", f"Basic {server.root_key}",
                              f"Bearer {server.root_key}x", f"Bearer  {disabled} trailing", f"{keys[1]}"):
            assert send("/v2/apis.getApi", {"apiId": api_id}, auth=None,
                        headers={"authorization": authorization})["status"] in (400, 401)
        assert send("/v2/keys.createKey", {"apiId": api_id}, auth=narrow_root)["status"] == 403
        # Keys in paths, query strings, other headers.
        assert send(f"/v2/{key}", {"key": key}, route="unmatched")["status"] == 404
        assert send(f"/v2/keys.verifyKey?key={key}", {"key": keys[1]},
                    route="/v2/keys.verifyKey")["status"] == 200
        assert send("/v2/keys.verifyKey", {"key": keys[2]}, headers={"x-api-key": key, "x-unkey-metrics": key})[
            "status"] == 200
        # The metrics token, right and wrong.
        assert send("/metrics", method="GET", auth=None, headers={"authorization": f"Bearer {key}"})["status"] == 403
        status, _, _ = server.request("GET", "/metrics", auth=token)
        assert status == 200
        # Garbage on the wire.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw_socket:
            raw_socket.sendall(f"{key} /{keys[1]} HTTP/1.1\r\nAuthorization: Bearer {keys[2]}\r\n\r\n".encode())
            raw_socket.recv(4096)
    finally:
        assert server.stop() == 0  # SIGTERM: the workers write their last access lines

    output = server.log_path.read_bytes()
    places = {"keysvc serve's output": output}
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            places[str(path.relative_to(data_dir))] = b"".join(data_chunks(path))
    assert len(places) > 5
    leaks = [(place, f"{secret[:8]}...") for secret in used for place, content in places.items()
             if secret.encode() in content or secret.rpartition("_")[2].encode() in content]
    assert not leaks, f"keys used found in: {leaks}"

    # Every line is JSON (stdout is no TTY), and every answer has its one access line.
    lines = [json.loads(line) for line in output.decode().splitlines()]
    for line in lines:
        assert {"ts", "level", "logger", "msg", "pid", "role"} <= set(line), line
    access = {}
    for line in lines:
        if line["logger"] == "keysvc.access":
            assert set(line) == ACCESS_FIELDS and line["role"] == "worker", line
            assert line["request_id"] not in access, f"two access lines for {line['request_id']}"
            access[line["request_id"]] = line
    assert len({line["pid"] for line in access.values()}) == 2, "the access lines of both workers"
    for request_id, status, route in answers:
        line = access[request_id]
        assert (line["status"], line["route"]) == (status, route), line
        assert 0 < line["latency_ms"] < 60_000
    assert {line["role"] for line in lines} == {"master", "worker", "flusher"}


# -- the error paths, in-process ---------------------------------------------------------------------------

@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch):
    """keysvc.logs set up as a worker's, writing to a buffer; logging as it was afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook, logs.settings.__dict__.copy())
    stream = io.StringIO()

    def setup(fmt: str = "json") -> io.StringIO:
        from keysvc.config import Config

        monkeypatch.setattr(sys, "stderr", stream)  # here: pytest sets its own for the test's call
        config = Config()
        config.logging.format = fmt
        logs.setup(config, "worker")
        return stream

    yield setup
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    sys.excepthook, threading.excepthook = saved[2], saved[3]
    logs.settings.__dict__.clear()
    logs.settings.__dict__.update(saved[4])
    logging.captureWarnings(False)


def _app(data_dir: Path):
    from keysvc.config import Config
    from keysvc.http.app import App
    from keysvc.management import Management
    from keysvc.store import LmdbStore, StoreConfig

    store = LmdbStore(StoreConfig(data_dir=str(data_dir), map_size=1 << 26, counters_map_size=1 << 26))
    try:
        _, root_key = Management(store).create_root_key(["*"])
    finally:
        store.close()
    config = Config()
    config.storage.data_dir = str(data_dir)
    config.storage.map_size = config.storage.counters_map_size = 1 << 26
    config.analytics.enabled = False
    config.logging.access = False
    app = App(config)
    app.open()
    return app, root_key


def _post(app: Any, path: str, body: bytes, authorization: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"authorization", authorization.encode()), (b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


@pytest.mark.parametrize("fmt", ["json", "human"])
def test_an_unexpected_error_is_logged_without_the_keys_of_its_request(tmp_path: Path, captured, fmt: str):
    stream = captured(fmt)
    app, root_key = _app(tmp_path / "data")
    key = "k" + secrets.token_hex(10)  # no key's shape: only the request's own strings can mask it
    escaped = "".join(f"\\u{ord(c):04x}" for c in key)

    def broken(ctx: Any, body: Any) -> Any:
        raise KeyError(f"no {body.key} among {{{root_key!r}: 1}}")

    entry = app.entries["/v2/keys.whoami"]
    entry.route = dataclasses.replace(entry.route, handler=broken, awaitable=False, blocking=False)
    try:
        assert _post(app, "/v2/keys.whoami", f'{{"key": "{escaped}"}}'.encode(), f"Bearer {root_key}") == 500
    finally:
        app.node.close()
    text = stream.getvalue()
    assert "unexpected error in /v2/keys.whoami" in text and "KeyError" in text and "Traceback" in text
    assert key not in text and root_key not in text and root_key.rpartition("_")[2] not in text, text
    if fmt == "json":
        (line,) = [json.loads(line) for line in text.splitlines() if "unexpected error" in line]
        assert line["level"] == "error" and line["role"] == "worker" and "[redacted]" in line["exc"]


def test_any_record_is_redacted_of_key_shaped_words(captured):
    stream = captured("json")
    key, root_key = random_key("sk"), random_key("unkey_root", 24)
    logging.getLogger("keysvc.test").warning("saw %s and %s", key, root_key, extra={"where": key})
    try:
        raise ValueError(root_key)
    except ValueError:
        logging.getLogger("keysvc.test").exception("failed")
    unshaped = "k" + secrets.token_hex(12)
    logging.getLogger("keysvc.test").warning("%d wrongly formatted", unshaped)  # logging's own error path
    text = stream.getvalue()
    for secret in (key, root_key, unshaped):
        assert secret.rpartition("_")[2] not in text
    first, _, last = [json.loads(line) for line in text.splitlines()]
    assert first["msg"] == "saw sk_[redacted] and unkey_root_[redacted]" and first["where"] == "sk_[redacted]"
    assert last["logger"] == "keysvc.logs" and "could not be written (TypeError)" in last["msg"]


def test_redact_masks_keys_and_keeps_ids_names_and_paths():
    for key in (random_key("sk"), random_key("unkey_root", 24), random_key("a_b_c"), random_key("x", 64)):
        assert logs.redact(f"key={key}.") == f"key={key.rpartition('_')[0]}_[redacted]."
    bare = "2" + base58(secrets.token_bytes(16))
    assert logs.redact(bare) == "[redacted]"
    for kept in ("key_AbCdEfGh12345678", "req_AbCdEfGh1", "keysvc_analytics_dropped_events_total",
                 "PermissionQuerySyntaxError", "/tmp/pytest-of-root/pytest-1/test_x0/data/store",
                 "api_3xZcV9bN2mQ4wE6r", "deadbeef00112233445566778899aabbccddeeff"):
        assert logs.redact(kept) == kept


def test_taints_find_the_strings_of_a_body_however_it_is_written():
    key = "k" + secrets.token_hex(10)
    escaped = "".join(f"\\u{ord(c):04x}" for c in key).encode()
    for body in (b'{"key": "' + escaped + b'"}', f'{{"a": ["{key}"]}}'.encode(), f'{{"key": "{key}'.encode(),
                 f'{{"{key}": 1}}'.encode(), key.encode() + b"\xff"):
        assert logs.scrub(f"error: {key}!", logs.taints(body, None)) == "error: [redacted]!", body
    assert logs.scrub(f"auth {key}", logs.taints(None, f"Bearer {key}".encode())) == "auth [redacted]"


def test_access_lines_are_whole_and_written_in_writes_of_at_most_pipe_buf(monkeypatch: pytest.MonkeyPatch):
    read, write = os.pipe()
    writes: list[bytes] = []
    real_write = os.write

    def recording_write(fd: int, data: Any) -> int:
        if fd == write:
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(logs.os, "write", recording_write)
    try:
        access = logs.AccessLog(fd=write, json=True)
        assert access.chunk == select.PIPE_BUF

        async def run() -> None:  # buffered on the loop, then flushed at once
            for i in range(200):
                access.write(f"req_{i:09d}", "POST" if i % 2 else "BREW", "/v2/keys.verifyKey", 200, 0.000123)
            access.flush()

        asyncio.run(run())
        os.close(write)
        write = -1
        data = b""
        while chunk := os.read(read, 1 << 16):
            data += chunk
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    assert len(writes) > 1 and all(len(w) <= select.PIPE_BUF and w.endswith(b"\n") for w in writes)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert len(lines) == 200
    assert set(lines[0]) == ACCESS_FIELDS
    assert lines[1]["method"] == "POST" and lines[0]["method"] == "OTHER"  # a method no client may invent
    assert lines[0]["latency_ms"] == 0.123 and lines[0]["logger"] == "keysvc.access"


def test_access_lines_are_batched_on_the_loop():
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        access = logs.AccessLog(fd=write, json=False)

        async def run() -> tuple[bytes, bytes]:
            access.write("req_a", "GET", "/v2/liveness", 200, 0.001)
            access.write("req_b", "GET", "/v2/liveness", 200, 0.002)
            try:
                early = os.read(read, 1 << 16)
            except BlockingIOError:
                early = b""
            await asyncio.sleep(logs.FLUSH_EVERY * 3)
            return early, os.read(read, 1 << 16)

        early, late = asyncio.run(run())
    finally:
        os.close(read)
        os.close(write)
    assert early == b""
    first, second = late.decode().splitlines()
    assert first.endswith("keysvc.access: req_a GET /v2/liveness 200 1.000 ms") and "req_b" in second


def test_auto_is_human_on_a_tty_and_json_elsewhere(captured):
    from keysvc.config import Config

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    captured("json")
    logs.setup(Config(), "master", stream=Tty())
    assert not logs.settings.json
    logs.setup(Config(), "master", stream=io.StringIO())
    assert logs.settings.json

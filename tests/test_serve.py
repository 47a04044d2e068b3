"""`keysvc serve` as an operator runs it: first start, a second server, HTTP/2, a dead worker,
and SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import Server, free_port


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_first_start_prints_a_bootstrap_root_key_once(tmp_path):
    data_dir = tmp_path / "data"
    port = free_port()
    args = [sys.executable, "-m", "keysvc", "serve", "--data-dir", str(data_dir), "--port", str(port), "--workers", "1"]
    outputs = []
    for _ in range(2):
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        server = Server.__new__(Server)  # only to poll liveness on this port
        server.port = port
        wait_for(lambda: _answers(server))
        process.send_signal(signal.SIGTERM)
        outputs.append(process.communicate(timeout=20)[0])
        assert process.returncode == 0
    first, second = outputs
    assert "No root key existed" in first and "No root key existed" not in second
    root_key = [line.strip() for line in first.splitlines() if line.strip().startswith("unkey_root_")][0]
    server = Server.__new__(Server)
    server.port = port
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(server))
        server.root_key = root_key
        assert server.call("/v2/apis.createApi", {"name": "bootstrapped"})[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def _answers(server: Server) -> bool:
    try:
        return server.request("GET", "/v2/liveness", auth=None)[0] == 200
    except OSError:
        return False


@pytest.fixture
def running(tmp_path):
    server = Server(tmp_path / "data", workers=2)
    yield server
    server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(running):
    result = subprocess.run(
        [sys.executable, "-m", "keysvc", "serve", "--data-dir", str(running.data_dir), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"another keysvc serve (pid {running.process.pid})" in result.stderr


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_http2_and_http1_are_both_served(running):
    for flag, version in (("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")):
        out = subprocess.run(["curl", "-s", flag, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                              f"{running.url}/v2/liveness"], capture_output=True, text=True, timeout=30)
        assert out.stdout == f"{version} 200"


def test_a_killed_worker_is_replaced_and_serving_goes_on(running):
    status, body = running.call("/v2/apis.createApi", {"name": "survives"})
    assert status == 200
    workers = running.worker_pids()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: len(set(running.worker_pids()) - {workers[0]}) == 2)
    for _ in range(20):  # both workers answer, the new one included
        assert running.call("/v2/apis.getApi", {"apiId": body["data"]["apiId"]})[0] == 200


def test_sigterm_stops_the_server_gracefully(running):
    assert running.call("/v2/apis.createApi", {"name": "before-stop"})[0] == 200
    workers = running.worker_pids()
    assert running.stop(timeout=60) == 0  # 0, not killed: Granian stopped its workers and exited
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)

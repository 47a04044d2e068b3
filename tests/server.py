"""A real `keysvc serve` process on loopback, for the end-to-end tests."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_root_key(data_dir: Path, *permissions: str) -> str:
    args = [sys.executable, "-m", "keysvc", "root-key", "create", "--data-dir", str(data_dir)]
    for permission in permissions:
        args += ["--permission", permission]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip().splitlines()[-1]


class Server:
    """Starts `keysvc serve` and waits until it answers; `stop()` sends SIGTERM."""

    def __init__(self, data_dir: Path, workers: int = 2, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.root_key = create_root_key(data_dir)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keysvc", "serve", "--data-dir", str(data_dir), "--port", str(self.port),
             "--workers", str(workers), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"keysvc serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.request("GET", "/v2/liveness", auth=None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"keysvc serve did not answer within {timeout} s:\n{self.log()}")

    def request(self, method: str, path: str, body: Any = None, *, auth: str | None = "root",
                headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request; returns (status, headers with lower-case names, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            sent = {"content-type": "application/json", **(headers or {})}
            if auth is not None:
                sent["authorization"] = f"Bearer {self.root_key if auth == 'root' else auth}"
            payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            conn.request(method, path, body=payload, headers=sent)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def call(self, path: str, body: Any, *, auth: str | None = "root") -> tuple[int, Any]:
        status, _, payload = self.request("POST", path, body, auth=auth)
        return status, json.loads(payload)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

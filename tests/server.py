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
from collections.abc import Iterator
from contextlib import contextmanager
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
                 env: dict[str, str] | None = None, new_session: bool = False, root_key: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        # A root key of an earlier server on this data dir, or a new one (a store write).
        self.root_key = root_key or create_root_key(data_dir)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "keysvc", "serve", "--data-dir", str(data_dir), "--port", str(self.port),
             "--workers", str(workers), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            # A process group of its own, so that kill_all() can SIGKILL serve and its workers
            # without reaching the test process.
            start_new_session=new_session,
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
        if not self._log.closed:
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

    # -- the process tree, for crash tests -------------------------------------------------------

    def children(self) -> list[int]:
        return child_pids(self.process.pid)

    def worker_pids(self) -> list[int]:
        """Granian's worker processes: the children of serve other than the flusher."""
        return [pid for pid in self.children() if b"keysvc.analytics" not in cmdline(pid)]

    def flusher_pids(self) -> list[int]:
        return [pid for pid in self.children() if b"keysvc.analytics" in cmdline(pid)]

    def kill_all(self, timeout: float = 20.0) -> list[int]:
        """SIGKILL everything of this server at once, as an OOM killer or a power cut would: the
        process group of serve (serve and its workers; needs new_session=True) and the flusher
        (a session of its own). Returns the pids killed; each is waited for."""
        assert os.getpgid(self.process.pid) == self.process.pid, "kill_all needs Server(new_session=True)"
        pids = [self.process.pid, *self.children()]
        os.killpg(self.process.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise AssertionError(f"still alive after SIGKILL: {[pid for pid in pids if alive(pid)]}")
            time.sleep(0.02)
        self._log.close()
        return pids


def child_pids(pid: int) -> list[int]:
    """The children of `pid` (all its threads'), from /proc; [] once it is gone."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except FileNotFoundError:
            pass
    return sorted(set(found))


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> Any:
    """predicate()'s first truthy value within `timeout` seconds (a liveness deadline, not a
    measurement), else an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- file systems, for fault tests (root only) ------------------------------------------------------

def can_mount() -> str | None:
    """None if this process may mount file systems, else why not (a reason to skip)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    import tempfile

    probe = tempfile.mkdtemp(prefix="keysvc-mount-probe-")
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], capture_output=True,
                                text=True, timeout=30)
        if result.returncode != 0:
            return f"mount is not permitted here: {result.stderr.strip()}"
        subprocess.run(["umount", probe], check=True, timeout=30)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"mount is not available: {exc}"
    finally:
        os.rmdir(probe)


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "24m") mounted on `path` (created) for the block; unmounted after,
    lazily if something still holds it, so that a failing test leaves no mount behind."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True,
                   capture_output=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, *options: str) -> None:
    """`mount -o remount,<options>` (e.g. "ro" or "rw") of the file system mounted on `path`."""
    subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(path)], check=True, capture_output=True,
                   timeout=30)

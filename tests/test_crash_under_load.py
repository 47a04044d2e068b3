"""SIGKILL under concurrent load on a real `keysvc serve --workers 2`: a worker, then the other
one, then the flusher, then everything at once; then a restart on the same data dir.

Threads keep verifying credited keys (and unknown ones) over keep-alive connections, and one
more keeps creating keys, recording every answer (with its meta.requestId) and every request
that was sent and never answered. A request without an answer may or may not have been served:
it is the only slack allowed anywhere below.

During the load:
- a worker killed: another one is spawned, and the service answers again, within a liveness
  deadline; then the other original worker too, so that only the respawned one can answer;
- the flusher killed: the supervisor starts a new one.

After SIGKILL of serve's whole process group and of the flusher, and a restart:
- every key whose createKey was answered is there and verifies;
- each credited key's balance is its initial credits less one per VALID answer, less at most
  one per request of that key that was never answered; no two VALID answers of one key reported
  the same balance (each charge is its own);
- every answered verification is in ClickHouse (queried through analytics.getVerifications)
  exactly once, with its outcome and key, and no request id is there twice;
- no LMDB reader slot of the store, the counters or the spool belongs to a dead process, and
  the restarted node writes to both environments.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import lmdb
import pytest
import yaml

from keysvc.analytics.spool import Spool
from keysvc.config import AnalyticsConfig
from server import Server, alive, wait_until

pytestmark = pytest.mark.slow

LIVENESS = 15.0  # seconds: only turns "never answers again" into a failure, never a speed check
DRAIN = 60.0  # seconds for the restarted flusher to land everything in ClickHouse
REQUEST_TIMEOUT = 20.0
VERIFIERS = 6  # load threads
KEYS = 8
INITIAL_CREDITS = 10**6
CREATED_CREDITS = 100


class Load:
    """Verification threads and one key-creating thread against one server, until stop()."""

    def __init__(self, server: Server, api_id: str, keys: list[tuple[str, str]]) -> None:
        self.port = server.port
        self.root_key = server.root_key
        self.api_id = api_id
        self.keys = keys  # (key id, plaintext)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[dict[str, Any]] = []  # one per answered verification
        self.unanswered: Counter[str | None] = Counter()  # key id (None: an unknown key) -> requests
        self.created: list[tuple[str, str]] = []  # keys whose createKey was answered
        self.create_unanswered = 0
        self.failures: list[str] = []  # answers that are not 200 (every verifyKey outcome is a 200)
        self.last_answer = 0.0  # time.monotonic() of the newest answer
        self.threads = [threading.Thread(target=self.verify_loop, args=(i,), daemon=True) for i in range(VERIFIERS)]
        self.threads.append(threading.Thread(target=self.create_loop, daemon=True))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT + 10)
            assert not thread.is_alive(), "a load thread is stuck"

    def answered_after(self, moment: float) -> bool:
        return self.last_answer > moment

    def connect(self) -> http.client.HTTPConnection | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.connect()  # refused: nothing was sent, so nothing can have been charged
        except OSError:
            conn.close()
            time.sleep(0.05)
            return None
        return conn

    def post(self, conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
        """(status, decoded body), or None when the request was sent (maybe partly) and no
        answer came back: the server may or may not have done it."""
        try:
            conn.request("POST", path, body=json.dumps(body).encode(),
                         headers={"content-type": "application/json", "authorization": f"Bearer {self.root_key}"})
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            return None
        self.last_answer = time.monotonic()
        return response.status, json.loads(payload)

    def verify_loop(self, index: int) -> None:
        rng = random.Random(index)
        conn = None
        while not self.stopping.is_set():
            if conn is None and (conn := self.connect()) is None:
                continue
            if rng.random() < 0.1:
                key_id, plaintext = None, f"sk_unknown_{rng.getrandbits(64):x}"
            else:
                key_id, plaintext = rng.choice(self.keys)
            answer = self.post(conn, "/v2/keys.verifyKey", {"key": plaintext})
            if answer is None:
                with self.lock:
                    self.unanswered[key_id] += 1
                conn.close()
                conn = None
                continue
            status, body = answer
            with self.lock:
                if status != 200:
                    self.failures.append(f"verifyKey {status}: {body}")
                    continue
                data = body["data"]
                self.answers.append({"key_id": key_id, "valid": data["valid"], "code": data["code"],
                                     "credits": data.get("credits"), "request_id": body["meta"]["requestId"]})
        if conn is not None:
            conn.close()

    def create_loop(self) -> None:
        conn = None
        while not self.stopping.is_set():
            if conn is None and (conn := self.connect()) is None:
                continue
            answer = self.post(conn, "/v2/keys.createKey",
                               {"apiId": self.api_id, "credits": {"remaining": CREATED_CREDITS}})
            if answer is None:
                self.create_unanswered += 1
                conn.close()
                conn = None
                continue
            status, body = answer
            with self.lock:
                if status != 200:
                    self.failures.append(f"createKey {status}: {body}")
                else:
                    self.created.append((body["data"]["keyId"], body["data"]["key"]))
            time.sleep(0.01)  # a steady trickle of fsynced writes, not a flood
        if conn is not None:
            conn.close()


def call(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, payload = server.call(path, body)
    assert status == 200, (path, status, payload)
    return payload["data"]


def analytics(server: Server, sql: str) -> list[dict[str, Any]]:
    return call(server, "/v2/analytics.getVerifications", {"query": sql})


def stale_readers(data_dir: Path) -> dict[str, list[int]]:
    """The pids holding a reader slot of each LMDB environment of the node that are not alive."""
    stale = {}
    for name, max_dbs in (("store", 32), ("counters", 1), ("spool", 2)):
        env = lmdb.open(str(data_dir / name), max_dbs=max_dbs, readonly=True, lock=True, create=False)
        try:
            table = env.readers()
        finally:
            env.close()
        pids = [int(line.split()[0]) for line in table.splitlines()[1:] if line.split() and line.split()[0].isdigit()]
        stale[name] = [pid for pid in pids if not alive(pid)]
    return stale


def test_sigkill_of_workers_flusher_and_server_under_load(tmp_path: Path):
    data_dir = tmp_path / "data"
    config = tmp_path / "keysvc.yaml"
    # No metrics listener: its fixed port would clash with other servers.
    config.write_text(yaml.safe_dump({"analytics": {"flush_interval": 0.2}, "metrics": {"port": None}}))
    server = Server(data_dir, workers=2, extra=("--config", str(config)), new_session=True)
    rng = random.Random()
    load = None
    figures: dict[str, str] = {}  # printed at the end (pytest -s): bench/README.md quotes a run
    try:
        api_id = call(server, "/v2/apis.createApi", {"name": "crash-under-load"})["apiId"]
        keys = []
        for _ in range(KEYS):
            created = call(server, "/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": INITIAL_CREDITS}})
            keys.append((created["keyId"], created["key"]))
        workers = wait_until(lambda: len(server.worker_pids()) == 2 and server.worker_pids(), LIVENESS,
                             "two Granian workers")
        flusher = wait_until(server.flusher_pids, LIVENESS, "the flusher")

        load = Load(server, api_id, keys)
        load.start()
        wait_until(lambda: len(load.answers) > 200, LIVENESS, "the load to get going")

        # One worker dies: the other answers on, and Granian spawns a new one.
        first, second = workers
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: [p for p in server.worker_pids() if p not in workers], LIVENESS,
                   "Granian to spawn a worker in place of the killed one")
        wait_until(lambda: load.answered_after(killed_at), LIVENESS, "an answer after a worker was killed")
        figures["first worker killed: answers again within"] = f"{time.monotonic() - killed_at:.2f} s"
        # Then the other original one: only the respawned worker is left to answer.
        answers_before = len(load.answers)
        os.kill(second, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: load.answered_after(killed_at) and len(load.answers) > answers_before + 50, LIVENESS,
                   "answers from the respawned worker after the other original one was killed")
        figures["second worker killed: 50 answers again within"] = f"{time.monotonic() - killed_at:.2f} s"
        wait_until(lambda: len([p for p in server.worker_pids() if p not in workers]) >= 2, LIVENESS,
                   "Granian to spawn a worker in place of the second killed one")

        # The flusher dies (at a random point of its batches): the supervisor starts another.
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(flusher[0], signal.SIGKILL)
        wait_until(lambda: [p for p in server.flusher_pids() if p != flusher[0]], LIVENESS, "a new flusher")
        answers_before = len(load.answers)
        wait_until(lambda: len(load.answers) > answers_before + 200, LIVENESS, "answers after the flusher died")

        # Everything at once, under load.
        time.sleep(rng.uniform(0.3, 1.2))
        killed = server.kill_all()
        assert all(not alive(pid) for pid in killed)
        time.sleep(0.3)  # the load threads meet refused connections: nothing more can be charged
        load.stop()
    finally:
        if load is not None:
            load.stopping.set()
        if server.process.poll() is None:
            server.kill_all()

    assert not load.failures, load.failures[:10]
    valid = Counter(a["key_id"] for a in load.answers if a["valid"])
    assert sum(valid.values()) > 500, "too little load to test anything"
    assert not any(a["valid"] for a in load.answers if a["key_id"] is None)
    assert len(load.created) > 5, "too few keys created under load"

    restarted_at = time.monotonic()
    server = Server(data_dir, workers=2, extra=("--config", str(config)), new_session=True)
    figures["whole node killed: restarted and answering within"] = f"{time.monotonic() - restarted_at:.2f} s"
    try:
        # Analytics first (the checks below verify keys, which adds events): every answered
        # verification exactly once.
        answered = {a["request_id"]: a for a in load.answers}
        assert len(answered) == len(load.answers), "a request id was answered twice"

        def drained() -> bool:
            # Once the spool is empty every insert has returned; then the flusher must answer.
            spool = Spool(str(data_dir), AnalyticsConfig().spool_map_size)
            try:
                if spool.depth() or spool.inflight() is not None:
                    return False
            finally:
                spool.close()
            status, _ = server.call("/v2/analytics.getVerifications", {"query": "SELECT 1 AS one"})
            return status == 200

        wait_until(drained, DRAIN, "the restarted flusher to land every spooled event", interval=0.5)
        figures["spool drained after the restart within"] = f"{time.monotonic() - restarted_at:.2f} s"
        rows = analytics(server, "SELECT request_id, key_id, outcome FROM key_verifications_v1")
        seen = Counter(row["request_id"] for row in rows)
        twice = {rid: n for rid, n in seen.items() if n > 1}
        assert not twice, f"{len(twice)} request ids in ClickHouse more than once, e.g. {list(twice.items())[:5]}"
        missing = [rid for rid in answered if rid not in seen]
        assert not missing, f"{len(missing)} of {len(answered)} answered verifications are not in ClickHouse: " \
                            f"{missing[:5]}"
        by_id = {row["request_id"]: row for row in rows}
        wrong = [(rid, a["code"], a["key_id"], by_id[rid]) for rid, a in answered.items()
                 if (by_id[rid]["outcome"], by_id[rid]["key_id"]) != (a["code"], a["key_id"] or "")]
        assert not wrong, wrong[:5]
        unanswered = sum(load.unanswered.values())
        assert len(rows) <= len(answered) + unanswered, (len(rows), len(answered), unanswered)

        # Credits: every VALID answer charged once; only unanswered requests may have been too.
        for key_id, _ in keys:
            remaining = call(server, "/v2/keys.getKey", {"keyId": key_id})["credits"]["remaining"]
            charged, slack = valid[key_id], load.unanswered[key_id]
            assert INITIAL_CREDITS - charged - slack <= remaining <= INITIAL_CREDITS - charged, \
                (key_id, remaining, charged, slack)
            reported = [a["credits"] for a in load.answers if a["key_id"] == key_id and a["valid"]]
            assert len(set(reported)) == len(reported), f"{key_id}: two VALID answers reported the same balance"
            assert min(reported) >= remaining

        # Every key whose creation was answered is there and verifies (a store write each was
        # fsynced before its answer).
        for key_id, plaintext in load.created:
            assert call(server, "/v2/keys.getKey", {"keyId": key_id})["keyId"] == key_id
            result = call(server, "/v2/keys.verifyKey", {"key": plaintext})
            assert (result["code"], result["keyId"], result["credits"]) == ("VALID", key_id, CREATED_CREDITS - 1)

        # No stale reader slot, no stale lock: the restarted node writes to both environments.
        fresh = call(server, "/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 3}})
        result = call(server, "/v2/keys.verifyKey", {"key": fresh["key"]})
        assert (result["valid"], result["credits"]) == (True, 2)
        assert stale_readers(data_dir) == {"store": [], "counters": [], "spool": []}
        figures.update({
            "verifications answered (VALID)": f"{len(answered)} ({sum(valid.values())})",
            "requests sent without an answer (lost with a killed process)": str(unanswered),
            "rows in ClickHouse (answered, each once; + landed unanswered)": f"{len(rows)}",
            "keys created under load, all present": str(len(load.created)),
        })
        print("\n".join(f"{name}: {value}" for name, value in figures.items()))
    finally:
        assert server.stop() == 0, server.log()

"""The node's flusher: one process per node (`python -m keysvc.analytics`, started and restarted
by `keysvc serve`) that drains the event spool into ClickHouse and answers the workers' analytics
queries.

Exactly once, across crashes: a batch is the spool range [first, last]. Before inserting, the
flusher marks it in flight (synced to disk for a ClickHouse server, see Spool.begin_flight); it
inserts the verification rows and the ratelimit rows each with
`insert_deduplication_token = "<spool epoch>:<first>-<last>:<table>"` (the raw tables keep a
deduplication window, and dependent materialized views deduplicate too); only then does it
remove the range from the spool (`land`). A flusher that starts and finds a range in flight sends
exactly that range again, with the same tokens: whatever ClickHouse already had is dropped.

ClickHouse is the embedded chDB engine under <data_dir>/chdb, or a server when
`analytics.clickhouse_url` is set; both through clickhouse-connect. chDB may be opened by one process
only, so the flusher also serves the workers' queries over the Unix socket <data_dir>/analytics.sock
(see client.py for the protocol), each in a thread of its own so that flushing goes on.

While ClickHouse is unreachable, events stay spooled (the oldest dropped past spool_cap_bytes, and
counted) and the flusher retries with a backoff capped at a few seconds. On SIGTERM it flushes what
it can within drain_timeout; the rest stays spooled for the next start.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import errno
import fcntl
import logging
import math
import os
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from keysvc import logs, metrics
from keysvc.analytics import events, schema
from keysvc.analytics.priority import holding_shared_locks
from keysvc.analytics.rollups import Rollups
from keysvc.analytics.spool import Spool
from keysvc.config import Config, from_json, load

log = logging.getLogger("keysvc.analytics")

CONFIG_ENV = "KEYSVC_CONFIG_JSON"  # as keysvc.http.app.CONFIG_ENV: the config `keysvc serve` passes on
SOCKET_NAME = "analytics.sock"
LOCK_NAME = "analytics.lock"
# Tests only: "<point>:<marker file>" makes the flusher SIGKILL itself once at that point of a batch
# (after_flight, between_tables, before_land); the marker file records that it did.
CRASH_ENV = "KEYSVC_ANALYTICS_CRASH_AT"

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 3.0
CAP_EVERY = 1.0  # seconds between two Spool.enforce_cap runs
POLL = 0.05  # seconds between two looks at the spool
QUERY_SLOTS = 4  # queries run at once; more wait for a slot
MAX_REQUEST = 1 << 20
MAX_RESPONSE = 64 << 20
FRAME = struct.Struct(">I")

_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64 = (0, (1 << 64) - 1)


# -- ClickHouse ------------------------------------------------------------------------------------

def connect(config: Config, *, connect_timeout: float = 3.0) -> Any:
    """A clickhouse-connect client: the embedded chDB engine, or the server at clickhouse_url."""
    import clickhouse_connect

    url = config.analytics.clickhouse_url
    if url:
        return clickhouse_connect.get_client(dsn=url, tz_mode="aware", connect_timeout=connect_timeout,
                                             send_receive_timeout=300, autogenerate_session_id=False,
                                             query_retries=0)
    path = Path(config.storage.data_dir) / "chdb"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _chdb_opened:
        _remove_unwritten_definitions(path)
        _chdb_opened.append(str(path))
    return clickhouse_connect.get_client(interface="chdb", path=str(path), tz_mode="aware")


_chdb_opened: list[str] = []  # the chDB path this process has opened: one engine per process
MIN_FREE_TO_MIGRATE = 8 << 20  # bytes free on chDB's disk before a migration is tried


def _remove_unwritten_definitions(path: Path) -> None:
    """A CREATE that met a full disk can leave its definition file empty, and chDB then refuses
    to open the whole database ("Cannot parse definition from metadata file"). An empty file
    defines nothing: removing it lets the migration, whose statements are idempotent, create it
    again. Only before this process opens chDB: an open engine owns its files."""
    for definition in path.rglob("*.sql"):
        try:
            if definition.is_file() and not definition.is_symlink() and definition.stat().st_size == 0:
                definition.unlink()
                log.warning("removed %s: an empty definition left by a CREATE that did not finish", definition)
        except OSError:
            pass


def unreachable(exc: BaseException) -> bool:
    """Whether an error means "ClickHouse cannot be reached" rather than "ClickHouse said no"."""
    from clickhouse_connect.driver.exceptions import OperationalError, StreamFailureError

    return isinstance(exc, OSError) or (isinstance(exc, OperationalError) and not isinstance(exc, StreamFailureError))


def insert_settings(token: str) -> dict[str, Any]:
    return {
        "insert_deduplicate": 1,
        "insert_deduplication_token": token,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
        "async_insert": 0,  # a server whose users default to async inserts: tokens want the synchronous path
    }


def _close(client: Any) -> None:
    try:
        client.close()
    except Exception:
        pass


# -- the rows ----------------------------------------------------------------------------------------

def _in(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


def decode_rows(batch: list[tuple[int, bytes]]) -> tuple[list[tuple], list[tuple], list[int]]:
    """The batch's verification rows and ratelimit rows, as the events' fields (the raw tables'
    columns of events.VERIFICATION_COLUMNS and RATELIMIT_COLUMNS), and the sequence numbers of the
    records that could not be decoded (the events' types bound their integers to their columns')."""
    verifications, ratelimits, bad = [], [], []
    for seq, raw in batch:
        try:
            event = events.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):  # a bad record, never fatal
            bad.append(seq)
            continue
        rows = verifications if isinstance(event, events.VerificationEvent) else ratelimits
        rows.append(msgspec.structs.astuple(event))
    return verifications, ratelimits, bad


def jsonable(value: Any) -> Any:
    """A ClickHouse value as JSON can carry it: times as unix milliseconds (like the raw tables'
    `time`), NaN and infinities as null, Decimal as a number, UUIDs, IPs and the like as strings."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if _in(value, (_INT64[0], _UINT64[1])) else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return (value - _EPOCH) // dt.timedelta(milliseconds=1)
    if isinstance(value, dt.date):
        return (value - _EPOCH.date()) // dt.timedelta(milliseconds=1)
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(jsonable(key)): jsonable(item) for key, item in value.items()}
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


# -- the flusher -------------------------------------------------------------------------------------

class Flusher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.analytics = config.analytics
        self.data_dir = config.storage.data_dir
        self.spool = holding_shared_locks(Spool, self.data_dir, self.analytics.spool_map_size)
        self.client: Any = None
        self.schema_ready = threading.Event()
        self.stop_requested = False
        self.parent = os.getppid()
        self.backoff = 0.0
        self.retry_at = 0.0
        self.cap_at = 0.0
        self.last_flush = time.monotonic()
        # The embedded chDB's rollups are the flusher's; a server's are its materialized views (schema.py).
        self.rollups = None if self.analytics.clickhouse_url else Rollups()
        self.last_rollup = time.monotonic()
        self.unrolled = self.rollups is not None  # a previous run may have landed batches it did not roll up
        self.rollup_failing = False
        self.undecodable = 0
        self._connect_lock = threading.Lock()
        self._failure_logged: tuple[str, float] = ("", 0.0)
        self.crash_at, self.crash_marker = "", ""
        point, _, marker = os.environ.get(CRASH_ENV, "").partition(":")
        if point and marker and not os.path.exists(marker):
            self.crash_at, self.crash_marker = point, marker
        self.queries = QueryServer(self)

    # -- lifecycle

    def request_stop(self, *_: Any) -> None:
        self.stop_requested = True  # only a flag: the loops look at it at least every POLL seconds

    def run(self) -> int:
        corrupt = holding_shared_locks(self.spool.drop_corrupt_mark)
        if corrupt is not None:
            log.error("removed the spool's in-flight mark, which is not a sequence number range (%s): the spool is "
                      "corrupted; the batch it named, if ClickHouse took it before the flusher stopped, is sent again "
                      "under new deduplication tokens and may be counted twice", corrupt[:32].hex())
        try:
            self.queries.start()
        except OSError as exc:  # flushing matters more: go on without answering queries
            log.error("cannot serve analytics queries on %s: %s", socket_path(self.data_dir), exc)
        try:
            self.loop()
            self.drain()
        finally:
            self.queries.stop()
            if self.client is not None:
                _close(self.client)
            left = self.spool.depth()
            holding_shared_locks(self.spool.close)  # it may write the drops it could not count yet
            log.info("stopped%s", f": {left} event(s) stay spooled for the next start" if left else "")
        return 0

    def stopping(self) -> bool:
        if not self.stop_requested and os.getppid() != self.parent:
            log.warning("keysvc serve (pid %d) went away: the flusher drains and stops", self.parent)
            self.stop_requested = True
        return self.stop_requested

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, POLL))

    # -- the loop

    def loop(self) -> None:
        batch_size, interval = max(1, self.analytics.batch_size), max(0.0, self.analytics.flush_interval)
        while not self.stopping():
            now = time.monotonic()
            if now >= self.cap_at:
                self.cap_at = now + CAP_EVERY
                self.enforce_cap()
            if now < self.retry_at:
                self.sleep(min(self.retry_at - now, CAP_EVERY))
                continue
            if not self.ready():
                continue
            if self.spool.inflight() is not None:
                self.resend()
                continue
            depth = self.spool.depth()
            if self.unrolled and ((depth == 0 and not self.rollup_failing) or self.rollup_due()):
                self.roll_up()
                continue
            if depth == 0:
                self.last_flush = now
            elif depth >= batch_size or now - self.last_flush >= interval:
                self.flush_all(batch_size)
                continue
            self.sleep(min(POLL, interval) if interval > 0 else POLL)

    def drain(self) -> None:
        """After SIGTERM: flush what can be flushed within drain_timeout."""
        deadline = time.monotonic() + max(0.0, self.analytics.drain_timeout)
        batch_size = max(1, self.analytics.batch_size)
        try:
            while time.monotonic() < deadline:
                if self.spool.inflight() is None and self.spool.depth() == 0:
                    break
                left = deadline - time.monotonic()
                if time.monotonic() < self.retry_at:
                    time.sleep(max(0.0, min(self.retry_at - time.monotonic(), left)))
                    continue
                if not self.ready(connect_timeout=max(1.0, min(3.0, left))):  # clickhouse-connect takes whole seconds
                    continue
                if self.spool.inflight() is not None:
                    self.resend()
                else:
                    self.flush_batch(batch_size)
            if self.spool.depth():
                log.warning("the drain timeout (%.1f s) has passed", self.analytics.drain_timeout)
            elif self.unrolled and self.client is not None and time.monotonic() < deadline:
                self.roll_up()  # else the next start rolls up what landed
        finally:
            self.enforce_cap()

    def ready(self, connect_timeout: float = 3.0) -> bool:
        """Connected to ClickHouse, with the schema migrated; else count a failure."""
        if self.client is not None and self.schema_ready.is_set():
            return True
        try:
            with self._connect_lock:
                if self.client is None:
                    self.client = connect(self.config, connect_timeout=connect_timeout)
                if not self.schema_ready.is_set():
                    schema.migrate(self.client, before=self.room_to_migrate)
                    self.schema_ready.set()
            log.info("connected to ClickHouse (%s)", self.where())
            return True
        except Exception as exc:
            self.failed("cannot reach ClickHouse (or migrate its schema)", exc)
            return False

    def room_to_migrate(self) -> None:
        """A migration that runs out of disk half-way leaves chDB's catalog with definitions it
        cannot read back: with chDB on a nearly full disk, wait for room rather than start one."""
        if self.analytics.clickhouse_url:
            return
        stat = os.statvfs(Path(self.data_dir) / "chdb")
        free = stat.f_bavail * stat.f_frsize
        if free < MIN_FREE_TO_MIGRATE:
            raise OSError(errno.ENOSPC, f"{free >> 20} MiB free on the disk of {self.where()}: the schema migration "
                                        f"waits for {MIN_FREE_TO_MIGRATE >> 20} MiB")

    def where(self) -> str:
        return "server" if self.analytics.clickhouse_url else f"chDB in {Path(self.data_dir) / 'chdb'}"

    def failed(self, what: str, exc: BaseException) -> None:
        metrics.flusher(self.config).failed()
        if self.client is not None and unreachable(exc):
            _close(self.client)
            self.client = None
        self.backoff = min(BACKOFF_CAP, self.backoff * 2 if self.backoff else BACKOFF_FIRST)
        self.retry_at = time.monotonic() + self.backoff
        kind = f"{what}: {type(exc).__name__}"  # the message itself varies (query ids)
        now = time.monotonic()
        if kind != self._failure_logged[0] or now - self._failure_logged[1] >= 30:
            self._failure_logged = (kind, now)
            log.error("%s: %s (retrying, at most every %.0f s; %d event(s) spooled)", kind, exc, BACKOFF_CAP,
                      self.spool.depth())

    def succeeded(self) -> None:
        if self.backoff:
            log.info("ClickHouse is back: flushing")
        self.backoff = 0.0
        self.retry_at = 0.0
        self._failure_logged = ("", 0.0)

    def enforce_cap(self) -> None:
        """Drop the oldest events past spool_cap_bytes (Spool.enforce_cap counts and logs them)."""
        try:
            evicted = holding_shared_locks(self.spool.enforce_cap, self.analytics.spool_cap_bytes)
            metrics.flusher(self.config).evicted(evicted)
        except Exception:
            log.exception("enforcing the spool cap failed")

    # -- rollups

    def rollup_due(self) -> bool:
        return time.monotonic() - self.last_rollup >= self.analytics.rollup_interval

    def roll_up(self) -> None:
        """Build the rollups of every landed batch (keysvc.analytics.rollups). A rollup that fails
        is tried again after rollup_interval; meanwhile batches go on landing, so that nothing
        spooled waits for the rollups."""
        self.last_rollup = time.monotonic()
        assert self.rollups is not None
        try:
            self.rollups.run(self.client)
        except Exception as exc:
            self.rollup_failing = True
            if unreachable(exc):
                self.failed("rolling up the raw tables failed", exc)
            else:
                metrics.flusher(self.config).failed()
                log.error("rolling up the raw tables failed (trying again in %.0f s): %s: %s",
                          self.analytics.rollup_interval, type(exc).__name__, exc)
            return
        self.rollup_failing = False
        self.unrolled = False

    # -- batches

    def flush_all(self, batch_size: int) -> None:
        """Flush batches until the spool holds less than a batch (it then waits for the interval), or
        until the rollups are due."""
        while not self.stopping():
            sent = self.flush_batch(batch_size)
            # A backlog is rolled up as it drains, every rollup_interval.
            if sent is None or sent < batch_size or (self.unrolled and self.rollup_due()):
                break
        self.last_flush = time.monotonic()

    def flush_batch(self, batch_size: int) -> int | None:
        """Send the oldest batch; returns how many records it held (None if it failed)."""
        batch = holding_shared_locks(self.spool.read, batch_size)  # it removes corrupt records
        if not batch:
            return 0
        first, last = batch[0][0], batch[-1][0]
        holding_shared_locks(self.spool.begin_flight, first, last, bool(self.analytics.clickhouse_url))
        self._crash_point("after_flight")
        return len(batch) if self.send(first, last, batch) else None

    def resend(self) -> bool:
        first, last = self.spool.inflight()
        batch = holding_shared_locks(self.spool.range, first, last)
        log.info("sending the batch in flight again, with the same deduplication tokens: %d-%d (%d events)",
                 first, last, len(batch))
        return self.send(first, last, batch)

    def send(self, first: int, last: int, batch: list[tuple[int, bytes]]) -> bool:
        rows = events.rows(batch)
        token = f"{self.spool.epoch}:{first}-{last}"
        try:
            try:
                self.insert_rows(rows, token)
            except Exception as exc:
                if self.client is None or unreachable(exc):
                    raise
                # ClickHouse refused the MsgPack rows although each decoded as an event (say, an
                # integer where a Float64 goes): the same batch, converted value by value, with
                # the same tokens, so that a table that took its part already drops it.
                log.warning("ClickHouse refused events %d-%d as MsgPack rows (%s): sending them value by value",
                            first, last, exc)
                rows.bad = self.insert_values(batch, token)
        except Exception as exc:
            self.failed(f"inserting events {first}-{last} failed", exc)
            return False
        self._crash_point("before_land")
        holding_shared_locks(self.spool.land, first, last)
        self.unrolled = self.rollups is not None
        metrics.flusher(self.config).landed(len(batch))
        self.succeeded()
        if rows.bad:
            bad = rows.bad
            self.undecodable += len(bad)
            holding_shared_locks(self.spool.count_dropped, len(bad),
                                 f"{len(bad)} spooled event(s) could not be decoded")
            log.error("skipped %d spooled event(s) that could not be decoded (sequence numbers %s%s); %d so far",
                      len(bad), ", ".join(map(str, bad[:10])), ", ..." if len(bad) > 10 else "", self.undecodable)
        return True

    def insert_rows(self, rows: events.Rows, token: str) -> None:
        if rows.verification_count:
            self.client.raw_insert(schema.VERIFICATIONS_TABLE, events.VERIFICATION_COLUMNS, rows.verifications,
                                   fmt="MsgPack", settings=insert_settings(f"{token}:{schema.VERIFICATIONS_TABLE}"))
        self._crash_point("between_tables")
        if rows.ratelimit_count:
            self.client.raw_insert(schema.RATELIMITS_TABLE, events.RATELIMIT_COLUMNS, rows.ratelimits,
                                   fmt="MsgPack", settings=insert_settings(f"{token}:{schema.RATELIMITS_TABLE}"))

    def insert_values(self, batch: list[tuple[int, bytes]], token: str) -> list[int]:
        """The slow path: decoded events, converted by clickhouse-connect. Returns the sequence
        numbers of the records it could not decode."""
        verifications, ratelimits, bad = decode_rows(batch)
        for table, rows, columns in ((schema.VERIFICATIONS_TABLE, verifications, events.VERIFICATION_COLUMNS),
                                     (schema.RATELIMITS_TABLE, ratelimits, events.RATELIMIT_COLUMNS)):
            if rows:
                self.client.insert(table, rows, column_names=columns, column_type_names=schema.types_of(table, columns),
                                   settings=insert_settings(f"{token}:{table}"))
        return bad

    def _crash_point(self, point: str) -> None:
        if point == self.crash_at:
            Path(self.crash_marker).write_text(f"{os.getpid()} {point}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    # -- queries (from QueryServer's threads)

    def query(self, sql: str, timeout: float, max_rows: int | None) -> dict[str, Any]:
        if not self.schema_ready.is_set():
            return {"error": "analytics is starting, or ClickHouse is unreachable", "kind": "unavailable"}
        client = self.queries.checkout()
        settings: dict[str, Any] = {"max_execution_time": timeout, "readonly": 1}
        if max_rows:
            settings.update(max_result_rows=max_rows, result_overflow_mode="throw")
        try:
            if client is None:
                with self._connect_lock:
                    client = connect(self.config)
            result = client.query(sql, settings=settings)
            names = result.column_names
            rows = [{name: jsonable(value) for name, value in zip(names, row)} for row in result.result_rows]
        except Exception as exc:
            from clickhouse_connect.driver.exceptions import ClickHouseError

            # A client that failed is not used again: an INSERT, say, makes clickhouse-connect
            # apply the settings to a chDB handle with SET, which it cannot undo under readonly.
            if client is not None:
                _close(client)
            if unreachable(exc):
                return {"error": f"ClickHouse is unreachable: {exc}", "kind": "unavailable"}
            if isinstance(exc, ClickHouseError):
                return {"error": str(exc), "kind": "rejected"}
            log.exception("an analytics query failed")
            return {"error": f"{type(exc).__name__}: {exc}", "kind": "rejected"}
        self.queries.checkin(client)
        return {"rows": rows}


# -- the query socket ----------------------------------------------------------------------------------

def socket_path(data_dir: str) -> str:
    return str(Path(data_dir) / SOCKET_NAME)


def read_frame(sock: socket.socket, limit: int) -> bytes | None:
    header = _recv_exactly(sock, FRAME.size)
    if header is None:
        return None
    (size,) = FRAME.unpack(header)
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is over the limit of {limit}")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        try:
            raw = read_frame(sock, MAX_REQUEST)
            if raw is None:
                return
            response = self.answer(raw)
        except (OSError, ValueError) as exc:
            response = {"error": f"bad request: {exc}", "kind": "rejected"}
        body = msgspec.json.encode(response)
        if len(body) > MAX_RESPONSE:
            body = msgspec.json.encode({"error": f"the result is too large ({len(body)} bytes)", "kind": "rejected"})
        try:
            sock.settimeout(None)
            sock.sendall(FRAME.pack(len(body)) + body)
        except OSError:
            pass  # the worker went away

    def answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = msgspec.json.decode(raw)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            sql, timeout = request["sql"], float(request.get("timeout", 10.0))
            max_rows = request.get("max_rows")
            if not isinstance(sql, str) or not math.isfinite(timeout) or timeout <= 0:
                raise ValueError("sql must be a string and timeout a positive number")
            if max_rows is not None and (not isinstance(max_rows, int) or max_rows <= 0):
                raise ValueError("max_rows must be a positive integer")
        except (msgspec.DecodeError, ValueError, KeyError, TypeError) as exc:
            return {"error": f"bad request: {exc}", "kind": "rejected"}
        flusher = self.server.flusher
        if not flusher.queries.slots.acquire(timeout=timeout):
            return {"error": "too many analytics queries at once", "kind": "unavailable"}
        try:
            return flusher.query(sql, timeout, max_rows)
        finally:
            flusher.queries.slots.release()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    flusher: Flusher


class QueryServer:
    """<data_dir>/analytics.sock (mode 0600): one thread per connection, QUERY_SLOTS queries at once,
    each on a clickhouse-connect client of its own (kept for the next query)."""

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self.slots = threading.BoundedSemaphore(QUERY_SLOTS)
        self.idle: list[Any] = []
        self.lock = threading.Lock()
        self.server: _Server | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        path = socket_path(self.flusher.data_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead flusher's: the analytics lock says none other runs
        server = _Server(_short(path), _Handler, bind_and_activate=False)
        old = os.umask(0o177)
        try:
            server.server_bind()
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        server.server_activate()
        server.flusher = self.flusher
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="analytics-queries", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(self.flusher.data_dir))
        with self.lock:
            idle, self.idle = self.idle, []
        for client in idle:
            _close(client)

    def checkout(self) -> Any:
        with self.lock:
            return self.idle.pop() if self.idle else None

    def checkin(self, client: Any) -> None:
        if client is not None:
            with self.lock:
                self.idle.append(client)


_SHORT_FDS: dict[str, int] = {}


def _short(path: str) -> str:
    """A Unix socket path short enough for sun_path (108 bytes): a long one is reached through
    /proc/self/fd/<an O_PATH descriptor of its directory>."""
    if len(path.encode()) < 100:
        return path
    directory = os.path.dirname(path)
    fd = _SHORT_FDS.get(directory)
    if fd is None:
        fd = _SHORT_FDS[directory] = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{os.path.basename(path)}"


# -- the process -------------------------------------------------------------------------------------

def _lock(data_dir: str, flusher_stop: list[bool]) -> int | None:
    """<data_dir>/analytics.lock: one flusher per data dir, even when a killed `keysvc serve` left
    its flusher draining. Waits for it; None if told to stop while waiting."""
    fd = os.open(Path(data_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:  # a full disk: the pid is only for the message above, the lock holds
                pass
            return fd
        except BlockingIOError:
            if not waited:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                log.warning("another flusher (pid %s) holds %s: waiting for it", holder, data_dir)
                waited = True
            if flusher_stop[0]:
                os.close(fd)
                return None
            time.sleep(0.2)


def main(argv: list[str] | None = None, stopped: list[bool] | None = None) -> int:
    """The flusher process. `stopped[0]` turns true on SIGTERM/SIGINT (__main__ installs the
    handler first thing); it asks for a drain and a stop, however early it comes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keysvc.analytics",
                                     description="keysvc's analytics flusher (`keysvc serve` runs it)")
    parser.add_argument("--config", help="a YAML config file (default: $KEYSVC_CONFIG_JSON, else the defaults)")
    parser.add_argument("--data-dir", help="the node's data directory")
    args = parser.parse_args(argv)
    raw = os.environ.get(CONFIG_ENV)
    config = load(args.config) if args.config or not raw else from_json(raw)
    if args.data_dir:
        config.storage.data_dir = args.data_dir
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s keysvc flusher[{os.getpid()}] %(levelname)s %(message)s")
    import clickhouse_connect.driver.httputil  # noqa: F401  (it sets urllib3's level on import: after it)

    for noisy in ("urllib3", "clickhouse_connect"):  # one warning per retry: the flusher says it once
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Times in rollups, and in what queries answer, are UTC whatever the host's zone: chDB takes
    # the process's zone.
    os.environ["TZ"] = "UTC"
    time.tzset()

    stop = stopped if stopped is not None else [False]

    def early_stop(*_: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGINT, early_stop)
    Path(config.storage.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = _lock(config.storage.data_dir, stop)
    if lock is None:
        return 0
    try:
        flusher = Flusher(config)
        flusher.stop_requested = stop[0]
        signal.signal(signal.SIGTERM, flusher.request_stop)
        signal.signal(signal.SIGINT, flusher.request_stop)
        if stop[0]:  # it came in between
            flusher.stop_requested = True
        log.info("flushing the spool of %s into ClickHouse (%s)", config.storage.data_dir, flusher.where())
        return flusher.run()
    finally:
        os.close(lock)


# -- the supervisor, in `keysvc serve` ----------------------------------------------------------------

class Supervisor:
    """Runs the flusher as a child process of `keysvc serve` and starts it again when it exits.

    The flusher is a separate interpreter in a session of its own (a terminal's Ctrl-C reaches
    only `keysvc serve`, which then stops it after the workers, so that their last events are
    flushed too). The watching thread only waits and, seldom, spawns and writes one line with
    os.write, so that Granian's forks of this process never inherit a lock it holds."""

    RESTART_FIRST = 0.5
    RESTART_CAP = 5.0
    STABLE_AFTER = 30.0  # a flusher that ran this long restarts after RESTART_FIRST again

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.thread = threading.Thread(target=self._watch, name="analytics-supervisor", daemon=True)

    def start(self) -> None:
        with self.lock:
            self._spawn()
        self.thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "keysvc.analytics"], env=self.env,
                                        stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        self.started_at = time.monotonic()

    def _watch(self) -> None:
        delay = self.RESTART_FIRST
        while True:
            process = self.process
            code = process.wait()
            if self.stopped.is_set():
                return
            if time.monotonic() - self.started_at >= self.STABLE_AFTER:
                delay = self.RESTART_FIRST
            _say("warning", f"the analytics flusher (pid {process.pid}) exited with {code}; "
                            f"starting it again in {delay:.1f} s")
            if self.stopped.wait(delay):
                return
            delay = min(self.RESTART_CAP, delay * 2)
            with self.lock:
                if self.stopped.is_set():
                    return
                try:
                    self._spawn()
                    self.restarts += 1
                except OSError as exc:
                    _say("error", f"cannot start the analytics flusher: {exc}")
                    self.process = process  # wait() again returns at once: retried after the delay

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the flusher and wait up to `timeout` for its drain; SIGKILL it after that (what
        it had not flushed stays spooled, and the batch in flight is sent again next time)."""
        with self.lock:
            self.stopped.set()
            process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                # A flusher still starting would die of SIGTERM's default action, with no drain.
                _wait_for_sigterm_handler(process, min(timeout, 10.0))
                process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _say("warning", f"the analytics flusher did not stop within {timeout:.0f} s: killing it")
                process.kill()
                process.wait()
        self.thread.join(5)
        return process.returncode


def _wait_for_sigterm_handler(process: subprocess.Popen, timeout: float) -> None:
    """Until the process catches SIGTERM (Linux: SigCgt in /proc/<pid>/status), or exits."""
    deadline = time.monotonic() + timeout
    bit = 1 << (signal.SIGTERM - 1)
    while time.monotonic() < deadline and process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            return  # no procfs: send it anyway
        caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), None)
        if caught is None or int(caught, 16) & bit:
            return
        time.sleep(0.01)


def _say(level: str, text: str) -> None:
    try:
        os.write(2, (logs.line(level, "keysvc.analytics", text) + "\n").encode())
    except OSError:
        pass

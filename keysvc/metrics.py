"""Prometheus metrics of the node, aggregated over all its processes.

Counters live in memory-mapped files, one per process: `<data_dir>/metrics/<role>-<pid>.bin` is a
64-byte header and then a fixed array of float64 slots whose meaning a `Layout` gives (a counter
per label set, or a histogram's buckets and sum). A process counts by writing into its mapping
through a memoryview (`slots[i] += 1.0`: tens of nanoseconds, no lock, no syscall; the page cache
makes the write visible to every reader at once). A file outlives its process, so what a worker
counted before it died is still summed after it is replaced: counters stay monotonic across
respawns. One writer per file (the worker's event loop, the flusher's main thread) and aligned
8-byte stores: no reader sees a torn value. `keysvc serve` empties the directory when it starts,
so the counters start at zero with the node, as Prometheus expects of a restart.

A worker (`WorkerMetrics`) counts HTTP requests by route and status, verifications by outcome,
keys.verifyKey's latency, ratelimit decisions and verify batches, and copies its key cache's hit
and miss counts; the flusher (`FlusherMetrics`) counts batches written to ClickHouse, their
events, failures and the events the spool cap evicted.

GET /metrics (`render`) sums the files and adds what is read at scrape time: spool depth and
size, dropped events, LMDB map usage of the store, the counters and the spool. A worker answering
on the API port (for the bearer of metrics.bearer_token) reads those from the environments it has
open (`render_from_node`); the listener `keysvc serve` runs on metrics.host:metrics.port
(`MetricsListener`) opens them read-only, without LMDB's lock file, for as long as one scrape
takes (`render_from_disk`): serve forks the workers, and must keep no environment open itself.
"""
from __future__ import annotations

import functools
import logging
import math
import mmap
import os
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("keysvc.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# -- the files -------------------------------------------------------------------------------------------

MAGIC = b"KSVCMET1"
HEADER = struct.Struct("<8sIIId")  # magic, layout fingerprint, slot count, pid, start time
HEADER_SIZE = 64
SUFFIX = ".bin"


class Family:
    """One metric: its name, type, help, labels, and where its slots start."""

    __slots__ = ("name", "kind", "help", "labelnames", "labelsets", "buckets", "offset", "width", "sparse")

    def __init__(self, name: str, kind: str, help: str, labelnames: Sequence[str],
                 labelsets: Sequence[tuple[str, ...]], buckets: Sequence[float] = (), sparse: bool = False) -> None:
        self.name = name
        self.kind = kind  # "counter" or "histogram"
        self.help = help
        self.labelnames = tuple(labelnames)
        self.labelsets = [tuple(labels) for labels in labelsets]
        self.buckets = tuple(buckets)
        # A counter takes one slot per label set; a histogram one per bucket, one for +Inf and
        # one for the sum (the count is the buckets' total).
        self.width = 1 if kind == "counter" else len(self.buckets) + 2
        self.offset = 0
        self.sparse = sparse  # label sets never counted are left out of the exposition

    def slot(self, labels: tuple[str, ...] = ()) -> int:
        """The first slot of a label set."""
        return self.offset + self.labelsets.index(labels) * self.width

    def slot_names(self) -> list[str]:
        names = []
        for labels in self.labelsets:
            base = f"{self.name}{{{','.join(labels)}}}"
            if self.kind == "counter":
                names.append(base)
            else:
                names.extend(f"{base}le={le}" for le in (*self.buckets, "+Inf"))
                names.append(f"{base}sum")
        return names


class Layout:
    """The fixed meaning of a role's slots. Each file records the layout's fingerprint; a scrape
    skips files of another layout (a process of an older version, say)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.families: list[Family] = []
        self.size = 0

    def add(self, family: Family) -> Family:
        family.offset = self.size
        self.size += family.width * len(family.labelsets)
        self.families.append(family)
        return family

    def counter(self, name: str, help: str, labelnames: Sequence[str] = (),
                labelsets: Sequence[tuple[str, ...]] = ((),), sparse: bool = False) -> Family:
        return self.add(Family(name, "counter", help, labelnames, labelsets, sparse=sparse))

    def histogram(self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = (),
                  labelsets: Sequence[tuple[str, ...]] = ((),)) -> Family:
        return self.add(Family(name, "histogram", help, labelnames, labelsets, buckets))

    @property
    def fingerprint(self) -> int:
        names = [self.role] + [name for family in self.families for name in family.slot_names()]
        return zlib.crc32("\n".join(names).encode())


def metrics_dir(data_dir: str | os.PathLike[str]) -> Path:
    return Path(data_dir) / "metrics"


def open_slots(directory: Path, layout: Layout) -> memoryview:
    """A new file for this process in `directory`, mapped: its slots as a float64 memoryview.
    Raises OSError when the file cannot be made."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = os.getpid()
    size = HEADER_SIZE + 8 * max(layout.size, 1)
    for attempt in range(1000):
        # A pid seen before in this node's life (reused by the OS): a name of its own, so that
        # the dead process's counts stay.
        name = f"{layout.role}-{pid}{f'.{attempt}' if attempt else ''}{SUFFIX}"
        try:
            fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free metrics file name for {layout.role}-{pid} in {directory}")
    try:
        # Blocks now, not a sparse file: a page of a mapping the disk cannot back (a full disk)
        # is SIGBUS at the first count, where this is an OSError the caller handles.
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.unlink(directory / name)
            raise
        mapped = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    mapped[:HEADER.size] = HEADER.pack(MAGIC, layout.fingerprint, layout.size, pid, time.time())
    return memoryview(mapped)[HEADER_SIZE:].cast("d")


def scratch_slots(layout: Layout) -> memoryview:
    """Slots in plain memory, for a process whose metrics are off or could not be filed."""
    return memoryview(bytearray(8 * max(layout.size, 1))).cast("d")


def read_file(path: str | os.PathLike[str], layout: Layout) -> array | None:
    """The slots of one file, or None if it is not a whole file of `layout`."""
    expected = HEADER_SIZE + 8 * max(layout.size, 1)
    try:
        with open(path, "rb") as file:
            data = file.read(expected + 1)
    except OSError:
        return None
    if len(data) != expected:
        return None
    magic, fingerprint, count, _, _ = HEADER.unpack_from(data)
    if magic != MAGIC or fingerprint != layout.fingerprint or count != layout.size:
        return None
    values = array("d")
    values.frombytes(data[HEADER_SIZE:HEADER_SIZE + 8 * layout.size])
    return values


def files_of(directory: Path, layout: Layout) -> list[str]:
    """The paths of `layout`'s role's files in `directory`."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    prefix = f"{layout.role}-"
    return [entry.path for entry in entries if entry.name.startswith(prefix) and entry.name.endswith(SUFFIX)]


def read_sums(directory: Path, layout: Layout) -> tuple[list[float], int]:
    """The slot-wise sums of every file of `layout` in `directory`, and how many files there were."""
    totals = [0.0] * layout.size
    files = 0
    for path in files_of(directory, layout):
        values = read_file(path, layout)
        if values is not None:
            totals = [a + b for a, b in zip(totals, values)]
            files += 1
    return totals, files


def empty_dir(directory: Path) -> None:
    """Remove every metrics file of `directory` (what `keysvc serve` does when it starts)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


# -- what each process counts --------------------------------------------------------------------------------

# Outcome codes of keys.verifyKey (the contract's list); anything else counts as "other".
CODES = ("VALID", "NOT_FOUND", "FORBIDDEN", "USAGE_EXCEEDED", "RATE_LIMITED", "DISABLED", "EXPIRED",
         "INSUFFICIENT_PERMISSIONS", "other")
# The statuses the API answers with; anything else counts as "other".
STATUSES = (200, 400, 401, 403, 404, 405, 409, 410, 412, 413, 422, 429, 500, 503)
STATUS_LABELS = (*(str(status) for status in STATUSES), "other")
# Seconds: keys.verifyKey takes tens of microseconds alone, a few milliseconds under load.
VERIFY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RATELIMIT_APIS = ("ratelimit.limit", "ratelimit.multiLimit")
METRICS_ROUTE = "/metrics"
UNMATCHED_ROUTE = "unmatched"  # a path of no route: never its text, which could be anything


class WorkerLayout(Layout):
    def __init__(self, routes: list[str]) -> None:
        super().__init__("worker")
        self.routes = routes
        self.http = self.counter(
            "keysvc_http_requests_total", "HTTP requests answered, by route and status.", ("route", "status"),
            [(route, status) for route in routes for status in STATUS_LABELS], sparse=True)
        self.verifications = self.counter(
            "keysvc_verifications_total", "Key verifications (keys.verifyKey), by outcome code.", ("code",),
            [(code,) for code in CODES])
        self.verify_duration = self.histogram(
            "keysvc_verify_duration_seconds",
            "Time keys.verifyKey took, from the request's arrival in the app to its answer.", VERIFY_BUCKETS)
        self.verify_batches = self.counter(
            "keysvc_verify_batches_total",
            "Group commits of verifications (each charges its verifications in one transaction).")
        self.ratelimit = self.counter(
            "keysvc_ratelimit_decisions_total",
            "Decisions of ratelimit.limit and ratelimit.multiLimit (all or nothing), by outcome.",
            ("api", "outcome"), [(api, outcome) for api in RATELIMIT_APIS for outcome in ("passed", "denied")])
        self.cache_hits = self.counter(
            "keysvc_key_cache_hits_total", "Key lookups (verifications and root keys) answered by a worker's cache.")
        self.cache_misses = self.counter(
            "keysvc_key_cache_misses_total", "Key lookups that had to read the store.")


class FlusherLayout(Layout):
    def __init__(self) -> None:
        super().__init__("flusher")
        self.batches = self.counter(
            "keysvc_analytics_flush_batches_total", "Batches of spooled events written to ClickHouse.")
        self.events = self.counter(
            "keysvc_analytics_flushed_events_total", "Spooled events in the batches written to ClickHouse.")
        self.failures = self.counter(
            "keysvc_analytics_flush_failures_total",
            "Failed attempts to reach ClickHouse or to write a batch (retried with a backoff).")
        self.evicted = self.counter(
            "keysvc_analytics_evicted_events_total",
            "Spooled events dropped by the spool's cap (also in keysvc_analytics_dropped_events_total).")


@functools.cache
def worker_layout() -> WorkerLayout:
    from keysvc.http import routes  # the route table, registered once (as keysvc.http.app does)
    from keysvc.http.routing import ROUTES

    routes.register_all()
    return WorkerLayout([*sorted(ROUTES), METRICS_ROUTE, UNMATCHED_ROUTE])


@functools.cache
def flusher_layout() -> FlusherLayout:
    return FlusherLayout()


def _slots(data_dir: str, layout: Layout, enabled: bool) -> tuple[memoryview, bool]:
    if enabled:
        try:
            return open_slots(metrics_dir(data_dir), layout), True
        except OSError as exc:
            log.warning("cannot keep metrics in %s (%s): this %s's counts are left out of /metrics",
                        metrics_dir(data_dir), exc, layout.role)
    return scratch_slots(layout), False


class WorkerMetrics:
    """A worker's slots, and the slot numbers its request path writes to."""

    def __init__(self, data_dir: str, enabled: bool = True) -> None:
        layout = self.layout = worker_layout()
        self.slots, self.filed = _slots(data_dir, layout, enabled)
        self.enabled = enabled
        width = len(STATUS_LABELS)
        self.http_base = {route: layout.http.offset + i * width for i, route in enumerate(layout.routes)}
        # The offset of each status's slot from its route's first, by status (any of 3 digits): a list,
        # indexed faster than a dict is searched.
        offsets = {status: i for i, status in enumerate(STATUSES)}
        self.status_offsets = [offsets.get(status, len(STATUSES)) for status in range(1000)]
        self.code_slot = {code: layout.verifications.slot((code,)) for code in CODES}
        self.code_other = self.code_slot["other"]
        self.verify_buckets = layout.verify_duration.buckets
        self.verify_bucket0 = layout.verify_duration.offset
        self.verify_sum = layout.verify_duration.offset + len(layout.verify_duration.buckets) + 1
        self.verify_batches = layout.verify_batches.offset
        self.ratelimit_slot = {(api, passed): layout.ratelimit.slot((api, "passed" if passed else "denied"))
                               for api in RATELIMIT_APIS for passed in (True, False)}
        self.cache_hits = layout.cache_hits.offset
        self.cache_misses = layout.cache_misses.offset

    def verified(self, results: list[Any], verifier: Any) -> None:
        """One verify batch: its outcomes, and the cache's counts so far (copied: they are the
        verifier's own, which also counts root-key lookups). A verifyKey answered NOT_FOUND
        without a verification (its root key may verify in no API) is not among them."""
        slots, code_slot, other = self.slots, self.code_slot, self.code_other
        for result in results:
            if not isinstance(result, Exception):  # an exception: a bad request, no verification
                slots[code_slot.get(result.code, other)] += 1.0
        slots[self.verify_batches] += 1.0
        self.copy_cache_counts(verifier)

    def copy_cache_counts(self, verifier: Any) -> None:
        slots = self.slots
        slots[self.cache_hits] = verifier.hits
        slots[self.cache_misses] = verifier.misses

    def ratelimit(self, api: str, passed: bool) -> None:
        self.slots[self.ratelimit_slot[(api, passed)]] += 1.0


class FlusherMetrics:
    def __init__(self, data_dir: str, enabled: bool = True) -> None:
        layout = self.layout = flusher_layout()
        self.slots, self.filed = _slots(data_dir, layout, enabled)

    def landed(self, events: int) -> None:
        """A batch of `events` is in ClickHouse."""
        self.slots[self.layout.batches.offset] += 1.0
        self.slots[self.layout.events.offset] += events

    def failed(self) -> None:
        self.slots[self.layout.failures.offset] += 1.0

    def evicted(self, events: int) -> None:
        if events:
            self.slots[self.layout.evicted.offset] += events


_flusher: tuple[int, FlusherMetrics] | None = None


def flusher(config: Any) -> FlusherMetrics:
    """The flusher process's recorder, made on first use (its file too)."""
    global _flusher
    if _flusher is None or _flusher[0] != os.getpid():
        _flusher = (os.getpid(), FlusherMetrics(config.storage.data_dir, config.metrics.enabled))
    return _flusher[1]


# -- the exposition ----------------------------------------------------------------------------------------------

_U64 = struct.Struct(">Q")
# A scrape-time metric: name, type, help, [(labels, value)].
Sample = tuple[tuple[tuple[str, str], ...], float]
Extra = tuple[str, str, str, list[Sample]]


def number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{name}="{_escape(value)}"' for name, value in pairs)
    return f"{{{text}}}" if text else ""


def _family(out: list[str], family: Family, sums: Sequence[float]) -> None:
    out.append(f"# HELP {family.name} {family.help}")
    out.append(f"# TYPE {family.name} {family.kind}")
    for i, labels in enumerate(family.labelsets):
        base = family.offset + i * family.width
        pairs = list(zip(family.labelnames, labels))
        if family.kind == "counter":
            value = sums[base]
            if family.sparse and not value:
                continue
            out.append(f"{family.name}{_labels(pairs)} {number(value)}")
            continue
        cumulative = 0.0
        for j, le in enumerate((*family.buckets, math.inf)):
            cumulative += sums[base + j]
            out.append(f"{family.name}_bucket{_labels([*pairs, ('le', number(float(le)))])} {number(cumulative)}")
        out.append(f"{family.name}_sum{_labels(pairs)} {number(sums[base + len(family.buckets) + 1])}")
        out.append(f"{family.name}_count{_labels(pairs)} {number(cumulative)}")


def render(data_dir: str, extra: Sequence[Extra] = ()) -> bytes:
    """The exposition: the filed counters of every worker and flusher, then `extra`."""
    directory = metrics_dir(data_dir)
    out: list[str] = []
    starts: list[Sample] = []
    layout: Layout
    for layout in (worker_layout(), flusher_layout()):
        sums, files = read_sums(directory, layout)
        starts.append(((("role", layout.role),), float(files)))
        for family in layout.families:
            _family(out, family, sums)
    from keysvc import __version__

    for name, kind, help, samples in (
        ("keysvc_process_starts_total", "counter",
         "Worker and flusher processes started since keysvc serve started (respawns included).", starts),
        ("keysvc_build_info", "gauge", "The running keysvc's version.", [((("version", __version__),), 1.0)]),
        *extra,
    ):
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{_labels(labels)} {number(value)}" for labels, value in samples)
    out.append("")
    return "\n".join(out).encode()


# -- scrape-time gauges ------------------------------------------------------------------------------

def map_usage(env: Any) -> tuple[int, int]:
    """(bytes used up to the highest page written, map size) of an LMDB environment."""
    info = env.info()
    return (info["last_pgno"] + 1) * env.stat()["psize"], info["map_size"]


def spool_stats(env: Any, events_db: Any, meta_db: Any) -> tuple[int, int, int]:
    """(events spooled, bytes they take, events dropped so far) of the analytics spool."""
    with env.begin() as txn:
        stat = txn.stat(events_db)
        dropped = txn.get(b"dropped", db=meta_db)
    size = stat["psize"] * (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])
    return stat["entries"], size, _U64.unpack(dropped)[0] if dropped else 0


def gauges(usage: dict[str, tuple[int, int]], spool: tuple[int, int, int] | None) -> list[Extra]:
    out: list[Extra] = [
        ("keysvc_lmdb_map_used_bytes", "gauge",
         "Bytes of an LMDB environment's map in use (up to its highest page); it is full at the map size.",
         [((("env", name),), float(used)) for name, (used, _) in usage.items()]),
        ("keysvc_lmdb_map_size_bytes", "gauge", "The map size of an LMDB environment (its limit).",
         [((("env", name),), float(size)) for name, (_, size) in usage.items()]),
    ]
    if spool is not None:
        depth, size, dropped = spool
        out += [
            ("keysvc_analytics_spool_events", "gauge", "Analytics events spooled, waiting for the flusher.",
             [((), float(depth))]),
            ("keysvc_analytics_spool_bytes", "gauge", "Bytes the spooled events take (capped by spool_cap_bytes).",
             [((), float(size))]),
            ("keysvc_analytics_dropped_events_total", "counter",
             "Analytics events lost: refused by a full spool, evicted by its cap, or undecodable "
             "(kept in the spool: not reset by a restart).", [((), float(dropped))]),
        ]
    return out


def render_from_node(node: Any) -> bytes:
    """In a worker: gauges from the environments its Node has open."""
    usage: dict[str, tuple[int, int]] = {}
    spool = None
    try:
        usage["store"] = map_usage(node.store.store_env)
        usage["counters"] = map_usage(node.store.counters_env)
        if node.spool is not None:
            usage["spool"] = map_usage(node.spool.env)
            spool = spool_stats(node.spool.env, node.spool.events, node.spool.meta)
    except Exception:  # noqa: BLE001 - a gauge that cannot be read is left out, the counters still go
        pass
    return render(node.config.storage.data_dir, gauges(usage, spool))


def render_from_disk(config: Any) -> bytes:
    """In `keysvc serve`: gauges from the environments opened read-only for this scrape."""
    import lmdb

    data_dir = Path(config.storage.data_dir)
    usage: dict[str, tuple[int, int]] = {}
    spool = None
    # The map sizes the workers open the environments with (this brief read-only look opens them
    # with a small one, which LMDB only raises to the data's size).
    sizes = {"store": config.storage.map_size, "counters": config.storage.counters_map_size}
    if config.analytics.enabled:
        sizes["spool"] = config.analytics.spool_map_size
    for name, map_size in sizes.items():
        path = data_dir / name
        if not (path / "data.mdb").exists():
            continue
        try:
            # lock=False: no reader slot, no lock file (nothing a forked worker could inherit
            # half-held). The reads are a few pages, done at once; a torn one raises, and the
            # gauge is left out of this scrape.
            env = lmdb.open(str(path), readonly=True, lock=False, create=False, readahead=False,
                            max_dbs=2 if name == "spool" else 0)
        except lmdb.Error:
            continue
        try:
            used, size = map_usage(env)
            usage[name] = (used, max(size, map_size))
            if name == "spool":
                spool = spool_stats(env, env.open_db(b"events", create=False), env.open_db(b"meta", create=False))
        except lmdb.Error:
            pass
        finally:
            env.close()
    return render(str(data_dir), gauges(usage, spool))


# -- the listener of `keysvc serve` -------------------------------------------------------------------------------

TIMEOUT = 10.0  # seconds a scraper's connection may idle


@functools.cache
def _http_classes() -> tuple[type, type]:
    """The listener's request handler and server classes (http.server is imported only by the
    process that listens: `keysvc serve`, never a worker)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = TIMEOUT
        server_version = "keysvc-metrics"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?", 1)[0] != "/metrics":
                self.answer(404, b"Not found: the metrics are at GET /metrics.\n", "text/plain; charset=utf-8")
                return
            try:
                body = self.server.render()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - the scraper learns it; nothing else to do here
                self.answer(500, f"cannot render the metrics: {type(exc).__name__}\n".encode(),
                            "text/plain; charset=utf-8")
                return
            self.answer(200, body, CONTENT_TYPE)

        def do_HEAD(self) -> None:  # noqa: N802
            self.answer(405, b"", "text/plain; charset=utf-8")

        def answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if status == 405:
                self.send_header("Allow", "GET")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # no stderr from this thread (see MetricsListener)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a scraper that went away: nothing to report (and no stderr from here)

    return Handler, Server


class MetricsListener:
    """GET /metrics on an address of its own, served by a thread of `keysvc serve`: bound at
    construction (an OSError if the address is taken), served once started.

    Granian forks the workers from that process, whenever one is (re)started, so the thread
    holds no lock a child could inherit held: it never logs nor writes to stderr (their locks),
    keeps no LMDB environment open between scrapes, and the listening socket is closed in every
    child."""

    def __init__(self, host: str, port: int, render: Callable[[], bytes]) -> None:
        handler, server = _http_classes()
        self.server = server((host, port), handler)
        self.server.render = render  # type: ignore[attr-defined]
        self.address = self.server.server_address[:2]
        self.thread: threading.Thread | None = None
        # A forked worker has no use for the listening socket: close its copy there.
        os.register_at_fork(after_in_child=self._close_in_child)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="metrics-listener", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(5)
            self.thread = None
        self.server.server_close()

    def _close_in_child(self) -> None:
        fd = self.server.socket.detach()  # -1 once closed here before the fork
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

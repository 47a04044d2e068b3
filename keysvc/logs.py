"""Logs: one line per record on stderr, JSON (msgspec) or a human format (`logging.format`: auto is
human on a TTY, JSON otherwise), set up once per process (`setup`: serve, each worker, the
flusher; Granian's own loggers through `dictconfig`).

Access lines (`AccessLog`), one per request with its request id, method, route, status and
latency, skip the logging module: each costs a few hundred nanoseconds, and they are encoded
and written in batches (every FLUSH_EVERY seconds or FLUSH_LINES lines, and at shutdown), in
writes of whole lines of at most PIPE_BUF bytes when stderr is a pipe or a socket, so that the
lines of several workers sharing it never interleave.

No log line carries a plaintext key or root key. Access lines hold nothing a client chose but the
method, and only a known one; other records pass `redact`, which masks anything shaped like a
key; and the error paths of the app log exceptions through `scrub`, which also masks every string
of the request's body and Authorization header.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import logging.config
import os
import re
import select
import stat
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from keysvc.config import Config

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FLUSH_EVERY = 0.05  # seconds an access line may wait in its worker's buffer
FLUSH_LINES = 256  # lines a worker buffers at most (about 60 KiB of JSON)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
REDACTED = "[redacted]"


class _Settings:
    json = True
    level = "info"
    access = True
    role = "master"


settings = _Settings()


def _config_values(config: Config) -> tuple[str, str, bool]:
    section = config.logging
    return section.format, section.level, section.access


def setup(config: Config, role: str, stream: Any = None) -> None:
    """Configure logging for this process (`role`: master, worker or flusher)."""
    fmt, level, access = _config_values(config)
    stream = sys.stderr if stream is None else stream
    settings.json = fmt == "json" or (fmt == "auto" and not _isatty(stream))
    settings.level = level
    settings.access = access_enabled(config)
    settings.role = role
    logging.config.dictConfig(dictconfig(config))
    logging.captureWarnings(True)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def dictconfig(config: Config) -> dict[str, Any]:
    """The logging.config dict of this process, for `setup` and for Granian's `log_dictconfig`
    (Granian applies it again in each worker it forks): the root logger, Granian's `_granian`,
    and `granian.access` (left at warning: keysvc writes its own access lines) all go to one
    stderr handler with keysvc's formatter."""
    level = _config_values(config)[1].upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"keysvc": {"()": "keysvc.logs.formatter"}},
        "handlers": {"keysvc": {"class": "keysvc.logs.Handler", "formatter": "keysvc",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "_granian": {"handlers": [], "level": level, "propagate": True},
            "granian.access": {"handlers": [], "level": "WARNING", "propagate": True},
        },
        "root": {"handlers": ["keysvc"], "level": level},
    }


def granian_level(config: Config) -> str:
    return _config_values(config)[1]


def access_enabled(config: Config) -> bool:
    """Whether this config asks for access lines (logging.access, at level info or below)."""
    _, level, access = _config_values(config)
    return bool(access) and LEVELS[level] <= logging.INFO


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def _after_fork_in_child() -> None:
    if settings.role == "master":  # Granian forks the workers from `keysvc serve`
        settings.role = "worker"


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- redaction ---------------------------------------------------------------------------------------

_BASE58 = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")
_LONG_WORD = re.compile(r"[A-Za-z0-9_]{20,}")


def _mask(match: re.Match[str]) -> str:
    # A key: base58 of 16 bytes or more (21+ characters), behind a prefix and an underscore, or
    # alone (then with a digit, so that CamelCase names of 20 letters stay readable). Ids (16
    # alphanumerics after their prefix) and request ids are shorter.
    parts = match.group().split("_")
    for i, part in enumerate(parts):
        if len(part) >= 20 and _BASE58.issuperset(part) and (i > 0 or any(c.isdigit() for c in part)):
            parts[i] = REDACTED
    return "_".join(parts)


def redact(text: str) -> str:
    """`text` with anything shaped like a generated key or root key masked."""
    return _LONG_WORD.sub(_mask, text) if len(text) >= 20 else text


_RUN = re.compile("[^\\s\"'{}\\[\\],:\\\\\ufffd]{6,}")
MAX_TAINTS = 20_000


def taints(body: bytes | None, authorization: bytes | None) -> list[str]:
    """The strings a request brought (those of its body, parsed or not, and its Authorization
    token) that could be a key, longest first."""
    found: set[str] = set()
    if authorization:
        token = authorization.partition(b" ")[2].strip() or authorization.strip()
        found.add(token.decode("utf-8", "replace"))
        found.add(authorization.decode("utf-8", "replace"))
    if body:
        try:
            _strings(msgspec.json.decode(body), found)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
            pass
        for run in _RUN.finditer(body[: 4 << 20].decode("utf-8", "replace")):
            found.add(run.group())
            if len(found) >= MAX_TAINTS:
                break
    return sorted((text for text in found if len(text) >= 6), key=len, reverse=True)[:MAX_TAINTS]


def _strings(value: Any, found: set[str], depth: int = 0) -> None:
    if len(found) >= MAX_TAINTS or depth > 64:
        return
    if isinstance(value, str):
        found.add(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            found.add(key)
            _strings(item, found, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _strings(item, found, depth + 1)


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with every one of `secrets` masked, then `redact`ed."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return redact(text)


def describe(exc: BaseException, secrets: list[str]) -> str:
    """A traceback of `exc` fit for a log line: scrubbed of `secrets`."""
    return scrub("".join(traceback.format_exception(exc)).rstrip(), secrets)


# -- formatters -----------------------------------------------------------------------------------------

def _iso(created: float) -> str:
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(created))}.{int(created % 1 * 1000):03d}Z"


_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines


def _json_head(created: float, level: str, logger: str, msg: str, pid: int | None) -> dict[str, Any]:
    return {"ts": _iso(created), "level": level.lower(), "logger": logger, "msg": redact(msg), "pid": pid,
            "role": settings.role}


def _human_head(created: float, level: str, logger: str, msg: str, pid: int | None) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    return f"{stamp}.{int(created % 1 * 1000):03d} {level.upper():<7} {settings.role}[{pid}] {logger}: {redact(msg)}"


def line(level: str, logger: str, msg: str) -> str:
    """One record in this process's log format, without a newline, made without the logging
    module: for a thread of a process that Granian forks (keysvc serve's flusher supervisor),
    which must not hold a handler's lock when the fork happens."""
    if settings.json:
        return _encode(_json_head(time.time(), level, logger, msg, os.getpid())).decode()
    return _human_head(time.time(), level, logger, msg, os.getpid())


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "pid", "role", and "exc" and `extra` fields if any}."""

    def format(self, record: logging.LogRecord) -> str:
        line = _json_head(record.created, record.levelname, record.name, record.getMessage(), record.process)
        for name, value in record.__dict__.items():
            if name not in _RESERVED and not name.startswith("_"):
                line[name] = value if value is None or isinstance(value, (bool, int, float)) else redact(str(value))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return _encode(line).decode()


class HumanFormatter(logging.Formatter):
    """`2024-05-01 12:00:00.123 INFO  worker[1234] keysvc.http: message`, local time."""

    def format(self, record: logging.LogRecord) -> str:
        text = _human_head(record.created, record.levelname, record.name, record.getMessage(), record.process)
        extra = {name: value for name, value in record.__dict__.items()
                 if name not in _RESERVED and not name.startswith("_")}
        exc = extra.pop("exc", None)
        if extra:
            text += " " + redact(" ".join(f"{name}={value}" for name, value in extra.items()))
        if exc:
            text += "\n" + redact(str(exc))
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        if record.stack_info:
            text += "\n" + redact(self.formatStack(record.stack_info))
        return text


class Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose own errors (a record whose arguments do not fit its message, say)
    are reported in one line that names where the record came from, never with its arguments
    (logging's default prints them, whatever they hold)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        try:
            kind = type(sys.exc_info()[1]).__name__
            line = {"ts": _iso(record.created), "level": "error", "logger": "keysvc.logs",
                    "msg": f"a log record could not be written ({kind}) from {record.pathname}:{record.lineno}",
                    "pid": os.getpid(), "role": settings.role}
            self.stream.write((_encode(line).decode() if settings.json else str(line)) + "\n")
            self.flush()
        except Exception:  # noqa: BLE001 - nowhere left to report it
            pass


def formatter() -> logging.Formatter:
    """The formatter `setup` chose (dictConfig's factory)."""
    return JsonFormatter() if settings.json else HumanFormatter()


def _excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("keysvc").critical("uncaught exception", exc_info=(kind, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    logging.getLogger("keysvc").error("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                                      exc_info=exc_info)  # type: ignore[arg-type]


# -- access lines ----------------------------------------------------------------------------------------

class AccessLine(msgspec.Struct):
    ts: str
    level: str
    logger: str
    msg: str
    pid: int
    role: str
    request_id: str
    method: str
    route: str
    status: int
    latency_ms: float


class AccessLog:
    """A worker's access lines, buffered and written to `fd` in whole lines."""

    def __init__(self, fd: int = 2, json: bool | None = None) -> None:
        self.fd = fd
        self.json = settings.json if json is None else json
        self.pid = os.getpid()
        self.role = settings.role
        self.lines: list[Any] = []  # AccessLine structs (JSON), or the lines' bytes (human)
        self.timer: asyncio.TimerHandle | None = None
        self.second = self.msec = -1
        self.stamp = self.ts = ""
        try:
            mode = os.fstat(fd).st_mode
            # A pipe or socket shared with other writers: writes of at most PIPE_BUF are atomic.
            self.chunk = select.PIPE_BUF if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else 0
        except OSError:
            self.chunk = select.PIPE_BUF
        atexit.register(self.flush)

    def write(self, request_id: str, method: str, route: str, status: int, seconds: float) -> None:
        """One access line. `request_id` and `route` are the app's own (no client's text); a
        method the HTTP standard does not name is written as OTHER. The line is encoded when
        the buffer is flushed, with the others (msgspec's encode_lines: one call for them all)."""
        msec = time.time_ns() // 1_000_000
        if msec != self.msec:  # the timestamp's text, made at most once a millisecond
            self.msec = msec
            second = msec // 1000
            if second != self.second:
                self.second = second
                self.stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) if self.json
                              else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
            self.ts = f"{self.stamp}.{msec % 1000:03d}{'Z' if self.json else ''}"
        if method not in METHODS:
            method = "OTHER"
        lines = self.lines
        if self.json:
            # Microseconds, as a float of milliseconds: written as 0.123, never 0.12300000000000001.
            lines.append(AccessLine(self.ts, "info", "keysvc.access", "request", self.pid, self.role, request_id,
                                    method, route, status, int(seconds * 1e6) / 1000))
        else:
            lines.append(f"{self.ts} INFO    {self.role}[{self.pid}] keysvc.access: {request_id} {method} {route} "
                         f"{status} {seconds * 1000:.3f} ms".encode())
        if len(lines) >= FLUSH_LINES:
            self.flush()
        elif self.timer is None:
            try:
                self.timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
            except RuntimeError:  # no loop: write now
                self.flush()

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        lines, self.lines = self.lines, []
        if not lines:
            return
        data = _encode_lines(lines) if self.json else b"\n".join(lines) + b"\n"
        if not self.chunk or len(data) <= self.chunk:
            self._write(memoryview(data))
            return
        view, start, end = memoryview(data), 0, len(data)
        while start < end:
            cut = end if end - start <= self.chunk else data.rfind(b"\n", start, start + self.chunk) + 1
            if cut <= start:  # one line longer than a chunk: whole, alone
                cut = data.find(b"\n", start) + 1 or end
            self._write(view[start:cut])
            start = cut

    def _write(self, view: memoryview) -> None:
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone: the lines are lost, the requests are not
            view = view[written:]

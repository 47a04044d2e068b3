"""`keysvc doctor`: check a data dir and the node around it, and say what is wrong.

A store that cannot be opened at all is one `keysvc: error:` line and exit code 2, like every
command. Otherwise the state (as `--json` keys), one line per check (ok, warn, fail, or skip when
it does not apply) and a verdict; exit code 1 when any check warns or fails."""
from __future__ import annotations

import argparse
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from keysvc.config import Config

from .common import add_json_flag, add_store_flags, config_of, guarded, open_store, print_object, print_rows

FULL = 0.8  # a map or the spool this full is a warning: time to raise its size, or to find out why
CLICKHOUSE_TIMEOUT = 3.0  # seconds


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor", help="check a data dir and the node's state; says what is wrong",
        description="Check the data dir (readable, writable, private), the store's and counters' map usage (a "
                    f"warning above {FULL:.0%}), the analytics spool, whether a server runs on it, and ClickHouse: "
                    "the server of analytics.clickhouse_url, or the embedded chDB through the running server's "
                    "flusher (never opened here: a starting server must be able to). Ends with a verdict. Exit "
                    "code 0 when all is well, 1 when a check warns or fails, 2 when the store cannot be opened.",
    )
    add_store_flags(doctor)
    add_json_flag(doctor)
    doctor.set_defaults(run=run)


@guarded
def run(args: argparse.Namespace) -> int:
    from keysvc._fast import COMPILED

    config = config_of(args)
    checks: list[Check] = []
    with open_store(args) as store:
        report: dict[str, Any] = {"data_dir": store.config.data_dir, "compiled_core": COMPILED}
        checks.append(_data_dir(Path(store.config.data_dir)))
        for name, env, setting in (("store", store.store_env, "storage.map_size"),
                                   ("counters", store.counters_env, "storage.counters_map_size")):
            info, env_stat = env.info(), env.stat()
            used, size = (info["last_pgno"] + 1) * env_stat["psize"], info["map_size"]
            report[f"{name}_map_used_bytes"] = used
            report[f"{name}_map_size_bytes"] = size
            checks.append(_map(name, used, size, setting))
        with store.read() as reader:
            report["keys"] = reader.count("keys")
        report["change_hint"] = store.change_hint()
    server = _server_pid(Path(config.storage.data_dir))
    report["server_pid"] = server
    checks.append(Check("server", "ok", f"keysvc serve runs (pid {server})") if server else
                  Check("server", "skip", "no keysvc serve runs on this data dir"))
    checks.append(_spool(config, report, server))
    checks.append(_clickhouse(config, server))

    problems = [check for check in checks if check.status == "fail"]
    warnings = [check for check in checks if check.status == "warn"]
    if problems or warnings:
        said = [f"{len(problems)} problem(s)"] if problems else []
        said += [f"{len(warnings)} warning(s)"] if warnings else []
        verdict = f"{' and '.join(said)}: {', '.join(check.name for check in problems + warnings)}"
    else:
        verdict = "healthy"
    if args.json:
        print_object({**report, "checks": [asdict(check) for check in checks], "verdict": verdict,
                      "ok": not (problems or warnings)}, True)
    else:
        print_object(report, False)
        print()
        print_rows([asdict(check) for check in checks], ("name", "status", "detail"), False)
        print(f"\nverdict: {verdict}", flush=True)
    return 1 if problems or warnings else 0


def _data_dir(path: Path) -> Check:
    # Opening the store has proved it readable and writable (it writes on open), or failed.
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("data_dir", "warn", f"mode {mode:04o}: others may read it, and it holds key hashes; "
                                         f"chmod 700 {path}")
    return Check("data_dir", "ok", f"readable and writable, mode {mode:04o}")


def _map(name: str, used: int, size: int, setting: str) -> Check:
    share = used / size if size else 1.0
    detail = f"{_size(used)} of {_size(size)} used ({share:.1%})"
    if share > FULL:
        return Check(f"{name}_map", "warn", f"{detail}: raise {setting} in the config before it fills up, "
                                            f"then restart")
    return Check(f"{name}_map", "ok", detail)


def _server_pid(data_dir: Path) -> int | None:
    """The pid of the `keysvc serve` on this data dir, if one runs. Read from serve.lock without
    taking the lock: a server starting at that instant would otherwise be refused."""
    try:
        pid = int((data_dir / "serve.lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        # The lock file keeps the pid of a server that has stopped; the pid may be reused since.
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not any(b"keysvc" in word for word in words) or b"serve" not in words:
            return None
    except OSError:
        pass  # no /proc: trust the pid
    return pid


def _spool(config: Config, report: dict[str, Any], server: int | None) -> Check:
    from keysvc.analytics.spool import Spool

    analytics = config.analytics
    if not analytics.enabled:
        return Check("spool", "skip", "analytics is disabled in the config")
    if not (Path(config.storage.data_dir) / "spool").is_dir():
        report["spool_depth"] = 0
        return Check("spool", "ok", "empty: no server has run analytics on this data dir yet")
    try:
        spool = Spool(config.storage.data_dir, analytics.spool_map_size)
        try:
            depth, size, dropped = spool.depth(), spool.size_bytes(), spool.dropped()
        finally:
            spool.close()
    except Exception as exc:  # lmdb's errors and OSError: reported, not raised
        return Check("spool", "fail", f"cannot read the spool: {exc}")
    report.update(spool_depth=depth, spool_bytes=size, spool_dropped_events=dropped)
    detail = f"{depth} event(s) waiting, {_size(size)} of the {_size(analytics.spool_cap_bytes)} cap"
    if dropped:
        detail += f"; {dropped} event(s) dropped since the spool was made"
    if size > FULL * analytics.spool_cap_bytes:
        return Check("spool", "warn", f"{detail}: past the cap the oldest events are dropped; is the flusher "
                                      f"running, and ClickHouse reachable?")
    if depth and not server:
        detail += ": the next keysvc serve flushes them"
    return Check("spool", "ok", detail)


def _clickhouse(config: Config, server: int | None) -> Check:
    analytics = config.analytics
    if not analytics.enabled:
        return Check("clickhouse", "skip", "analytics is disabled in the config")
    if analytics.clickhouse_url:
        return _clickhouse_server(config, analytics.clickhouse_url)
    from keysvc.analytics.client import AnalyticsUnavailable, QueryFailed, run_query

    import asyncio

    if not server:
        return Check("clickhouse", "skip", "embedded chDB: not checked, as no keysvc serve runs (only the "
                                           "server's flusher opens it)")
    try:
        asyncio.run(run_query(config.storage.data_dir, "SELECT 1 AS ok", CLICKHOUSE_TIMEOUT))
    except (AnalyticsUnavailable, QueryFailed) as exc:
        return Check("clickhouse", "fail", f"embedded chDB, through the flusher of keysvc serve (pid {server}): {exc}")
    return Check("clickhouse", "ok", f"embedded chDB answers, through the flusher of keysvc serve (pid {server})")


def _clickhouse_server(config: Config, url: str) -> Check:
    from keysvc.analytics.flusher import connect

    shown, secret = _without_password(url)
    try:
        client = connect(config, connect_timeout=CLICKHOUSE_TIMEOUT)
        try:
            client.query("SELECT 1")
        finally:
            client.close()
    except Exception as exc:  # whatever clickhouse-connect raises: the check fails with its message
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if secret:
            message = message.replace(secret, "***")
        return Check("clickhouse", "fail", f"{shown} cannot be reached: {message}")
    return Check("clickhouse", "ok", f"{shown} answers")


def _without_password(url: str) -> tuple[str, str | None]:
    """The URL to show, its password masked, and the password (to mask in error messages too)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "the ClickHouse server", None
    if not password:
        return url, None
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), password


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            break
    return f"{count:.1f} {unit}"

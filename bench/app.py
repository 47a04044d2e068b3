"""What does keysvc's ASGI app cost per keys.verifyKey, without Granian, the network and wrk?

    .venv/bin/python bench/app.py [--rounds 9] [--requests 4000] [--concurrency 16]

bench/http.py measures the whole node against a bare Granian app, and on a shared 2-core machine
its rounds move by +-10%: too coarse for a change of a few microseconds in the app. This calls the
apps directly instead, in one process on uvloop: `keysvc.http.app.create_app()` over a real data
dir (a root key, and a key like http.py's: one auto-applied ratelimit that never denies, credits
that never run out) and bench/raw_asgi.py's app, the ceiling http.py compares against. A round
sends N verifyKey requests as ASGI calls, `concurrency` at a time (gathered, so that the verify
batcher groups them as it does under load), to each app in turn, A B C A B C; the table gives the
median microseconds per request and keysvc minus the ceiling. Variants: analytics off; analytics
on (the workers' side: an event per verification, spooled; no flusher runs here); the ceiling.

Every answer must be 200 VALID (the bench stops otherwise). Exits 0 whatever the figures.
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/app.py`, this folder comes first on sys.path and bench/http.py would shadow
# the standard library's `http` package: move it last (bench/machine.py is still found).
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))
sys.dont_write_bytecode = True

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import machine
import raw_asgi


class Call:
    """One verifyKey request as ASGI: its scope, a receive that hands over the body, a send that keeps the answer."""

    def __init__(self, path: str, body: bytes, root_key: str) -> None:
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {root_key}".encode()),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
        }
        self.message = {"type": "http.request", "body": body, "more_body": False}

    async def receive(self) -> dict[str, Any]:
        return self.message

    async def answer(self, app: Any) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(dict(self.scope), self.receive, send)
        return sent[0]["status"], sent[1]["body"]


class Lifespan:
    """The app's lifespan, as Granian drives it: startup (the app opens the store), then shutdown."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[str] = asyncio.Queue()
        self.task: asyncio.Future[None] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.sent.put(message["type"])

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, self.queue.get,
                                                   self.send))
        await self.queue.put({"type": "lifespan.startup"})
        if await self.sent.get() != "lifespan.startup.complete":
            raise SystemExit("the app did not start")

    async def stop(self) -> None:
        await self.queue.put({"type": "lifespan.shutdown"})
        await self.task


def keysvc_app(data_dir: Path, analytics: bool) -> Any:
    """create_app() as a Granian worker calls it, with this data dir and analytics setting."""
    from keysvc.http import app as app_module

    os.environ[app_module.CONFIG_ENV] = json.dumps({
        "storage": {"data_dir": str(data_dir)}, "analytics": {"enabled": analytics},
        "metrics": {"port": None}, "logging": {"access": False},
    })
    return app_module.create_app()


async def bench_key(app: Any, root_key: str) -> str:
    async def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, payload = await Call(path, json.dumps(body).encode(), root_key).answer(app)
        if status != 200:
            raise SystemExit(f"{path} answered {status}: {payload[:300]!r}")
        return json.loads(payload)["data"]

    api_id = (await call("/v2/apis.createApi", {"name": "app-bench"}))["apiId"]
    return (await call("/v2/keys.createKey", {
        "apiId": api_id, "credits": {"remaining": 10**15},
        "ratelimits": [{"name": "requests", "limit": 10**12, "duration": 60_000, "autoApply": True}],
    }))["key"]


async def timed(app: Any, call: Call, requests: int, concurrency: int) -> float:
    """Microseconds per request of `requests` calls, `concurrency` at a time."""
    rounds = max(1, requests // concurrency)
    started = time.perf_counter()
    for _ in range(rounds):
        answers = await asyncio.gather(*[call.answer(app) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    status, body = answers[-1]
    if status != 200 or b'"code":"VALID"' not in body:
        raise SystemExit(f"not a VALID answer: {status} {body[:300]!r}")
    return elapsed / (rounds * concurrency) * 1e6


async def main_async(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    import keysvc.http.app  # noqa: F401  (imported before the timing: routes register on import)

    hb = machine.bench_http()
    workloads: dict[str, tuple[Any, Call]] = {}
    lifespans = []
    try:
        for name, analytics in (("keysvc, analytics off", False), ("keysvc, analytics on (spooling only)", True)):
            data_dir = root / ("on" if analytics else "off")
            root_key = hb.create_root_key(data_dir)
            app = keysvc_app(data_dir, analytics)
            lifespans.append(Lifespan(app))
            await lifespans[-1].start()
            key = await bench_key(app, root_key)
            workloads[name] = (app, Call("/v2/keys.verifyKey", json.dumps({"key": key}).encode(), root_key))
        workloads["raw ASGI app (http.py's ceiling)"] = (raw_asgi.app, workloads["keysvc, analytics off"][1])
        for app, call in workloads.values():  # warm-up: caches, the first windows, the allocator
            await timed(app, call, args.requests, args.concurrency)
        results: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(args.rounds):
            for name, (app, call) in workloads.items():
                results[name].append(await timed(app, call, args.requests, args.concurrency))
        return results
    finally:
        for lifespan in lifespans:
            await lifespan.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="A B C rounds (default 9)")
    parser.add_argument("--requests", type=int, default=4000, help="requests per workload per round (default 4000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests gathered at a time (default 16)")
    args = parser.parse_args()

    import uvloop

    print("# keysvc ASGI app bench: keys.verifyKey as ASGI calls in one process, against the raw ASGI ceiling")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"cpu: {machine.cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"uvloop {machine.version('uvloop')}, msgspec {machine.version('msgspec')}, lmdb {machine.version('lmdb')}; "
          f"keysvc at {machine.keysvc_revision()}")
    print(f"run: {' '.join([Path(sys.executable).name, *sys.argv])}; {args.rounds} rounds of {args.requests} requests, "
          f"{args.concurrency} at a time")
    print()
    root = Path(tempfile.mkdtemp(prefix="keysvc-app-bench-"))
    try:
        results = uvloop.run(main_async(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    from keysvc._fast import COMPILED

    ceiling = statistics.median(results["raw ASGI app (http.py's ceiling)"])
    print(f"core: {'compiled' if COMPILED else 'pure Python'}")
    print()
    print("| workload | median us/request | min-max | minus the ceiling |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f}-{max(values):.1f} | {median - ceiling:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

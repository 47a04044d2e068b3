"""`keysvc serve`: the node. Granian's workers serve the HTTP API; this process supervises
them and the analytics flusher, and answers GET /metrics on a listener of its own."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from keysvc import __version__
from keysvc.store import LmdbStore

if TYPE_CHECKING:
    from keysvc.config import Config
    from keysvc.metrics import MetricsListener

from .common import add_store_flags, config_of, store_config

FLUSHER_STOP_MARGIN = 10.0  # seconds the flusher gets past its drain_timeout to stop before SIGKILL

log = logging.getLogger("keysvc.serve")


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve the HTTP API with Granian")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    add_store_flags(serve)
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from granian import Granian

    from keysvc import logs
    from keysvc.config import to_json
    from keysvc.http.app import CONFIG_ENV
    from keysvc.store.lmdb import node_lock

    config = config_of(args)
    logs.setup(config, "master")
    data_dir = config.storage.data_dir
    Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with node_lock(data_dir):
        # Opened once here so that a bad data dir fails now with its message, and closed again
        # before Granian forks: each worker opens its own.
        store = LmdbStore(store_config(config))
        try:
            bootstrap_root_key(store)
        finally:
            store.close()
        os.environ[CONFIG_ENV] = to_json(config).decode()
        workers = config.workers()
        listener, failure = metrics_listener(config)
        if failure is not None:
            print(f"keysvc: error: {failure}", file=sys.stderr, flush=True)
            return 2
        where = f", metrics at http://{_host(listener.address[0])}:{listener.address[1]}/metrics" if listener else ""
        log.info(f"keysvc {__version__} serving http://{_host(config.server.host)}:{config.server.port} with "
                 f"{workers} worker(s), data in {data_dir}{where}")
        # The analytics flusher: its own process (it alone opens chDB), started before Granian
        # forks the workers and stopped after they have stopped, so that their last events are
        # flushed; restarted by the supervisor's thread whenever it exits meanwhile.
        flusher = None
        if config.analytics.enabled:
            from keysvc.analytics.flusher import Supervisor

            flusher = Supervisor()
            flusher.start()
        if listener is not None:
            listener.start()
        try:
            Granian(
                "keysvc.http.app:create_app",
                factory=True,
                address=config.server.host,
                port=config.server.port,
                interface="asgi",
                loop="uvloop",
                http="auto",
                websockets=False,
                workers=workers,
                respawn_failed_workers=True,
                respawn_interval=0.5,
                workers_kill_timeout=10,
                log_level=logs.granian_level(config),
                log_dictconfig=logs.dictconfig(config),
                log_access=False,  # keysvc writes its own access lines (keysvc.logs.AccessLog)
            ).serve()
        finally:
            if listener is not None:
                listener.stop()
            if flusher is not None:
                flusher.stop(config.analytics.drain_timeout + FLUSHER_STOP_MARGIN)
    return 0


def metrics_listener(config: Config) -> tuple[MetricsListener | None, str | None]:
    """(the metrics listener, bound, or None; the reason it cannot be, or None). The metrics files
    of the last run are removed first: the counters start at zero with the node."""
    settings = config.metrics
    if not settings.enabled:
        return None, None
    from keysvc import metrics

    metrics.empty_dir(metrics.metrics_dir(config.storage.data_dir))
    host, port = settings.host, settings.port
    if port is None:
        return None, None
    from keysvc.metrics import MetricsListener

    try:
        listener = MetricsListener(host, port, lambda: metrics.render_from_disk(config))
    except OSError as exc:
        return None, (f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} (metrics.port: choose a free "
                      f"port, or null for no metrics listener)")
    # One scrape here, before the listener's thread starts: whatever it imports and caches is
    # done now, in this thread, and not while Granian forks a worker.
    metrics.render_from_disk(config)
    return listener, None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def bootstrap_root_key(store: LmdbStore) -> None:
    """On the first start of a data dir, make a root key with every permission and show it once."""
    from keysvc.management import ROOT_KEYSPACE, Management

    with store.read() as reader:
        if next(reader.key_ids_of_keyspace(ROOT_KEYSPACE), None) is not None:
            return
    record, plaintext = Management(store).create_root_key(["*"], name="bootstrap")
    print(f"No root key existed: created {record.id} with every permission. It is shown this once and\n"
          f"stored only as a hash; keep it, and create narrower ones with `keysvc root-key create`:\n\n"
          f"    {plaintext}\n", file=sys.stderr, flush=True)

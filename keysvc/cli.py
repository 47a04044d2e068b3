"""The `keysvc` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from keysvc import __version__
from keysvc.config import Config, load
from keysvc.store import LmdbStore, StoreConfig, StoreError

FLUSHER_STOP_MARGIN = 10.0  # seconds the flusher gets past its drain_timeout to stop before SIGKILL


def _doctor(args: argparse.Namespace) -> int:
    store = LmdbStore(StoreConfig(data_dir=args.data_dir))
    try:
        report = {"data_dir": args.data_dir, "compiled_core": _compiled()}
        for name, env in (("store", store.store_env), ("counters", store.counters_env)):
            info, stat = env.info(), env.stat()
            used = (info["last_pgno"] + 1) * stat["psize"]
            report[f"{name}_map_used_bytes"] = used
            report[f"{name}_map_size_bytes"] = info["map_size"]
        with store.read() as reader:
            report["keys"] = reader.txn.stat(store.dbs["keys"])["entries"]
        report["change_hint"] = store.change_hint()
    finally:
        store.close()
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name:28} {value}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from granian import Granian

    from keysvc.config import to_json
    from keysvc.http.app import CONFIG_ENV
    from keysvc.store.lmdb import node_lock

    config = _config(args)
    data_dir = config.storage.data_dir
    Path(data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    with node_lock(data_dir):
        # Opened once here so that a bad data dir fails now with its message, and closed again
        # before Granian forks: each worker opens its own.
        store = LmdbStore(_store_config(config))
        try:
            _bootstrap_root_key(store)
        finally:
            store.close()
        os.environ[CONFIG_ENV] = to_json(config).decode()
        workers = config.workers()
        print(f"keysvc {__version__} serving http://{config.server.host}:{config.server.port} with {workers} "
              f"worker(s), data in {data_dir}", file=sys.stderr, flush=True)
        # The analytics flusher: its own process (it alone opens chDB), started before Granian
        # forks the workers and stopped after they have stopped, so that their last events are
        # flushed; restarted by the supervisor's thread whenever it exits meanwhile.
        flusher = None
        if config.analytics.enabled:
            from keysvc.analytics.flusher import Supervisor

            flusher = Supervisor()
            flusher.start()
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
                log_level="warning",
            ).serve()
        finally:
            if flusher is not None:
                flusher.stop(config.analytics.drain_timeout + FLUSHER_STOP_MARGIN)
    return 0


def _bootstrap_root_key(store: LmdbStore) -> None:
    """On the first start of a data dir, make a root key with every permission and show it once."""
    from keysvc.management import ROOT_KEYSPACE, Management

    with store.read() as reader:
        if next(reader.key_ids_of_keyspace(ROOT_KEYSPACE), None) is not None:
            return
    record, plaintext = Management(store).create_root_key(["*"], name="bootstrap")
    print(f"No root key existed: created {record.id} with every permission. It is shown this once and\n"
          f"stored only as a hash; keep it, and create narrower ones with `keysvc root-key create`:\n\n"
          f"    {plaintext}\n", file=sys.stderr, flush=True)


def _root_key_create(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    store = LmdbStore(_store_config(_config(args)))
    try:
        record, plaintext = Management(store).create_root_key(args.permission or ["*"], name=args.name)
    finally:
        store.close()
    print(f"root key {record.id} created with: {', '.join(record.grants)}", file=sys.stderr)
    print("It is shown once and stored only as a hash: keep it now.", file=sys.stderr)
    print(plaintext, flush=True)
    return 0


def _config(args: argparse.Namespace) -> Config:
    config = load(getattr(args, "config", None))
    if getattr(args, "data_dir", None):
        config.storage.data_dir = args.data_dir
    for flag, field in (("host", "host"), ("port", "port"), ("workers", "workers")):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config.server, field, value)
    return config


def _store_config(config: Config) -> StoreConfig:
    return StoreConfig(data_dir=config.storage.data_dir, map_size=config.storage.map_size,
                       counters_map_size=config.storage.counters_map_size)


def _compiled() -> bool:
    from keysvc._fast import COMPILED

    return COMPILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keysvc", description="A fast, self-hosted API-key service.")
    parser.add_argument("--version", action="version", version=f"keysvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser("doctor", help="check a data dir and report its state")
    doctor.add_argument("--data-dir", default="./keysvc-data")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(run=_doctor)

    serve = commands.add_parser("serve", help="serve the HTTP API with Granian")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    serve.add_argument("--data-dir", help="the node's data directory (default ./keysvc-data)")
    serve.add_argument("--config", help="a YAML config file")
    serve.set_defaults(run=_serve)

    root_key = commands.add_parser("root-key", help="manage root keys").add_subparsers(dest="action", required=True)
    create = root_key.add_parser("create", help="create a root key; prints it as the last line of stdout")
    create.add_argument("--data-dir", help="the node's data directory (default ./keysvc-data)")
    create.add_argument("--config", help="a YAML config file")
    create.add_argument("--permission", action="append", metavar="P",
                        help="a permission such as api.*.create_key (repeatable; default: all)")
    create.add_argument("--name", help="a name to recognise the key by")
    create.set_defaults(run=_root_key_create)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except StoreError as exc:
        print(f"keysvc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

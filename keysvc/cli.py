"""The `keysvc` command line."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from keysvc import __version__
from keysvc.store import LmdbStore, StoreConfig, StoreError


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

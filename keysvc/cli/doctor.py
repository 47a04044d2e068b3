"""`keysvc doctor`: check a data dir and report its state."""
from __future__ import annotations

import argparse

from .common import add_json_flag, add_store_flags, open_store, print_object


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="check a data dir and report its state")
    add_store_flags(doctor)
    add_json_flag(doctor)
    doctor.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from keysvc._fast import COMPILED

    with open_store(args) as store:
        report = {"data_dir": store.config.data_dir, "compiled_core": COMPILED}
        for name, env in (("store", store.store_env), ("counters", store.counters_env)):
            info, stat = env.info(), env.stat()
            report[f"{name}_map_used_bytes"] = (info["last_pgno"] + 1) * stat["psize"]
            report[f"{name}_map_size_bytes"] = info["map_size"]
        with store.read() as reader:
            report["keys"] = reader.txn.stat(store.dbs["keys"])["entries"]
        report["change_hint"] = store.change_hint()
    print_object(report, args.json)
    return 0

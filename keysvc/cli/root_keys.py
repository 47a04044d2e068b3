"""`keysvc root-key ...`: the keys that authorize the management API."""
from __future__ import annotations

import argparse
import sys

from .common import add_store_flags, open_store


def register(commands: argparse._SubParsersAction) -> None:
    root_key = commands.add_parser("root-key", help="manage root keys").add_subparsers(dest="action", required=True)
    create = root_key.add_parser("create", help="create a root key; prints it as the last line of stdout")
    add_store_flags(create)
    create.add_argument("--permission", action="append", metavar="P",
                        help="a permission such as api.*.create_key (repeatable; default: all)")
    create.add_argument("--name", help="a name to recognise the key by")
    create.set_defaults(run=create_root_key)


def create_root_key(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    with open_store(args) as store:
        record, plaintext = Management(store).create_root_key(args.permission or ["*"], name=args.name)
    print(f"root key {record.id} created with: {', '.join(record.grants)}", file=sys.stderr)
    print("It is shown once and stored only as a hash: keep it now.", file=sys.stderr)
    print(plaintext, flush=True)
    return 0

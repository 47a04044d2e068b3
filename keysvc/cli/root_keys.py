"""`keysvc root-key ...`: the keys that authorize the management API."""
from __future__ import annotations

import argparse
import sys

from .common import add_json_flag, add_store_flags, guarded, iso_ms, open_store, print_object, print_rows

COLUMNS = ("id", "name", "permissions", "created", "start")


def register(commands: argparse._SubParsersAction) -> None:
    root_key = commands.add_parser(
        "root-key", help="manage root keys", description="Manage the root keys that authorize the HTTP API.",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")

    create = root_key.add_parser(
        "create", help="create a root key; prints it as the last line of stdout",
        description="Create a root key and print it once: the last line of stdout (or `key` with --json). "
                    "It is stored only as a hash.",
    )
    add_store_flags(create)
    add_json_flag(create)
    create.add_argument("--permission", action="append", metavar="P",
                        help="a permission such as api.*.create_key or api.<apiId>.verify_key (repeatable; "
                             "default: *, every permission)")
    create.add_argument("--name", help="a name to recognise the key by")
    create.set_defaults(run=create_root_key)

    listing = root_key.add_parser(
        "list", help="list root keys (never their hashes)",
        description="List the root keys: id, name, permissions, creation time and start (the first "
                    "characters of the key). Neither keys nor their hashes are shown.",
    )
    add_store_flags(listing)
    add_json_flag(listing)
    listing.add_argument("--revoked", action="store_true", help="include revoked root keys")
    listing.set_defaults(run=list_root_keys)

    revoke = root_key.add_parser(
        "revoke", help="revoke a root key by its id",
        description="Revoke a root key: a running server refuses it from its next request on.",
    )
    revoke.add_argument("key_id", metavar="ID", help="the root key's id (key_...), as `root-key list` shows it")
    add_store_flags(revoke)
    add_json_flag(revoke)
    revoke.set_defaults(run=revoke_root_key)


@guarded
def create_root_key(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    with open_store(args) as store:
        record, plaintext = Management(store).create_root_key(args.permission or ["*"], name=args.name)
    if args.json:
        print_object({"id": record.id, "name": record.name, "permissions": record.grants, "created": record.created_at,
                      "start": record.start, "key": plaintext}, True)
        return 0
    print(f"root key {record.id} created with: {', '.join(record.grants)}", file=sys.stderr)
    print("It is shown once and stored only as a hash: keep it now.", file=sys.stderr, flush=True)
    print(plaintext, flush=True)
    return 0


@guarded
def list_root_keys(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    with open_store(args, must_exist=True) as store:
        keys = Management(store).list_root_keys(include_revoked=args.revoked)
    columns = COLUMNS + ("revoked",) if args.revoked else COLUMNS
    rows = []
    for key in sorted(keys, key=lambda key: (key.created_at, key.id)):
        # The hash is left out on purpose: with it, anyone can test guesses offline.
        row = {"id": key.id, "name": key.name, "permissions": key.grants,
               "created": key.created_at if args.json else iso_ms(key.created_at), "start": key.start}
        if args.revoked:
            row["revoked"] = key.deleted_at if args.json else iso_ms(key.deleted_at)
        rows.append(row)
    print_rows(rows, columns, args.json)
    return 0


@guarded
def revoke_root_key(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    with open_store(args, must_exist=True) as store:
        manage = Management(store)
        key = manage.revoke_root_key(args.key_id)
        left = len(manage.list_root_keys())
    if args.json:
        print_object({"id": key.id, "revoked": key.deleted_at, "liveRootKeys": left}, True)
    else:
        print(f"root key {key.id} revoked")
    if not left:
        print("No live root key remains: the HTTP API accepts none until `keysvc root-key create` makes one.",
              file=sys.stderr)
    return 0

"""`keysvc apis ...`: the APIs that keys belong to."""
from __future__ import annotations

import argparse
from typing import Any

from keysvc.store import records as r

from .common import add_json_flag, add_store_flags, checked, guarded, iso_ms, open_store, print_object, print_rows


def register(commands: argparse._SubParsersAction) -> None:
    apis = commands.add_parser(
        "apis", help="create and list APIs", description="Create and list APIs (each holds a keyspace of keys).",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")

    create = apis.add_parser("create", help="create an API", description="Create an API and print its id.")
    create.add_argument("name", metavar="NAME", help="the API's name")
    add_store_flags(create)
    add_json_flag(create)
    create.set_defaults(run=create_api)

    listing = apis.add_parser("list", help="list APIs", description="List the APIs, oldest first.")
    listing.add_argument("--deleted", action="store_true", help="include deleted APIs")
    add_store_flags(listing)
    add_json_flag(listing)
    listing.set_defaults(run=list_apis)


@guarded
def create_api(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    from keysvc.http.routes.apis import CreateApiRequest

    request = checked(CreateApiRequest, {"name": args.name}, {"name": "NAME"})
    with open_store(args) as store:
        api = Management(store).create_api(request.name)
    if args.json:
        print_object(_row(api, True), True)
    else:
        print(api.id)
    return 0


@guarded
def list_apis(args: argparse.Namespace) -> int:
    with open_store(args, must_exist=True) as store, store.read() as reader:
        apis = [api for api in reader.records_from("apis", r.Api) if args.deleted or api.deleted_at is None]
    apis.sort(key=lambda api: (api.created_at, api.id))
    columns = ("id", "name", "keyspaceId", "created") + (("deleted",) if args.deleted else ())
    print_rows([_row(api, args.json) for api in apis], columns, args.json)
    return 0


def _row(api: r.Api, as_json: bool) -> dict[str, Any]:
    stamp = (lambda ms: ms) if as_json else iso_ms
    return {"id": api.id, "name": api.name, "keyspaceId": api.keyspace_id, "created": stamp(api.created_at),
            "deleted": stamp(api.deleted_at)}

"""`keysvc keys ...`: create, verify, read and revoke keys, with the same rules (and the same
request types) as the HTTP API's keys.createKey, keys.verifyKey, keys.getKey and keys.deleteKey."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from types import SimpleNamespace
from typing import Any

import msgspec

from .common import (
    UsageError,
    add_json_flag,
    add_store_flags,
    checked,
    guarded,
    open_store,
    print_object,
)

CREATE_FLAGS = {
    "apiId": "--api-id", "prefix": "--prefix", "name": "--name", "byteLength": "--byte-length",
    "externalId": "--external-id", "meta": "--meta", "roles": "--role", "permissions": "--permission",
    "expires": "--expires", "credits": "--credits/--refill-*", "ratelimits": "--ratelimit", "enabled": "--disabled",
}
VERIFY_FLAGS = {"key": "KEY", "permissions": "--permissions", "credits": "--cost", "ratelimits": "--ratelimit"}

_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)?")


def register(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser(
        "keys", help="create, verify, read and revoke keys",
        description="Create, verify, read and revoke the keys of an API.",
    ).add_subparsers(dest="action", required=True, metavar="ACTION")

    create = keys.add_parser(
        "create", help="create a key; prints it as the last line of stdout",
        description="Create a key in an API and print it once: the last line of stdout (or `key` with "
                    "--json). It is stored only as a hash. Limits are those of keys.createKey.",
    )
    create.add_argument("--api-id", required=True, help="the API the key belongs to")
    create.add_argument("--prefix", help="the key's prefix, as in <prefix>_<random>")
    create.add_argument("--name", help="a name for the key")
    create.add_argument("--byte-length", type=int, metavar="N", help="random bytes in the key (16 to 255; default 16)")
    create.add_argument("--external-id", metavar="ID", help="the identity the key belongs to (created if new)")
    create.add_argument("--meta", metavar="JSON", help="a JSON object stored with the key")
    create.add_argument("--role", action="append", default=[], metavar="NAME", help="a role (repeatable; must exist)")
    create.add_argument("--permission", action="append", default=[], metavar="SLUG",
                        help="a permission (repeatable; created if new)")
    create.add_argument("--expires", metavar="WHEN",
                        help="when the key expires: unix milliseconds or an ISO 8601 time (UTC unless it says)")
    create.add_argument("--credits", type=int, metavar="N", help="the uses the key has (default: unlimited)")
    create.add_argument("--refill-interval", choices=("daily", "monthly"), help="refill the credits every day or month")
    create.add_argument("--refill-amount", type=int, metavar="N", help="credits the refill sets")
    create.add_argument("--refill-day", type=int, metavar="D", help="day of the month of a monthly refill (1 to 31)")
    create.add_argument("--ratelimit", action="append", default=[], metavar="NAME:LIMIT:DURATION[:auto]",
                        help="a rate limit: LIMIT requests per DURATION (ms, or with a unit: 10s, 1m, 1h, 1d); "
                             "`auto` applies it to every verification (repeatable)")
    create.add_argument("--disabled", action="store_true", help="create the key disabled")
    add_store_flags(create)
    add_json_flag(create)
    create.set_defaults(run=create_key)

    verify = keys.add_parser(
        "verify", help="verify a key as the server does; exit code 0 if valid, 1 if not",
        description="Verify a key with the server's verifier: it charges credits and rate limits like "
                    "keys.verifyKey, and prints the outcome (valid, code, credits, ...). Exit code 0 if the key "
                    "is valid, 1 if not, 2 if the request is wrong.",
    )
    verify.add_argument("key", metavar="KEY", help="the key, or - to read it from the first line of stdin")
    verify.add_argument("--permissions", metavar="QUERY",
                        help="a permission query the key must satisfy, e.g. 'a.read AND (b.write OR c)'")
    verify.add_argument("--cost", type=int, metavar="N", help="credits this verification costs (default 1)")
    verify.add_argument("--ratelimit", action="append", default=[], metavar="NAME[:COST[:LIMIT:DURATION]]",
                        help="check the key's rate limit NAME at COST (default 1), or an ad hoc one of LIMIT per "
                             "DURATION (repeatable)")
    verify.add_argument("--api-id", action="append", metavar="ID",
                        help="only find keys of this API (repeatable), as a root key scoped to it would")
    add_store_flags(verify)
    add_json_flag(verify)
    verify.set_defaults(run=verify_key)

    get = keys.add_parser("get", help="show a key by its id",
                          description="Show a key by its id, as keys.getKey does (never the key or its hash).")
    get.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_...)")
    add_store_flags(get)
    add_json_flag(get)
    get.set_defaults(run=get_key)

    revoke = keys.add_parser(
        "revoke", help="revoke (delete) a key by its id",
        description="Revoke a key: it verifies as NOT_FOUND from now on, on a running server too.",
    )
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (key_...)")
    revoke.add_argument("--permanent", action="store_true",
                        help="remove the record and its credits too, instead of marking it deleted")
    add_store_flags(revoke)
    add_json_flag(revoke)
    revoke.set_defaults(run=revoke_key)


# -- create -------------------------------------------------------------------------------------------


@guarded
def create_key(args: argparse.Namespace) -> int:
    from keysvc.http.routes.keys import CreateKeyRequest, credits_spec, ratelimit_specs, value
    from keysvc.management import KeySpec, Management

    body: dict[str, Any] = {"apiId": args.api_id, "enabled": not args.disabled}
    for field, given in (("prefix", args.prefix), ("name", args.name), ("byteLength", args.byte_length),
                         ("externalId", args.external_id)):
        if given is not None:
            body[field] = given
    if args.meta is not None:
        body["meta"] = _json_object(args.meta, "--meta")
    if args.role:
        body["roles"] = args.role
    if args.permission:
        body["permissions"] = args.permission
    if args.expires is not None:
        body["expires"] = parse_time(args.expires, "--expires")
    if args.refill_interval is not None and args.refill_amount is None:
        raise UsageError("--refill-interval needs --refill-amount, the credits each refill sets")
    if args.refill_interval == "monthly" and args.refill_day is None:
        raise UsageError("--refill-interval monthly needs --refill-day")
    if args.credits is not None:
        body["credits"] = {"remaining": args.credits}
        if args.refill_interval is not None:
            refill: dict[str, Any] = {"interval": args.refill_interval, "amount": args.refill_amount}
            if args.refill_day is not None:
                refill["refillDay"] = args.refill_day
            body["credits"]["refill"] = refill
    elif args.refill_interval or args.refill_amount is not None or args.refill_day is not None:
        raise UsageError("a refill needs --credits, the balance it refills")
    if args.refill_interval is None and (args.refill_amount is not None or args.refill_day is not None):
        raise UsageError("--refill-amount and --refill-day need --refill-interval")
    if args.ratelimit:
        body["ratelimits"] = [_key_ratelimit(text) for text in args.ratelimit]
    request = checked(CreateKeyRequest, body, CREATE_FLAGS)
    spec = KeySpec(
        api_id=request.api_id, prefix=value(request.prefix), name=value(request.name),
        byte_length=value(request.byte_length), external_id=value(request.external_id), meta=value(request.meta),
        roles=value(request.roles, ()), permissions=value(request.permissions, ()), expires=value(request.expires),
        credits=credits_spec(request.credits), ratelimits=ratelimit_specs(request.ratelimits),
        enabled=request.enabled,
    )
    _check_meta(spec.meta)
    with open_store(args, must_exist=True) as store:
        record, plaintext = Management(store).create_key(spec)
    if args.json:
        print_object({"keyId": record.id, "apiId": record.api_id, "start": record.start, "key": plaintext}, True)
        return 0
    print(f"key {record.id} created in {record.api_id}: it is shown once and stored only as a hash", file=sys.stderr,
          flush=True)
    print(plaintext, flush=True)
    return 0


def _key_ratelimit(text: str) -> dict[str, Any]:
    parts = text.split(":")
    auto = len(parts) == 4 and parts[3] == "auto"
    if len(parts) not in (3, 4) or (len(parts) == 4 and not auto):
        raise UsageError(f"--ratelimit {text!r}: expected NAME:LIMIT:DURATION or NAME:LIMIT:DURATION:auto")
    return {"name": parts[0], "limit": _integer(parts[1], f"--ratelimit {text!r}: LIMIT"),
            "duration": parse_duration(parts[2], f"--ratelimit {text!r}: DURATION"), "autoApply": auto}


def _check_meta(meta: Any) -> None:
    from keysvc.http.errors import HttpError
    from keysvc.http.routes.keys import checked_meta

    try:
        checked_meta(meta, "--meta")
    except HttpError as exc:
        raise UsageError(exc.detail) from None


# -- verify -------------------------------------------------------------------------------------------


@guarded
def verify_key(args: argparse.Namespace) -> int:
    from keysvc._fast import PermissionQuerySyntaxError, RatelimitNotFoundError, Verifier
    from keysvc.http.routes.keys import VerifyKeyRequest, verify_answer
    from keysvc.management import now_ms

    key = args.key
    if key == "-":
        # Only the first line: a key never holds a newline, and a pipe often adds one.
        key = sys.stdin.readline().strip()
        if not key:
            raise UsageError("no key on stdin")
    body: dict[str, Any] = {"key": key}
    if args.permissions is not None:
        body["permissions"] = args.permissions
    if args.cost is not None:
        body["credits"] = {"cost": args.cost}
    if args.ratelimit:
        body["ratelimits"] = [_verify_ratelimit(text) for text in args.ratelimit]
    request = checked(VerifyKeyRequest, body, VERIFY_FLAGS)
    ratelimits = None
    if request.ratelimits:
        ratelimits = [(rl.name, _or_none(rl.cost), _or_none(rl.limit), _or_none(rl.duration))
                      for rl in request.ratelimits]
    with open_store(args, must_exist=True) as store:
        verifier = Verifier(store, cache_size=16)
        try:
            result = verifier.verify(
                request.key, now_ms(), _or_none(request.permissions),
                -1 if request.credits is msgspec.UNSET else request.credits.cost, ratelimits,
                frozenset(args.api_id) if args.api_id else None,
            )
        except PermissionQuerySyntaxError as exc:
            raise UsageError(f"invalid --permissions: {exc}") from None
        except RatelimitNotFoundError as exc:
            raise UsageError(f"--ratelimit: {exc}") from None
        answer = msgspec.to_builtins(verify_answer(result))
    print_object(answer, args.json)
    return 0 if result.valid else 1


def _verify_ratelimit(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (1, 2, 4):
        raise UsageError(f"--ratelimit {text!r}: expected NAME, NAME:COST or NAME:COST:LIMIT:DURATION")
    item: dict[str, Any] = {"name": parts[0]}
    if len(parts) >= 2:
        item["cost"] = _integer(parts[1], f"--ratelimit {text!r}: COST")
    if len(parts) == 4:
        item["limit"] = _integer(parts[2], f"--ratelimit {text!r}: LIMIT")
        item["duration"] = parse_duration(parts[3], f"--ratelimit {text!r}: DURATION")
    return item


def _or_none(field: Any) -> Any:
    return None if field is msgspec.UNSET else field


# -- get and revoke --------------------------------------------------------------------------------------


@guarded
def get_key(args: argparse.Namespace) -> int:
    from keysvc.http.routes.keys import describe_key
    from keysvc.management import Management

    with open_store(args, must_exist=True) as store:
        manage = Management(store)
        key = manage.get_key(args.key_id)
        # describe_key reads through a request's node; the store and its management are all it uses.
        answer = msgspec.to_builtins(describe_key(SimpleNamespace(node=SimpleNamespace(store=store, manage=manage)),
                                                  key))
    print_object({"keyId": answer.pop("keyId"), "apiId": key.api_id, **answer}, args.json)
    return 0


@guarded
def revoke_key(args: argparse.Namespace) -> int:
    from keysvc.management import Management

    with open_store(args, must_exist=True) as store:
        Management(store).delete_key(args.key_id, permanent=args.permanent)
    if args.json:
        print_object({"keyId": args.key_id, "revoked": True, "permanent": args.permanent}, True)
    else:
        print(f"key {args.key_id} {'deleted permanently' if args.permanent else 'revoked'}")
    return 0


# -- parsing ------------------------------------------------------------------------------------------------


def parse_time(text: str, flag: str) -> int:
    """Unix milliseconds, or an ISO 8601 time (UTC when it names no zone), as unix milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected unix milliseconds or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def parse_duration(text: str, what: str) -> int:
    found = _DURATION.fullmatch(text)
    if found is None:
        raise UsageError(f"{what}: expected milliseconds, or a number with a unit (ms, s, m, h, d)")
    return int(found.group(1)) * _UNITS[found.group(2) or "ms"]


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not an integer") from None


def _json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return parsed

"""What every command shares: the config as flags and files make it, the store it opens, and
output as a human table or as JSON."""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from keysvc.config import Config, load, validate
from keysvc.store import LmdbStore, StoreConfig


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the node's data directory (default ./keysvc-data)")
    parser.add_argument("--config", help="a YAML config file")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar on stderr (default: when stderr is a terminal)")


class UsageError(Exception):
    """Input the command cannot use (an unknown id, a malformed line): exit code 2, one line."""


Run = Callable[[argparse.Namespace], int]


def guarded(run: Run) -> Run:
    """The command's domain refusals as one `keysvc: error:` line and exit code 2, like the
    store's and the config's (which main() turns into the same)."""
    from keysvc.errors import KeysvcError

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (KeysvcError, UsageError) as exc:
            return fail(str(exc))

    return wrapper


def fail(message: str) -> int:
    sys.stdout.flush()
    print(f"keysvc: error: {message}", file=sys.stderr, flush=True)
    return 2


T = TypeVar("T")

_WHERE = re.compile(r" - at `\$\.?([A-Za-z0-9_]*)([^`]*)`$")


def checked(kind: type[T], body: dict[str, Any], flags: Mapping[str, str]) -> T:
    """`body` as the API's request type `kind`, so that the command line takes exactly what the
    HTTP API takes; a refusal names the flag (`flags` maps wire fields to flags)."""
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        found = _WHERE.search(text)
        if found is None:
            raise UsageError(text) from None
        flag = flags.get(found.group(1), found.group(1))
        raise UsageError(f"invalid {flag}{found.group(2)}: {text[:found.start()]}") from None


def iso_ms(ms: int | None) -> str | None:
    """Unix milliseconds as an ISO 8601 UTC time, for tables; JSON keeps the number."""
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def config_of(args: argparse.Namespace) -> Config:
    config = load(getattr(args, "config", None))
    if getattr(args, "data_dir", None):
        config.storage.data_dir = args.data_dir
    for flag in ("host", "port", "workers"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config.server, flag, value)
    return validate(config)  # flags are settings too: --port 70000 is refused like server.port: 70000


def store_config(config: Config) -> StoreConfig:
    return StoreConfig(data_dir=config.storage.data_dir, map_size=config.storage.map_size,
                       counters_map_size=config.storage.counters_map_size)


@contextmanager
def open_store(args: argparse.Namespace, must_exist: bool = False) -> Iterator[LmdbStore]:
    """The store of the data dir the flags and config name. `must_exist`: for commands that only
    read or change what is there, so that a mistyped --data-dir is an error, not a new empty store."""
    config = store_config(config_of(args))
    if must_exist and not os.path.exists(config.data_dir):
        raise UsageError(f"there is no data dir at {config.data_dir} (--data-dir, or storage.data_dir in the config)")
    store = LmdbStore(config)
    try:
        yield store
    finally:
        store.close()


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Rows as one JSON array, or as a table with a header line."""
    if as_json:
        print(json.dumps(list(rows)))
        return
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column), *(len(line[i]) for line in cells)]) for i, column in enumerate(columns)]
    print("  ".join(column.upper().ljust(width) for column, width in zip(columns, widths)).rstrip())
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    sys.stdout.flush()


def print_object(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj))
        return
    width = max((len(name) for name in obj), default=0)
    for name, value in obj.items():
        print(f"{name.ljust(width)}  {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)

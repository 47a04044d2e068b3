"""What every command shares: the config as flags and files make it, the store it opens, and
output as a human table or as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from keysvc.config import Config, load
from keysvc.store import LmdbStore, StoreConfig


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="the node's data directory (default ./keysvc-data)")
    parser.add_argument("--config", help="a YAML config file")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_of(args: argparse.Namespace) -> Config:
    config = load(getattr(args, "config", None))
    if getattr(args, "data_dir", None):
        config.storage.data_dir = args.data_dir
    for flag in ("host", "port", "workers"):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(config.server, flag, value)
    return config


def store_config(config: Config) -> StoreConfig:
    return StoreConfig(data_dir=config.storage.data_dir, map_size=config.storage.map_size,
                       counters_map_size=config.storage.counters_map_size)


@contextmanager
def open_store(args: argparse.Namespace) -> Iterator[LmdbStore]:
    store = LmdbStore(store_config(config_of(args)))
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

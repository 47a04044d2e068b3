"""The `keysvc` command line: one module per command group."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from keysvc import __version__
from keysvc.config import ConfigError
from keysvc.store import StoreError

from . import apis, backup, doctor, keys, root_keys, serve


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="keysvc", description="A fast, self-hosted API-key service.")
    root.add_argument("--version", action="version", version=f"keysvc {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    for group in (serve, root_keys, apis, keys, backup, doctor):
        group.register(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (StoreError, ConfigError) as exc:
        print(f"keysvc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The machine and the code a benchmark ran on, for the header every bench script prints."""
from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent


def bench_http() -> ModuleType:
    """bench/http.py's helpers (servers, the bench key, wrk), loaded as `bench_http`: under its
    own name it would shadow the standard library's `http` package."""
    if "bench_http" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_http", Path(__file__).resolve().parent / "http.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["bench_http"] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["bench_http"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def keysvc_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "keysvc"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (keysvc/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def remove_unless_kept(tmp: Path, keep: bool) -> None:
    """A bench's temporary dir at its end: removed, or with --keep kept and named on stderr."""
    if keep:
        print(f"\nkept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


def run_script(main: Callable[[], int], errors: tuple[type[BaseException], ...]) -> NoReturn:
    """sys.exit(main()); a failure of the bench itself (one of `errors`) is one line on stderr and exit 2."""
    try:
        sys.exit(main())
    except errors as exc:
        print(f"bench/{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)

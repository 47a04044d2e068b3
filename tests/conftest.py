"""Fixtures shared by the tests: both twins of the hot path, and a real store in a temp dir."""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from keysvc.management import Management
from server import Server
from keysvc.store import LmdbStore, StoreConfig

# Tests start many servers at once: no metrics listener on the shared default port unless a test
# asks for one (tests of metrics set their own port).
os.environ.setdefault("KEYSVC_METRICS__PORT", "null")

TWINS = ["keysvc._fast._core_c", "keysvc._fast._core_py"]


@pytest.fixture(autouse=True)
def _outside_the_source_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from a temp dir, so that the processes tests start (`python -m keysvc`,
    `python -c ...`) import the installed, compiled package, not the checkout's sources."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=TWINS, ids=["compiled", "python"])
def core(request: pytest.FixtureRequest) -> ModuleType:
    """Each twin of the hot path in turn; the compiled one must really be compiled."""
    module = importlib.import_module(request.param)
    assert module.COMPILED == request.param.endswith("_c")
    return module


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `keysvc serve --workers 2` for the session's end-to-end tests."""
    running = Server(tmp_path_factory.mktemp("server") / "data", workers=2)
    yield running
    running.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(StoreConfig(data_dir=str(data_dir), map_size=1 << 30, counters_map_size=1 << 28))
    yield s
    s.close()


@pytest.fixture
def manage(store: LmdbStore) -> Management:
    return Management(store)


@pytest.fixture(params=[False, True], ids=["compiled", "python"])
def twin(request: pytest.FixtureRequest) -> tuple[dict[str, str], bool]:
    """For tests that start processes: their environment, and whether their hot path must be
    the compiled twin (else KEYSVC_NO_EXTENSIONS=1 selects the pure-Python one)."""
    env = dict(os.environ)
    env.pop("KEYSVC_NO_EXTENSIONS", None)
    if request.param:
        env["KEYSVC_NO_EXTENSIONS"] = "1"
    return env, not request.param


@pytest.fixture
def verifier(core: ModuleType, store: LmdbStore):
    return core.Verifier(store)

"""Each way the store can refuse gives one clear message naming the cause, never a traceback,
and loses nothing already committed. Also: files are private, and environments are per process."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from keysvc._fast import Verifier
from keysvc.management import CreditsSpec, KeySpec, Management, now_ms
from keysvc.store import LmdbStore, NewerSchemaError, StoreConfig, StoreFullError, StoreLockedError
from keysvc.store.lmdb import node_lock


def doctor(data_dir: Path, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keysvc", "doctor", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60, **kw)


def assert_one_clear_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keysvc: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_doctor_reports_a_healthy_store(data_dir):
    result = doctor(data_dir)
    assert result.returncode == 0 and "store_map_size_bytes" in result.stdout


def test_a_newer_schema_is_refused(data_dir):
    LmdbStore(StoreConfig(data_dir=str(data_dir))).close()
    env = lmdb.open(str(data_dir / "store"), max_dbs=32)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"schema_version", b"99")
    env.close()
    with pytest.raises(NewerSchemaError, match="newer keysvc"):
        LmdbStore(StoreConfig(data_dir=str(data_dir)))
    assert_one_clear_error(doctor(data_dir), "newer keysvc", "schema version 99", "Upgrade")


def test_a_data_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    assert_one_clear_error(doctor(target), str(target))


def test_a_corrupt_store_file_is_refused(data_dir):
    (data_dir / "store").mkdir(parents=True)
    (data_dir / "store" / "data.mdb").write_bytes(b"\x00garbage" * 4096)
    assert_one_clear_error(doctor(data_dir), "not a readable keysvc store")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_an_unreadable_data_dir_is_refused(data_dir):
    LmdbStore(StoreConfig(data_dir=str(data_dir))).close()
    # Root reads everything; without these two capabilities it obeys the mode bits like anyone.
    os.chown(data_dir, 65534, 65534)
    data_dir.chmod(0o700)
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(
        ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--", sys.executable, "-m", "keysvc", "doctor",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert_one_clear_error(result, "permission denied", str(data_dir))


def test_a_second_server_on_the_same_data_dir_is_refused(data_dir):
    data_dir.mkdir()
    with node_lock(str(data_dir)):
        code = f"from keysvc.store.lmdb import node_lock\nwith node_lock({str(data_dir)!r}): pass"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "StoreLockedError" in result.stderr and f"pid {os.getpid()}" in result.stderr
    with node_lock(str(data_dir)):  # released: taken again
        pass


def test_the_lock_error_names_the_holder(data_dir):
    data_dir.mkdir()
    with node_lock(str(data_dir)):
        pid = os.fork()
        if pid == 0:
            try:
                with node_lock(str(data_dir)):
                    os._exit(1)
            except StoreLockedError as exc:
                os._exit(0 if f"pid {os.getppid()}" in str(exc) else 3)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_full_map_is_a_clear_error_and_loses_nothing(tmp_path):
    config = StoreConfig(data_dir=str(tmp_path / "small"), map_size=1 << 20, counters_map_size=1 << 20)
    store = LmdbStore(config)
    manage = Management(store)
    api = manage.create_api("full")
    created = []
    with pytest.raises(StoreFullError, match="map size is used up.*storage.map_size"):
        for _ in range(100_000):
            created.append(manage.create_key(KeySpec(api_id=api.id, meta={"pad": "x" * 200},
                                                     credits=CreditsSpec(remaining=7)))[1])
    assert len(created) > 100
    verifier = Verifier(store)
    now = now_ms()
    assert all(verifier.verify(key, now).code == "VALID" for key in created)
    store.close()
    reopened = LmdbStore(config)
    verifier = Verifier(reopened)
    assert [verifier.verify(key, now).credits for key in created[:5]] == [5] * 5
    reopened.close()


def test_store_files_are_private(data_dir):
    store = LmdbStore(StoreConfig(data_dir=str(data_dir)))
    store.close()
    modes = {path.relative_to(data_dir).as_posix(): stat.S_IMODE(path.stat().st_mode) for path in data_dir.rglob("*")}
    assert modes.pop("store") == modes.pop("counters") == 0o700
    assert modes and all(mode == 0o600 for mode in modes.values()), modes
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_a_store_opened_before_fork_is_refused_in_the_child(data_dir):
    store = LmdbStore(StoreConfig(data_dir=str(data_dir)))
    pid = os.fork()
    if pid == 0:
        try:
            with store.read():
                os._exit(1)
        except Exception as exc:
            os._exit(0 if "open it in each worker" in str(exc) else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.close()

"""The `keysvc` command line end to end, on real data dirs: root keys, APIs, keys, doctor; with a
server running on the same data dir; and bad input as one clear line with exit code 2.

Commands whose process boundary matters (exit codes, what stdout holds, stdin) run as
subprocesses; the others in-process through keysvc.cli.main, which is what `python -m keysvc` runs."""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from keysvc import cli
from keysvc.analytics.spool import Spool
from keysvc.management import CreditsSpec, KeySpec, Management
from keysvc.store import LmdbStore, StoreConfig
from server import free_port


def keysvc(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keysvc", *argv], input=stdin, capture_output=True, text=True,
                          timeout=60)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_clear_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keysvc: error: "), result.stderr
    return lines[0]


def config_file(tmp_path: Path, **sections: Any) -> str:
    path = tmp_path / "keysvc.yaml"
    path.write_text(yaml.safe_dump(sections))
    return str(path)


# -- --help everywhere ----------------------------------------------------------------------------------------


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    return found


def test_every_command_has_help(capsys):
    every = commands(cli.parser())
    assert {("export",), ("import",), ("doctor",), ("serve",), ("root-key", "list"), ("root-key", "revoke"),
            ("apis", "create"), ("apis", "list"), ("keys", "create"), ("keys", "verify"), ("keys", "get"),
            ("keys", "revoke")} <= set(every)
    for path in every:
        with pytest.raises(SystemExit) as exited:
            cli.main([*path, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: keysvc {' '.join(path)}".rstrip()), path
    # The import's help documents the line formats it reads.
    with pytest.raises(SystemExit):
        cli.main(["import", "--help"])
    out = capsys.readouterr().out
    assert '"type": "header"' in out and '"type": "unkey_key"' in out and "migrateKeys" in out


# -- root keys ------------------------------------------------------------------------------------------------


def test_root_keys_are_created_listed_and_revoked(capsys, data_dir):
    d = str(data_dir)
    created = keysvc("root-key", "create", "--data-dir", d, "--name", "deploy",
                     "--permission", "api.*.create_key", "--permission", "api.*.verify_key")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip().splitlines()[-1]
    assert plaintext.startswith("unkey_root_") and "shown once" in created.stderr
    code, out, _ = run(capsys, "root-key", "create", "--data-dir", d, "--json")
    as_json = json.loads(out)
    assert as_json["key"].startswith("unkey_root_") and as_json["permissions"] == ["*"]

    code, table, _ = run(capsys, "root-key", "list", "--data-dir", d)
    header, *rows = table.splitlines()
    assert header.split() == ["ID", "NAME", "PERMISSIONS", "CREATED", "START"] and len(rows) == 2
    assert "deploy" in rows[0] and "api.*.create_key,api.*.verify_key" in rows[0] and plaintext[:15] in rows[0]
    listed = json.loads(run(capsys, "root-key", "list", "--data-dir", d, "--json")[1])
    assert [set(row) for row in listed] == [{"id", "name", "permissions", "created", "start"}] * 2
    # Neither the keys nor anything of their hashes is shown.
    store = LmdbStore(StoreConfig(data_dir=d))
    hashes = [key.hash for key in Management(store).list_root_keys()]
    store.close()
    for text in (table, json.dumps(listed)):
        assert plaintext not in text and as_json["key"] not in text
        assert not any(digest.hex()[:8] in text or base64.b64encode(digest).decode()[:8] in text for digest in hashes)

    code, out, _ = run(capsys, "root-key", "revoke", listed[0]["id"], "--data-dir", d)
    assert code == 0 and listed[0]["id"] in out
    after = json.loads(run(capsys, "root-key", "list", "--data-dir", d, "--json")[1])
    assert [row["id"] for row in after] == [listed[1]["id"]]
    with_revoked = json.loads(run(capsys, "root-key", "list", "--revoked", "--data-dir", d, "--json")[1])
    assert [row["revoked"] is not None for row in with_revoked] == [True, False]
    assert "No live root key" in one_clear_error(keysvc("root-key", "revoke", listed[0]["id"], "--data-dir", d))


# -- APIs and keys ------------------------------------------------------------------------------------------------


def test_apis_and_keys_end_to_end(capsys, monkeypatch, data_dir):
    d = str(data_dir)
    api_id = keysvc("apis", "create", "payments", "--data-dir", d).stdout.strip()
    assert api_id.startswith("api_")
    listed = json.loads(run(capsys, "apis", "list", "--data-dir", d, "--json")[1])
    assert [(row["id"], row["name"]) for row in listed] == [(api_id, "payments")]
    assert "payments" in run(capsys, "apis", "list", "--data-dir", d)[1]

    created = keysvc("keys", "create", "--api-id", api_id, "--data-dir", d, "--prefix", "sk", "--name",
                     "acme's key", "--external-id", "acme", "--meta", '{"plan": "pro"}', "--permission", "docs.read",
                     "--credits", "2", "--refill-interval", "daily", "--refill-amount", "5",
                     "--ratelimit", "requests:10:1m:auto", "--expires", "2099-01-01T00:00:00Z")
    assert created.returncode == 0, created.stderr
    plaintext = created.stdout.strip().splitlines()[-1]
    assert plaintext.startswith("sk_") and "shown once" in created.stderr

    verified = keysvc("keys", "verify", plaintext, "--data-dir", d, "--json", "--permissions", "docs.read")
    assert verified.returncode == 0, verified.stderr
    answer = json.loads(verified.stdout)
    assert (answer["valid"], answer["code"], answer["credits"], answer["permissions"], answer["meta"]) == (
        True, "VALID", 1, ["docs.read"], {"plan": "pro"})
    assert answer["identity"]["externalId"] == "acme" and answer["expires"] == 4070908800000
    assert answer["ratelimits"][0]["name"] == "requests" and answer["ratelimits"][0]["remaining"] == 9
    # From stdin, in the table format: the last credit.
    monkeypatch.setattr(sys, "stdin", io.StringIO(plaintext + "\n"))
    code, out, _ = run(capsys, "keys", "verify", "-", "--data-dir", d)
    assert code == 0 and "VALID" in out and "credits" in out
    spent = keysvc("keys", "verify", plaintext, "--data-dir", d, "--json")
    assert spent.returncode == 1 and json.loads(spent.stdout)["code"] == "USAGE_EXCEEDED"
    code, out, _ = run(capsys, "keys", "verify", plaintext, "--data-dir", d, "--json", "--cost", "0",
                       "--permissions", "docs.write")
    assert code == 1 and json.loads(out)["code"] == "INSUFFICIENT_PERMISSIONS"
    code, out, _ = run(capsys, "keys", "verify", "sk_unknown", "--data-dir", d, "--json")
    assert code == 1 and json.loads(out) == {"valid": False, "code": "NOT_FOUND"}
    code, out, _ = run(capsys, "keys", "verify", plaintext, "--data-dir", d, "--json", "--api-id", "api_other")
    assert json.loads(out)["code"] == "NOT_FOUND"

    key_id = answer["keyId"]
    shown = json.loads(run(capsys, "keys", "get", key_id, "--data-dir", d, "--json")[1])
    assert (shown["keyId"], shown["apiId"], shown["name"], shown["start"], shown["credits"]["remaining"]) == (
        key_id, api_id, "acme's key", plaintext[:7], 0)
    assert shown["credits"]["refill"] == {"interval": "daily", "amount": 5}
    assert "hash" not in json.dumps(shown) and plaintext not in json.dumps(shown)
    assert "acme's key" in run(capsys, "keys", "get", key_id, "--data-dir", d)[1]

    as_json = json.loads(run(capsys, "keys", "create", "--api-id", api_id, "--data-dir", d, "--json", "--disabled")[1])
    assert run(capsys, "keys", "verify", as_json["key"], "--data-dir", d)[0] == 1

    code, out, _ = run(capsys, "keys", "revoke", key_id, "--data-dir", d)
    assert code == 0 and key_id in out
    gone = keysvc("keys", "verify", plaintext, "--data-dir", d, "--json")
    assert gone.returncode == 1 and json.loads(gone.stdout)["code"] == "NOT_FOUND"
    assert "does not exist" in one_clear_error(keysvc("keys", "get", key_id, "--data-dir", d))
    code, out, _ = run(capsys, "keys", "revoke", as_json["keyId"], "--permanent", "--data-dir", d, "--json")
    assert json.loads(out) == {"keyId": as_json["keyId"], "revoked": True, "permanent": True}


BAD = {
    "an unknown api": (["keys", "create", "--api-id", "api_nope"], "The requested API 'api_nope' does not exist"),
    "a bad prefix": (["keys", "create", "--api-id", "API", "--prefix", "no spaces"], "invalid --prefix"),
    "a bad rate limit": (["keys", "create", "--api-id", "API", "--ratelimit", "requests:10"], "--ratelimit"),
    "a rate limit out of bounds": (["keys", "create", "--api-id", "API", "--ratelimit", "requests:0:1s"],
                                   "invalid --ratelimit[0].limit"),
    "meta that is no object": (["keys", "create", "--api-id", "API", "--meta", "[1]"], "--meta must be a JSON object"),
    "an unknown role": (["keys", "create", "--api-id", "API", "--role", "ghost"], "Role 'ghost' does not exist"),
    "a refill without credits": (["keys", "create", "--api-id", "API", "--refill-interval", "daily",
                                  "--refill-amount", "1"], "a refill needs --credits"),
    "a bad expiry": (["keys", "create", "--api-id", "API", "--expires", "soon"], "--expires 'soon'"),
    "a bad permission query": (["keys", "verify", "sk_x", "--permissions", "a AND"], "invalid --permissions"),
    "an unknown rate limit": (["keys", "verify", "KEY", "--ratelimit", "nope"], "ratelimit 'nope' was requested"),
    "an empty stdin": (["keys", "verify", "-"], "no key on stdin"),
    "an unknown key id": (["keys", "get", "key_nope"], "'key_nope' does not exist"),
    "an unknown root key": (["root-key", "revoke", "key_nope"], "No live root key 'key_nope'"),
    "a short api name": (["apis", "create", "ab"], "invalid NAME"),
    "a malformed line": (["import", "FILE", "--merge"], "line 2: not valid JSON"),
    "a missing file": (["import", "/nonexistent.jsonl"], "cannot read /nonexistent.jsonl"),
    "a bad config": (["doctor", "--config", "CONFIG"], "server.port"),
    "a mistyped data dir": (["export", "--data-dir", "NOWHERE"], "there is no data dir at"),
}


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A data dir with an API and a key, and the files the bad cases name."""
    base = tmp_path_factory.mktemp("bad-input")
    store = LmdbStore(StoreConfig(data_dir=str(base / "data")))
    api = Management(store).create_api("payments")
    _, plaintext = Management(store).create_key(KeySpec(api_id=api.id))
    store.close()
    broken = base / "broken.jsonl"
    broken.write_text('{"type": "header", "format": "keysvc-export", "version": 1}\n{"type": "api", "id": \n')
    return {"DATA": str(base / "data"), "NOWHERE": str(base / "typo"), "API": api.id, "KEY": plaintext, "FILE": str(broken),
            "CONFIG": config_file(base, server={"port": 70000})}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_clear_line_and_exit_code_2(capsys, monkeypatch, bad_input_dir, case):
    argv, message = BAD[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = [bad_input_dir.get(arg, arg) for arg in argv]
    if "--data-dir" not in argv:
        argv += ["--data-dir", bad_input_dir["DATA"]]
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in one_clear_error(subprocess.CompletedProcess(argv, code, out, err))
    assert not os.path.exists(bad_input_dir["NOWHERE"])


def test_bad_input_as_a_process_sees_it(bad_input_dir):
    # The same through `python -m keysvc`: the exit code, and stderr without a traceback.
    result = keysvc("import", bad_input_dir["FILE"], "--merge", "--data-dir", bad_input_dir["DATA"])
    assert "line 2: not valid JSON" in one_clear_error(result) and result.stdout == ""


# -- doctor -------------------------------------------------------------------------------------------------------


def doctor_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, "doctor", "--json", *argv)
    assert err == "" or code != 0, err
    return code, json.loads(out)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


def test_doctor_on_a_healthy_data_dir(capsys, data_dir):
    result = keysvc("doctor", "--data-dir", str(data_dir))
    assert result.returncode == 0 and result.stdout.rstrip().endswith("verdict: healthy")
    assert "store_map_size_bytes" in result.stdout and "data_dir" in result.stdout
    code, report = doctor_json(capsys, "--data-dir", str(data_dir))
    assert code == 0 and report["ok"] and report["verdict"] == "healthy"
    assert {"data_dir", "compiled_core", "store_map_used_bytes", "store_map_size_bytes", "counters_map_used_bytes",
            "counters_map_size_bytes", "keys", "change_hint"} <= set(report)
    assert statuses(report) == {"data_dir": "ok", "store_map": "ok", "counters_map": "ok", "server": "skip",
                                "spool": "ok", "clickhouse": "skip"}
    assert report["server_pid"] is None


def test_doctor_says_what_is_wrong(capsys, tmp_path, data_dir):
    # A store map past 80%, a data dir others may read, a spool at its cap, and a ClickHouse server
    # that cannot be reached (whose password never shows).
    small = 1 << 20
    store = LmdbStore(StoreConfig(data_dir=str(data_dir), map_size=small))
    manage = Management(store)
    api = manage.create_api("full")
    while (store.store_env.info()["last_pgno"] + 1) * store.store_env.stat()["psize"] < 0.85 * small:
        manage.create_key(KeySpec(api_id=api.id, meta={"pad": "x" * 100_000}, credits=CreditsSpec(remaining=1)))
    store.close()
    data_dir.chmod(0o755)
    spool = Spool(str(data_dir), 1 << 20)
    spool.append([b"x" * 1000] * 20)
    spool.close()
    port = free_port()
    config = config_file(tmp_path, storage={"map_size": small}, analytics={
        "clickhouse_url": f"http://admin:s3cret-pw@127.0.0.1:{port}/default", "spool_cap_bytes": 16384,
        "spool_map_size": 1 << 20})

    code, report = doctor_json(capsys, "--data-dir", str(data_dir), "--config", config)
    assert code == 1 and not report["ok"]
    assert statuses(report) == {"data_dir": "warn", "store_map": "warn", "counters_map": "ok", "server": "skip",
                                "spool": "warn", "clickhouse": "fail"}
    assert report["verdict"].startswith("1 problem(s) and 3 warning(s): clickhouse")
    assert report["spool_depth"] == 20
    details = {check["name"]: check["detail"] for check in report["checks"]}
    assert "storage.map_size" in details["store_map"] and "chmod 700" in details["data_dir"]
    assert f"http://admin:***@127.0.0.1:{port}/default cannot be reached" in details["clickhouse"]
    assert "s3cret-pw" not in json.dumps(report)
    table = keysvc("doctor", "--data-dir", str(data_dir), "--config", config)
    assert table.returncode == 1 and "verdict: 1 problem(s) and 3 warning(s)" in table.stdout


def test_a_store_doctor_cannot_open_is_one_clear_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    assert str(target) in one_clear_error(keysvc("doctor", "--data-dir", str(target)))


# -- with a server on the data dir ----------------------------------------------------------------------------------


def test_commands_work_while_a_server_runs(server, capsys):
    data = str(server.data_dir)
    # A root key made here authorizes requests there, from the next request on.
    root = keysvc("root-key", "create", "--data-dir", data, "--json")
    created = json.loads(root.stdout)
    status, body = server.call("/v2/apis.createApi", {"name": "made-over-http"}, auth=created["key"])
    assert status == 200

    # An API made here takes keys there; a key made there verifies here, and the other way round.
    api_id = keysvc("apis", "create", "made-by-cli", "--data-dir", data).stdout.strip()
    status, body = server.call("/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 5}})
    assert status == 200
    over_http = body["data"]
    answer = json.loads(keysvc("keys", "verify", over_http["key"], "--data-dir", data, "--json").stdout)
    assert (answer["code"], answer["credits"]) == ("VALID", 4)
    assert server.call("/v2/keys.verifyKey", {"key": over_http["key"]})[1]["data"]["credits"] == 3
    here = json.loads(keysvc("keys", "create", "--api-id", api_id, "--data-dir", data, "--json").stdout)
    assert server.call("/v2/keys.verifyKey", {"key": here["key"]})[1]["data"]["valid"] is True

    # Revocations made here are refused there at once: the workers follow the change log.
    assert keysvc("keys", "revoke", over_http["keyId"], "--data-dir", data).returncode == 0
    assert server.call("/v2/keys.verifyKey", {"key": over_http["key"]})[1]["data"]["code"] == "NOT_FOUND"
    assert keysvc("root-key", "revoke", created["id"], "--data-dir", data).returncode == 0
    assert server.call("/v2/apis.createApi", {"name": "too-late"}, auth=created["key"])[0] == 401
    assert created["id"] not in keysvc("root-key", "list", "--data-dir", data).stdout

    # doctor sees the server, and the embedded ClickHouse through its flusher (once it is up).
    deadline = time.monotonic() + 30
    while True:
        code, report = doctor_json(capsys, "--data-dir", data)
        if statuses(report)["clickhouse"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["server_pid"] == server.process.pid, report
    assert statuses(report)["server"] == "ok" and statuses(report)["clickhouse"] == "ok", report
    assert code == 0 and report["verdict"] == "healthy", report
    assert os.path.exists(server.data_dir / "analytics.sock")

"""`keysvc export` and `keysvc import`: a store exported and imported into an empty data dir
verifies every key as the original does; malformed input is refused with its line number; keys
exported from Unkey import by their SHA-256 hashes.

Most commands run in-process through keysvc.cli.main (what `python -m keysvc` calls); those whose
process boundary matters (stdin, exit codes, what reaches the terminal) as subprocesses."""
from __future__ import annotations

import io
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keysvc import cli
from keysvc.cli import backup
from keysvc.keys import unkey_hash
from keysvc.management import CreditsSpec, KeySpec, Management, RatelimitSpec, now_ms
from keysvc.store import LmdbStore, StoreConfig

DAY = 86_400_000


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """keysvc ARGV in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def keysvc(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "keysvc", *argv], input=stdin, capture_output=True, timeout=60)


def verify(capsys: pytest.CaptureFixture[str], data_dir: Path, key: str, *flags: str) -> dict[str, Any]:
    code, out, err = run(capsys, "keys", "verify", key, "--data-dir", str(data_dir), "--json", *flags)
    assert code in (0, 1), err
    answer = json.loads(out)
    assert answer["valid"] == (code == 0)
    return answer


def without_windows(answer: dict[str, Any]) -> dict[str, Any]:
    """The answer without the rate-limit windows' counts, which an export leaves out on purpose:
    they are counters of the moment."""
    answer = json.loads(json.dumps(answer))
    for limit in answer.get("ratelimits", ()):
        del limit["remaining"], limit["reset"]
    return answer


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keysvc: error: "), err
    assert "Traceback" not in err
    return lines[0]


def held(data_dir: Path) -> dict[str, int]:
    store = LmdbStore(StoreConfig(data_dir=str(data_dir)))
    try:
        return backup._held(store)
    finally:
        store.close()


# -- a store with a bit of everything ---------------------------------------------------------------------


def varied_store(data_dir: Path) -> tuple[list[tuple[str, tuple[str, ...]]], str]:
    """Builds the store; returns the (plaintext, verify flags) of each key to check, and a root key."""
    store = LmdbStore(StoreConfig(data_dir=str(data_dir)))
    manage = Management(store)
    now = now_ms()
    try:
        api = manage.create_api("payments")
        other = manage.create_api("search")
        gone = manage.create_api("retired")
        manage.create_permission("Read documents", "documents.read", description="read them")
        manage.create_role("admin", "does everything", permissions=["documents.read", "documents.write"])
        manage.create_role("unused")
        manage.create_identity("acme", meta={"tier": "gold"},
                               ratelimits=[RatelimitSpec("requests", 100, 60_000, auto_apply=True)])
        namespace = manage.namespace("email", create=True)
        manage.set_override(namespace.id, "user_*", 5, 10_000)
        manage.set_override(namespace.id, "user_42", 50, 10_000)

        def key(api_id: str = api.id, flags: tuple[str, ...] = (), **spec: Any) -> tuple[str, tuple[str, ...]]:
            return manage.create_key(KeySpec(api_id=api_id, **spec))[1], flags

        keys = [
            key(prefix="sk", name="plain", meta={"plan": "pro", "nested": [1, {"a": None}]}),
            key(credits=CreditsSpec(remaining=5)),
            key(credits=CreditsSpec(remaining=0)),  # USAGE_EXCEEDED
            key(credits=CreditsSpec(remaining=2, refill_interval="daily", refill_amount=10)),
            key(credits=CreditsSpec(remaining=3, refill_interval="monthly", refill_amount=7, refill_day=31)),
            key(ratelimits=[RatelimitSpec("fast", 3, 1_000, auto_apply=True), RatelimitSpec("slow", 10, 60_000)],
                flags=("--ratelimit", "slow")),
            key(external_id="acme", credits=CreditsSpec(remaining=9)),
            key(external_id="acme", ratelimits=[RatelimitSpec("requests", 2, 60_000, auto_apply=True)]),
            key(permissions=["documents.read", "billing.*"], flags=("--permissions", "documents.read")),
            key(roles=["admin"], flags=("--permissions", "documents.write AND documents.read")),
            key(roles=["admin"], flags=("--permissions", "billing.read")),  # INSUFFICIENT_PERMISSIONS
            key(expires=now - DAY),  # EXPIRED
            key(expires=now + 30 * DAY, credits=CreditsSpec(remaining=1)),
            key(enabled=False, credits=CreditsSpec(remaining=4)),  # DISABLED, credits still reported
            key(api_id=other.id, prefix="srch", byte_length=32),
            key(api_id=gone.id),  # NOT_FOUND once its API is deleted
        ]
        deleted_key, deleted_plaintext = manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=3)))
        manage.delete_key(deleted_key.id)  # soft: NOT_FOUND, its record exported all the same
        keys.append((deleted_plaintext, ()))
        manage.delete_api(gone.id)
        # A key imported from Unkey: stored by its SHA-256, verified with its old plaintext.
        old_plaintext = "unkey_3ZZ7imported0key0from0unkey"
        manage.migrate_keys(api.id, [(unkey_hash(old_plaintext), KeySpec(api_id=api.id, credits=CreditsSpec(6)),
                                      "unkey_3ZZ7")])
        keys.append((old_plaintext, ()))
        keys.append(("sk_neverissued", ()))
        _, root = manage.create_root_key(["api.*.verify_key"], name="ops")
        keys.append((root, ()))  # a root key verifies as no key of an API
    finally:
        store.close()
    return keys, root


def test_export_then_import_into_an_empty_dir_verifies_every_key_identically(tmp_path, capsys):
    source, target = tmp_path / "source", tmp_path / "target"
    keys, root = varied_store(source)
    before = [verify(capsys, source, key, *flags) for key, flags in keys]  # credits spent before the export
    assert {answer["code"] for answer in before} == {
        "VALID", "USAGE_EXCEEDED", "INSUFFICIENT_PERMISSIONS", "EXPIRED", "DISABLED", "NOT_FOUND"}

    export = tmp_path / "backup.jsonl"
    code, _, err = run(capsys, "export", "--data-dir", str(source), "-o", str(export))
    assert code == 0, err
    assert stat.S_IMODE(export.stat().st_mode) == 0o600 and not list(tmp_path.glob(".*.partial"))
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert lines[0]["type"] == "header" and lines[0]["format"] == "keysvc-export" and lines[-1]["type"] == "end"
    assert {line["type"] for line in lines} == {
        "header", "api", "ratelimit_namespace", "ratelimit_override", "permission", "role", "identity", "key",
        "root_key", "credits", "end"}
    assert not any(plaintext in export.read_text() for plaintext, _ in keys)  # hashes only

    code, out, err = run(capsys, "import", str(export), "--data-dir", str(target), "--json")
    assert code == 0, err
    imported = json.loads(out)["imported"]
    assert imported["key"] == 18 and imported["root_key"] == 1 and imported["credits"] == 9

    # The same store: the target's export is the source's, line for line (but for its header).
    again = tmp_path / "again.jsonl"
    assert run(capsys, "export", "--data-dir", str(target), "-o", str(again))[0] == 0
    assert again.read_text().splitlines()[1:] == export.read_text().splitlines()[1:]

    after_source = [verify(capsys, source, key, *flags) for key, flags in keys]
    after_target = [verify(capsys, target, key, *flags) for key, flags in keys]
    assert [without_windows(a) for a in after_target] == [without_windows(a) for a in after_source]
    # Balances came across as they were after the first round: both spent one more since.
    assert [a.get("credits") for a in after_target] == [a.get("credits") for a in after_source]
    assert after_target[1]["credits"] == 3 and after_target[2]["code"] == "USAGE_EXCEEDED"
    # Windows did not: the target's limits count only the verification just made.
    fast = after_target[5]["ratelimits"]
    assert {limit["name"]: limit["remaining"] for limit in fast} == {"fast": 2, "slow": 9}

    # The root key came across too, under its id, and is listed (never with its hash).
    code, out, _ = run(capsys, "root-key", "list", "--data-dir", str(target), "--json")
    assert [(row["name"], row["start"]) for row in json.loads(out)] == [("ops", root[:15])]


def test_import_refuses_a_data_dir_with_records_unless_merging(tmp_path, capsys):
    source, target = tmp_path / "source", tmp_path / "target"
    store = LmdbStore(StoreConfig(data_dir=str(source)))
    manage = Management(store)
    api = manage.create_api("payments")
    _, plaintext = manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=5)))
    manage.create_permission("read", "documents.read")
    store.close()
    export = tmp_path / "backup.jsonl"
    assert run(capsys, "export", "--data-dir", str(source), "-o", str(export))[0] == 0

    # Root keys alone (a first `keysvc serve` makes one) leave a data dir empty enough.
    assert run(capsys, "root-key", "create", "--data-dir", str(target))[0] == 0
    assert run(capsys, "import", str(export), "--data-dir", str(target))[0] == 0
    assert verify(capsys, target, plaintext)["credits"] == 4

    code, _, err = run(capsys, "import", str(export), "--data-dir", str(target))
    assert code == 2 and "holds records already" in error_line(err) and "--merge" in err
    # --merge replaces records of the same id: the balance goes back to the export's.
    assert run(capsys, "import", str(export), "--data-dir", str(target), "--merge")[0] == 0
    assert verify(capsys, target, plaintext)["credits"] == 4

    # A record whose unique name belongs to another record is refused, and nothing of its batch written.
    other = tmp_path / "other"
    store = LmdbStore(StoreConfig(data_dir=str(other)))
    Management(store).create_permission("read", "documents.read")  # same slug, another id
    store.close()
    code, _, err = run(capsys, "import", str(export), "--data-dir", str(other), "--merge")
    assert code == 2 and "named 'documents.read'" in error_line(err) and "nothing was imported" in err
    assert held(other) == {"permissions": 1}


def good_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    source = tmp_path / "source"
    store = LmdbStore(StoreConfig(data_dir=str(source)))
    manage = Management(store)
    api = manage.create_api("payments")
    for credits in (1, 2, 3):
        manage.create_key(KeySpec(api_id=api.id, credits=CreditsSpec(remaining=credits)))
    store.close()
    export = tmp_path / "good.jsonl"
    assert run(capsys, "export", "--data-dir", str(source), "-o", str(export))[0] == 0
    return export.read_text().splitlines()


def edit(lines: list[str], number: int, **changes: Any) -> list[str]:
    line = json.loads(lines[number - 1])
    line.update(changes)
    return [*lines[:number - 1], json.dumps(line), *lines[number:]]


BROKEN = {
    "not JSON": (lambda lines: [*lines[:2], lines[2][:-5], *lines[3:]], "line 3: not valid JSON"),
    "an unknown field": (lambda lines: edit(lines, 2, colour="red"), "line 2: Object contains unknown field `colour`"),
    "a wrong type": (lambda lines: edit(lines, 3, created_at="yesterday"), "line 3: Expected `int`, got `str`"),
    "an unknown line type": (lambda lines: edit(lines, 2, type="widget"), "line 2: Invalid value 'widget'"),
    "a bad hash": (lambda lines: edit(lines, 3, hash="AAAA"), "line 3: key key_"),
    "credits before their key": (lambda lines: [lines[0], lines[1], lines[3], lines[2], *lines[4:]],
                                 "line 3: the credits of key"),
    "no header": (lambda lines: lines[1:], "line 1: not a keysvc export"),
    "a newer format": (lambda lines: edit(lines, 1, version=99), "line 1: the export is format version 99"),
    "no end line": (lambda lines: lines[:-1], "without the export's end line: it is cut short"),
    "a lost key": (lambda lines: [*lines[:4], *lines[6:]], "the end line counts 7 records, but the export holds 5"),
}


@pytest.mark.parametrize("breakage", BROKEN, ids=list(BROKEN))
def test_a_broken_export_is_refused_with_its_line_and_nothing_is_written(tmp_path, capsys, breakage):
    change, message = BROKEN[breakage]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(change(good_export(tmp_path, capsys))) + "\n")
    target = tmp_path / "target"
    code, out, err = run(capsys, "import", str(broken), "--data-dir", str(target))
    assert code == 2 and out == ""
    assert message in error_line(err) and err.rstrip().endswith("nothing was imported")
    assert held(target) == {}


def test_stdin_is_imported_as_read_and_a_cut_short_one_says_what_went_in(tmp_path, capsys, monkeypatch):
    lines = good_export(tmp_path, capsys)
    monkeypatch.setattr(backup, "BATCH", 2)  # so that batches commit before the input ends
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines[:-1]).encode())))
    target = tmp_path / "target"
    code, _, err = run(capsys, "import", "-", "--data-dir", str(target))
    assert code == 2
    assert "cut short; the records of lines 2-4 were imported, none after" in error_line(err)
    assert held(target) == {"apis": 1, "keys": 1}

    # Whole, through a real pipe: imported.
    result = keysvc("import", "-", "--data-dir", str(tmp_path / "piped"), "--json",
                    stdin=("\n".join(lines) + "\n").encode())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["imported"] == {"api": 1, "key": 3, "credits": 3}


def test_progress_goes_to_stderr_only_when_asked_or_on_a_terminal(tmp_path):
    data_dir = tmp_path / "data"
    assert keysvc("apis", "create", "payments", "--data-dir", str(data_dir)).returncode == 0
    quiet = keysvc("export", "--data-dir", str(data_dir))
    assert quiet.returncode == 0 and quiet.stderr == b""
    shown = keysvc("export", "--data-dir", str(data_dir), "--progress")
    assert shown.returncode == 0 and b"exporting" in shown.stderr and b"100%" in shown.stderr
    assert json.loads(shown.stdout.splitlines()[0])["type"] == "header"  # stdout stays the data
    piped = keysvc("import", "-", "--data-dir", str(tmp_path / "copy"), "--progress", stdin=quiet.stdout)
    assert piped.returncode == 0 and b"importing" in piped.stderr


def test_an_export_that_fails_leaves_no_file(tmp_path):
    target = tmp_path / "backup.jsonl"
    (tmp_path / "data").write_text("not a data dir")
    result = keysvc("export", "--data-dir", str(tmp_path / "data"), "-o", str(target))
    assert result.returncode == 2 and b"Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]


# -- keys exported from Unkey ----------------------------------------------------------------------------------


def unkey_lines(*items: dict[str, Any]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def test_unkey_keys_import_by_their_hashes_and_verify_with_their_plaintexts(tmp_path, capsys):
    data_dir = tmp_path / "data"
    code, api_id, _ = run(capsys, "apis", "create", "migrated", "--data-dir", str(data_dir))
    api_id = api_id.strip()
    store = LmdbStore(StoreConfig(data_dir=str(data_dir)))
    Management(store).create_role("reader", permissions=["documents.read"])
    store.close()
    lines = tmp_path / "unkey.jsonl"
    lines.write_text(unkey_lines(
        {"hash": unkey_hash("uk_first"), "start": "uk_fi", "name": "first", "externalId": "acme",
         "credits": {"remaining": 10, "refill": {"interval": "daily", "amount": 10}}, "roles": ["reader"],
         "ratelimits": [{"name": "requests", "limit": 5, "duration": 60000, "autoApply": True}], "meta": {"a": 1}},
        {"type": "unkey_key", "apiId": api_id, "hash": unkey_hash("uk_second"), "enabled": False},
        {"hash": unkey_hash("uk_third"), "expires": now_ms() - DAY},
    ))
    code, out, err = run(capsys, "import", "--unkey", "--api-id", api_id, str(lines), "--data-dir", str(data_dir),
                         "--json")
    assert code == 0, err
    assert json.loads(out) == {"imported": {"unkey_key": 3}, "skipped": []}

    first = verify(capsys, data_dir, "uk_first", "--permissions", "documents.read")
    assert (first["code"], first["credits"], first["identity"]["externalId"], first["meta"]) == (
        "VALID", 9, "acme", {"a": 1})
    assert first["ratelimits"][0]["remaining"] == 4
    assert verify(capsys, data_dir, "uk_second")["code"] == "DISABLED"
    assert verify(capsys, data_dir, "uk_third")["code"] == "EXPIRED"
    code, out, _ = run(capsys, "keys", "get", first["keyId"], "--data-dir", str(data_dir), "--json")
    assert json.loads(out)["start"] == "uk_fi"

    # Again: every hash is in the store already, so each is skipped (and named), as migrateKeys does.
    code, out, err = run(capsys, "import", "--unkey", "--api-id", api_id, str(lines), "--data-dir", str(data_dir))
    assert code == 0 and "skipped 3 key(s)" in err and unkey_hash("uk_first") in err


UNKEY_BROKEN = {
    "no api": ((), [{"hash": unkey_hash("x")}], "line 1: no apiId"),
    "an unknown api": (("--api-id", "api_nope"), [{"hash": unkey_hash("x")}],
                       "line 1: The requested API 'api_nope' does not exist"),
    "a hex hash": (("--api-id", "API"), [{"hash": unkey_hash("x")}, {"hash": "ab" * 32}],
                   "line 2: the hash is not an Unkey key hash"),
    "an unknown role": (("--api-id", "API"), [{"hash": unkey_hash("x"), "roles": ["ghost"]}],
                        "line 1: Role 'ghost' does not exist"),
    "a misspelt field": (("--api-id", "API"), [{"hash": unkey_hash("x")}, {"hash": unkey_hash("y"), "nmae": "z"}],
                         "line 2: Object contains unknown field `nmae`"),
    "a refill without its day": (("--api-id", "API"), [{"hash": unkey_hash("x"), "credits": {
        "remaining": 1, "refill": {"interval": "monthly", "amount": 1}}}], "line 1: credits.refill.refillDay"),
}


@pytest.mark.parametrize("breakage", UNKEY_BROKEN, ids=list(UNKEY_BROKEN))
def test_a_broken_unkey_line_is_refused_with_its_number(tmp_path, capsys, breakage):
    flags, items, message = UNKEY_BROKEN[breakage]
    data_dir = tmp_path / "data"
    api_id = run(capsys, "apis", "create", "migrated", "--data-dir", str(data_dir))[1].strip()
    lines = tmp_path / "unkey.jsonl"
    lines.write_text(unkey_lines(*items))
    code, _, err = run(capsys, "import", "--unkey", *[api_id if f == "API" else f for f in flags], str(lines),
                       "--data-dir", str(data_dir))
    assert code == 2 and message in error_line(err) and "nothing was imported" in err
    assert held(data_dir) == {"apis": 1}


# -- with a server running ----------------------------------------------------------------------------------------


def test_a_running_servers_store_exports_and_restores(server, tmp_path):
    status, body = server.call("/v2/apis.createApi", {"name": "backed-up"})
    assert status == 200
    api_id = body["data"]["apiId"]
    status, body = server.call("/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 10},
                                                      "externalId": "backup-user"})
    plaintext = body["data"]["key"]
    for _ in range(3):
        assert server.call("/v2/keys.verifyKey", {"key": plaintext})[1]["data"]["credits"] in (9, 8, 7)
    exported = keysvc("export", "--data-dir", str(server.data_dir))
    assert exported.returncode == 0, exported.stderr
    restored = tmp_path / "restored"
    result = keysvc("import", "-", "--data-dir", str(restored), stdin=exported.stdout)
    assert result.returncode == 0, result.stderr
    answer = json.loads(keysvc("keys", "verify", plaintext, "--data-dir", str(restored), "--json").stdout)
    assert (answer["code"], answer["credits"], answer["identity"]["externalId"]) == ("VALID", 6, "backup-user")
    # The server's root keys came across too, under their ids (and hashes: they work there as here).
    listed = [json.loads(keysvc("root-key", "list", "--data-dir", str(d), "--json").stdout)
              for d in (server.data_dir, restored)]
    assert listed[0] and listed[1] == listed[0]
    # And into the server's own (non-empty) data dir the import refuses, naming why.
    refused = keysvc("import", "-", "--data-dir", str(server.data_dir), stdin=exported.stdout)
    assert refused.returncode == 2 and b"holds records already" in refused.stderr

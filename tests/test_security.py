"""SECURITY.md's claims that no other test file proves, against this module's own `keysvc serve --workers 2`
(analytics on, flushed every 0.2 s; its own data dir, so that what the data dir holds is this module's alone):

- a root key holding every per-API action on API A (but delete_api, which it holds on a spare API), and
  nothing on API B, is refused on every key and API route that touches API B (403 in the envelope, nothing
  changes; keys.verifyKey: 200 NOT_FOUND, nothing charged), while the same request on API A succeeds: route by
  route, and a guard that fails when a keys.* or apis.* route is added without a row here;
- every NOT_FOUND of keys.verifyKey is the same answer, byte for byte but the request id, whatever the reason;
- the data dir and everything keysvc creates in it are private (0700 directories, 0600 files);
- after keys, root keys and unknown keys have gone through every route that takes one, and the flusher has
  landed every verification in chDB, no file under the data dir (recursively: the store, the counters, the
  spool, chDB's parts and logs) and no line of the server's log holds any of them, as bytes, nor the base58
  body of any without its prefix; and ClickHouse's rows do not either.

The last test stops the server, to look at the files once more after a clean shutdown: keep it last.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keysvc.keys import base58
from server import Server, create_root_key
from sparse import data_chunks
from test_http_errors import FORBIDDEN, assert_error, data_of, everything, sha256_b64

# Every action of the `api` group that a route checks against an API id.
API_ACTIONS = ("create_key", "read_key", "verify_key", "update_key", "delete_key", "read_api", "delete_api",
               "decrypt_key", "read_analytics")
PROBE_PREFIX = "plainprobe"  # keys of the plaintext scan: prefix_ + the base58 of 32 random bytes
SCAN_TAG = "security-scan"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("security")
    config = base / "keysvc.yaml"
    config.write_text("analytics:\n  flush_interval: 0.2\n")
    server = Server(base / "data", workers=2, extra=("--config", str(config)))
    yield server
    server.stop()


def call(server: Server, path: str, body: Any, auth: str = "root") -> tuple[int, dict[str, str], bytes]:
    return server.request("POST", path, body, auth=auth)


def ok(server: Server, path: str, body: Any, auth: str = "root") -> Any:
    return data_of(call(server, path, body, auth))


class Side:
    """One API as the tests see it: its id, a credited key, and fresh keys for the rows that destroy one."""

    def __init__(self, server: Server, name: str) -> None:
        self.server = server
        self.api = ok(server, "/v2/apis.createApi", {"name": unique(name)})["apiId"]
        self.key = self.fresh()

    def fresh(self) -> dict[str, str]:
        return ok(self.server, "/v2/keys.createKey", {"apiId": self.api, "credits": {"remaining": 1000}})


class World:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.own = Side(server, "own")  # API A
        self.other = Side(server, "other")  # API B
        self.permission = unique("perm")
        ok(server, "/v2/permissions.createPermission", {"name": self.permission, "slug": self.permission})
        self.role = unique("role")
        ok(server, "/v2/permissions.createRole", {"name": self.role, "permissions": [self.permission]})
        # An API the scoped key may delete, for deleteApi's own-side row (it may not delete API A: the
        # other rows need it).
        self.doomed = ok(server, "/v2/apis.createApi", {"name": unique("doomed")})["apiId"]
        grants = [f"api.{self.own.api}.{action}" for action in API_ACTIONS if action != "delete_api"]
        self.scoped = create_root_key(server.data_dir, *grants, f"api.{self.doomed}.delete_api")
        self.verifications = 0  # with the scan tag

    def side(self, target: str) -> Side:
        return self.own if target == "own" else self.other

    def snapshot(self, body: dict[str, Any]) -> dict[str, Any]:
        """Everything a refused request on API B could have changed, read with the all-permission key."""
        s = self.server
        state: dict[str, Any] = {
            "keys_b": everything(s, "/v2/apis.listKeys", {"apiId": self.other.api}),
            "permissions": everything(s, "/v2/permissions.listPermissions", {}),
            "roles": everything(s, "/v2/permissions.listRoles", {}),
        }
        if "apiId" in body:
            status, _, raw = call(s, "/v2/apis.getApi", {"apiId": body["apiId"]})
            state["api"] = (status, json.loads(raw).get("data"))
        if "keyId" in body:
            status, _, raw = call(s, "/v2/keys.getKey", {"keyId": body["keyId"]})
            state["key"] = (status, json.loads(raw).get("data"))
        return state


@pytest.fixture(scope="module")
def world(node: Server) -> World:
    return World(node)


# -- a root key scoped to API A, on every key and API route -------------------------------------------

Body = Callable[[World, Side], dict[str, Any]]

# (id, path, body for a side): the scoped key succeeds on its own API and gets 403 on the other one.
ROUTES: list[tuple[str, str, Body]] = [
    ("createKey", "/v2/keys.createKey", lambda w, s: {"apiId": s.api, "name": "boundary"}),
    ("migrateKeys", "/v2/keys.migrateKeys",
     lambda w, s: {"migrationId": "mig_boundary", "apiId": s.api, "keys": [{"hash": sha256_b64(unique("p"))}]}),
    ("getKey", "/v2/keys.getKey", lambda w, s: {"keyId": s.key["keyId"]}),
    ("getKey-decrypt", "/v2/keys.getKey", lambda w, s: {"keyId": s.key["keyId"], "decrypt": True}),
    ("whoami", "/v2/keys.whoami", lambda w, s: {"key": s.key["key"]}),
    ("listKeys", "/v2/apis.listKeys", lambda w, s: {"apiId": s.api}),
    ("listKeys-decrypt", "/v2/apis.listKeys", lambda w, s: {"apiId": s.api, "decrypt": True}),
    ("getApi", "/v2/apis.getApi", lambda w, s: {"apiId": s.api}),
    ("deleteApi", "/v2/apis.deleteApi",
     lambda w, s: {"apiId": w.doomed if s is w.own else ok(w.server, "/v2/apis.createApi",
                                                            {"name": unique("other-doomed")})["apiId"]}),
    ("updateKey", "/v2/keys.updateKey", lambda w, s: {"keyId": s.key["keyId"], "name": "renamed", "meta": {"a": 1}}),
    ("updateKey-disable", "/v2/keys.updateKey", lambda w, s: {"keyId": s.fresh()["keyId"], "enabled": False}),
    ("updateCredits", "/v2/keys.updateCredits",
     lambda w, s: {"keyId": s.key["keyId"], "operation": "increment", "value": 1}),
    ("updateCredits-set", "/v2/keys.updateCredits",
     lambda w, s: {"keyId": s.fresh()["keyId"], "operation": "set", "value": 0}),
    ("rerollKey", "/v2/keys.rerollKey", lambda w, s: {"keyId": s.fresh()["keyId"], "expiration": 0}),
    ("deleteKey", "/v2/keys.deleteKey", lambda w, s: {"keyId": s.fresh()["keyId"]}),
    ("deleteKey-permanent", "/v2/keys.deleteKey", lambda w, s: {"keyId": s.fresh()["keyId"], "permanent": True}),
    ("addPermissions", "/v2/keys.addPermissions",
     lambda w, s: {"keyId": s.key["keyId"], "permissions": [w.permission]}),
    ("removePermissions", "/v2/keys.removePermissions",
     lambda w, s: {"keyId": s.key["keyId"], "permissions": [w.permission]}),
    ("setPermissions", "/v2/keys.setPermissions",
     lambda w, s: {"keyId": s.key["keyId"], "permissions": [w.permission]}),
    ("addRoles", "/v2/keys.addRoles", lambda w, s: {"keyId": s.key["keyId"], "roles": [w.role]}),
    ("removeRoles", "/v2/keys.removeRoles", lambda w, s: {"keyId": s.key["keyId"], "roles": [w.role]}),
    ("setRoles", "/v2/keys.setRoles", lambda w, s: {"keyId": s.key["keyId"], "roles": [w.role]}),
]
# Routes under keys.* and apis.* that take no API: what the scoped key gets there is said by its own test.
NOT_PER_API = {"/v2/keys.verifyKey": "test_verify_stays_in_its_api", "/v2/apis.createApi": "test_create_api_is_refused"}


@pytest.mark.parametrize("target", ["own", "other"])
@pytest.mark.parametrize(("path", "make"), [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_api_scoped_root_key_stays_in_its_api(world: World, path: str, make: Body, target: str) -> None:
    body = make(world, world.side(target))
    if target == "own":  # the control: the key may do this, so a 403 on API B is the boundary, not the action
        data_of(call(world.server, path, body, world.scoped))
        return
    before = world.snapshot(body)
    assert_error(call(world.server, path, body, world.scoped), 403, code=FORBIDDEN)
    assert world.snapshot(body) == before, "a refused request changed API B"


def test_every_key_and_api_route_has_a_row(node: Server) -> None:
    """A keys.* or apis.* route added later must get a row above (or an entry in NOT_PER_API)."""
    status, _, raw = node.request("GET", "/openapi.json", auth=None)
    assert status == 200
    paths = {p for p in json.loads(raw)["paths"] if p.startswith(("/v2/keys.", "/v2/apis."))}
    covered = {path for _, path, _ in ROUTES} | set(NOT_PER_API)
    assert paths - covered == set(), "routes without a boundary row"
    assert covered - paths == set(), "rows for routes that do not exist"


@pytest.mark.parametrize("target", ["own", "other"])
def test_verify_stays_in_its_api(world: World, target: str) -> None:
    side = world.side(target)
    key = side.fresh()
    answer = ok(world.server, "/v2/keys.verifyKey", {"key": key["key"], "credits": {"cost": 3}}, world.scoped)
    remaining = ok(world.server, "/v2/keys.getKey", {"keyId": key["keyId"]})["credits"]["remaining"]
    if target == "own":
        assert (answer["code"], answer["keyId"], answer["credits"], remaining) == ("VALID", key["keyId"], 997, 997)
    else:
        assert answer == {"valid": False, "code": "NOT_FOUND"}
        assert remaining == 1000, "a refused verification charged credits"


def test_create_api_is_refused(world: World) -> None:
    """create_api is not a permission on an API: holding every action on API A does not give it."""
    assert_error(call(world.server, "/v2/apis.createApi", {"name": unique("new")}, world.scoped), 403, code=FORBIDDEN)


def test_id_probing_tells_only_existence(world: World) -> None:
    """A documented limit (SECURITY.md): the key id of another API is answered 403, an id that exists nowhere
    404; ids are random, so this tells only whether a given id exists, never anything about its key."""
    assert call(world.server, "/v2/keys.getKey", {"keyId": world.other.key["keyId"]}, world.scoped)[0] == 403
    assert call(world.server, "/v2/keys.getKey", {"keyId": "key_" + "x" * 16}, world.scoped)[0] == 404


# -- NOT_FOUND says nothing else ----------------------------------------------------------------------------


def test_every_not_found_is_the_same_answer(world: World, node: Server) -> None:
    """Unknown, another API's, deleted, of a deleted API, a root key: one answer, byte for byte (but the id)."""
    s = world.server
    deleted = world.own.fresh()
    ok(s, "/v2/keys.deleteKey", {"keyId": deleted["keyId"]})
    gone_api = Side(s, "gone")
    ok(s, "/v2/apis.deleteApi", {"apiId": gone_api.api})
    cases = {
        "unknown": ("root", "sk_" + base58(secrets.token_bytes(16))),
        "other API, scoped root key": (world.scoped, world.other.key["key"]),
        "soft-deleted key": ("root", deleted["key"]),
        "key of a deleted API": ("root", gone_api.key["key"]),
        "a root key": ("root", world.scoped),
    }
    answers = {}
    for name, (auth, key) in cases.items():
        status, headers, raw = call(s, "/v2/keys.verifyKey", {"key": key}, auth)
        assert status == 200, (name, raw)
        answers[name] = (sorted((k, v) for k, v in headers.items() if k != "date"),
                         re.sub(rb'"requestId":"req_[A-Za-z0-9]+"', b'"requestId":"-"', raw))
    assert len(set(map(repr, answers.values()))) == 1, answers
    assert json.loads(answers["unknown"][1])["data"] == {"valid": False, "code": "NOT_FOUND"}


# -- the data dir is private ----------------------------------------------------------------------------------


def modes(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                else "socket" if stat.S_ISSOCK(st.st_mode) else "file")
        out[path.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode))
    return out


def wait_for_analytics(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call(server, "/v2/analytics.getVerifications", {"query": "SELECT 1 AS one"})[0] == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"analytics did not answer within {timeout} s:\n{server.log()[-3000:]}")


def test_the_data_dir_is_private(world: World, node: Server) -> None:
    """After serving with analytics: 0700 for the data dir and every directory keysvc makes in it, 0600 for
    its files and sockets; chDB's tree is reachable only through its 0700 `chdb` directory."""
    ok(node, "/v2/keys.verifyKey", {"key": world.own.key["key"], "credits": {"cost": 0}})
    wait_for_analytics(node)
    data_dir = node.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    found = modes(data_dir)
    assert {"store", "counters", "spool", "chdb", "store/data.mdb", "spool/data.mdb", "analytics.sock"} <= set(found)
    ours = {name: mode for name, mode in found.items() if name.split("/")[0] != "chdb" or name == "chdb"}
    wrong = {name: (kind, oct(mode)) for name, (kind, mode) in ours.items()
             if mode != (0o700 if kind == "dir" else 0o600)}
    assert wrong == {}, "keysvc's own files must be 0600 and its directories 0700"


def test_chdb_files_are_private_by_themselves(world: World, node: Server) -> None:
    wait_for_analytics(node)
    chdb = modes(node.data_dir / "chdb")
    wrong = {name: (kind, oct(mode)) for name, (kind, mode) in chdb.items()
             if kind != "link" and mode & 0o077}
    assert wrong == {}


# -- no plaintext key at rest or in the log --------------------------------------------------------------------


def probe_key() -> str:
    """A key no server made, shaped like those of the scan: prefix_ + base58 of 32 random bytes."""
    return f"{PROBE_PREFIX}_{base58(secrets.token_bytes(32))}"


def needles(plaintexts: list[str]) -> dict[bytes, str]:
    """What must not be found, as bytes: each key whole, its base58 body without the prefix, and the part of
    the body past the 4 characters `start` keeps (keys.getKey's `start` is prefix_ + 4 characters, by the
    contract, and is stored)."""
    out: dict[bytes, str] = {}
    for key in plaintexts:
        body = key.rpartition("_")[2]
        assert len(body) >= 20, key
        out[key.encode()] = key
        out[body.encode()] = key
        out[body[4:].encode()] = key
    return out


def scan(paths: list[Path], wanted: dict[bytes, str]) -> dict[str, list[str]]:
    """{file: [keys whose bytes it holds]}, over regular files only (symlinks are chDB's, to its own tree)."""
    longest = max(map(len, wanted))
    found: dict[str, list[str]] = {}
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        hits: set[str] = set()
        for chunk in data_chunks(path, overlap=longest - 1):
            hits.update(key for needle, key in wanted.items() if needle in chunk)
        if hits:
            found[str(path)] = sorted(hits)
    return found


def test_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    """The scanner itself: a needle in a sparse file's data past a hole, and one across two chunks."""
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(40 << 20)
        f.write(b"xx plainprobe_needle1 xx")
    across = tmp_path / "across"
    across.write_bytes(b"." * ((4 << 20) - 5) + b"plainprobe_needle2" + b"." * 100)
    wanted = {b"plainprobe_needle1": "one", b"plainprobe_needle2": "two", b"absent": "three"}
    assert scan([sparse, across], wanted) == {str(sparse): ["one"], str(across): ["two"]}


def verify(world: World, key: str, auth: str = "root") -> dict[str, Any]:
    world.verifications += 1
    return ok(world.server, "/v2/keys.verifyKey", {"key": key, "tags": [SCAN_TAG]}, auth)


def test_no_plaintext_key_at_rest_or_in_the_log(world: World, node: Server) -> None:
    s = world.server
    api = world.own.api
    secrets_: list[str] = [node.root_key, world.scoped]
    # Keys made by every route that makes one, with a distinctive shape, each verified and looked up.
    made = [ok(s, "/v2/keys.createKey", {"apiId": api, "prefix": PROBE_PREFIX, "byteLength": 32})
            for _ in range(3)]
    made.append(ok(s, "/v2/keys.createKey", {
        "apiId": api, "prefix": PROBE_PREFIX, "byteLength": 32, "externalId": unique("ext"), "meta": {"m": 1},
        "credits": {"remaining": 10, "refill": {"interval": "daily", "amount": 10}},
        "ratelimits": [{"name": "probe", "limit": 100, "duration": 60_000, "autoApply": True}],
        "permissions": [world.permission], "roles": [world.role]}))
    rerolled = ok(s, "/v2/keys.rerollKey", {"keyId": made[0]["keyId"], "expiration": 60_000})
    made.append(rerolled)
    secrets_ += [m["key"] for m in made]
    # A key imported by its hash (migrateKeys) is found by its plaintext: the server sees it on verification.
    migrated = probe_key()
    ok(s, "/v2/keys.migrateKeys", {"migrationId": "mig_scan", "apiId": api, "keys": [{"hash": sha256_b64(migrated)}]})
    secrets_.append(migrated)
    # Root keys: one more made on the command line, used once.
    cli_root = create_root_key(node.data_dir)
    secrets_.append(cli_root)
    ok(s, "/v2/apis.getApi", {"apiId": api}, cli_root)
    # Keys that exist nowhere: verified, looked up, sent as root keys, in bad requests.
    unknown = [probe_key() for _ in range(3)]
    secrets_ += unknown

    for key in [m["key"] for m in made] + [migrated]:
        assert verify(world, key)["code"] == "VALID", key
        start = ok(s, "/v2/keys.whoami", {"key": key})["start"]
        assert start == ("" if key == migrated else key[:len(PROBE_PREFIX) + 5])  # an import's plaintext is unknown
    for key in unknown:
        assert verify(world, key)["code"] == "NOT_FOUND"
        assert call(s, "/v2/keys.whoami", {"key": key})[0] == 404
    assert verify(world, world.other.key["key"], world.scoped)["code"] == "NOT_FOUND"
    assert verify(world, cli_root)["code"] == "NOT_FOUND"  # a root key is not a key of any API
    secrets_.append(world.other.key["key"])
    # Error paths, each with a key in the request: none may log or echo it.
    bad_requests = [
        (unknown[0], "/v2/apis.getApi", {"apiId": api}, 401),  # unknown root key
        ("root", "/v2/keys.verifyKey", {"key": unknown[1], "credits": {"cost": -1}}, 400),
        ("root", "/v2/keys.verifyKey", {"key": made[1]["key"], "permissions": "a AND ("}, 400),
        ("root", "/v2/keys.verifyKey", {"key": made[1]["key"], "ratelimits": [{"name": "missing"}]}, 412),
        ("root", "/v2/keys.whoami", {"key": made[2]["key"], "extra": 1}, 400),
        (world.scoped, "/v2/keys.whoami", {"key": world.other.key["key"]}, 403),
    ]
    for auth, path, body, status in bad_requests:
        got, _, raw = call(s, path, body, auth)
        assert got == status, (path, raw)
        assert not [k for k in secrets_ if k.encode() in raw], f"{path} echoed a key: {raw[:300]!r}"

    # Every verification of this test has landed in ClickHouse (the spool drains in order, so all before too).
    query = f"SELECT count() AS n FROM key_verifications_v1 WHERE has(tags, '{SCAN_TAG}')"
    deadline = time.monotonic() + 60
    landed = -1
    while time.monotonic() < deadline:
        status, _, raw = call(s, "/v2/analytics.getVerifications", {"query": query})
        if status == 200 and (landed := json.loads(raw)["data"][0]["n"]) >= world.verifications:
            break
        time.sleep(0.2)
    assert landed == world.verifications, f"{landed} of {world.verifications} verifications landed"
    rows = ok(s, "/v2/analytics.getVerifications",
              {"query": f"SELECT * FROM key_verifications_v1 WHERE has(tags, '{SCAN_TAG}')"})
    assert len(rows) == world.verifications
    wanted = needles(secrets_)
    text = json.dumps(rows).encode()
    assert not [key for needle, key in wanted.items() if needle in text], "ClickHouse holds a plaintext key"

    files = sorted(node.data_dir.rglob("*"))
    assert any(p.parts[-2:] == ("spool", "data.mdb") for p in files)
    assert sum(1 for p in files if "chdb" in p.parts and p.suffix == ".bin") > 0, "no chDB part on disk"
    assert scan(files + [node.log_path], wanted) == {}
    # Once more after a clean shutdown: the flusher's last drain, chDB's and LMDB's last writes.
    assert node.stop() == 0
    assert scan(sorted(node.data_dir.rglob("*")) + [node.log_path], wanted) == {}

"""Root-key permission boundaries, route by route, against a real `keysvc serve` (the session's
`server` fixture), table-driven: who (a root key with a named set of permissions) sends what,
and what comes back. A refusal is the contract's 403 (`unkey/authorization/insufficient_permissions`)
on a management route, or 200 `{"valid": false, "code": "NOT_FOUND"}` on keys.verifyKey; either
way it changes nothing, which each row checks with the all-permission root key.

Permissions are in the contract's form: `api.<apiId>.<action>`, `api.*.<action>`,
`ratelimit.*.<action>`, `identity.*.<action>`, `rbac.*.<action>`.
"""
from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from server import Server, create_root_key
from test_http_errors import FORBIDDEN, assert_error, data_of, everything, sha256_b64

KEY_ACTIONS = ("create_key", "read_key", "verify_key", "update_key", "delete_key")

# name -> permissions; {A} and {B} are the ids of the two APIs.
ROOT_KEYS: dict[str, list[str]] = {
    "scoped_a": [f"api.{{A}}.{action}" for action in KEY_ACTIONS],
    "verify_all": ["api.*.verify_key"],
    "no_verify": ["api.*.read_key", "api.*.create_key", "api.*.update_key"],
    "key_rbac_a": ["api.{A}.update_key", "rbac.*.add_permission_to_key", "rbac.*.remove_permission_from_key",
                   "rbac.*.add_role_to_key", "rbac.*.remove_role_from_key"],
    "api_admin": ["api.*.create_api", "api.*.read_api", "api.*.delete_api"],
    "rl_limit": ["ratelimit.*.limit"],
    "rl_create": ["ratelimit.*.create_namespace"],
    "rl_both": ["ratelimit.*.limit", "ratelimit.*.create_namespace"],
    "rl_overrides": ["ratelimit.*.set_override", "ratelimit.*.read_override", "ratelimit.*.delete_override"],
    "id_read": ["identity.*.read_identity"],
    "id_write": ["identity.*.create_identity", "identity.*.read_identity", "identity.*.update_identity",
                 "identity.*.delete_identity"],
    "rbac_read": ["rbac.*.read_permission", "rbac.*.read_role"],
    "rbac_write": ["rbac.*.create_permission", "rbac.*.update_permission", "rbac.*.delete_permission",
                   "rbac.*.create_role", "rbac.*.update_role", "rbac.*.delete_role"],
    "key_admin": ["api.*.read_key", "api.*.update_key", "api.*.delete_key", "api.*.create_key"],
}


VICTIMS = 6  # one shared by the tests that only look, one for each that may change it


def create_root_key_with_id(server: Server) -> tuple[str, str]:
    """An all-permission root key and its id (`root-key create` names the id on stderr)."""
    args = [sys.executable, "-m", "keysvc", "root-key", "create", "--data-dir", str(server.data_dir)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60)
    key_id = next(word for word in out.stderr.split() if word.startswith("key_"))
    return out.stdout.strip().splitlines()[-1], key_id


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def call(server: Server, path: str, body: Any, auth: str = "root") -> tuple[int, dict[str, str], bytes]:
    return server.request("POST", path, body, auth=auth)


def ok(server: Server, path: str, body: Any, auth: str = "root") -> Any:
    return data_of(call(server, path, body, auth))


class World:
    """Two APIs with a credited key each, an identity, a role, a permission, a namespace, and
    root keys of every shape in ROOT_KEYS (created in parallel: each is a CLI process)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.A = ok(server, "/v2/apis.createApi", {"name": unique("scope-a")})["apiId"]
        self.B = ok(server, "/v2/apis.createApi", {"name": unique("scope-b")})["apiId"]
        self.kA = self.new_key(self.A)
        self.kB = self.new_key(self.B)
        self.identity = unique("ext")
        ok(server, "/v2/identities.createIdentity", {"externalId": self.identity})
        self.permission = unique("perm")
        ok(server, "/v2/permissions.createPermission", {"name": self.permission, "slug": self.permission})
        self.role = unique("role")
        ok(server, "/v2/permissions.createRole", {"name": self.role, "permissions": [self.permission]})
        self.namespace = unique("ns")
        ok(server, "/v2/ratelimit.limit", {"namespace": self.namespace, "identifier": "seed", "limit": 10,
                                           "duration": 60_000})
        ok(server, "/v2/ratelimit.setOverride", {"namespace": self.namespace, "identifier": "vip", "limit": 100,
                                                 "duration": 60_000})
        specs = {name: [p.replace("{A}", self.A).replace("{B}", self.B) for p in perms]
                 for name, perms in ROOT_KEYS.items()}
        with ThreadPoolExecutor(8) as pool:
            futures = {name: pool.submit(create_root_key, server.data_dir, *perms) for name, perms in specs.items()}
            # All-permission root keys for the tests that try to reach root keys through keys.*
            victims = [pool.submit(create_root_key_with_id, server) for _ in range(VICTIMS)]
        self.roots = {name: future.result() for name, future in futures.items()}
        self.roots["root"] = "root"
        self.victims = [future.result() for future in victims]

    def new_key(self, api_id: str, **extra: Any) -> dict[str, str]:
        return ok(self.server, "/v2/keys.createKey", {"apiId": api_id, "credits": {"remaining": 1000}, **extra})

    def remaining(self, key: dict[str, str]) -> int:
        return ok(self.server, "/v2/keys.getKey", {"keyId": key["keyId"]})["credits"]["remaining"]

    def state(self) -> dict[str, Any]:
        """Everything a refused request could have changed, read with the all-permission key."""
        s = self.server
        return {
            "keys_a": everything(s, "/v2/apis.listKeys", {"apiId": self.A}),
            "keys_b": everything(s, "/v2/apis.listKeys", {"apiId": self.B}),
            "apis": [ok(s, "/v2/apis.getApi", {"apiId": api}) for api in (self.A, self.B)],
            "identities": everything(s, "/v2/identities.listIdentities", {}),
            "permissions": everything(s, "/v2/permissions.listPermissions", {}),
            "roles": everything(s, "/v2/permissions.listRoles", {}),
            "overrides": everything(s, "/v2/ratelimit.listOverrides", {"namespace": self.namespace}),
        }


@pytest.fixture(scope="module")
def world(server: Server) -> World:
    return World(server)


Body = Callable[[World], Any]
# (who, path, body, expected): 200 (allowed), 403/404 (refused, nothing changes).
Row = tuple[str, str, Body, int]


def run_row(world: World, who: str, path: str, body: Body, expected: int) -> Any:
    request = body(world)
    if expected == 200:
        return data_of(call(world.server, path, request, world.roots[who]))
    before = world.state()
    answer = call(world.server, path, request, world.roots[who])
    code = FORBIDDEN if expected == 403 else None
    assert_error(answer, expected, code=code)
    assert world.state() == before, "a refused request changed state"
    return None


def row_id(row: Row) -> str:
    who, path, _, expected = row
    return f"{who}-{path.rsplit('/', 1)[-1]}-{expected}"


def fresh_a(w: World) -> str:
    return w.new_key(w.A)["keyId"]


# -- keys and APIs ------------------------------------------------------------------------------------

API_ROWS: list[Row] = [
    # a root key with every key action on API A, and nothing else
    ("scoped_a", "/v2/keys.createKey", lambda w: {"apiId": w.A}, 200),
    ("scoped_a", "/v2/keys.createKey", lambda w: {"apiId": w.B}, 403),
    ("scoped_a", "/v2/keys.getKey", lambda w: {"keyId": w.kA["keyId"]}, 200),
    ("scoped_a", "/v2/keys.getKey", lambda w: {"keyId": w.kB["keyId"]}, 403),
    ("scoped_a", "/v2/keys.getKey", lambda w: {"keyId": w.kA["keyId"], "decrypt": True}, 403),
    ("scoped_a", "/v2/apis.listKeys", lambda w: {"apiId": w.A}, 200),
    ("scoped_a", "/v2/apis.listKeys", lambda w: {"apiId": w.B}, 403),
    ("scoped_a", "/v2/apis.listKeys", lambda w: {"apiId": w.A, "decrypt": True}, 403),
    ("scoped_a", "/v2/keys.whoami", lambda w: {"key": w.kA["key"]}, 200),
    ("scoped_a", "/v2/keys.whoami", lambda w: {"key": w.kB["key"]}, 403),
    ("scoped_a", "/v2/keys.updateKey", lambda w: {"keyId": w.kA["keyId"], "name": "renamed"}, 200),
    ("scoped_a", "/v2/keys.updateKey", lambda w: {"keyId": w.kB["keyId"], "name": "hijacked"}, 403),
    ("scoped_a", "/v2/keys.updateKey", lambda w: {"keyId": w.kB["keyId"], "enabled": False}, 403),
    ("scoped_a", "/v2/keys.updateCredits", lambda w: {"keyId": w.kA["keyId"], "operation": "increment", "value": 1},
     200),
    ("scoped_a", "/v2/keys.updateCredits", lambda w: {"keyId": w.kB["keyId"], "operation": "set", "value": 0}, 403),
    ("scoped_a", "/v2/keys.rerollKey", lambda w: {"keyId": fresh_a(w), "expiration": 0}, 200),
    ("scoped_a", "/v2/keys.rerollKey", lambda w: {"keyId": w.kB["keyId"], "expiration": 0}, 403),
    ("scoped_a", "/v2/keys.deleteKey", lambda w: {"keyId": fresh_a(w)}, 200),
    ("scoped_a", "/v2/keys.deleteKey", lambda w: {"keyId": w.kB["keyId"]}, 403),
    ("scoped_a", "/v2/keys.deleteKey", lambda w: {"keyId": w.kB["keyId"], "permanent": True}, 403),
    ("scoped_a", "/v2/keys.migrateKeys",
     lambda w: {"migrationId": "mig1", "apiId": w.A, "keys": [{"hash": sha256_b64(unique("p"))}]}, 200),
    ("scoped_a", "/v2/keys.migrateKeys",
     lambda w: {"migrationId": "mig1", "apiId": w.B, "keys": [{"hash": sha256_b64(unique("p"))}]}, 403),
    ("scoped_a", "/v2/apis.getApi", lambda w: {"apiId": w.A}, 403),
    ("scoped_a", "/v2/apis.createApi", lambda w: {"name": "not-allowed"}, 403),
    ("scoped_a", "/v2/apis.deleteApi", lambda w: {"apiId": w.B}, 403),
    ("scoped_a", "/v2/apis.deleteApi", lambda w: {"apiId": w.A}, 403),
    ("scoped_a", "/v2/keys.addPermissions", lambda w: {"keyId": w.kB["keyId"], "permissions": ["x.y"]}, 403),
    ("scoped_a", "/v2/keys.setRoles", lambda w: {"keyId": w.kB["keyId"], "roles": [w.role]}, 403),
    ("scoped_a", "/v2/identities.listIdentities", lambda w: {}, 403),
    ("scoped_a", "/v2/permissions.listPermissions", lambda w: {}, 403),
    ("scoped_a", "/v2/ratelimit.limit",
     lambda w: {"namespace": w.namespace, "identifier": "a", "limit": 1, "duration": 1000}, 403),
    # verify on every API, nothing else
    ("verify_all", "/v2/keys.getKey", lambda w: {"keyId": w.kA["keyId"]}, 403),
    ("verify_all", "/v2/keys.createKey", lambda w: {"apiId": w.A}, 403),
    ("verify_all", "/v2/apis.listKeys", lambda w: {"apiId": w.B}, 403),
    ("verify_all", "/v2/keys.whoami", lambda w: {"key": w.kB["key"]}, 403),
    # read, create and update keys of every API, but not verify them
    ("no_verify", "/v2/keys.getKey", lambda w: {"keyId": w.kB["keyId"]}, 200),
    ("no_verify", "/v2/keys.createKey", lambda w: {"apiId": w.B}, 200),
    ("no_verify", "/v2/keys.deleteKey", lambda w: {"keyId": w.kA["keyId"]}, 403),
    # API A's keys, with the rbac actions on keys
    ("key_rbac_a", "/v2/keys.addPermissions", lambda w: {"keyId": w.kA["keyId"], "permissions": [w.permission]},
     200),
    ("key_rbac_a", "/v2/keys.addRoles", lambda w: {"keyId": w.kA["keyId"], "roles": [w.role]}, 200),
    ("key_rbac_a", "/v2/keys.removeRoles", lambda w: {"keyId": w.kA["keyId"], "roles": [w.role]}, 200),
    ("key_rbac_a", "/v2/keys.addPermissions", lambda w: {"keyId": w.kB["keyId"], "permissions": [w.permission]},
     403),
    ("key_rbac_a", "/v2/keys.setPermissions", lambda w: {"keyId": w.kB["keyId"], "permissions": []}, 403),
    ("key_rbac_a", "/v2/keys.addRoles", lambda w: {"keyId": w.kB["keyId"], "roles": [w.role]}, 403),
    ("key_rbac_a", "/v2/keys.removePermissions", lambda w: {"keyId": w.kB["keyId"], "permissions": [w.permission]},
     403),
    ("key_rbac_a", "/v2/keys.getKey", lambda w: {"keyId": w.kA["keyId"]}, 403),
    # APIs, not their keys
    ("api_admin", "/v2/apis.getApi", lambda w: {"apiId": w.B}, 200),
    ("api_admin", "/v2/apis.createApi", lambda w: {"name": unique("admin-api")}, 200),
    ("api_admin", "/v2/apis.deleteApi", lambda w: {"apiId": ok(w.server, "/v2/apis.createApi",
                                                                {"name": unique("doomed")})["apiId"]}, 200),
    ("api_admin", "/v2/apis.listKeys", lambda w: {"apiId": w.A}, 403),
    ("api_admin", "/v2/keys.createKey", lambda w: {"apiId": w.A}, 403),
    ("api_admin", "/v2/keys.getKey", lambda w: {"keyId": w.kA["keyId"]}, 403),
]


@pytest.mark.parametrize("row", API_ROWS, ids=[row_id(r) for r in API_ROWS])
def test_key_and_api_routes(world: World, row: Row) -> None:
    run_row(world, *row)


def test_scoped_key_creates_only_in_its_api(world: World) -> None:
    """What the scoped key creates lands in its API, and is listed there."""
    created = ok(world.server, "/v2/keys.createKey", {"apiId": world.A, "name": "scoped"}, world.roots["scoped_a"])
    listed = everything(world.server, "/v2/apis.listKeys", {"apiId": world.A})
    assert created["keyId"] in {k["keyId"] for k in listed}
    assert created["keyId"] not in {k["keyId"] for k in everything(world.server, "/v2/apis.listKeys",
                                                                       {"apiId": world.B})}


# -- verifyKey: refusals are 200 NOT_FOUND, and charge nothing ---------------------------------------

# (who, which key, code)
VERIFY_ROWS = [
    ("scoped_a", "kA", "VALID"),
    ("scoped_a", "kB", "NOT_FOUND"),
    ("verify_all", "kA", "VALID"),
    ("verify_all", "kB", "VALID"),
    ("no_verify", "kA", "NOT_FOUND"),
    ("no_verify", "kB", "NOT_FOUND"),
    ("key_rbac_a", "kA", "NOT_FOUND"),
    ("api_admin", "kA", "NOT_FOUND"),
    ("rl_limit", "kB", "NOT_FOUND"),
    ("id_read", "kA", "NOT_FOUND"),
    ("root", "kB", "VALID"),
]


@pytest.mark.parametrize(("who", "which", "code"), VERIFY_ROWS, ids=[f"{w}-{k}-{c}" for w, k, c in VERIFY_ROWS])
def test_verify_key(world: World, who: str, which: str, code: str) -> None:
    key = getattr(world, which)
    before = world.remaining(key)
    answer = ok(world.server, "/v2/keys.verifyKey", {"key": key["key"], "credits": {"cost": 5}}, world.roots[who])
    after = world.remaining(key)
    if code == "NOT_FOUND":
        assert answer == {"valid": False, "code": "NOT_FOUND"}, "a refusal must not tell anything about the key"
        assert after == before, "a refused verification charged credits"
    else:
        assert (answer["valid"], answer["code"], answer["keyId"]) == (True, "VALID", key["keyId"])
        assert answer["credits"] == after == before - 5


@pytest.mark.parametrize("who", ["scoped_a", "no_verify"])
def test_refused_verify_spends_no_ratelimit(world: World, who: str) -> None:
    """A refused verification neither counts against the key's rate limit nor its credits."""
    key = world.new_key(world.B, ratelimits=[{"name": "tight", "limit": 1, "duration": 60_000, "autoApply": True}])
    for _ in range(3):
        assert ok(world.server, "/v2/keys.verifyKey", {"key": key["key"]}, world.roots[who])["code"] == "NOT_FOUND"
    first = ok(world.server, "/v2/keys.verifyKey", {"key": key["key"]})
    assert (first["code"], first["credits"], first["ratelimits"][0]["remaining"]) == ("VALID", 999, 0)
    assert ok(world.server, "/v2/keys.verifyKey", {"key": key["key"]})["code"] == "RATE_LIMITED"


def test_scoped_verify_with_keyspaces_cannot_widen_scope(world: World) -> None:
    """Naming the other API's keyspace does not let the scoped key through."""
    keyspace = ok(world.server, "/v2/keys.verifyKey", {"key": world.kB["key"], "credits": {"cost": 0}})["keyspaceId"]
    answer = ok(world.server, "/v2/keys.verifyKey", {"key": world.kB["key"], "keyspaces": [keyspace]},
                world.roots["scoped_a"])
    assert answer == {"valid": False, "code": "NOT_FOUND"}


# -- ratelimit ------------------------------------------------------------------------------------------


def namespace_exists(world: World, name: str) -> bool:
    """Probed with a key that may limit but not create: 200 if it exists, 404 if not (cost 0 counts nothing)."""
    status, _, body = call(world.server, "/v2/ratelimit.limit",
                           {"namespace": name, "identifier": "probe", "limit": 1, "duration": 1000, "cost": 0},
                           world.roots["rl_limit"])
    assert status in (200, 404), body
    return status == 200


def limit_body(namespace: str, identifier: str = "u") -> dict[str, Any]:
    return {"namespace": namespace, "identifier": identifier, "limit": 5, "duration": 60_000}


# (who, namespace: "existing" or "new", status)
LIMIT_ROWS = [
    pytest.param("rl_limit", "existing", 200, id="limit-existing-200"),
    pytest.param("rl_limit", "new", 404, id="limit-new-404"),
    pytest.param("rl_both", "new", 200, id="limit+create-new-200"),
    pytest.param("rl_both", "existing", 200, id="limit+create-existing-200"),
    pytest.param("rl_create", "existing", 403, id="create-existing-403"),
    pytest.param("rl_create", "new", 403, id="create-new-403"),
    pytest.param("rl_overrides", "existing", 403, id="overrides-existing-403"),
    pytest.param("rl_overrides", "new", 404, id="overrides-new-404"),
    pytest.param("id_read", "existing", 403, id="unrelated-existing-403"),
    pytest.param("id_read", "new", 404, id="unrelated-new-404"),
    pytest.param("scoped_a", "new", 404, id="api-key-new-404"),
]


@pytest.mark.parametrize(("who", "which", "status"), LIMIT_ROWS)
def test_ratelimit_limit(world: World, who: str, which: str, status: int) -> None:
    name = world.namespace if which == "existing" else unique("new_ns")
    identifier = unique("id")
    answer = call(world.server, "/v2/ratelimit.limit", limit_body(name, identifier), world.roots[who])
    if status == 200:
        data = data_of(answer)
        assert (data["success"], data["remaining"]) == (True, 4)
    else:
        assert_error(answer, status, code=FORBIDDEN if status == 403 else "unkey/data/ratelimit_namespace_not_found")
    exists = which == "existing" or status == 200
    assert namespace_exists(world, name) == exists
    if exists:  # refused requests count nothing: the identifier still has all 5 (cost 0 only looks)
        left = ok(world.server, "/v2/ratelimit.limit", dict(limit_body(name, identifier), cost=0))["remaining"]
        assert left == (4 if status == 200 else 5)


MULTI_ROWS = [
    pytest.param("rl_limit", ["existing", "new"], 404, id="limit-existing+new-404"),
    pytest.param("rl_both", ["new", "new"], 200, id="limit+create-new+new-200"),
    pytest.param("rl_create", ["existing"], 403, id="create-existing-403"),
    pytest.param("rl_create", ["new", "existing"], 403, id="create-new+existing-403"),
]


@pytest.mark.parametrize(("who", "which", "status"), MULTI_ROWS)
def test_ratelimit_multi_limit(world: World, who: str, which: list[str], status: int) -> None:
    names = [world.namespace if w == "existing" else unique("new_ns") for w in which]
    identifier = unique("id")
    answer = call(world.server, "/v2/ratelimit.multiLimit", [limit_body(n, identifier) for n in names],
                  world.roots[who])
    if status == 200:
        assert data_of(answer)["passed"] is True
    else:
        assert_error(answer, status, code=FORBIDDEN if status == 403 else "unkey/data/ratelimit_namespace_not_found")
    for name, w in zip(names, which):
        assert namespace_exists(world, name) == (w == "existing" or status == 200), name
        if w == "existing" or status == 200:
            left = ok(world.server, "/v2/ratelimit.limit", dict(limit_body(name, identifier), cost=0))["remaining"]
            assert left == (4 if status == 200 else 5), "a refused multiLimit counted"


def doomed_override(w: World) -> str:
    identifier = unique("doomed")
    ok(w.server, "/v2/ratelimit.setOverride", {"namespace": w.namespace, "identifier": identifier, "limit": 1,
                                               "duration": 1000})
    return identifier


OVERRIDE_ROWS: list[Row] = [
    ("rl_overrides", "/v2/ratelimit.setOverride",
     lambda w: {"namespace": w.namespace, "identifier": unique("o"), "limit": 1, "duration": 1000}, 200),
    ("rl_overrides", "/v2/ratelimit.getOverride", lambda w: {"namespace": w.namespace, "identifier": "vip"}, 200),
    ("rl_overrides", "/v2/ratelimit.listOverrides", lambda w: {"namespace": w.namespace}, 200),
    ("rl_overrides", "/v2/ratelimit.deleteOverride",
     lambda w: {"namespace": w.namespace, "identifier": doomed_override(w)}, 200),
    ("rl_overrides", "/v2/ratelimit.setOverride",
     lambda w: {"namespace": unique("new_ns"), "identifier": "x", "limit": 1, "duration": 1000}, 404),
    ("rl_limit", "/v2/ratelimit.setOverride",
     lambda w: {"namespace": w.namespace, "identifier": "vip", "limit": 0, "duration": 1000}, 403),
    ("rl_limit", "/v2/ratelimit.getOverride", lambda w: {"namespace": w.namespace, "identifier": "vip"}, 403),
    ("rl_limit", "/v2/ratelimit.listOverrides", lambda w: {"namespace": w.namespace}, 403),
    ("rl_limit", "/v2/ratelimit.deleteOverride", lambda w: {"namespace": w.namespace, "identifier": "vip"}, 403),
    ("rl_both", "/v2/ratelimit.setOverride",
     lambda w: {"namespace": w.namespace, "identifier": "vip", "limit": 0, "duration": 1000}, 403),
    ("scoped_a", "/v2/ratelimit.deleteOverride", lambda w: {"namespace": w.namespace, "identifier": "vip"}, 403),
]


@pytest.mark.parametrize("row", OVERRIDE_ROWS, ids=[row_id(r) for r in OVERRIDE_ROWS])
def test_ratelimit_overrides(world: World, row: Row) -> None:
    run_row(world, *row)


def test_refused_override_changes_no_limit(world: World) -> None:
    """After the refused setOverride(vip, 0) above, vip still gets its override of 100."""
    data = ok(world.server, "/v2/ratelimit.limit", dict(limit_body(world.namespace, "vip"), cost=0),
              world.roots["rl_limit"])
    assert data["limit"] == 100


# -- identities -------------------------------------------------------------------------------------------

IDENTITY_ROWS: list[Row] = [
    ("id_read", "/v2/identities.getIdentity", lambda w: {"identity": w.identity}, 200),
    ("id_read", "/v2/identities.listIdentities", lambda w: {"limit": 5}, 200),
    ("id_read", "/v2/identities.createIdentity", lambda w: {"externalId": unique("ext")}, 403),
    ("id_read", "/v2/identities.updateIdentity", lambda w: {"identity": w.identity, "meta": {"x": 1}}, 403),
    ("id_read", "/v2/identities.deleteIdentity", lambda w: {"identity": w.identity}, 403),
    ("id_write", "/v2/identities.createIdentity", lambda w: {"externalId": unique("ext")}, 200),
    ("id_write", "/v2/identities.updateIdentity", lambda w: {"identity": w.identity, "meta": {"tier": "gold"}}, 200),
    ("id_write", "/v2/identities.getIdentity", lambda w: {"identity": w.identity}, 200),
    ("rl_both", "/v2/identities.getIdentity", lambda w: {"identity": w.identity}, 403),
    ("scoped_a", "/v2/identities.createIdentity", lambda w: {"externalId": unique("ext")}, 403),
    ("rbac_write", "/v2/identities.listIdentities", lambda w: {}, 403),
]


@pytest.mark.parametrize("row", IDENTITY_ROWS, ids=[row_id(r) for r in IDENTITY_ROWS])
def test_identity_routes(world: World, row: Row) -> None:
    run_row(world, *row)


def test_identity_delete_with_permission(world: World) -> None:
    external_id = unique("ext")
    ok(world.server, "/v2/identities.createIdentity", {"externalId": external_id})
    answer = call(world.server, "/v2/identities.deleteIdentity", {"identity": external_id}, world.roots["id_write"])
    assert answer[0] == 200
    assert call(world.server, "/v2/identities.getIdentity", {"identity": external_id})[0] == 404


# -- permissions and roles ---------------------------------------------------------------------------------

RBAC_ROWS: list[Row] = [
    ("rbac_read", "/v2/permissions.getPermission", lambda w: {"permission": w.permission}, 200),
    ("rbac_read", "/v2/permissions.listPermissions", lambda w: {"limit": 5}, 200),
    ("rbac_read", "/v2/permissions.getRole", lambda w: {"role": w.role}, 200),
    ("rbac_read", "/v2/permissions.listRoles", lambda w: {"limit": 5}, 200),
    ("rbac_read", "/v2/permissions.createPermission", lambda w: {"name": "n", "slug": unique("slug")}, 403),
    ("rbac_read", "/v2/permissions.updatePermission", lambda w: {"permission": w.permission, "name": "x"}, 403),
    ("rbac_read", "/v2/permissions.deletePermission", lambda w: {"permission": w.permission}, 403),
    ("rbac_read", "/v2/permissions.createRole", lambda w: {"name": unique("role")}, 403),
    ("rbac_read", "/v2/permissions.updateRole", lambda w: {"role": w.role, "description": "x"}, 403),
    ("rbac_read", "/v2/permissions.setRolePermissions", lambda w: {"role": w.role, "permissions": []}, 403),
    ("rbac_read", "/v2/permissions.deleteRole", lambda w: {"role": w.role}, 403),
    ("rbac_write", "/v2/permissions.createPermission", lambda w: {"name": "n", "slug": unique("slug")}, 200),
    ("rbac_write", "/v2/permissions.createRole", lambda w: {"name": unique("role"), "permissions": [w.permission]},
     200),
    ("rbac_write", "/v2/permissions.updateRole", lambda w: {"role": w.role, "description": "described"}, 200),
    ("rbac_write", "/v2/permissions.setRolePermissions", lambda w: {"role": w.role, "permissions": [w.permission]},
     200),
    ("rbac_write", "/v2/permissions.deleteRole",
     lambda w: {"role": ok(w.server, "/v2/permissions.createRole", {"name": unique("doomed")})["roleId"]}, 200),
    ("rbac_write", "/v2/permissions.deletePermission",
     lambda w: {"permission": ok(w.server, "/v2/permissions.createPermission",
                                 {"name": "d", "slug": unique("doomed")})["permissionId"]}, 200),
    ("rbac_write", "/v2/permissions.getRole", lambda w: {"role": w.role}, 403),
    ("rbac_write", "/v2/permissions.listPermissions", lambda w: {}, 403),
    ("id_write", "/v2/permissions.createRole", lambda w: {"name": unique("role")}, 403),
    ("scoped_a", "/v2/permissions.getPermission", lambda w: {"permission": w.permission}, 403),
]


@pytest.mark.parametrize("row", RBAC_ROWS, ids=[row_id(r) for r in RBAC_ROWS])
def test_rbac_routes(world: World, row: Row) -> None:
    run_row(world, *row)


# -- root keys are not keys of an API ---------------------------------------------------------------------



@pytest.fixture
def victim(world: World) -> tuple[str, str]:
    """A root key of its own for a test that may change it (while the bug it pins is there)."""
    assert len(world.victims) > 1, "raise VICTIMS"
    return world.victims.pop()


@pytest.fixture
def onlooker(world: World) -> tuple[str, str]:
    """The root key shared by the tests that only look it up."""
    return world.victims[0]


def assert_root_key_works(world: World, plaintext: str) -> None:
    assert call(world.server, "/v2/apis.getApi", {"apiId": world.A}, plaintext)[0] == 200


@pytest.mark.parametrize("who", ["root", "verify_all"])
def test_root_key_does_not_verify_as_a_key(world: World, onlooker: tuple[str, str], who: str) -> None:
    plaintext, _ = onlooker
    answer = ok(world.server, "/v2/keys.verifyKey", {"key": plaintext}, world.roots[who])
    assert answer == {"valid": False, "code": "NOT_FOUND"}


def test_root_key_is_not_read_as_a_key(world: World, onlooker: tuple[str, str]) -> None:
    plaintext, key_id = onlooker
    answer = call(world.server, "/v2/keys.getKey", {"keyId": key_id}, world.roots["key_admin"])
    assert_error(answer, 404, code="unkey/data/key_not_found")
    assert_root_key_works(world, plaintext)


@pytest.mark.parametrize(("path", "body", "who"), [
    ("/v2/keys.updateKey", {"enabled": False}, "key_admin"),
    ("/v2/keys.updateKey", {"expires": 1}, "key_admin"),
    ("/v2/keys.deleteKey", {}, "key_admin"),
    ("/v2/keys.deleteKey", {"permanent": True}, "key_admin"),
    ("/v2/keys.rerollKey", {"expiration": 0}, "root"),
], ids=["updateKey-disable", "updateKey-expire", "deleteKey", "deleteKey-permanent", "rerollKey"])
def test_root_key_is_not_managed_as_a_key(world: World, victim: tuple[str, str], path: str, body: dict[str, Any],
                                          who: str) -> None:
    plaintext, key_id = victim
    answer = call(world.server, path, {"keyId": key_id, **body}, world.roots[who])
    assert_error(answer, 404, code="unkey/data/key_not_found")
    assert_root_key_works(world, plaintext)


def test_root_key_is_not_found_by_whoami(world: World, onlooker: tuple[str, str]) -> None:
    plaintext, _ = onlooker
    assert_error(call(world.server, "/v2/keys.whoami", {"key": plaintext}), 404, code="unkey/data/key_not_found")
    assert_root_key_works(world, plaintext)

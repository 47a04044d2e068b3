"""Every class of bad request against a real `keysvc serve` over loopback (the session's `server`
fixture): each answer has the status of the contract's map (docs/unkey-v2-contract.md sections 2,
3 and 11), the error envelope exactly, and the negotiated content type; none is a 5xx, and none
changes state.

The envelope: `{"meta": {"requestId": "req_<9 alphanumerics>"}, "error": {title, detail, status,
type}}`, `status` equal to the HTTP status, `type` under https://unkey.com/docs/errors/, and on
every 400 an `error.errors` list of {location, message[, fix]}, non-empty for bad bodies.

One test is marked xfail(strict=True): HTTP framing errors (an unparsable Content-Length) are
answered by Granian itself, before keysvc sees the request, without the envelope. It asserts the
envelope, so it will pass (and its marker must go) if that ever changes.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from server import Server, create_root_key

REQUEST_ID = re.compile(r"^req_[A-Za-z0-9]{9}$")
ERROR_TYPE = "https://unkey.com/docs/errors/"
TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    409: "Conflicting Resource", 413: "Content Too Large",
}
JSON = "application/json"
PROBLEM = "application/problem+json"
MiB = 1 << 20
MAX_EXPIRES = 4_102_444_800_000
DEEP = 100_000

INVALID_INPUT = "unkey/application/invalid_input"
AUTH_MISSING = "unkey/authentication/missing"
AUTH_MALFORMED = "unkey/authentication/malformed"
AUTH_UNKNOWN = "unkey/authentication/key_not_found"
FORBIDDEN = "unkey/authorization/insufficient_permissions"


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


# -- the envelope ---------------------------------------------------------------------------------


def assert_error(answer: tuple[int, dict[str, str], bytes], status: int, *, code: str | None = None,
                 content_type: str = JSON, issues: bool = True) -> dict[str, Any]:
    """The answer is the contract's error envelope for `status`, and nothing else; returns `error`.

    `issues`: on a 400, whether `error.errors` must be non-empty (it is a list on every 400; the
    authentication 400s may leave it empty, as the contract and Unkey do)."""
    got_status, headers, body = answer
    assert got_status == status, body[:500]
    assert headers.get("content-type") == content_type, headers
    assert int(headers["content-length"]) == len(body)
    doc = json.loads(body)
    assert set(doc) == {"meta", "error"}, doc
    assert set(doc["meta"]) == {"requestId"}, doc
    assert REQUEST_ID.match(doc["meta"]["requestId"]), doc
    error = doc["error"]
    assert set(error) == {"title", "detail", "status", "type"} | ({"errors"} if status == 400 else set()), error
    assert error["status"] == status
    assert error["title"] == TITLES[status]
    assert isinstance(error["detail"], str) and error["detail"]
    assert isinstance(error["type"], str) and error["type"].startswith(ERROR_TYPE)
    if code is not None:
        assert error["type"] == ERROR_TYPE + code, error
    if status == 400:
        assert isinstance(error["errors"], list), error
        if issues:
            assert error["errors"], error
        for issue in error["errors"]:
            assert {"location", "message"} <= set(issue) <= {"location", "message", "fix"}, issue
            assert all(isinstance(v, str) and v for v in issue.values()), issue
    return error


def data_of(answer: tuple[int, dict[str, str], bytes]) -> Any:
    status, headers, body = answer
    assert status == 200, body[:500]
    assert headers["content-type"] == JSON
    doc = json.loads(body)
    assert REQUEST_ID.match(doc["meta"]["requestId"])
    return doc["data"]


def post(server: Server, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return server.request("POST", path, body, **kw)


def ok(server: Server, path: str, body: Any) -> Any:
    return data_of(post(server, path, body))


# -- raw HTTP beyond Server.request ---------------------------------------------------------------


def send_body(server: Server, path: str, chunks: Iterator[bytes] | bytes, headers: dict[str, str],
              *, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    """POST a body that the server may refuse before it has all of it: a refusal can break the
    pipe under the sender, but the answer is still there to read."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        try:
            conn.request("POST", path, body=chunks, headers=headers, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_exchange(server: Server, request: bytes) -> bytes:
    """Send bytes on a fresh socket and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def parse_raw(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


# -- what exists: an API with keys, and everything else the state check looks at ------------------


@pytest.fixture(scope="module")
def world(server: Server) -> dict[str, Any]:
    api_id = ok(server, "/v2/apis.createApi", {"name": unique("errors-api")})["apiId"]
    role = unique("role")
    ok(server, "/v2/permissions.createRole", {"name": role, "permissions": [unique("perm")]})
    external_id = unique("ext")
    credited = ok(server, "/v2/keys.createKey", {
        "apiId": api_id, "name": "credited", "credits": {"remaining": 100}, "externalId": external_id,
        "roles": [role], "permissions": ["docs.read"], "meta": {"plan": "pro"},
        "ratelimits": [{"name": "requests", "limit": 1000, "duration": 60_000}],
    })
    plain = ok(server, "/v2/keys.createKey", {"apiId": api_id, "name": "plain"})
    ok(server, "/v2/ratelimit.limit", {"namespace": unique("ns"), "identifier": "u", "limit": 5, "duration": 60_000})
    return {"api_id": api_id, "credited": credited, "plain": plain, "role": role, "external_id": external_id}


def everything(server: Server, path: str, body: dict[str, Any]) -> list[Any]:
    items: list[Any] = []
    cursor = None
    while True:
        page = dict(body, **({"cursor": cursor} if cursor else {}))
        status, _, raw = post(server, path, page)
        assert status == 200, raw
        doc = json.loads(raw)
        items += doc["data"]
        if not doc["pagination"]["hasMore"]:
            return items
        cursor = doc["pagination"]["cursor"]


def snapshot(server: Server, world: dict[str, Any]) -> dict[str, Any]:
    """What a bad request might change: the API's keys (with balances), identities, permissions, roles."""
    return {
        "keys": everything(server, "/v2/apis.listKeys", {"apiId": world["api_id"]}),
        "identities": everything(server, "/v2/identities.listIdentities", {}),
        "permissions": everything(server, "/v2/permissions.listPermissions", {}),
        "roles": everything(server, "/v2/permissions.listRoles", {}),
    }


# -- bad bodies -------------------------------------------------------------------------------------

# (id, path, raw body with {api}/{key}/{keyId} placeholders, a word the issue's location names)
BAD_BODIES: list[tuple[str, str, bytes, str | None]] = [
    # malformed JSON
    ("json-unclosed", "/v2/keys.createKey", b'{"apiId": "{api}"', None),
    ("json-garbage", "/v2/keys.createKey", b"{bad", None),
    ("json-single-quotes", "/v2/keys.verifyKey", b"{'key': 'a'}", None),
    ("json-trailing-comma", "/v2/keys.verifyKey", b'{"key": "a",}', None),
    ("json-trailing-garbage", "/v2/keys.createKey", b'{"apiId": "{api}"} x', None),
    ("json-nan", "/v2/keys.createKey", b'{"apiId": "{api}", "expires": NaN}', None),
    ("json-bom", "/v2/keys.verifyKey", b'\xef\xbb\xbf{"key": "a"}', None),
    ("json-raw-control-char", "/v2/keys.createKey", b'{"apiId": "{api}", "name": "a\x01b"}', None),
    ("form-encoded", "/v2/keys.createKey", b"apiId={api}&name=x", None),
    ("whitespace-only", "/v2/keys.createKey", b"   \r\n", None),
    ("empty", "/v2/keys.createKey", b"", None),
    ("empty-verify", "/v2/keys.verifyKey", b"", None),
    # invalid UTF-8 and lone surrogates in strings
    ("utf8-in-value", "/v2/keys.createKey", b'{"apiId": "{api}", "name": "\xff\xfe"}', None),
    ("utf8-in-object-key", "/v2/keys.createKey", b'{"apiId": "{api}", "meta": {"\xc3\x28": 1}}', None),
    ("utf8-in-array", "/v2/keys.verifyKey", b'{"key": "{key}", "tags": ["\xed\xa0\x80"]}', None),
    ("lone-surrogate", "/v2/keys.createKey", b'{"apiId": "{api}", "name": "\\ud800"}', None),
    ("lone-low-surrogate", "/v2/keys.verifyKey", b'{"key": "\\udfff"}', None),
    # the wrong JSON type
    ("top-level-array", "/v2/keys.createKey", b'[{"apiId": "{api}"}]', None),
    ("top-level-null", "/v2/keys.verifyKey", b"null", None),
    ("top-level-string", "/v2/keys.verifyKey", b'"{key}"', None),
    ("top-level-number", "/v2/keys.createKey", b"1", None),
    ("object-for-multilimit", "/v2/ratelimit.multiLimit",
     b'{"namespace": "n", "identifier": "i", "limit": 1, "duration": 1000}', None),
    ("key-int", "/v2/keys.verifyKey", b'{"key": 1}', "key"),
    ("apiId-null", "/v2/keys.createKey", b'{"apiId": null}', "apiId"),
    ("byteLength-string", "/v2/keys.createKey", b'{"apiId": "{api}", "byteLength": "16"}', "byteLength"),
    ("byteLength-float", "/v2/keys.createKey", b'{"apiId": "{api}", "byteLength": 16.5}', "byteLength"),
    ("byteLength-huge", "/v2/keys.createKey", b'{"apiId": "{api}", "byteLength": 1e400}', "byteLength"),
    ("enabled-string", "/v2/keys.createKey", b'{"apiId": "{api}", "enabled": "true"}', "enabled"),
    ("meta-array", "/v2/keys.createKey", b'{"apiId": "{api}", "meta": []}', "meta"),
    ("tags-string", "/v2/keys.verifyKey", b'{"key": "{key}", "tags": "a"}', "tags"),
    ("permissions-array", "/v2/keys.verifyKey", b'{"key": "{key}", "permissions": ["docs.read"]}', "permissions"),
    ("credits-int", "/v2/keys.createKey", b'{"apiId": "{api}", "credits": 5}', "credits"),
    ("ratelimits-object", "/v2/keys.createKey", b'{"apiId": "{api}", "ratelimits": {}}', "ratelimits"),
    ("expires-bool", "/v2/keys.updateKey", b'{"keyId": "{keyId}", "expires": true}', "expires"),
    ("limit-string", "/v2/ratelimit.limit",
     b'{"namespace": "n", "identifier": "i", "limit": "5", "duration": 1000}', "limit"),
    ("value-string", "/v2/keys.updateCredits", b'{"keyId": "{keyId}", "operation": "set", "value": "7"}', "value"),
    # required fields missing
    ("createKey-no-apiId", "/v2/keys.createKey", b"{}", None),
    ("verifyKey-no-key", "/v2/keys.verifyKey", b'{"tags": ["a"]}', None),
    ("createApi-no-name", "/v2/apis.createApi", b"{}", None),
    ("limit-no-duration", "/v2/ratelimit.limit", b'{"namespace": "n", "identifier": "i", "limit": 1}', None),
    ("updateCredits-no-operation", "/v2/keys.updateCredits", b'{"keyId": "{keyId}", "value": 1}', None),
    ("credits-no-remaining", "/v2/keys.createKey", b'{"apiId": "{api}", "credits": {}}', "credits"),
    ("ratelimit-no-limit", "/v2/keys.createKey",
     b'{"apiId": "{api}", "ratelimits": [{"name": "abc", "duration": 1000}]}', "ratelimits"),
    # unknown fields are refused
    ("unknown-top-level", "/v2/keys.createKey", b'{"apiId": "{api}", "foo": 1}', None),
    ("unknown-wrong-case", "/v2/keys.verifyKey", b'{"Key": "{key}"}', None),
    ("unknown-snake-case", "/v2/keys.createKey", b'{"api_id": "{api}"}', None),
    ("unknown-in-credits", "/v2/keys.createKey",
     b'{"apiId": "{api}", "credits": {"remaining": 1, "extra": true}}', "credits"),
    ("unknown-in-ratelimit", "/v2/keys.verifyKey",
     b'{"key": "{key}", "ratelimits": [{"name": "requests", "bogus": 1}]}', "ratelimits"),
    ("unknown-in-limit", "/v2/ratelimit.limit",
     b'{"namespace": "n", "identifier": "i", "limit": 1, "duration": 1000, "async": true}', None),
    ("unknown-in-updateKey", "/v2/keys.updateKey", b'{"keyId": "{keyId}", "disabled": true}', None),
]

# Values outside the contract's limits: (id, path, body with "{api}"/"{key}"/"{keyId}" strings, location word)
OUT_OF_LIMITS: list[tuple[str, str, dict[str, Any], str]] = [
    ("key-513", "/v2/keys.verifyKey", {"key": "k" * 513}, "key"),
    ("key-empty", "/v2/keys.verifyKey", {"key": ""}, "key"),
    ("tags-21", "/v2/keys.verifyKey", {"key": "{key}", "tags": [f"t{i}" for i in range(21)]}, "tags"),
    ("tag-513", "/v2/keys.verifyKey", {"key": "{key}", "tags": ["t" * 513]}, "tags"),
    ("permissions-1001", "/v2/keys.verifyKey", {"key": "{key}", "permissions": "p" * 1001}, "permissions"),
    ("credits-cost-negative", "/v2/keys.verifyKey", {"key": "{key}", "credits": {"cost": -1}}, "cost"),
    ("credits-cost-over-1e12", "/v2/keys.verifyKey", {"key": "{key}", "credits": {"cost": 10**12 + 1}}, "cost"),
    ("verify-ratelimit-name-2", "/v2/keys.verifyKey", {"key": "{key}", "ratelimits": [{"name": "ab"}]}, "name"),
    ("byteLength-15", "/v2/keys.createKey", {"apiId": "{api}", "byteLength": 15}, "byteLength"),
    ("byteLength-256", "/v2/keys.createKey", {"apiId": "{api}", "byteLength": 256}, "byteLength"),
    ("prefix-dash", "/v2/keys.createKey", {"apiId": "{api}", "prefix": "my-prefix"}, "prefix"),
    ("prefix-17", "/v2/keys.createKey", {"apiId": "{api}", "prefix": "p" * 17}, "prefix"),
    ("prefix-empty", "/v2/keys.createKey", {"apiId": "{api}", "prefix": ""}, "prefix"),
    ("apiId-pattern", "/v2/keys.createKey", {"apiId": "api-with-dash"}, "apiId"),
    ("apiId-2", "/v2/keys.createKey", {"apiId": "ab"}, "apiId"),
    ("name-256", "/v2/keys.createKey", {"apiId": "{api}", "name": "n" * 256}, "name"),
    ("externalId-pattern", "/v2/keys.createKey", {"apiId": "{api}", "externalId": "user 1"}, "externalId"),
    ("expires-beyond-2100", "/v2/keys.createKey", {"apiId": "{api}", "expires": MAX_EXPIRES + 1}, "expires"),
    ("expires-negative", "/v2/keys.createKey", {"apiId": "{api}", "expires": -1}, "expires"),
    ("meta-101-properties", "/v2/keys.createKey",
     {"apiId": "{api}", "meta": {f"k{i}": i for i in range(101)}}, "meta"),
    ("credits-negative", "/v2/keys.createKey", {"apiId": "{api}", "credits": {"remaining": -1}}, "remaining"),
    ("refill-amount-0", "/v2/keys.createKey",
     {"apiId": "{api}", "credits": {"remaining": 1, "refill": {"interval": "daily", "amount": 0}}}, "amount"),
    ("refill-day-32", "/v2/keys.createKey",
     {"apiId": "{api}", "credits": {"remaining": 1, "refill": {"interval": "monthly", "amount": 1, "refillDay": 32}}},
     "refillDay"),
    ("key-ratelimit-limit-0", "/v2/keys.createKey",
     {"apiId": "{api}", "ratelimits": [{"name": "abc", "limit": 0, "duration": 1000}]}, "limit"),
    ("key-ratelimit-duration-999", "/v2/keys.createKey",
     {"apiId": "{api}", "ratelimits": [{"name": "abc", "limit": 1, "duration": 999}]}, "duration"),
    ("key-ratelimits-51", "/v2/keys.createKey",
     {"apiId": "{api}", "ratelimits": [{"name": f"rl{i:02}", "limit": 1, "duration": 1000} for i in range(51)]},
     "ratelimits"),
    ("permission-slug-pattern", "/v2/keys.createKey", {"apiId": "{api}", "permissions": ["has space"]}, "permissions"),
    ("roles-101", "/v2/keys.createKey", {"apiId": "{api}", "roles": [f"r{i}" for i in range(101)]}, "roles"),
    ("limit-0", "/v2/ratelimit.limit", {"namespace": "n", "identifier": "i", "limit": 0, "duration": 1000}, "limit"),
    ("duration-999", "/v2/ratelimit.limit", {"namespace": "n", "identifier": "i", "limit": 1, "duration": 999},
     "duration"),
    ("duration-over-30-days", "/v2/ratelimit.limit",
     {"namespace": "n", "identifier": "i", "limit": 1, "duration": 2_592_000_001}, "duration"),
    ("limit-cost-negative", "/v2/ratelimit.limit",
     {"namespace": "n", "identifier": "i", "limit": 1, "duration": 1000, "cost": -1}, "cost"),
    ("namespace-513", "/v2/ratelimit.limit", {"namespace": "n" * 513, "identifier": "i", "limit": 1, "duration": 1000},
     "namespace"),
    ("identifier-empty", "/v2/ratelimit.limit", {"namespace": "n", "identifier": "", "limit": 1, "duration": 1000},
     "identifier"),
    ("multiLimit-empty", "/v2/ratelimit.multiLimit", [], "body"),
    ("createApi-name-2", "/v2/apis.createApi", {"name": "ab"}, "name"),
    ("createApi-name-257", "/v2/apis.createApi", {"name": "n" * 257}, "name"),
    ("listKeys-limit-0", "/v2/apis.listKeys", {"apiId": "{api}", "limit": 0}, "limit"),
    ("listKeys-limit-101", "/v2/apis.listKeys", {"apiId": "{api}", "limit": 101}, "limit"),
    ("updateCredits-value-negative", "/v2/keys.updateCredits",
     {"keyId": "{keyId}", "operation": "set", "value": -5}, "value"),
    ("rerollKey-expiration-beyond", "/v2/keys.rerollKey", {"keyId": "{keyId}", "expiration": MAX_EXPIRES + 1},
     "expiration"),
    ("getKey-keyId-2", "/v2/keys.getKey", {"keyId": "ab"}, "keyId"),
    ("createIdentity-meta-101", "/v2/identities.createIdentity",
     {"externalId": "ext_meta", "meta": {f"k{i}": i for i in range(101)}}, "meta"),
]


def nest(depth: int, open_: bytes, close: bytes, inner: bytes = b"1") -> bytes:
    return open_ * depth + inner + close * depth


# Deeply nested JSON: 100000 levels, in `meta` (free-form) and in a typed field.
DEEPLY_NESTED: list[tuple[str, str, bytes]] = [
    ("meta-objects", "/v2/keys.createKey", b'{"apiId": "{api}", "meta": ' + nest(DEEP, b'{"a": ', b"}") + b"}"),
    ("meta-arrays", "/v2/keys.createKey", b'{"apiId": "{api}", "meta": {"a": ' + nest(DEEP, b"[", b"]") + b"}}"),
    ("roles-arrays", "/v2/keys.createKey", b'{"apiId": "{api}", "roles": ' + nest(DEEP, b"[", b"]", b'"r"') + b"}"),
    ("tags-arrays", "/v2/keys.verifyKey", b'{"key": "{key}", "tags": ' + nest(DEEP, b"[", b"]", b"") + b"}"),
    ("identity-meta", "/v2/identities.createIdentity",
     b'{"externalId": "deep_ext", "meta": ' + nest(DEEP, b'{"a": ', b"}") + b"}"),
    ("top-level-arrays", "/v2/ratelimit.multiLimit", nest(DEEP, b"[", b"]", b"")),
    ("unclosed", "/v2/keys.createKey", b'{"apiId": "{api}", "meta": ' + b'{"a": ' * DEEP),
]


def fill(raw: bytes, world: dict[str, Any]) -> bytes:
    return (raw.replace(b"{api}", world["api_id"].encode())
            .replace(b"{keyId}", world["credited"]["keyId"].encode())
            .replace(b"{key}", world["credited"]["key"].encode()))


def fill_json(body: Any, world: dict[str, Any]) -> bytes:
    return fill(json.dumps(body).encode(), world)


@pytest.mark.parametrize(("path", "raw", "where"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_body_is_a_400_in_the_envelope(server: Server, world: dict[str, Any], path: str, raw: bytes,
                                           where: str | None) -> None:
    error = assert_error(post(server, path, raw=fill(raw, world)), 400, code=INVALID_INPUT)
    if where is not None:
        assert any(where in issue["location"] for issue in error["errors"]), error


@pytest.mark.parametrize(("path", "body", "where"), [c[1:] for c in OUT_OF_LIMITS], ids=[c[0] for c in OUT_OF_LIMITS])
def test_value_outside_the_contract_limits_is_a_400(server: Server, world: dict[str, Any], path: str, body: Any,
                                                    where: str) -> None:
    error = assert_error(post(server, path, raw=fill_json(body, world)), 400, code=INVALID_INPUT)
    assert any(where in issue["location"] for issue in error["errors"]), error


@pytest.mark.parametrize(("path", "raw"), [c[1:] for c in DEEPLY_NESTED], ids=[c[0] for c in DEEPLY_NESTED])
def test_deeply_nested_json_is_a_400(server: Server, world: dict[str, Any], path: str, raw: bytes) -> None:
    assert_error(post(server, path, raw=fill(raw, world)), 400, code=INVALID_INPUT)


def test_limits_are_inclusive(server: Server, world: dict[str, Any]) -> None:
    """The edges of the limits above are accepted, so the 400s are about the limit, not the field."""
    api = world["api_id"]
    ok(server, "/v2/keys.createKey", {"apiId": api, "byteLength": 16, "prefix": "p" * 16, "expires": MAX_EXPIRES,
                                      "meta": {f"k{i}": i for i in range(100)}})
    ok(server, "/v2/keys.createKey", {"apiId": api, "byteLength": 255, "prefix": "under_score"})
    assert ok(server, "/v2/keys.verifyKey", {"key": "k" * 512, "tags": ["t" * 512] * 20})["code"] == "NOT_FOUND"
    ok(server, "/v2/ratelimit.limit", {"namespace": unique("edge"), "identifier": "i", "limit": 1, "duration": 1000,
                                       "cost": 0})
    ok(server, "/v2/apis.createApi", {"name": "abc"})


def test_no_bad_request_changes_state(server: Server, world: dict[str, Any]) -> None:
    """Every bad body above, against every writing route it could touch, and the same valid writes
    refused for their Authorization: no key, identity, permission, role or balance changes."""
    before = snapshot(server, world)
    key_id = world["credited"]["keyId"]
    writes = ["/v2/keys.createKey", "/v2/keys.updateKey", "/v2/keys.updateCredits", "/v2/keys.deleteKey",
              "/v2/keys.rerollKey", "/v2/keys.setRoles", "/v2/keys.setPermissions", "/v2/keys.migrateKeys",
              "/v2/identities.createIdentity", "/v2/permissions.createRole", "/v2/keys.verifyKey"]
    for _, path, raw, _ in BAD_BODIES:
        for target in dict.fromkeys([path, *writes]):
            status, _, body = post(server, target, raw=fill(raw, world))
            assert 400 <= status < 500, (target, raw[:80], body[:300])
    for _, path, body, _ in OUT_OF_LIMITS:
        assert post(server, path, raw=fill_json(body, world))[0] == 400
    for _, path, raw in DEEPLY_NESTED:
        assert post(server, path, raw=fill(raw, world))[0] == 400
    # Fields that pass validation, then a reference that does not exist: the whole write is refused.
    refused = [
        ("/v2/keys.createKey", {"apiId": world["api_id"], "externalId": unique("ext"), "permissions": [unique("p")],
                                "credits": {"remaining": 5}, "roles": [unique("missing_role")]}, 404),
        ("/v2/keys.createKey", {"apiId": "api_doesnotexist", "externalId": unique("ext")}, 404),
        ("/v2/keys.updateKey", {"keyId": key_id, "externalId": unique("ext"), "permissions": [unique("p")],
                                "name": "renamed", "roles": [unique("missing_role")]}, 404),
        ("/v2/keys.setRoles", {"keyId": key_id, "roles": [world["role"], unique("missing_role")]}, 404),
        ("/v2/keys.updateKey", {"keyId": key_id, "credits": {"remaining": 7}, "roles": [unique("missing_role")]},
         404),
        ("/v2/keys.updateKey", {"keyId": key_id, "credits": None, "roles": [unique("missing_role")]}, 404),
        ("/v2/keys.updateCredits", {"keyId": key_id, "operation": "frobnicate", "value": 1}, 400),
        ("/v2/keys.updateKey", {"keyId": key_id, "credits": {"remaining": 1,
                                                             "refill": {"interval": "weekly", "amount": 1}}}, 400),
        ("/v2/keys.updateKey", {"keyId": key_id, "credits": {"remaining": 1,
                                                             "refill": {"interval": "monthly", "amount": 1}}}, 400),
        ("/v2/keys.verifyKey", {"key": world["credited"]["key"], "credits": {"cost": 1},
                                "ratelimits": [{"name": "not_on_this_key"}]}, 412),
        ("/v2/keys.verifyKey", {"key": world["credited"]["key"], "credits": {"cost": 1},
                                "permissions": "docs.read AND ("}, 400),
        ("/v2/keys.migrateKeys", {"migrationId": "mig1", "apiId": world["api_id"],
                                  "keys": [{"hash": sha256_b64(unique("p"))}, {"hash": "not-base64"}]},
         400),
        ("/v2/identities.createIdentity", {"externalId": world["external_id"]}, 409),
        ("/v2/permissions.createRole", {"name": world["role"], "permissions": [unique("p")]}, 409),
    ]
    for path, body, status in refused:
        answer = post(server, path, body)
        assert answer[0] == status, (path, answer[2][:300])
    valid_create = {"apiId": world["api_id"], "name": "never", "externalId": unique("ext"),
                    "permissions": [unique("p")], "credits": {"remaining": 1}}
    normal_key = world["plain"]["key"]
    for auth, headers in [(None, {}), (None, {"authorization": "InvalidFormat"}), (None, {"authorization": "Bearer "}),
                          ("unkey_root_" + "x" * 40, {}), (normal_key, {})]:
        assert post(server, "/v2/keys.createKey", valid_create, auth=auth, headers=headers)[0] in (400, 401)
        assert post(server, "/v2/keys.verifyKey", {"key": world["credited"]["key"], "credits": {"cost": 3}},
                    auth=auth, headers=headers)[0] in (400, 401)
        assert post(server, "/v2/keys.deleteKey", {"keyId": key_id}, auth=auth, headers=headers)[0] in (400, 401)
    for chunked in (False, True):
        body = json.dumps({"apiId": world["api_id"], "name": "big", "meta": {"pad": "x" * MiB}}).encode()
        headers = {"authorization": f"Bearer {server.root_key}", "content-type": JSON}
        status = send_body(server, "/v2/keys.createKey", iter([body]) if chunked else body, headers,
                           chunked=chunked)[0]
        assert status == 413
    assert snapshot(server, world) == before


# -- size ---------------------------------------------------------------------------------------------


def _pieces(prefix: bytes, total: int, piece: int = 64 * 1024) -> Iterator[bytes]:
    yield prefix
    sent = len(prefix)
    while sent < total:
        n = min(piece, total - sent)
        sent += n
        yield b"x" * n


@pytest.mark.parametrize("size", [MiB + 1, 4 * MiB, 64 * MiB], ids=["1MiB+1", "4MiB", "64MiB"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_1_mib_is_a_413(server: Server, framing: str, size: int) -> None:
    headers = {"authorization": f"Bearer {server.root_key}", "content-type": JSON}
    if framing == "chunked":
        answer = send_body(server, "/v2/keys.verifyKey", _pieces(b'{"key": "', size), headers, chunked=True)
    else:
        answer = send_body(server, "/v2/keys.verifyKey", b"".join(_pieces(b'{"key": "', size)), headers,
                           chunked=False)
    assert_error(answer, 413, code="unkey/application/request_too_large")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_of_exactly_1_mib_is_read(server: Server, framing: str) -> None:
    """The limit is on the body, not one byte under it: 1 MiB is decoded (and found too long a key)."""
    body = b'{"key": "' + b"x" * (MiB - 11) + b'"}'
    assert len(body) == MiB
    headers = {"authorization": f"Bearer {server.root_key}", "content-type": JSON}
    chunked = framing == "chunked"
    answer = send_body(server, "/v2/keys.verifyKey", iter([body[:MiB // 2], body[MiB // 2:]]) if chunked else body,
                       headers, chunked=chunked)
    error = assert_error(answer, 400, code=INVALID_INPUT)
    assert any("key" in issue["location"] for issue in error["errors"])


def test_413_comes_before_authentication(server: Server) -> None:
    answer = send_body(server, "/v2/keys.createKey", b"{" + b" " * MiB + b"}", {"content-type": JSON}, chunked=False)
    assert_error(answer, 413)


# -- methods and paths ----------------------------------------------------------------------------------

WRONG_METHODS = [
    ("GET", "/v2/keys.createKey", "POST"),
    ("GET", "/v2/keys.verifyKey", "POST"),
    ("PUT", "/v2/keys.updateKey", "POST"),
    ("DELETE", "/v2/keys.deleteKey", "POST"),
    ("PATCH", "/v2/apis.createApi", "POST"),
    ("OPTIONS", "/v2/ratelimit.limit", "POST"),
    ("POST", "/v2/liveness", "GET"),
    ("PUT", "/v2/liveness", "GET"),
    ("POST", "/openapi.json", "GET"),
]


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS,
                         ids=[f"{m} {p}" for m, p, _ in WRONG_METHODS])
@pytest.mark.parametrize("auth", ["root", None], ids=["root", "no-auth"])
def test_wrong_method_is_a_405(server: Server, method: str, path: str, allowed: str, auth: str | None) -> None:
    answer = server.request(method, path, {} if method != "GET" else None, auth=auth)
    assert_error(answer, 405, code="unkey/application/method_not_allowed")
    assert answer[1]["allow"] == allowed


def test_head_is_a_405_without_a_body(server: Server) -> None:
    status, headers, body = server.request("HEAD", "/v2/liveness", auth=None)
    assert (status, headers["allow"], body) == (405, "GET", b"")


UNKNOWN_PATHS = ["/v2/keys.nope", "/v2/", "/nope", "/", "/v2", "/v2/keys.createKey/", "/v2/keys.createkey",
                 "/V2/keys.createKey", "/v1/keys.verifyKey", "//v2/keys.verifyKey", "/v2/analytics.getGatewayRequests",
                 "/v2/rootKeys.createKey", "/v2/workspace.getLimits", "/v3/deployments.createDeployment",
                 "/v2/liveness/", "/openapi.yaml"]


@pytest.mark.parametrize("path", UNKNOWN_PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_path_is_a_404_in_the_envelope(server: Server, path: str, method: str) -> None:
    for auth in ("root", None):
        assert_error(server.request(method, path, {} if method == "POST" else None, auth=auth), 404,
                     code="unkey/data/route_not_found")


def test_query_string_does_not_change_the_route(server: Server) -> None:
    assert data_of(server.request("GET", "/v2/liveness?x=1", auth=None))["message"]
    assert_error(post(server, "/v2/keys.verifyKey?key=abc", {}), 400, code=INVALID_INPUT)


# -- content negotiation ---------------------------------------------------------------------------------

ACCEPTS = [
    ("application/problem+json", PROBLEM),
    ("*/*", PROBLEM),
    ("application/*", PROBLEM),
    ("application/json, application/problem+json;q=0.9", PROBLEM),
    ("application/json", JSON),
    ("text/html", JSON),
    (None, JSON),
]

ERROR_REQUESTS = {
    400: lambda s, h: s.request("POST", "/v2/keys.verifyKey", raw=b"{bad", headers=h),
    "400-auth": lambda s, h: s.request("POST", "/v2/keys.verifyKey", {"key": "a"}, auth=None, headers=h),
    401: lambda s, h: s.request("POST", "/v2/keys.verifyKey", {"key": "a"}, auth="unkey_root_nope", headers=h),
    404: lambda s, h: s.request("POST", "/v2/keys.getKey", {"keyId": "key_doesnotexist"}, headers=h),
    "404-route": lambda s, h: s.request("GET", "/nope", headers=h),
    405: lambda s, h: s.request("GET", "/v2/keys.verifyKey", headers=h),
    413: lambda s, h: send_body(s, "/v2/keys.verifyKey", b" " * (MiB + 1),
                                {"content-type": JSON, "authorization": f"Bearer {s.root_key}", **h}, chunked=False),
}


@pytest.mark.parametrize(("accept", "content_type"), ACCEPTS, ids=[str(a) for a, _ in ACCEPTS])
@pytest.mark.parametrize("kind", list(ERROR_REQUESTS), ids=str)
def test_error_content_type_follows_accept(server: Server, kind: Any, accept: str | None, content_type: str) -> None:
    headers = {"accept": accept} if accept else {}
    status = int(str(kind)[:3])
    assert_error(ERROR_REQUESTS[kind](server, headers), status, content_type=content_type,
                 issues=kind != "400-auth")


@pytest.mark.parametrize("accept", ["application/problem+json", "*/*", "application/json"])
def test_success_is_json_whatever_accept_says(server: Server, accept: str) -> None:
    answer = post(server, "/v2/keys.verifyKey", {"key": "nope"}, headers={"accept": accept})
    assert data_of(answer) == {"valid": False, "code": "NOT_FOUND"}
    assert set(json.loads(answer[2])) == {"meta", "data"}


# -- authentication and authorization ------------------------------------------------------------------


@pytest.fixture(scope="module")
def narrow_root_key(server: Server) -> str:
    """A root key that may only read identities."""
    return create_root_key(server.data_dir, "identity.*.read_identity")


AUTH_FAILURES = [
    # (id, auth argument, extra headers, status, code)
    ("no-header", None, {}, 400, AUTH_MISSING),
    ("empty-header", None, {"authorization": ""}, 400, AUTH_MISSING),
    ("invalid-format", None, {"authorization": "InvalidFormat"}, 400, AUTH_MALFORMED),
    ("bearer-empty-token", None, {"authorization": "Bearer "}, 400, AUTH_MALFORMED),
    ("bearer-blank-token", None, {"authorization": "Bearer    "}, 400, AUTH_MALFORMED),
    ("bearer-alone", None, {"authorization": "Bearer"}, 400, AUTH_MALFORMED),
    ("basic-scheme", None, {"authorization": "Basic dXNlcjpwYXNz"}, 400, AUTH_MALFORMED),
    ("token-not-utf8", None, {"authorization": "Bearer \xff\xfe"}, 400, AUTH_MALFORMED),
    ("unknown-key", "unkey_root_doesnotexist", {}, 401, AUTH_UNKNOWN),
    ("unknown-key-long", "k" * 5000, {}, 401, AUTH_UNKNOWN),
    ("root-key-with-suffix", "{root}x", {}, 401, AUTH_UNKNOWN),
    ("normal-key", "{normal}", {}, 401, AUTH_UNKNOWN),
]


@pytest.mark.parametrize(("auth", "headers", "status", "code"), [c[1:] for c in AUTH_FAILURES],
                         ids=[c[0] for c in AUTH_FAILURES])
@pytest.mark.parametrize("route", ["/v2/keys.verifyKey", "/v2/keys.createKey", "/v2/apis.listKeys",
                                   "/v2/ratelimit.limit", "/v2/identities.listIdentities"])
def test_authentication_failures(server: Server, world: dict[str, Any], route: str, auth: str | None,
                                 headers: dict[str, str], status: int, code: str) -> None:
    if auth is not None:
        auth = auth.replace("{root}", server.root_key).replace("{normal}", world["plain"]["key"])
    bodies = {"/v2/keys.verifyKey": {"key": world["credited"]["key"]},
              "/v2/keys.createKey": {"apiId": world["api_id"]},
              "/v2/apis.listKeys": {"apiId": world["api_id"]},
              "/v2/ratelimit.limit": {"namespace": "n_auth", "identifier": "i", "limit": 1, "duration": 1000},
              "/v2/identities.listIdentities": {}}
    assert_error(post(server, route, bodies[route], auth=auth, headers=headers), status, code=code, issues=False)


def test_authentication_comes_before_the_body(server: Server) -> None:
    """A bad body without a root key is answered for the missing key; with an unknown one, 401."""
    assert_error(post(server, "/v2/keys.createKey", raw=b"{bad", auth=None), 400, code=AUTH_MISSING, issues=False)
    assert_error(post(server, "/v2/keys.createKey", raw=b"{bad", auth="unkey_root_nope"), 401, code=AUTH_UNKNOWN)


MANAGEMENT = [
    ("/v2/keys.createKey", {"apiId": "{api}"}),
    ("/v2/keys.getKey", {"keyId": "{keyId}"}),
    ("/v2/keys.updateKey", {"keyId": "{keyId}", "name": "hacked"}),
    ("/v2/keys.deleteKey", {"keyId": "{keyId}"}),
    ("/v2/keys.updateCredits", {"keyId": "{keyId}", "operation": "set", "value": 0}),
    ("/v2/keys.whoami", {"key": "{key}"}),
    ("/v2/apis.createApi", {"name": "forbidden-api"}),
    ("/v2/apis.getApi", {"apiId": "{api}"}),
    ("/v2/apis.listKeys", {"apiId": "{api}"}),
    ("/v2/apis.deleteApi", {"apiId": "{api}"}),
    ("/v2/permissions.createRole", {"name": "forbidden_role"}),
    ("/v2/identities.createIdentity", {"externalId": "forbidden_ext"}),
]


@pytest.mark.parametrize(("path", "body"), MANAGEMENT, ids=[p for p, _ in MANAGEMENT])
def test_missing_permission_is_a_403_on_management_routes(server: Server, world: dict[str, Any],
                                                          narrow_root_key: str, path: str, body: Any) -> None:
    before = snapshot(server, world)
    answer = post(server, path, raw=fill_json(body, world), auth=narrow_root_key)
    assert_error(answer, 403, code=FORBIDDEN)
    assert snapshot(server, world) == before


def test_missing_permission_is_not_found_on_verify(server: Server, world: dict[str, Any],
                                                   narrow_root_key: str) -> None:
    credited = world["credited"]
    before = ok(server, "/v2/keys.getKey", {"keyId": credited["keyId"]})["credits"]["remaining"]
    answer = post(server, "/v2/keys.verifyKey", {"key": credited["key"], "credits": {"cost": 2}}, auth=narrow_root_key)
    assert data_of(answer) == {"valid": False, "code": "NOT_FOUND"}
    assert ok(server, "/v2/keys.getKey", {"keyId": credited["keyId"]})["credits"]["remaining"] == before
    # ...while the same key, verified with the all-permission root key, is there.
    assert ok(server, "/v2/keys.verifyKey", {"key": credited["key"], "credits": {"cost": 0}})["code"] == "VALID"


# -- liveness and the OpenAPI document ------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": "InvalidFormat"}, {"authorization": "Bearer nope"}],
                         ids=["none", "malformed", "unknown"])
def test_liveness_needs_no_auth(server: Server, headers: dict[str, str]) -> None:
    answer = server.request("GET", "/v2/liveness", auth=None, headers=headers)
    assert data_of(answer) == {"message": "OK"}
    assert set(json.loads(answer[2])) == {"meta", "data"}


CONTRACT_PATHS = {f"/v2/{op}" for op in [
    *(f"keys.{o}" for o in ["addPermissions", "addRoles", "createKey", "deleteKey", "getKey", "migrateKeys",
                            "removePermissions", "removeRoles", "rerollKey", "setPermissions", "setRoles",
                            "updateCredits", "updateKey", "verifyKey", "whoami"]),
    *(f"apis.{o}" for o in ["createApi", "deleteApi", "getApi", "listKeys"]),
    *(f"ratelimit.{o}" for o in ["limit", "multiLimit", "setOverride", "getOverride", "listOverrides",
                                 "deleteOverride"]),
    *(f"identities.{o}" for o in ["createIdentity", "getIdentity", "updateIdentity", "deleteIdentity",
                                  "listIdentities"]),
    *(f"permissions.{o}" for o in ["createPermission", "getPermission", "listPermissions", "deletePermission",
                                   "updatePermission", "createRole", "getRole", "listRoles", "deleteRole",
                                   "updateRole", "setRolePermissions"]),
    "analytics.getVerifications", "analytics.getRatelimits",
    "liveness",
]}


@pytest.fixture(scope="module")
def openapi(server: Server) -> dict[str, Any]:
    status, headers, body = server.request("GET", "/openapi.json", auth=None)
    assert status == 200
    assert headers["content-type"] == JSON
    return json.loads(body)


def test_openapi_document_needs_no_auth_and_lists_the_api(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"] == "3.1.0"
    paths = openapi["paths"]
    assert {p for p in paths if p.startswith("/v2/")} == CONTRACT_PATHS
    assert set(paths["/v2/keys.verifyKey"]) == {"post"}
    assert set(paths["/v2/liveness"]) == {"get"}
    verify = paths["/v2/keys.verifyKey"]["post"]
    assert verify["security"] == [{"rootKey": []}]
    assert "security" not in paths["/v2/liveness"]["get"]
    assert {"400", "401", "403", "413"} <= set(verify["responses"])
    schemas = openapi["components"]["schemas"]
    ref = verify["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = schemas[ref.rsplit("/", 1)[-1]]
    assert request["required"] == ["key"]
    assert request["properties"]["key"]["maxLength"] == 512


def test_every_documented_path_answers_its_method(server: Server, openapi: dict[str, Any]) -> None:
    """Every path of the document answers its declared method (with `{}`, so nothing is written),
    and no other method."""
    for path, operations in openapi["paths"].items():
        for method in operations:
            status, _, body = server.request(method.upper(), path, {} if method == "post" else None)
            assert status not in (404, 405) and status < 500, (method, path, body[:300])
            other = "GET" if method == "post" else "POST"
            assert server.request(other, path, {} if other == "POST" else None)[0] == 405, path


def _resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _branches(openapi: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null alternatives of a property's schema, references resolved."""
    return [_resolve(openapi, s) for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]


WRONG_VALUES = [("string", "wrong"), ("integer", 12345), ("boolean", True), ("array", [1]), ("object", {"a": 1})]


def bad_values(openapi: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """For one property: a value of a type it does not take, and values just past each limit it declares."""
    branches = _branches(openapi, schema)
    types = {b.get("type", "any") for b in branches}
    if "any" in types:
        return
    yield next((f"wrong-type-{t}", v) for t, v in WRONG_VALUES if t not in types)
    for b in branches:
        if "maxLength" in b:
            yield "maxLength+1", "a" * (b["maxLength"] + 1)
        if b.get("minLength", 0) > 0:
            yield "minLength-1", "a" * (b["minLength"] - 1)
        if "maximum" in b:
            yield "maximum+1", b["maximum"] + 1
        if "minimum" in b:
            yield "minimum-1", b["minimum"] - 1
        if "maxItems" in b:
            yield "maxItems+1", ["a"] * (b["maxItems"] + 1)
        if "maxProperties" in b:
            yield "maxProperties+1", {f"k{i}": i for i in range(b["maxProperties"] + 1)}


@pytest.mark.parametrize("path", sorted(CONTRACT_PATHS - {"/v2/liveness"}))
def test_every_documented_field_is_validated(server: Server, world: dict[str, Any], openapi: dict[str, Any],
                                             path: str) -> None:
    """Generated from the server's own /openapi.json: for every property of every request body, a value
    of the wrong type and values just past each declared limit are a 400 naming the property, and so
    are an unknown property, `null` and the wrong top-level type. The document and the validation agree."""
    schema = _resolve(openapi, openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    is_list = schema.get("type") == "array"
    item = _resolve(openapi, schema["items"]) if is_list else schema
    before = snapshot(server, world)
    checked = 0
    for name, prop in item["properties"].items():
        for case, value in bad_values(openapi, prop):
            body = [{name: value}] if is_list else {name: value}
            error = assert_error(post(server, path, body), 400, code=INVALID_INPUT)
            assert any(name in issue["location"] for issue in error["errors"]), (path, name, case, error)
            checked += 1
    assert checked >= len(item["properties"]) or not item["properties"]
    for body in ([{"notAField": 1}] if is_list else {"notAField": 1}, None, {} if is_list else []):
        assert_error(post(server, path, raw=json.dumps(body).encode()), 400, code=INVALID_INPUT)
    assert snapshot(server, world) == before


# -- below the app: HTTP framing ------------------------------------------------------------------------


def test_broken_chunk_framing_is_a_400_in_the_envelope(server: Server) -> None:
    request = (b"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + server.root_key.encode() +
               b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    assert_error(parse_raw(raw_exchange(server, request)), 400, issues=False)


def test_broken_chunk_framing_names_the_body(server: Server) -> None:
    request = (b"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\nAuthorization: Bearer " + server.root_key.encode() +
               b"\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    assert_error(parse_raw(raw_exchange(server, request)), 400, issues=True)


FRAMING = [
    ("content-length-abc", b"Content-Length: abc\r\n\r\n{}"),
    ("content-length-negative", b"Content-Length: -1\r\n\r\n{}"),
    ("content-length-overflow", b"Content-Length: 99999999999999999999999\r\n\r\n{}"),
]


@pytest.mark.parametrize("tail", [t for _, t in FRAMING], ids=[i for i, _ in FRAMING])
@pytest.mark.xfail(strict=True, reason=(
    "Known limitation, below the app: Granian answers a request with an unparsable Content-Length with a bare "
    "'400 Bad Request', content-length 0 and no content type, so the rule 'no answer outside the "
    "envelope' does not hold for HTTP framing errors. Expected: the 400 error envelope "
    "(unkey/application/invalid_input), e.g. from a front that parses framing itself."))
def test_unparsable_content_length_is_answered_in_the_envelope(server: Server, tail: bytes) -> None:
    request = (b"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
               + server.root_key.encode() + b"\r\n" + tail)
    assert_error(parse_raw(raw_exchange(server, request)), 400)


def test_unparsable_content_length_is_refused_not_crashed(server: Server) -> None:
    """What does hold today: framing errors are a 400 and the server keeps answering."""
    for _, tail in FRAMING:
        request = b"POST /v2/keys.verifyKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + tail
        assert parse_raw(raw_exchange(server, request))[0] == 400
    assert data_of(server.request("GET", "/v2/liveness", auth=None))


# -- valid-looking requests the store cannot take ------------------------------------------------------

# Bodies inside the contract's limits that reached the store and came back as a 503 (an LMDB key
# over 511 bytes, MDB_BAD_VALSIZE). The SDK retries every 5xx for 10 s before it gives up.
LONG_NAMES = [
    ("namespace-512", "/v2/ratelimit.limit",
     lambda: {"namespace": "n" * 512, "identifier": "i", "limit": 1, "duration": 1000}),
    ("namespace-256-two-byte-chars", "/v2/ratelimit.limit",
     lambda: {"namespace": "é" * 256, "identifier": "i", "limit": 1, "duration": 1000}),
    ("override-identifier-490", "/v2/ratelimit.setOverride",
     lambda: {"namespace": "{ns}", "identifier": "i" * 490, "limit": 1, "duration": 1000}),
    ("role-name-512", "/v2/permissions.createRole", lambda: {"name": "r" * 512}),
]


@pytest.fixture(scope="module")
def namespace(server: Server) -> str:
    name = unique("ns_long")
    ok(server, "/v2/ratelimit.limit", {"namespace": name, "identifier": "i", "limit": 1, "duration": 1000})
    return name


@pytest.mark.parametrize(("path", "make"), [c[1:] for c in LONG_NAMES], ids=[c[0] for c in LONG_NAMES])
def test_long_names_within_the_limits_are_stored(server: Server, namespace: str, path: str, make: Any) -> None:
    body = json.loads(json.dumps(make()).replace("{ns}", namespace))
    data_of(post(server, path, body))


def test_long_names_round_trip(server: Server) -> None:
    """Names past LMDB's key size are stored under a hash, yet found by their full text."""
    namespace = unique("n") + "n" * 480
    body = {"namespace": namespace, "identifier": "é" * 300, "limit": 2, "duration": 60_000}
    assert [data_of(post(server, "/v2/ratelimit.limit", body))["remaining"] for _ in range(3)] == [1, 0, 0]
    identifier = "i" * 500
    override = {"namespace": namespace, "identifier": identifier, "limit": 7, "duration": 60_000}
    override_id = data_of(post(server, "/v2/ratelimit.setOverride", override))["overrideId"]
    got = data_of(post(server, "/v2/ratelimit.getOverride", {"namespace": namespace, "identifier": identifier}))
    assert (got["overrideId"], got["identifier"]) == (override_id, identifier)
    name = unique("r") + "r" * 490
    role_id = data_of(post(server, "/v2/permissions.createRole", {"name": name}))["roleId"]
    assert data_of(post(server, "/v2/permissions.getRole", {"role": name}))["id"] == role_id
    assert post(server, "/v2/permissions.createRole", {"name": name})[0] == 409


def sha256_b64(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@pytest.mark.parametrize("where", ["earlier-request", "same-request"])
def test_migrating_a_stored_hash_is_reported_failed(server: Server, world: dict[str, Any], where: str) -> None:
    """A hash already stored, or given twice, is reported in data.failed, not a 5xx (which the SDK
    would retry) - found as a 503 'a key with this hash exists already' while writing this file."""
    plaintext = unique("plaintext")
    digest = sha256_b64(plaintext)
    body = {"migrationId": "mig_dup", "apiId": world["api_id"], "keys": [{"hash": digest, "name": "first"}]}
    if where == "earlier-request":
        key_id = ok(server, "/v2/keys.migrateKeys", body)["migrated"][0]["keyId"]
        body["keys"][0]["name"] = "second"
        expected_migrated = 0
    else:
        body["keys"].append({"hash": digest, "name": "second"})
        expected_migrated = 1
    before = snapshot(server, world)
    data = ok(server, "/v2/keys.migrateKeys", body)
    assert (len(data["migrated"]), data["failed"]) == (expected_migrated, [digest])
    if where == "same-request":
        key_id = data["migrated"][0]["keyId"]
    else:
        assert snapshot(server, world) == before
    verified = ok(server, "/v2/keys.verifyKey", {"key": plaintext})
    assert (verified["keyId"], verified["name"]) == (key_id, "first")


@pytest.mark.parametrize("credits", [{"remaining": 999}, None], ids=["set-999", "unlimited"])
def test_refused_update_leaves_credits_alone(server: Server, world: dict[str, Any], credits: Any) -> None:
    """Found while writing this file: updateKey wrote the balance before the rest could still fail."""
    created = ok(server, "/v2/keys.createKey", {"apiId": world["api_id"], "credits": {"remaining": 10}})
    answer = post(server, "/v2/keys.updateKey",
                  {"keyId": created["keyId"], "credits": credits, "roles": [unique("missing_role")]})
    assert_error(answer, 404, code="unkey/data/role_not_found")
    assert ok(server, "/v2/keys.getKey", {"keyId": created["keyId"]})["credits"] == {"remaining": 10}
    verified = ok(server, "/v2/keys.verifyKey", {"key": created["key"]})
    assert (verified["code"], verified["credits"]) == ("VALID", 9)

"""End to end with Unkey's official Python SDK (`unkey-py`) against a real `keysvc serve`.

Every operation keysvc serves that the SDK offers is called through the SDK, unchanged, with only
`server_url` pointed at the session's server (tests/conftest.py: `server`). The SDK validates every
response against its pydantic models, so each call here also checks the wire shape (envelope,
required fields, content types) — a missing required field raises ResponseValidationError.

Retries are off, so a server error fails at once instead of after the SDK's 10 s backoff.
Tests share the server: each makes its own APIs, keys, identities, permissions, roles and
namespaces with unique names, so they are independent of each other and of their order.
Rate limits use a 30-day window, so a window boundary during a test is practically impossible.
"""
from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from unkey.py import Unkey, errors
from unkey.py.utils import BackoffStrategy, RetryConfig

from keysvc.keys import unkey_hash

LONG = 2_592_000_000  # 30 days, the longest window the API takes
HOUR = 3_600_000
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), False)


def uid() -> str:
    return uuid.uuid4().hex[:12]


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture(scope="module")
def unkey(server: Any) -> Iterator[Unkey]:
    with Unkey(root_key=server.root_key, server_url=server.url, retry_config=NO_RETRIES) as client:
        yield client


@pytest.fixture
def api_id(unkey: Unkey) -> str:
    return unkey.apis.create_api(name=f"sdk-test-{uid()}").data.api_id


def new_key(unkey: Unkey, api_id: str, **kwargs: Any) -> tuple[str, str]:
    """(key id, plaintext)."""
    data = unkey.keys.create_key(api_id=api_id, **kwargs).data
    return data.key_id, data.key


def verify(unkey: Unkey, key: str, **kwargs: Any) -> Any:
    return unkey.keys.verify_key(key=key, **kwargs).data


def error_json(exc: errors.UnkeyError) -> dict[str, Any]:
    return json.loads(exc.body)


# -- apis -----------------------------------------------------------------------------------------


def test_create_get_delete_api(unkey: Unkey) -> None:
    name = f"payments-{uid()}"
    created = unkey.apis.create_api(name=name)
    assert created.meta.request_id.startswith("req_")
    api_id = created.data.api_id
    assert api_id.startswith("api_")

    got = unkey.apis.get_api(api_id=api_id).data
    assert (got.id, got.name) == (api_id, name)

    _, key = new_key(unkey, api_id)
    assert verify(unkey, key).code == "VALID"

    assert unkey.apis.delete_api(api_id=api_id).meta.request_id.startswith("req_")
    with pytest.raises(errors.NotFoundErrorResponse) as raised:
        unkey.apis.get_api(api_id=api_id)
    assert raised.value.status_code == 404
    assert raised.value.data.error.status == 404
    # The deleted API's keys no longer verify, and it takes no new keys.
    assert verify(unkey, key).code == "NOT_FOUND"
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.create_key(api_id=api_id)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.whoami(key=key)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.apis.list_keys(api_id=api_id)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.apis.delete_api(api_id=api_id)


def test_list_keys_pages_show_every_live_key_exactly_once(unkey: Unkey, api_id: str) -> None:
    created = {new_key(unkey, api_id, name=f"k{i}")[0] for i in range(7)}
    deleted, _ = new_key(unkey, api_id, name="gone")
    unkey.keys.delete_key(key_id=deleted)

    page = unkey.apis.list_keys(api_id=api_id, limit=3)
    sizes, more, seen = [], [], []
    while page is not None:
        sizes.append(len(page.result.data))
        more.append(page.result.pagination.has_more)
        seen += [key.key_id for key in page.result.data]
        if page.result.pagination.has_more:
            assert page.result.pagination.cursor
        page = page.next()

    assert sizes == [3, 3, 1]
    assert more == [True, True, False]
    assert Counter(seen) == Counter(created)  # each live key exactly once; the deleted one never
    assert deleted not in seen

    # One page with everything.
    everything = unkey.apis.list_keys(api_id=api_id).result
    assert {key.key_id for key in everything.data} == created
    assert everything.pagination.has_more is False
    assert {key.name for key in everything.data} == {f"k{i}" for i in range(7)}


def test_list_keys_filtered_by_external_id(unkey: Unkey, api_id: str) -> None:
    external_id = f"owner_{uid()}"
    mine = {new_key(unkey, api_id, external_id=external_id)[0] for _ in range(2)}
    new_key(unkey, api_id)
    new_key(unkey, api_id, external_id=f"other_{uid()}")
    listed = unkey.apis.list_keys(api_id=api_id, external_id=external_id).result
    assert {key.key_id for key in listed.data} == mine
    assert all(key.identity.external_id == external_id for key in listed.data)


# -- keys: create, read ----------------------------------------------------------------------------


def test_create_key_with_every_option_then_get_whoami_and_verify(unkey: Unkey, api_id: str) -> None:
    u = uid()
    role = f"reader_{u}"
    unkey.permissions.create_role(name=role, permissions=[f"docs.read.{u}"])
    expires = now_ms() + HOUR
    key_id, key = new_key(
        unkey, api_id, prefix="sk", name="acme", meta={"plan": "pro", "seats": 3},
        expires=expires, external_id=f"acme_{u}", roles=[role], permissions=[f"docs.write.{u}"],
        credits={"remaining": 100, "refill": {"interval": "daily", "amount": 100}},
        ratelimits=[{"name": "requests", "limit": 10, "duration": LONG, "auto_apply": True},
                    {"name": "on_demand", "limit": 1, "duration": LONG}],
    )
    assert key_id.startswith("key_")
    assert key.startswith("sk_") and len(key) > len("sk_") + 16

    got = unkey.keys.get_key(key_id=key_id).data
    assert got.key_id == key_id
    assert got.start == key[: len("sk_") + 4]
    assert got.enabled is True
    assert abs(got.created_at - now_ms()) < HOUR
    assert got.name == "acme"
    assert got.meta == {"plan": "pro", "seats": 3}
    assert got.expires == expires
    assert got.roles == [role]
    assert f"docs.write.{u}" in got.permissions
    assert got.credits.remaining == 100
    assert (got.credits.refill.interval, got.credits.refill.amount) == ("daily", 100)
    assert got.identity.external_id == f"acme_{u}"
    assert got.identity.id.startswith("id_")
    limits = {rl.name: rl for rl in got.ratelimits}
    assert set(limits) == {"requests", "on_demand"}
    assert (limits["requests"].limit, limits["requests"].duration, limits["requests"].auto_apply) == (10, LONG, True)
    assert limits["on_demand"].auto_apply is False
    assert got.plaintext is None

    who = unkey.keys.whoami(key=key).data
    assert (who.key_id, who.name, who.start) == (key_id, "acme", got.start)

    result = verify(unkey, key, tags=["path=/v1/docs", "region=eu"])
    assert (result.valid, result.code) == (True, "VALID")
    assert result.key_id == key_id
    assert result.name == "acme"
    assert result.meta == {"plan": "pro", "seats": 3}
    assert result.expires == expires
    assert result.enabled is True
    assert result.credits == 99
    assert result.roles == [role]
    assert {f"docs.read.{u}", f"docs.write.{u}"} <= set(result.permissions)
    assert result.identity.external_id == f"acme_{u}"
    assert result.identity.id == got.identity.id
    # Only the auto-applied limit is checked on a plain verification.
    [checked] = result.ratelimits
    assert (checked.name, checked.id, checked.exceeded, checked.limit, checked.remaining, checked.auto_apply) == (
        "requests", limits["requests"].id, False, 10, 9, True)
    assert checked.reset > now_ms()  # the end of the current window


def test_create_key_defaults(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id)
    assert "_" not in key  # no prefix: just the base58 body
    got = unkey.keys.get_key(key_id=key_id).data
    assert got.start == key[:4]
    assert got.enabled is True
    assert (got.name, got.meta, got.expires, got.credits, got.identity, got.ratelimits) == (None,) * 6
    result = verify(unkey, key)
    assert result.code == "VALID"
    assert result.credits is None  # unlimited keys report no credits

    _, long_key = new_key(unkey, api_id, prefix="big", byte_length=64)
    assert len(long_key) > len("big_") + 80  # 64 bytes are about 87 base58 characters
    assert len(key) < 25  # the default, 16 bytes, about 22


def test_create_key_monthly_refill(unkey: Unkey, api_id: str) -> None:
    key_id, _ = new_key(unkey, api_id, credits={"remaining": 5, "refill": {"interval": "monthly", "amount": 50,
                                                                            "refill_day": 15}})
    refill = unkey.keys.get_key(key_id=key_id).data.credits.refill
    assert (refill.interval, refill.amount, refill.refill_day) == ("monthly", 50, 15)

    with pytest.raises(errors.BadRequestErrorResponse) as raised:
        unkey.keys.create_key(api_id=api_id, credits={"remaining": 5, "refill": {"interval": "monthly", "amount": 5}})
    assert raised.value.status_code == 400
    assert isinstance(raised.value.data.error.errors, list)


def test_create_key_with_unknown_role_is_not_found(unkey: Unkey, api_id: str) -> None:
    with pytest.raises(errors.NotFoundErrorResponse) as raised:
        unkey.keys.create_key(api_id=api_id, roles=[f"no_such_role_{uid()}"])
    assert raised.value.status_code == 404


def test_create_recoverable_key_is_a_precondition_failure(unkey: Unkey, api_id: str) -> None:
    """keysvc runs no vault, so it cannot keep plaintexts: 412, and no key is made."""
    with pytest.raises(errors.UnkeyError) as raised:
        unkey.keys.create_key(api_id=api_id, recoverable=True)
    assert raised.value.status_code == 412  # createKey has no typed 412 branch: a generic APIError
    assert error_json(raised.value)["error"]["status"] == 412
    assert unkey.apis.list_keys(api_id=api_id).result.data == []


def test_create_key_on_unknown_api_is_not_found(unkey: Unkey) -> None:
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.create_key(api_id=f"api_missing{uid()}")


# -- keys: update ----------------------------------------------------------------------------------


def test_update_key_absent_null_and_value(unkey: Unkey, api_id: str) -> None:
    expires = now_ms() + HOUR
    key_id, key = new_key(unkey, api_id, name="orig", meta={"a": 1}, expires=expires, credits={"remaining": 5})

    def get() -> Any:
        return unkey.keys.get_key(key_id=key_id).data

    # A value sets; absent fields stay.
    assert unkey.keys.update_key(key_id=key_id, meta={"b": 2}).meta.request_id.startswith("req_")
    got = get()
    assert (got.name, got.meta, got.expires, got.credits.remaining) == ("orig", {"b": 2}, expires, 5)
    assert got.updated_at is not None

    # null clears, only that field.
    unkey.keys.update_key(key_id=key_id, name=None)
    got = get()
    assert (got.name, got.meta, got.expires) == (None, {"b": 2}, expires)

    unkey.keys.update_key(key_id=key_id, expires=None, meta=None)
    got = get()
    assert (got.name, got.meta, got.expires, got.credits.remaining) == (None, None, None, 5)

    unkey.keys.update_key(key_id=key_id, name="renamed")
    assert get().name == "renamed"
    assert verify(unkey, key).name == "renamed"

    # credits: null makes the key unlimited; an object sets the balance.
    unkey.keys.update_key(key_id=key_id, credits=None)
    assert get().credits is None
    result = verify(unkey, key)
    assert (result.code, result.credits) == ("VALID", None)
    unkey.keys.update_key(key_id=key_id, credits={"remaining": 3})
    assert get().credits.remaining == 3
    assert verify(unkey, key).credits == 2
    unkey.keys.update_key(key_id=key_id, credits={"remaining": 7, "refill": {"interval": "daily", "amount": 7}})
    credits = get().credits
    assert (credits.remaining, credits.refill.interval, credits.refill.amount) == (7, "daily", 7)
    unkey.keys.update_key(key_id=key_id, credits={"refill": None})
    credits = get().credits
    assert (credits.remaining, credits.refill) == (7, None)
    unkey.keys.update_key(key_id=key_id, credits={"remaining": None})  # remaining null: unlimited
    assert get().credits is None
    unkey.keys.update_key(key_id=key_id, credits={"remaining": 4})

    # enabled: takes effect on the very next verification.
    unkey.keys.update_key(key_id=key_id, enabled=False)
    assert get().enabled is False
    assert verify(unkey, key).code == "DISABLED"
    unkey.keys.update_key(key_id=key_id, enabled=True)
    assert verify(unkey, key).code == "VALID"

    # An expiry in the past expires the key at once; null lifts it.
    unkey.keys.update_key(key_id=key_id, expires=now_ms() - HOUR)
    assert verify(unkey, key).code == "EXPIRED"
    unkey.keys.update_key(key_id=key_id, expires=None)
    assert verify(unkey, key).code == "VALID"


def test_update_key_identity_link_and_unlink(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id)
    external_id = f"user_{uid()}"
    unkey.keys.update_key(key_id=key_id, external_id=external_id)  # upserts the identity
    identity = unkey.keys.get_key(key_id=key_id).data.identity
    assert identity.external_id == external_id
    assert unkey.identities.get_identity(identity=external_id).data.id == identity.id
    assert verify(unkey, key).identity.external_id == external_id

    unkey.keys.update_key(key_id=key_id, name="still linked")
    assert unkey.keys.get_key(key_id=key_id).data.identity.external_id == external_id

    unkey.keys.update_key(key_id=key_id, external_id=None)
    assert unkey.keys.get_key(key_id=key_id).data.identity is None
    assert verify(unkey, key).identity is None


def test_update_key_replaces_ratelimits_roles_and_permissions(unkey: Unkey, api_id: str) -> None:
    u = uid()
    role_a, role_b = f"ra_{u}", f"rb_{u}"
    unkey.permissions.create_role(name=role_a)
    unkey.permissions.create_role(name=role_b)
    key_id, key = new_key(
        unkey, api_id, roles=[role_a], permissions=[f"p1.{u}", f"p2.{u}"],
        ratelimits=[{"name": "alpha", "limit": 5, "duration": LONG}, {"name": "beta", "limit": 6, "duration": LONG}],
    )
    before = {rl.name: rl.id for rl in unkey.keys.get_key(key_id=key_id).data.ratelimits}

    unkey.keys.update_key(key_id=key_id, ratelimits=[{"name": "alpha", "limit": 50, "duration": LONG}],
                          roles=[role_b], permissions=[f"p3.{u}"])
    got = unkey.keys.get_key(key_id=key_id).data
    [alpha] = got.ratelimits
    assert (alpha.name, alpha.limit, alpha.id) == ("alpha", 50, before["alpha"])  # upserted by name, id kept
    assert got.roles == [role_b]
    assert got.permissions == [f"p3.{u}"]
    assert verify(unkey, key, permissions=f"p3.{u}").code == "VALID"
    assert verify(unkey, key, permissions=f"p1.{u}").code == "INSUFFICIENT_PERMISSIONS"

    unkey.keys.update_key(key_id=key_id, ratelimits=None, roles=[], permissions=[])
    got = unkey.keys.get_key(key_id=key_id).data
    assert (got.ratelimits, got.roles, got.permissions) == (None, None, None)


def test_failed_update_key_changes_nothing(unkey: Unkey, api_id: str) -> None:
    """An update rejected with 404 (an unknown role) must not apply any of its other fields."""
    key_id, key = new_key(unkey, api_id, name="before", credits={"remaining": 5})
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.update_key(key_id=key_id, name="after", credits={"remaining": 100}, roles=[f"ghost_{uid()}"])
    got = unkey.keys.get_key(key_id=key_id).data
    assert (got.name, got.credits.remaining, got.roles) == ("before", 5, None)
    assert verify(unkey, key).credits == 4


def test_update_key_unknown_is_not_found(unkey: Unkey) -> None:
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.update_key(key_id=f"key_missing{uid()}", name="x")


# -- keys: delete, reroll ---------------------------------------------------------------------------


@pytest.mark.parametrize("permanent", [False, True], ids=["soft", "permanent"])
def test_delete_key(unkey: Unkey, api_id: str, permanent: bool) -> None:
    key_id, key = new_key(unkey, api_id)
    kept_id, kept = new_key(unkey, api_id)
    assert verify(unkey, key).code == "VALID"

    unkey.keys.delete_key(key_id=key_id, permanent=permanent)
    assert verify(unkey, key).code == "NOT_FOUND"
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.get_key(key_id=key_id)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.whoami(key=key)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.delete_key(key_id=key_id)
    assert [k.key_id for k in unkey.apis.list_keys(api_id=api_id).result.data] == [kept_id]
    assert verify(unkey, kept).code == "VALID"


def test_reroll_key_copies_settings_and_keeps_the_old_key_until_its_expiry(unkey: Unkey, api_id: str) -> None:
    u = uid()
    old_id, old = new_key(unkey, api_id, prefix="rr", name="rolled", meta={"m": 1}, credits={"remaining": 10},
                          permissions=[f"perm.{u}"], external_id=f"owner_{u}",
                          ratelimits=[{"name": "requests", "limit": 100, "duration": LONG, "auto_apply": True}])
    assert verify(unkey, old).credits == 9

    before = now_ms()
    rerolled = unkey.keys.reroll_key(key_id=old_id, expiration=HOUR).data
    assert rerolled.key_id != old_id and rerolled.key != old
    assert rerolled.key.startswith("rr_")

    new = verify(unkey, rerolled.key, permissions=f"perm.{u}")
    assert (new.code, new.key_id, new.name, new.meta) == ("VALID", rerolled.key_id, "rolled", {"m": 1})
    assert new.credits == 8  # the balance carried over (9), one spent now
    assert new.identity.external_id == f"owner_{u}"
    assert [rl.name for rl in new.ratelimits] == ["requests"]

    # The old key still verifies until its expiry, now about an hour away (rounded up to a minute).
    assert verify(unkey, old).code == "VALID"
    old_expires = unkey.keys.get_key(key_id=old_id).data.expires
    assert before + HOUR <= old_expires <= now_ms() + HOUR + 60_000
    assert old_expires % 60_000 == 0
    assert unkey.keys.get_key(key_id=rerolled.key_id).data.expires is None


def test_reroll_key_with_zero_expiration_expires_the_old_key(unkey: Unkey, api_id: str) -> None:
    old_id, old = new_key(unkey, api_id, name="now")
    rerolled = unkey.keys.reroll_key(key_id=old_id, expiration=0).data
    time.sleep(0.002)  # expiry is "strictly after": make sure the clock has moved past it
    assert verify(unkey, old).code == "EXPIRED"
    assert verify(unkey, rerolled.key).code == "VALID"


def test_reroll_unknown_key_is_not_found(unkey: Unkey) -> None:
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.reroll_key(key_id=f"key_missing{uid()}", expiration=0)


# -- keys: credits -----------------------------------------------------------------------------------


def test_update_credits_set_increment_decrement_and_unlimited(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id, credits={"remaining": 10, "refill": {"interval": "daily", "amount": 10}})

    data = unkey.keys.update_credits(key_id=key_id, operation="set", value=5).data
    assert data.remaining == 5
    assert (data.refill.interval, data.refill.amount) == ("daily", 10)
    assert verify(unkey, key).credits == 4

    assert unkey.keys.update_credits(key_id=key_id, operation="increment", value=3).data.remaining == 7
    assert unkey.keys.update_credits(key_id=key_id, operation="decrement", value=2).data.remaining == 5
    assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 5
    assert verify(unkey, key).credits == 4

    unkey.keys.update_credits(key_id=key_id, operation="set", value=0)
    result = verify(unkey, key)
    assert (result.valid, result.code, result.credits) == (False, "USAGE_EXCEEDED", 0)

    # set null: unlimited, and the refill goes with it.
    data = unkey.keys.update_credits(key_id=key_id, operation="set", value=None).data
    assert (data.remaining, data.refill) == (None, None)
    assert unkey.keys.get_key(key_id=key_id).data.credits is None
    result = verify(unkey, key)
    assert (result.code, result.credits) == ("VALID", None)

    # increment/decrement need a limited key and a value.
    with pytest.raises(errors.BadRequestErrorResponse) as raised:
        unkey.keys.update_credits(key_id=key_id, operation="increment", value=1)
    assert raised.value.status_code == 400
    with pytest.raises(errors.BadRequestErrorResponse):
        unkey.keys.update_credits(key_id=key_id, operation="decrement")

    # set on an unlimited key makes it limited again.
    assert unkey.keys.update_credits(key_id=key_id, operation="set", value=2).data.remaining == 2
    assert verify(unkey, key).credits == 1


def test_update_credits_reports_monthly_refill(unkey: Unkey, api_id: str) -> None:
    key_id, _ = new_key(unkey, api_id, credits={"remaining": 1, "refill": {"interval": "monthly", "amount": 9,
                                                                            "refill_day": 3}})
    data = unkey.keys.update_credits(key_id=key_id, operation="increment", value=4).data
    assert data.remaining == 5
    assert (data.refill.interval, data.refill.amount, data.refill.refill_day) == ("monthly", 9, 3)


# -- keys: permissions and roles ----------------------------------------------------------------------


def test_add_remove_set_permissions(unkey: Unkey, api_id: str) -> None:
    u = uid()
    p1, p2, p3 = f"a.read.{u}", f"a.write.{u}", f"a.admin.{u}"
    key_id, key = new_key(unkey, api_id)

    added = unkey.keys.add_permissions(key_id=key_id, permissions=[p1, p2]).data
    assert {p.slug for p in added} == {p1, p2}
    assert all(p.id.startswith("perm_") for p in added)
    assert verify(unkey, key, permissions=f"{p1} AND {p2}").code == "VALID"
    # Adding again is idempotent.
    assert sorted(p.slug for p in unkey.keys.add_permissions(key_id=key_id, permissions=[p1]).data) == sorted([p1, p2])

    remaining = unkey.keys.remove_permissions(key_id=key_id, permissions=[p1]).data
    assert [p.slug for p in remaining] == [p2]
    assert verify(unkey, key, permissions=p1).code == "INSUFFICIENT_PERMISSIONS"
    assert verify(unkey, key, permissions=p2).code == "VALID"

    replaced = unkey.keys.set_permissions(key_id=key_id, permissions=[p3]).data
    assert [p.slug for p in replaced] == [p3]
    assert unkey.keys.get_key(key_id=key_id).data.permissions == [p3]
    assert verify(unkey, key, permissions=p2).code == "INSUFFICIENT_PERMISSIONS"
    # Auto-created permissions exist on their own.
    assert unkey.permissions.get_permission(permission=p3).data.slug == p3


def test_add_remove_set_roles(unkey: Unkey, api_id: str) -> None:
    u = uid()
    r1, r2 = f"r1_{u}", f"r2_{u}"
    unkey.permissions.create_role(name=r1, permissions=[f"q1.{u}"])
    unkey.permissions.create_role(name=r2, permissions=[f"q2.{u}"])
    key_id, key = new_key(unkey, api_id)

    roles = unkey.keys.add_roles(key_id=key_id, roles=[r1]).data
    assert [r.name for r in roles] == [r1]
    assert roles[0].id.startswith("role_")
    assert [p.slug for p in roles[0].permissions] == [f"q1.{u}"]
    roles = unkey.keys.add_roles(key_id=key_id, roles=[r2]).data
    assert sorted(r.name for r in roles) == sorted([r1, r2])
    assert verify(unkey, key, permissions=f"q1.{u} AND q2.{u}").code == "VALID"

    assert [r.name for r in unkey.keys.remove_roles(key_id=key_id, roles=[r1]).data] == [r2]
    assert verify(unkey, key, permissions=f"q1.{u}").code == "INSUFFICIENT_PERMISSIONS"

    assert [r.name for r in unkey.keys.set_roles(key_id=key_id, roles=[r1]).data] == [r1]
    assert unkey.keys.get_key(key_id=key_id).data.roles == [r1]
    assert verify(unkey, key, permissions=f"q1.{u}").code == "VALID"
    assert verify(unkey, key, permissions=f"q2.{u}").code == "INSUFFICIENT_PERMISSIONS"

    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.keys.add_roles(key_id=key_id, roles=[f"ghost_{u}"])
    assert unkey.keys.get_key(key_id=key_id).data.roles == [r1]  # unchanged by the failed call


# -- keys: migrate ----------------------------------------------------------------------------------


def test_migrate_keys_with_unkey_hashes(unkey: Unkey, api_id: str) -> None:
    u = uid()
    plaintexts = [f"legacy_{uuid.uuid4().hex}" for _ in range(2)]
    hashes = [unkey_hash(p) for p in plaintexts]
    migrated = unkey.keys.migrate_keys(
        migration_id=f"mig_{u}", api_id=api_id,
        keys=[{"hash": hashes[0], "name": "imported", "meta": {"from": "unkey"}, "credits": {"remaining": 3},
               "permissions": [f"legacy.{u}"], "external_id": f"legacy_{u}"},
              {"hash": hashes[1], "enabled": False}],
    ).data
    assert migrated.failed == []
    assert [m.hash for m in migrated.migrated] == hashes
    first_id = migrated.migrated[0].key_id
    assert first_id.startswith("key_")

    result = verify(unkey, plaintexts[0], permissions=f"legacy.{u}")
    assert (result.valid, result.code, result.key_id) == (True, "VALID", first_id)
    assert (result.name, result.meta, result.credits) == ("imported", {"from": "unkey"}, 2)
    assert result.identity.external_id == f"legacy_{u}"
    assert unkey.keys.whoami(key=plaintexts[0]).data.key_id == first_id
    assert unkey.keys.get_key(key_id=first_id).data.credits.remaining == 2

    assert verify(unkey, plaintexts[1]).code == "DISABLED"
    assert verify(unkey, plaintexts[0] + "x").code == "NOT_FOUND"


def test_migrate_keys_lists_existing_hashes_as_failed(unkey: Unkey, api_id: str) -> None:
    """The SDK documents migrateKeys as "HTTP 200 even on partial success; hashes that could not be
    migrated are listed under data.failed" (e.g. a hash that exists already)."""
    u = uid()
    old, new = f"legacy_{uuid.uuid4().hex}", f"legacy_{uuid.uuid4().hex}"
    first = unkey.keys.migrate_keys(migration_id=f"mig_{u}", api_id=api_id, keys=[{"hash": unkey_hash(old)}]).data
    [existing] = first.migrated

    again = unkey.keys.migrate_keys(migration_id=f"mig_{u}", api_id=api_id,
                                    keys=[{"hash": unkey_hash(old)}, {"hash": unkey_hash(new), "name": "fresh"}]).data
    assert again.failed == [unkey_hash(old)]
    [migrated] = again.migrated
    assert migrated.hash == unkey_hash(new)
    assert verify(unkey, new).key_id == migrated.key_id
    assert verify(unkey, old).key_id == existing.key_id  # the existing key is untouched
    assert {k.key_id for k in unkey.apis.list_keys(api_id=api_id).result.data} == {existing.key_id, migrated.key_id}


# -- verifyKey outcomes -------------------------------------------------------------------------------


def test_verify_unknown_key_is_not_found(unkey: Unkey) -> None:
    response = unkey.keys.verify_key(key=f"sk_nonexistent{uid()}")
    assert response.meta.request_id.startswith("req_")
    data = response.data
    assert (data.valid, data.code) == (False, "NOT_FOUND")
    assert (data.key_id, data.credits, data.name) == (None, None, None)


def test_verify_disabled_and_expired_spend_no_credits(unkey: Unkey, api_id: str) -> None:
    disabled_id, disabled = new_key(unkey, api_id, enabled=False, credits={"remaining": 5})
    result = verify(unkey, disabled)
    assert (result.valid, result.code, result.key_id, result.enabled) == (False, "DISABLED", disabled_id, False)

    expired_id, expired = new_key(unkey, api_id, expires=now_ms() - 60_000, credits={"remaining": 5})
    result = verify(unkey, expired)
    assert (result.valid, result.code, result.key_id) == (False, "EXPIRED", expired_id)

    # DISABLED is checked before EXPIRED.
    _, both = new_key(unkey, api_id, enabled=False, expires=now_ms() - 60_000)
    assert verify(unkey, both).code == "DISABLED"

    for key_id in (disabled_id, expired_id):
        assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 5


def test_verify_permission_queries(unkey: Unkey, api_id: str) -> None:
    u = uid()
    read, write, admin = f"docs.read.{u}", f"docs.write.{u}", f"docs.admin.{u}"
    role = f"admins_{u}"
    unkey.permissions.create_role(name=role, permissions=[admin])
    _, key = new_key(unkey, api_id, permissions=[read, write], roles=[role])
    missing = f"billing.read.{u}"

    cases = {
        read: "VALID",
        admin: "VALID",  # through the role
        missing: "INSUFFICIENT_PERMISSIONS",
        f"{read} AND {write}": "VALID",
        f"{read} AND {missing}": "INSUFFICIENT_PERMISSIONS",
        f"{missing} OR {write}": "VALID",
        f"{missing} or {write}": "VALID",  # operators are case-insensitive
        f"{missing} OR billing.write.{u}": "INSUFFICIENT_PERMISSIONS",
        f"({missing} OR {read}) AND ({admin} OR billing.write.{u})": "VALID",
        f"{missing} AND ({read} OR {write})": "INSUFFICIENT_PERMISSIONS",
        f"{missing} AND {read} OR {write}": "VALID",  # AND binds tighter than OR
        f"{missing} AND ({read} OR {write} AND {admin})": "INSUFFICIENT_PERMISSIONS",
        "docs.*": "INSUFFICIENT_PERMISSIONS",  # `*` is literal
    }
    outcomes = {query: verify(unkey, key, permissions=query).code for query in cases}
    assert outcomes == cases

    for bad in (f"{read} AND", f"({read}", f"{read})", "()", f"{read} {write}", f"{read} & {write}"):
        with pytest.raises(errors.BadRequestErrorResponse) as raised:
            unkey.keys.verify_key(key=key, permissions=bad)
        assert raised.value.status_code == 400, bad
        error = raised.value.data.error
        assert error.status == 400
        assert error.type.endswith("permissions_query_syntax_error"), (bad, error.type)
        assert isinstance(error.errors, list)


def test_verify_key_ratelimit_auto_applied(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id, credits={"remaining": 10},
                          ratelimits=[{"name": "requests", "limit": 2, "duration": LONG, "auto_apply": True}])
    first, second, third = (verify(unkey, key) for _ in range(3))
    assert [r.code for r in (first, second, third)] == ["VALID", "VALID", "RATE_LIMITED"]
    assert [r.ratelimits[0].remaining for r in (first, second, third)] == [1, 0, 0]
    assert [r.ratelimits[0].exceeded for r in (first, second, third)] == [False, False, True]
    assert third.valid is False
    assert third.ratelimits[0].name == "requests"
    assert third.ratelimits[0].reset == first.ratelimits[0].reset > now_ms()  # one window
    # Credits are charged last: the rate-limited call spent none.
    assert [first.credits, second.credits] == [9, 8]
    assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 8


def test_verify_usage_exceeded_and_costs(unkey: Unkey, api_id: str) -> None:
    _, key = new_key(unkey, api_id, credits={"remaining": 2})
    results = [verify(unkey, key) for _ in range(3)]
    assert [(r.code, r.credits) for r in results] == [("VALID", 1), ("VALID", 0), ("USAGE_EXCEEDED", 0)]
    assert results[2].valid is False
    # cost 0 always passes, even at zero.
    result = verify(unkey, key, credits={"cost": 0})
    assert (result.code, result.credits) == ("VALID", 0)

    key_id, key = new_key(unkey, api_id, credits={"remaining": 5})
    result = verify(unkey, key, credits={"cost": 15})
    assert (result.code, result.credits) == ("USAGE_EXCEEDED", 5)  # nothing charged, current balance reported
    result = verify(unkey, key, credits={"cost": 5})
    assert (result.code, result.credits) == ("VALID", 0)
    assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 0


def test_identity_ratelimit_is_shared_by_its_keys(unkey: Unkey, api_id: str) -> None:
    external_id = f"org_{uid()}"
    identity_id = unkey.identities.create_identity(
        external_id=external_id,
        ratelimits=[{"name": "shared", "limit": 3, "duration": LONG, "auto_apply": True}],
    ).data.identity_id
    shared_id = unkey.identities.get_identity(identity=identity_id).data.ratelimits[0].id
    _, a = new_key(unkey, api_id, external_id=external_id)
    _, b = new_key(unkey, api_id, external_id=external_id)
    # A key of the same identity whose own "shared" limit wins over the identity's.
    _, c = new_key(unkey, api_id, external_id=external_id,
                   ratelimits=[{"name": "shared", "limit": 100, "duration": LONG, "auto_apply": True}])

    results = [verify(unkey, k) for k in (a, a, b, b, a)]
    assert [r.code for r in results] == ["VALID", "VALID", "VALID", "RATE_LIMITED", "RATE_LIMITED"]
    assert [r.ratelimits[0].remaining for r in results] == [2, 1, 0, 0, 0]
    assert {r.ratelimits[0].id for r in results} == {shared_id}
    assert results[0].identity.id == identity_id
    assert [rl.name for rl in results[0].identity.ratelimits] == ["shared"]

    own = verify(unkey, c)
    assert own.code == "VALID"
    assert (own.ratelimits[0].limit, own.ratelimits[0].remaining) == (100, 99)


def test_verify_adhoc_and_named_ratelimits(unkey: Unkey, api_id: str) -> None:
    _, key = new_key(unkey, api_id, ratelimits=[{"name": "burst", "limit": 1, "duration": LONG}])

    # An ad-hoc limit, given whole in the request.
    adhoc = [{"name": "adhoc", "limit": 2, "duration": LONG}]
    results = [verify(unkey, key, ratelimits=adhoc) for _ in range(3)]
    assert [r.code for r in results] == ["VALID", "VALID", "RATE_LIMITED"]
    assert [(r.ratelimits[0].name, r.ratelimits[0].exceeded) for r in results] == [
        ("adhoc", False), ("adhoc", False), ("adhoc", True)]
    assert results[2].ratelimits[0].auto_apply is False
    # Without it in the request it is not checked; "burst" is not auto-applied either.
    assert [verify(unkey, key).code for _ in range(3)] == ["VALID"] * 3

    # A named limit of the key, applied on demand with its configured limit.
    named = [verify(unkey, key, ratelimits=[{"name": "burst"}]) for _ in range(2)]
    assert [r.code for r in named] == ["VALID", "RATE_LIMITED"]
    assert named[1].ratelimits[0].limit == 1
    # cost 0 only checks.
    _, other = new_key(unkey, api_id, ratelimits=[{"name": "burst", "limit": 1, "duration": LONG}])
    assert [verify(unkey, other, ratelimits=[{"name": "burst", "cost": 0}]).code for _ in range(3)] == ["VALID"] * 3
    assert verify(unkey, other, ratelimits=[{"name": "burst"}]).code == "VALID"
    assert verify(unkey, other, ratelimits=[{"name": "burst"}]).code == "RATE_LIMITED"


def test_verify_named_identity_ratelimit_on_demand(unkey: Unkey, api_id: str) -> None:
    """A limit named in the request may live on the key's identity (not auto-applied there)."""
    external_id = f"team_{uid()}"
    unkey.identities.create_identity(external_id=external_id,
                                     ratelimits=[{"name": "team_burst", "limit": 1, "duration": LONG}])
    _, a = new_key(unkey, api_id, external_id=external_id)
    _, b = new_key(unkey, api_id, external_id=external_id)
    assert verify(unkey, a).code == "VALID"  # not auto-applied: plain verifications pass
    assert verify(unkey, a).code == "VALID"
    first = verify(unkey, a, ratelimits=[{"name": "team_burst"}])
    assert first.code == "VALID"
    assert (first.ratelimits[0].name, first.ratelimits[0].auto_apply) == ("team_burst", False)
    # Counted per identity, so the other key of the same identity is limited too.
    assert verify(unkey, b, ratelimits=[{"name": "team_burst"}]).code == "RATE_LIMITED"


def test_verify_request_ratelimit_replaces_the_auto_applied_one_of_that_name(unkey: Unkey, api_id: str) -> None:
    _, key = new_key(unkey, api_id,
                     ratelimits=[{"name": "requests", "limit": 10, "duration": LONG, "auto_apply": True}])
    result = verify(unkey, key, ratelimits=[{"name": "requests", "cost": 4}])
    assert [(r.name, r.remaining) for r in result.ratelimits] == [("requests", 6)]  # checked once, at cost 4
    assert [(r.name, r.remaining) for r in verify(unkey, key).ratelimits] == [("requests", 5)]


def test_verify_several_ratelimits_are_all_or_nothing(unkey: Unkey, api_id: str) -> None:
    _, key = new_key(unkey, api_id, ratelimits=[{"name": "tight", "limit": 1, "duration": LONG},
                                                {"name": "loose", "limit": 3, "duration": LONG}])
    both = [{"name": "tight"}, {"name": "loose"}]
    assert verify(unkey, key, ratelimits=both).code == "VALID"
    denied = verify(unkey, key, ratelimits=both)
    assert denied.code == "RATE_LIMITED"
    assert {r.name: r.exceeded for r in denied.ratelimits} == {"tight": True, "loose": False}
    # The denied verification counted nothing against "loose": two of its three are left.
    results = [verify(unkey, key, ratelimits=[{"name": "loose"}]) for _ in range(3)]
    assert [(r.code, r.ratelimits[0].remaining) for r in results] == [("VALID", 1), ("VALID", 0), ("RATE_LIMITED", 0)]


def test_verify_named_ratelimit_missing_is_412(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id, credits={"remaining": 5})
    with pytest.raises(errors.UnkeyError) as raised:
        unkey.keys.verify_key(key=key, ratelimits=[{"name": "does_not_exist"}])
    # The SDK has no typed 412 branch for verifyKey: it raises the generic APIError.
    assert isinstance(raised.value, errors.APIError)
    assert raised.value.status_code == 412
    body = error_json(raised.value)
    assert body["error"]["status"] == 412
    assert body["meta"]["requestId"].startswith("req_")
    assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 5


def test_verify_restricted_to_keyspaces(unkey: Unkey, api_id: str) -> None:
    key_id, key = new_key(unkey, api_id, credits={"remaining": 5})
    keyspace_id = verify(unkey, key).keyspace_id
    assert keyspace_id
    assert verify(unkey, key, keyspaces=[keyspace_id]).code == "VALID"
    assert verify(unkey, key, keyspaces=[f"ks_other{uid()}"]).code == "NOT_FOUND"
    assert unkey.keys.get_key(key_id=key_id).data.credits.remaining == 3  # the NOT_FOUND spent nothing


# -- ratelimit -------------------------------------------------------------------------------------------


def test_ratelimit_limit(unkey: Unkey) -> None:
    namespace = f"ns_{uid()}"
    results = [unkey.ratelimit.limit(namespace=namespace, identifier="user_1", limit=2, duration=LONG).data
               for _ in range(3)]
    assert [r.success for r in results] == [True, True, False]
    assert [r.remaining for r in results] == [1, 0, 0]
    assert {r.limit for r in results} == {2}
    assert all(r.override_id is None for r in results)
    assert results[0].reset > now_ms()

    # Identifiers are counted separately; cost counts several at once.
    other = unkey.ratelimit.limit(namespace=namespace, identifier="user_2", limit=5, duration=LONG, cost=4).data
    assert (other.success, other.remaining) == (True, 1)
    over = unkey.ratelimit.limit(namespace=namespace, identifier="user_2", limit=5, duration=LONG, cost=2).data
    assert (over.success, over.remaining) == (False, 0)
    last = unkey.ratelimit.limit(namespace=namespace, identifier="user_2", limit=5, duration=LONG).data
    assert (last.success, last.remaining) == (True, 0)


def test_ratelimit_multi_limit_is_all_or_nothing(unkey: Unkey) -> None:
    namespace = f"ns_{uid()}"
    unkey.ratelimit.limit(namespace=namespace, identifier="tight", limit=1, duration=LONG)  # used up

    loose = {"namespace": namespace, "identifier": "loose", "limit": 5, "duration": LONG}
    tight = {"namespace": namespace, "identifier": "tight", "limit": 1, "duration": LONG}
    denied = unkey.ratelimit.multi_limit(request=[loose, tight]).data
    assert denied.passed is False
    assert [(c.identifier, c.passed) for c in denied.limits] == [("loose", True), ("tight", False)]
    assert [c.namespace for c in denied.limits] == [namespace, namespace]

    # The denied batch counted nothing, not even the limit that passed.
    after = unkey.ratelimit.limit(namespace=namespace, identifier="loose", limit=5, duration=LONG).data
    assert (after.success, after.remaining) == (True, 4)

    passed = unkey.ratelimit.multi_limit(request=[loose, {**tight, "identifier": "fresh"}]).data
    assert passed.passed is True
    assert [(c.identifier, c.passed, c.remaining) for c in passed.limits] == [("loose", True, 3), ("fresh", True, 0)]


def test_ratelimit_overrides_glob_and_exact(unkey: Unkey) -> None:
    namespace = f"ns_{uid()}"
    unkey.ratelimit.limit(namespace=namespace, identifier="bootstrap", limit=1, duration=LONG)  # creates it

    glob_id = unkey.ratelimit.set_override(namespace=namespace, identifier="vip_*", limit=5, duration=LONG
                                           ).data.override_id
    gold_id = unkey.ratelimit.set_override(namespace=namespace, identifier="vip_gold", limit=10, duration=LONG
                                           ).data.override_id
    assert glob_id.startswith("rlor_") and gold_id.startswith("rlor_") and glob_id != gold_id

    got = unkey.ratelimit.get_override(namespace=namespace, identifier="vip_*").data
    assert (got.override_id, got.identifier, got.limit, got.duration) == (glob_id, "vip_*", 5, LONG)

    gold = unkey.ratelimit.limit(namespace=namespace, identifier="vip_gold", limit=1, duration=LONG).data
    assert (gold.limit, gold.override_id, gold.remaining) == (10, gold_id, 9)  # exact beats the glob
    silver = unkey.ratelimit.limit(namespace=namespace, identifier="vip_silver", limit=1, duration=LONG).data
    assert (silver.limit, silver.override_id, silver.remaining) == (5, glob_id, 4)
    plain = unkey.ratelimit.limit(namespace=namespace, identifier="regular", limit=1, duration=LONG).data
    assert (plain.limit, plain.override_id) == (1, None)

    # Upsert: setting it again keeps its id and changes its limit.
    assert unkey.ratelimit.set_override(namespace=namespace, identifier="vip_*", limit=7, duration=LONG
                                        ).data.override_id == glob_id
    assert unkey.ratelimit.get_override(namespace=namespace, identifier="vip_*").data.limit == 7

    page = unkey.ratelimit.list_overrides(namespace=namespace, limit=1)
    listed = []
    while page is not None:
        assert len(page.result.data) <= 1
        listed += [(o.identifier, o.override_id) for o in page.result.data]
        page = page.next()
    assert sorted(listed) == sorted([("vip_*", glob_id), ("vip_gold", gold_id)])

    unkey.ratelimit.delete_override(namespace=namespace, identifier="vip_gold")
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.ratelimit.get_override(namespace=namespace, identifier="vip_gold")
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.ratelimit.delete_override(namespace=namespace, identifier="vip_gold")
    now_glob = unkey.ratelimit.limit(namespace=namespace, identifier="vip_gold", limit=1, duration=LONG).data
    assert (now_glob.limit, now_glob.override_id) == (7, glob_id)


def test_ratelimit_override_of_zero_denies_everything(unkey: Unkey) -> None:
    namespace = f"ns_{uid()}"
    unkey.ratelimit.limit(namespace=namespace, identifier="bootstrap", limit=1, duration=LONG)
    override_id = unkey.ratelimit.set_override(namespace=namespace, identifier="banned", limit=0, duration=LONG
                                               ).data.override_id
    for _ in range(2):
        data = unkey.ratelimit.limit(namespace=namespace, identifier="banned", limit=100, duration=LONG).data
        assert (data.success, data.limit, data.remaining, data.override_id) == (False, 0, 0, override_id)
    assert unkey.ratelimit.limit(namespace=namespace, identifier="other", limit=100, duration=LONG).data.success


def test_ratelimit_override_on_unknown_namespace_is_not_found(unkey: Unkey) -> None:
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.ratelimit.set_override(namespace=f"ns_missing_{uid()}", identifier="x", limit=1, duration=LONG)


# -- identities ------------------------------------------------------------------------------------------


def test_identity_lifecycle(unkey: Unkey) -> None:
    external_id = f"customer_{uid()}"
    identity_id = unkey.identities.create_identity(
        external_id=external_id, meta={"tier": "gold"},
        ratelimits=[{"name": "calls", "limit": 10, "duration": 60_000}],
    ).data.identity_id
    assert identity_id.startswith("id_")

    for ref in (identity_id, external_id):
        got = unkey.identities.get_identity(identity=ref).data
        assert (got.id, got.external_id, got.meta) == (identity_id, external_id, {"tier": "gold"})
        [calls] = got.ratelimits
        assert (calls.name, calls.limit, calls.duration, calls.auto_apply) == ("calls", 10, 60_000, False)
    calls_id = calls.id

    updated = unkey.identities.update_identity(
        identity=external_id, meta={"tier": "platinum"},
        ratelimits=[{"name": "calls", "limit": 20, "duration": 60_000, "auto_apply": True},
                    {"name": "tokens", "limit": 1000, "duration": HOUR}],
    ).data
    assert (updated.id, updated.meta) == (identity_id, {"tier": "platinum"})
    limits = {rl.name: rl for rl in updated.ratelimits}
    assert set(limits) == {"calls", "tokens"}
    assert (limits["calls"].limit, limits["calls"].auto_apply, limits["calls"].id) == (20, True, calls_id)

    # meta alone leaves the rate limits.
    unkey.identities.update_identity(identity=identity_id, meta={"tier": "silver"})
    got = unkey.identities.get_identity(identity=identity_id).data
    assert got.meta == {"tier": "silver"}
    assert {rl.name for rl in got.ratelimits} == {"calls", "tokens"}

    cleared = unkey.identities.update_identity(identity=identity_id, ratelimits=[]).data
    assert cleared.meta == {"tier": "silver"}
    assert not cleared.ratelimits  # an empty list may be omitted
    assert not unkey.identities.get_identity(identity=identity_id).data.ratelimits

    delete = unkey.identities.delete_identity(identity=external_id)
    assert delete.meta.request_id.startswith("req_")
    for ref in (identity_id, external_id):
        with pytest.raises(errors.NotFoundErrorResponse) as raised:
            unkey.identities.get_identity(identity=ref)
        assert raised.value.status_code == 404
    # deleteIdentity's spec lists its errors as problem+json; the SDK raises either way, with the status.
    with pytest.raises(errors.UnkeyError) as raised:
        unkey.identities.delete_identity(identity=identity_id)
    assert raised.value.status_code == 404

    # The external id is free again.
    assert unkey.identities.create_identity(external_id=external_id).data.identity_id != identity_id


def test_deleting_an_identity_keeps_its_keys(unkey: Unkey, api_id: str) -> None:
    external_id = f"gone_{uid()}"
    key_id, key = new_key(unkey, api_id, external_id=external_id)
    unkey.identities.delete_identity(identity=external_id)
    result = verify(unkey, key)
    assert (result.code, result.identity) == ("VALID", None)
    assert unkey.keys.get_key(key_id=key_id).data.identity is None


def test_create_identity_twice_is_a_conflict(unkey: Unkey) -> None:
    external_id = f"dup_{uid()}"
    unkey.identities.create_identity(external_id=external_id)
    with pytest.raises(errors.ConflictErrorResponse) as raised:
        unkey.identities.create_identity(external_id=external_id)
    assert raised.value.status_code == 409
    assert raised.value.data.error.status == 409
    assert raised.value.data.meta.request_id.startswith("req_")


def test_list_identities_pages(unkey: Unkey) -> None:
    token = uid()
    created = {unkey.identities.create_identity(external_id=f"lst_{token}_{i}").data.identity_id for i in range(5)}
    page = unkey.identities.list_identities(limit=2, search=token)
    sizes, seen = [], []
    while page is not None:
        sizes.append(len(page.result.data))
        seen += [i.id for i in page.result.data]
        assert all(token in i.external_id for i in page.result.data)
        page = page.next()
    assert sizes == [2, 2, 1]
    assert Counter(seen) == Counter(created)


# -- permissions and roles ------------------------------------------------------------------------------


def test_permission_crud(unkey: Unkey, api_id: str) -> None:
    u = uid()
    slug = f"invoices.read.{u}"
    permission_id = unkey.permissions.create_permission(name=f"Read invoices {u}", slug=slug,
                                                        description="may read invoices").data.permission_id
    assert permission_id.startswith("perm_")
    for ref in (permission_id, slug):
        got = unkey.permissions.get_permission(permission=ref).data
        assert (got.id, got.name, got.slug, got.description) == (
            permission_id, f"Read invoices {u}", slug, "may read invoices")

    with pytest.raises(errors.ConflictErrorResponse) as raised:
        unkey.permissions.create_permission(name="again", slug=slug)
    assert raised.value.status_code == 409

    listed = unkey.permissions.list_permissions(search=u).result
    assert [p.id for p in listed.data] == [permission_id]

    updated = unkey.permissions.update_permission(permission=permission_id, name=f"Invoices {u}",
                                                  description=None).data
    assert (updated.id, updated.name, updated.slug, updated.description) == (permission_id, f"Invoices {u}", slug, None)
    new_slug = f"invoices.view.{u}"
    unkey.permissions.update_permission(permission=slug, slug=new_slug, description="renamed")
    got = unkey.permissions.get_permission(permission=new_slug).data
    assert (got.id, got.name, got.description) == (permission_id, f"Invoices {u}", "renamed")
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.permissions.get_permission(permission=slug)

    # A key holding the permission follows the rename, and loses it with the deletion.
    other = f"invoices.other.{u}"
    unkey.permissions.create_permission(name=f"Other {u}", slug=other)
    with pytest.raises(errors.ConflictErrorResponse) as raised:
        unkey.permissions.update_permission(permission=other, slug=new_slug)
    assert raised.value.status_code == 409
    key_id, key = new_key(unkey, api_id, permissions=[new_slug])
    assert verify(unkey, key, permissions=new_slug).code == "VALID"

    assert unkey.permissions.delete_permission(permission=permission_id).meta.request_id.startswith("req_")
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.permissions.get_permission(permission=permission_id)
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.permissions.delete_permission(permission=permission_id)
    assert verify(unkey, key, permissions=new_slug).code == "INSUFFICIENT_PERMISSIONS"
    assert unkey.keys.get_key(key_id=key_id).data.permissions is None


def test_list_permissions_pages(unkey: Unkey) -> None:
    u = uid()
    created = {unkey.permissions.create_permission(name=f"p{i} {u}", slug=f"pg{i}.{u}").data.permission_id
               for i in range(3)}
    page = unkey.permissions.list_permissions(search=u, limit=2)
    seen = []
    while page is not None:
        seen += [p.id for p in page.result.data]
        page = page.next()
    assert Counter(seen) == Counter(created)


def test_role_crud_and_set_role_permissions(unkey: Unkey, api_id: str) -> None:
    u = uid()
    name = f"editor_{u}"
    read, write, publish = f"posts.read.{u}", f"posts.write.{u}", f"posts.publish.{u}"
    role_id = unkey.permissions.create_role(name=name, description="edits posts", permissions=[read, write]
                                            ).data.role_id
    assert role_id.startswith("role_")
    for ref in (role_id, name):
        got = unkey.permissions.get_role(role=ref).data
        assert (got.id, got.name, got.description) == (role_id, name, "edits posts")
        assert sorted(p.slug for p in got.permissions) == sorted([read, write])

    with pytest.raises(errors.ConflictErrorResponse) as raised:
        unkey.permissions.create_role(name=name)
    assert raised.value.status_code == 409

    listed = unkey.permissions.list_roles(search=u).result
    assert [r.id for r in listed.data] == [role_id]
    assert listed.pagination.has_more is False

    _, key = new_key(unkey, api_id, roles=[name])
    assert verify(unkey, key, permissions=f"{read} AND {write}").code == "VALID"

    replaced = unkey.permissions.set_role_permissions(request={"role": name, "permissions": [read, publish]}).data
    assert sorted(p.slug for p in replaced) == sorted([read, publish])
    assert sorted(p.slug for p in unkey.permissions.get_role(role=role_id).data.permissions) == sorted([read, publish])
    # The key sees its role's new permissions at once.
    assert verify(unkey, key, permissions=publish).code == "VALID"
    assert verify(unkey, key, permissions=write).code == "INSUFFICIENT_PERMISSIONS"
    # The deprecated spelling still works.
    unkey.permissions.set_role_permissions(request={"role_id": role_id, "permissions": [write]})
    assert [p.slug for p in unkey.permissions.get_role(role=role_id).data.permissions] == [write]

    new_name = f"author_{u}"
    updated = unkey.permissions.update_role(role=role_id, name=new_name, description=None).data
    assert (updated.id, updated.name, updated.description) == (role_id, new_name, None)
    assert unkey.permissions.get_role(role=new_name).data.id == role_id
    assert verify(unkey, key).roles == [new_name]

    taken = f"taken_{u}"
    unkey.permissions.create_role(name=taken)
    with pytest.raises(errors.ConflictErrorResponse) as raised:
        unkey.permissions.update_role(role=role_id, name=taken)
    assert raised.value.status_code == 409
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.permissions.set_role_permissions(request={"role": f"ghost_{u}", "permissions": [read]})

    assert unkey.permissions.delete_role(role=role_id).meta.request_id.startswith("req_")
    with pytest.raises(errors.NotFoundErrorResponse):
        unkey.permissions.get_role(role=role_id)
    result = verify(unkey, key, permissions=write)
    assert result.code == "INSUFFICIENT_PERMISSIONS"  # the key lost what the role gave it
    assert result.roles is None


def test_list_roles_pages(unkey: Unkey) -> None:
    u = uid()
    created = {unkey.permissions.create_role(name=f"lr{i}_{u}").data.role_id for i in range(3)}
    page = unkey.permissions.list_roles(search=u, limit=2)
    sizes, seen = [], []
    while page is not None:
        sizes.append(len(page.result.data))
        seen += [r.id for r in page.result.data]
        page = page.next()
    assert sizes == [2, 1]
    assert Counter(seen) == Counter(created)


# -- errors ----------------------------------------------------------------------------------------------


def test_wrong_root_key_is_unauthorized(server: Any) -> None:
    with Unkey(root_key="unkey_not_a_real_root_key", server_url=server.url, retry_config=NO_RETRIES) as bad:
        with pytest.raises(errors.UnauthorizedErrorResponse) as raised:
            bad.apis.create_api(name=f"nope-{uid()}")
        assert raised.value.status_code == 401
        assert raised.value.data.error.status == 401
        assert raised.value.data.meta.request_id.startswith("req_")
        with pytest.raises(errors.UnauthorizedErrorResponse):
            bad.keys.verify_key(key="anything")


def test_get_unknown_key_is_not_found(unkey: Unkey) -> None:
    with pytest.raises(errors.NotFoundErrorResponse) as raised:
        unkey.keys.get_key(key_id=f"key_missing{uid()}")
    assert raised.value.status_code == 404
    error = raised.value.data.error
    assert (error.status, error.title) == (404, "Not Found")
    assert error.type.startswith("https://unkey.com/docs/errors/")


def test_invalid_body_is_bad_request(unkey: Unkey, api_id: str) -> None:
    with pytest.raises(errors.BadRequestErrorResponse) as raised:
        unkey.keys.create_key(api_id=api_id, prefix="has space")
    assert raised.value.status_code == 400
    assert isinstance(raised.value.data.error.errors, list)


def test_unserved_sdk_group_is_a_404_envelope(unkey: Unkey) -> None:
    """keysvc serves no gateway: the SDK's call gets a proper 404 error envelope, not a crash."""
    with pytest.raises(errors.UnkeyError) as raised:
        unkey.analytics.get_gateway_requests(query="SELECT count(*) FROM gateway_requests_v1")
    assert raised.value.status_code == 404
    body = error_json(raised.value)
    assert body["error"]["status"] == 404
    assert body["meta"]["requestId"].startswith("req_")

"""Every verification rule of the contract's section 6, on both twins, against a real store."""
from __future__ import annotations

import datetime as dt

import pytest

from keysvc._fast import PermissionQuerySyntaxError, RatelimitNotFoundError
from keysvc.errors import BadRequest, NotFound
from keysvc.keys import unkey_hash
from keysvc.management import CreditsSpec, KeySpec, RatelimitSpec
from keysvc.store.records import Refill

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000


def ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp() * 1000)


NOW = ms(2026, 11, 28, 12, 0, 0)  # well inside its minute, hour and day windows


@pytest.fixture
def api(manage):
    return manage.create_api("payments")


def new_key(manage, api, **kw):
    record, plaintext = manage.create_key(KeySpec(api_id=api.id, **kw))
    return record, plaintext


def codes(verifier, key, n, now=NOW, **kw):
    return [verifier.verify(key, now, **kw).code for _ in range(n)]


# -- lookup -----------------------------------------------------------------------------------


def test_unknown_key_is_not_found_with_nothing_else(verifier, manage, api):
    new_key(manage, api)
    result = verifier.verify("sk_doesnotexist", NOW)
    assert (result.code, result.valid, result.key, result.credits, result.ratelimits) == (
        "NOT_FOUND", False, None, None, None)


def test_valid_key_reports_its_record(verifier, manage, api):
    record, key = new_key(manage, api, prefix="sk", name="acme", meta={"plan": "pro"})
    result = verifier.verify(key, NOW)
    assert result.valid and result.code == "VALID"
    assert result.key.key_id == record.id and result.key.api_id == api.id
    assert result.key.record.key.meta == {"plan": "pro"}
    assert key.startswith("sk_") and record.start == key[:7]


def test_soft_and_permanently_deleted_keys_are_not_found(verifier, manage, api):
    soft, soft_key = new_key(manage, api)
    hard, hard_key = new_key(manage, api)
    assert verifier.verify(soft_key, NOW).valid and verifier.verify(hard_key, NOW).valid
    manage.delete_key(soft.id)
    manage.delete_key(hard.id, permanent=True)
    assert verifier.verify(soft_key, NOW).code == "NOT_FOUND"
    assert verifier.verify(hard_key, NOW).code == "NOT_FOUND"


def test_keys_of_a_deleted_api_are_not_found(verifier, manage, api):
    _, key = new_key(manage, api)
    assert verifier.verify(key, NOW).valid
    manage.delete_api(api.id)
    assert verifier.verify(key, NOW).code == "NOT_FOUND"


def test_api_scope_and_keyspace_filter_hide_other_keys(verifier, manage, api):
    other = manage.create_api("other")
    _, key = new_key(manage, api, credits=CreditsSpec(remaining=5))
    assert verifier.verify(key, NOW, api_ids=frozenset({other.id})).code == "NOT_FOUND"
    assert verifier.verify(key, NOW, keyspace_ids=frozenset({other.keyspace_id})).code == "NOT_FOUND"
    assert manage.credits(manage.get_key(verifier.verify(key, NOW, api_ids=frozenset({api.id})).key.key_id)) == 4


def test_keys_imported_by_unkey_sha256_hash_verify(verifier, manage, api):
    plaintext = "unkey_3ZZ7faUrkfv1YAhffAcnKW74"
    [(_, record)], failed = manage.migrate_keys(api.id, [(unkey_hash(plaintext), KeySpec(api_id=api.id), "unkey_3ZZ7")])
    assert failed == []
    assert record.hash_alg == "sha256"
    result = verifier.verify(plaintext, NOW)
    assert result.code == "VALID" and result.key.key_id == record.id
    assert verifier.verify(plaintext + "x", NOW).code == "NOT_FOUND"


# -- the order of the checks ------------------------------------------------------------------


def test_disabled_comes_before_expired(verifier, manage, api):
    _, key = new_key(manage, api, enabled=False, expires=NOW - 1)
    assert verifier.verify(key, NOW).code == "DISABLED"


def test_expiry_is_strictly_after_and_comes_before_permissions(verifier, manage, api):
    _, key = new_key(manage, api, expires=NOW)
    assert verifier.verify(key, NOW, permissions="x").code == "INSUFFICIENT_PERMISSIONS"
    assert verifier.verify(key, NOW + 1, permissions="x").code == "EXPIRED"
    assert verifier.verify(key, NOW).code == "VALID"


def test_permissions_fail_before_anything_is_charged(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=1),
                          ratelimits=[RatelimitSpec("requests", 1, MINUTE, auto_apply=True)])
    assert codes(verifier, key, 3, permissions="admin") == ["INSUFFICIENT_PERMISSIONS"] * 3
    result = verifier.verify(key, NOW)
    assert result.code == "VALID" and result.credits == 0


def test_a_ratelimit_denial_charges_no_credits(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=10),
                          ratelimits=[RatelimitSpec("requests", 2, MINUTE, auto_apply=True)])
    assert codes(verifier, key, 4) == ["VALID", "VALID", "RATE_LIMITED", "RATE_LIMITED"]
    denied = verifier.verify(key, NOW)
    assert denied.credits == 8 and denied.spent == 0
    assert manage.credits(record) == 8


def test_a_credits_denial_consumes_no_ratelimit(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=1),
                          ratelimits=[RatelimitSpec("requests", 3, MINUTE, auto_apply=True)])
    assert codes(verifier, key, 3) == ["VALID", "USAGE_EXCEEDED", "USAGE_EXCEEDED"]
    manage.update_credits(record.id, "set", 5)
    # Had the denied calls counted, the limit of 3 would already be used up.
    assert codes(verifier, key, 3) == ["VALID", "VALID", "RATE_LIMITED"]


# -- permission queries -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "held"),
    [
        ("docs.read", True),
        ("docs.write", False),
        ("docs.read AND docs.write", False),
        ("docs.read OR docs.write", True),
        ("docs.read OR billing.read AND docs.write", True),  # AND binds tighter
        ("(docs.write OR billing.read) AND docs.admin", False),
        ("docs.write or (api.*.verify_key and docs.read)", True),  # case-insensitive operators
        ("api.*", False),  # '*' is literal
        ("api.*.verify_key", True),
    ],
)
def test_permission_queries(verifier, manage, api, query, held):
    _, key = new_key(manage, api, permissions=["docs.read", "api.*.verify_key"], roles=[])
    assert verifier.verify(key, NOW, permissions=query).code == ("VALID" if held else "INSUFFICIENT_PERMISSIONS")


def test_permissions_through_roles_count(verifier, manage, api):
    manage.create_role("editor", permissions=["docs.write", "docs.read"])
    _, key = new_key(manage, api, roles=["editor"])
    result = verifier.verify(key, NOW, permissions="docs.write AND docs.read")
    assert result.code == "VALID"
    assert result.key.record.role_names == ["editor"]


@pytest.mark.parametrize("query", ["", "   ", "()", "(a", "a)", "a AND", "OR a", "a b", "a AND OR b", "a & b", "ä"])
def test_permission_query_syntax_errors_raise_before_lookup(verifier, query):
    with pytest.raises(PermissionQuerySyntaxError):
        verifier.verify("whatever", NOW, permissions=query)


# -- rate limits ----------------------------------------------------------------------------


def test_sliding_window_worked_example(verifier, manage, api):
    """Contract 6.4: limit 100 per minute, 84 in the previous window, 36 in this one, 15 s in:
    36 + trunc(84 * 0.75) + 1 = 100 passes with 0 remaining; the next is 101 and denied."""
    _, key = new_key(manage, api)
    start = NOW - NOW % MINUTE
    limit = [("requests", 1, 100, MINUTE)]
    assert codes(verifier, key, 84, now=start - MINUTE + 5, ratelimits=limit) == ["VALID"] * 84
    assert codes(verifier, key, 36, now=start + 15_000, ratelimits=limit) == ["VALID"] * 36
    last = verifier.verify(key, start + 15_000, ratelimits=limit)
    assert last.code == "VALID"
    [outcome] = last.ratelimits
    assert (outcome.remaining, outcome.reset, outcome.exceeded) == (0, start + MINUTE, False)
    denied = verifier.verify(key, start + 15_000, ratelimits=limit)
    assert denied.code == "RATE_LIMITED" and denied.ratelimits[0].exceeded


def test_windows_are_epoch_aligned_and_the_previous_one_fades(verifier, manage, api):
    _, key = new_key(manage, api)
    start = NOW - NOW % MINUTE
    limit = [("requests", 1, 10, MINUTE)]
    assert codes(verifier, key, 11, now=start + 59_999, ratelimits=limit) == ["VALID"] * 10 + ["RATE_LIMITED"]
    # Just into the next window the previous 10 still weigh trunc(10 * 59999/60000) = 9.
    assert codes(verifier, key, 2, now=start + MINUTE + 1, ratelimits=limit) == ["VALID", "RATE_LIMITED"]
    # Two windows later nothing weighs.
    assert codes(verifier, key, 10, now=start + 3 * MINUTE, ratelimits=limit) == ["VALID"] * 10


def test_buckets_are_keyed_without_the_limit(verifier, manage, api):
    _, key = new_key(manage, api)
    assert codes(verifier, key, 3, ratelimits=[("requests", 1, 3, MINUTE)]) == ["VALID"] * 3
    assert verifier.verify(key, NOW, ratelimits=[("requests", 1, 5, MINUTE)]).ratelimits[0].remaining == 1
    # A different duration or name is a different bucket.
    assert verifier.verify(key, NOW, ratelimits=[("requests", 1, 1, HOUR)]).code == "VALID"
    assert verifier.verify(key, NOW, ratelimits=[("other", 1, 1, MINUTE)]).code == "VALID"


def test_auto_applied_limits_and_named_ones(verifier, manage, api):
    _, key = new_key(manage, api, ratelimits=[RatelimitSpec("requests", 2, MINUTE, auto_apply=True),
                                              RatelimitSpec("tokens", 100, MINUTE, auto_apply=False)])
    first = verifier.verify(key, NOW)
    assert [o.name for o in first.ratelimits] == ["requests"] and first.ratelimits[0].auto_apply
    # A named entry uses the configured limit with the request's cost.
    named = verifier.verify(key, NOW, ratelimits=[("tokens", 60, None, None)])
    assert sorted((o.name, o.remaining) for o in named.ratelimits) == [("requests", 0), ("tokens", 40)]
    assert verifier.verify(key, NOW, ratelimits=[("tokens", 41, None, None)]).code == "RATE_LIMITED"


def test_a_requested_entry_replaces_the_auto_applied_one(verifier, manage, api):
    _, key = new_key(manage, api, ratelimits=[RatelimitSpec("requests", 5, MINUTE, auto_apply=True)])
    result = verifier.verify(key, NOW, ratelimits=[("requests", 3, None, None)])
    assert [(o.name, o.remaining) for o in result.ratelimits] == [("requests", 2)]


def test_an_unknown_named_limit_is_a_precondition_failure_that_charges_nothing(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=3))
    with pytest.raises(RatelimitNotFoundError):
        verifier.verify(key, NOW, ratelimits=[("missing", 1, None, None)])
    assert manage.credits(record) == 3


def test_identity_limits_are_shared_by_its_keys_and_key_limits_win(verifier, manage, api):
    manage.create_identity("acme", ratelimits=[RatelimitSpec("requests", 3, MINUTE, auto_apply=True),
                                               RatelimitSpec("burst", 100, MINUTE, auto_apply=True)])
    _, first = new_key(manage, api, external_id="acme")
    _, second = new_key(manage, api, external_id="acme")
    _, own = new_key(manage, api, external_id="acme", ratelimits=[RatelimitSpec("requests", 1, MINUTE, True)])
    assert codes(verifier, first, 2) == ["VALID", "VALID"]
    assert codes(verifier, second, 2) == ["VALID", "RATE_LIMITED"]
    # The key's own "requests" replaces the identity's; "burst" is still the identity's.
    result = verifier.verify(own, NOW)
    assert result.code == "VALID"
    assert sorted((o.name, o.limit, o.remaining) for o in result.ratelimits) == [("burst", 100, 96), ("requests", 1, 0)]


def test_several_limits_are_all_or_nothing(verifier, manage, api):
    _, key = new_key(manage, api, ratelimits=[RatelimitSpec("a", 10, MINUTE, True), RatelimitSpec("b", 1, MINUTE, True)])
    assert verifier.verify(key, NOW).code == "VALID"
    denied = verifier.verify(key, NOW)
    assert denied.code == "RATE_LIMITED"
    assert {o.name: o.exceeded for o in denied.ratelimits} == {"a": False, "b": True}
    # "a" was not incremented by the denied call: 10 - 1 used - 1 for this call.
    after = verifier.verify(key, NOW, ratelimits=[("b", 0, None, None)])
    assert {o.name: o.remaining for o in after.ratelimits} == {"a": 8, "b": 0}


def test_a_zero_limit_always_denies_and_zero_cost_only_checks(verifier, manage, api):
    _, key = new_key(manage, api)
    assert verifier.verify(key, NOW, ratelimits=[("zero", 0, 0, MINUTE)]).code == "RATE_LIMITED"
    assert codes(verifier, key, 5, ratelimits=[("free", 0, 1, MINUTE)]) == ["VALID"] * 5
    assert verifier.verify(key, NOW, ratelimits=[("free", 1, 1, MINUTE)]).code == "VALID"


def test_the_ratelimit_api_is_all_or_nothing(core, verifier):
    a = core.bucket_key(core.NAMESPACE_LIMITS, "ns", "user", MINUTE)
    b = core.bucket_key(core.NAMESPACE_LIMITS, "ns2", "user", MINUTE)
    passed, outcomes = verifier.limit([(a, 5, MINUTE, 2), (b, 1, MINUTE, 1)], NOW)
    assert passed and [(o.passed, o.remaining) for o in outcomes] == [(True, 3), (True, 0)]
    passed, outcomes = verifier.limit([(a, 5, MINUTE, 2), (b, 1, MINUTE, 1)], NOW)
    assert not passed and [o.passed for o in outcomes] == [True, False]
    passed, outcomes = verifier.limit([(a, 5, MINUTE, 3)], NOW)
    assert passed and outcomes[0].remaining == 0  # the rolled-back 2 were never counted


def test_long_bucket_names_are_hashed_to_fit_lmdb(core, verifier):
    bucket = core.bucket_key(core.NAMESPACE_LIMITS, "n" * 512, "i" * 2048, MINUTE)
    assert len(bucket) < 511
    assert verifier.limit([(bucket, 1, MINUTE, 1)], NOW)[0]


# -- credits ----------------------------------------------------------------------------------


def test_credits_are_charged_and_denied_exactly(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=5))
    first = verifier.verify(key, NOW)  # no cost given: 1
    assert (first.code, first.credits, first.spent) == ("VALID", 4, 1)
    spent = verifier.verify(key, NOW, credits_cost=4)
    assert (spent.code, spent.credits) == ("VALID", 0)
    free = verifier.verify(key, NOW, credits_cost=0)
    assert (free.code, free.credits) == ("VALID", 0)
    denied = verifier.verify(key, NOW, credits_cost=1)
    assert (denied.code, denied.credits, denied.spent) == ("USAGE_EXCEEDED", 0, 0)


def test_a_denied_charge_reports_the_current_balance(verifier, manage, api):
    _, key = new_key(manage, api, credits=CreditsSpec(remaining=5))
    denied = verifier.verify(key, NOW, credits_cost=15)
    assert (denied.code, denied.credits) == ("USAGE_EXCEEDED", 5)


def test_keys_without_credits_are_unlimited(verifier, manage, api):
    _, key = new_key(manage, api)
    result = verifier.verify(key, NOW, credits_cost=10**12)
    assert (result.code, result.credits, result.spent) == ("VALID", None, 0)


def test_update_key_refuses_a_refill_without_credits_and_changes_nothing(verifier, manage, api):
    record, key = new_key(manage, api, name="before")
    with pytest.raises(BadRequest, match="credits.refill needs credits.remaining"):
        manage.update_key(record.id, name="after", refill=Refill("daily", 5))
    unchanged = manage.get_key(record.id)
    assert (unchanged.name, unchanged.has_credits, unchanged.refill) == ("before", False, None)
    # With a balance in the same update, the refill is taken.
    updated = manage.update_key(record.id, name="after", remaining=1, refill=Refill("daily", 5))
    assert (updated.name, updated.has_credits, updated.refill) == ("after", True, Refill("daily", 5))
    assert verifier.verify(key, NOW).credits == 0


def test_update_credits_operations(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=2))
    assert manage.update_credits(record.id, "increment", 3)[1] == 5
    assert manage.update_credits(record.id, "decrement", 10)[1] == 0
    assert verifier.verify(key, NOW).code == "USAGE_EXCEEDED"
    assert manage.update_credits(record.id, "set", 1)[1] == 1
    assert verifier.verify(key, NOW).code == "VALID"
    manage.update_credits(record.id, "set", None)
    assert verifier.verify(key, NOW).credits is None


def daily(amount):
    return CreditsSpec(remaining=0, refill_interval="daily", refill_amount=amount)


def monthly(amount, day):
    return CreditsSpec(remaining=0, refill_interval="monthly", refill_amount=amount, refill_day=day)


def test_daily_refill_sets_the_balance_at_midnight_utc(verifier, manage, api):
    _, key = new_key(manage, api, credits=daily(3))
    created = manage.get_key(verifier.verify(key, NOW).key.key_id).created_at
    midnight = created - created % DAY + DAY
    assert verifier.verify(key, midnight - 1).code == "USAGE_EXCEEDED"
    assert [verifier.verify(key, midnight).credits for _ in range(4)] == [2, 1, 0, 0]
    # Three days of downtime: one refill, to the amount, nothing rolled over.
    result = verifier.verify(key, midnight + 3 * DAY + 5)
    assert (result.code, result.credits) == ("VALID", 2)


def test_a_refill_does_not_lower_a_higher_balance(verifier, manage, api):
    record, key = new_key(manage, api, credits=daily(3))
    manage.update_credits(record.id, "increment", 10)
    midnight = record.created_at - record.created_at % DAY + DAY
    assert verifier.verify(key, midnight + 1).credits == 9


def test_monthly_refill_on_its_day(verifier, manage, api):
    _, key = new_key(manage, api, credits=monthly(5, 15))
    created = manage.get_key(verifier.verify(key, NOW).key.key_id).created_at
    day = dt.datetime.fromtimestamp(created / 1000, dt.timezone.utc)
    nxt = dt.datetime(day.year + (day.month == 12), day.month % 12 + 1, 15, tzinfo=dt.timezone.utc)
    refill_at = int(nxt.timestamp() * 1000)
    if day.day < 15:  # this month's 15th is still ahead
        refill_at = int(day.replace(day=15, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    assert verifier.verify(key, refill_at - 1).code == "USAGE_EXCEEDED"
    assert verifier.verify(key, refill_at).credits == 4


@pytest.mark.parametrize(
    ("now", "day", "expected"),
    [
        (ms(2027, 2, 28, 0, 0, 1), 31, ms(2027, 2, 28)),  # day 31 fires on February's last day
        (ms(2028, 2, 29, 10), 31, ms(2028, 2, 29)),  # leap year
        (ms(2028, 2, 28, 10), 31, ms(2028, 1, 31)),  # not yet: January's 31st
        (ms(2027, 4, 30, 1), 31, ms(2027, 4, 30)),
        (ms(2027, 1, 14, 23), 15, ms(2026, 12, 15)),  # across the year
        (ms(2027, 1, 15), 15, ms(2027, 1, 15)),
        (ms(2027, 3, 1), 1, ms(2027, 3, 1)),
    ],
)
def test_last_refill_instant_calendar(core, now, day, expected):
    assert core.last_refill_instant(now, core.REFILL_MONTHLY, day) == expected
    assert core.last_refill_instant(now, core.REFILL_DAILY, 0) == now - now % DAY


# -- the cache --------------------------------------------------------------------------------


def test_changes_by_another_worker_are_seen_by_the_next_verification(core, store, manage, api):
    first, second = core.Verifier(store), core.Verifier(store)
    record, key = new_key(manage, api, permissions=["read"])
    for verifier in (first, second):
        assert verifier.verify(key, NOW, permissions="read").code == "VALID"
        assert verifier.verify(key, NOW, permissions="read").code == "VALID"
        assert (verifier.misses, verifier.hits) == (1, 1)
    manage.update_key(record.id, permissions=["write"])
    assert [v.verify(key, NOW, permissions="read").code for v in (first, second)] == ["INSUFFICIENT_PERMISSIONS"] * 2
    manage.update_key(record.id, enabled=False)
    assert [v.verify(key, NOW).code for v in (first, second)] == ["DISABLED"] * 2
    manage.update_key(record.id, enabled=True, expires=NOW - 1)
    assert [v.verify(key, NOW).code for v in (first, second)] == ["EXPIRED"] * 2
    manage.delete_key(record.id)
    assert [v.verify(key, NOW).code for v in (first, second)] == ["NOT_FOUND"] * 2


def test_role_and_identity_changes_reach_cached_keys(core, store, manage, api):
    verifier = core.Verifier(store)
    role = manage.create_role("reader", permissions=["read"])
    manage.create_identity("acme", ratelimits=[RatelimitSpec("requests", 100, MINUTE, True)])
    _, key = new_key(manage, api, roles=["reader"], external_id="acme")
    assert verifier.verify(key, NOW, permissions="read").code == "VALID"
    manage.set_role_permissions(role.id, ["write"])
    assert verifier.verify(key, NOW, permissions="read").code == "INSUFFICIENT_PERMISSIONS"
    manage.update_identity("acme", ratelimits=[RatelimitSpec("requests", 1, MINUTE, True)])
    assert verifier.verify(key, NOW).code == "RATE_LIMITED"  # 1 of the earlier 2 still count


def test_the_cache_is_bounded(core, store, manage, api):
    verifier = core.Verifier(store, cache_size=20)
    keys = [new_key(manage, api)[1] for _ in range(50)]
    for key in keys:
        assert verifier.verify(key, NOW).valid
        assert verifier.cache_len() <= 20
    assert all(verifier.verify(key, NOW).valid for key in keys)


def test_a_pruned_change_log_flushes_the_whole_cache(core, data_dir, api_free_store):
    store, manage = api_free_store
    verifier = core.Verifier(store)
    api = manage.create_api("small-log")
    record, key = new_key(manage, api)
    assert verifier.verify(key, NOW).valid
    manage.update_key(record.id, enabled=False)
    for _ in range(10):  # more changes than the log keeps
        new_key(manage, api)
    assert verifier.verify(key, NOW).code == "DISABLED"


@pytest.fixture
def api_free_store(data_dir):
    from keysvc.management import Management
    from keysvc.store import LmdbStore, StoreConfig

    store = LmdbStore(StoreConfig(data_dir=str(data_dir), map_size=1 << 28, counters_map_size=1 << 26,
                                  change_log_size=4))
    yield store, Management(store)
    store.close()


def test_a_root_key_is_no_api_key(verifier, manage, api):
    record, root = manage.create_root_key(["*"])
    assert verifier.lookup(root).key_id == record.id  # what authentication uses
    assert verifier.verify(root, NOW).code == "NOT_FOUND"
    with pytest.raises(NotFound):
        manage.get_key(record.id)
    with pytest.raises(NotFound):
        manage.delete_key(record.id)


# -- late requests, bucket names, bounds ------------------------------------------------------


def test_a_request_stamped_in_an_older_window_counts_in_the_newer_one(verifier, manage, api):
    """A worker takes the time, then waits for the writer lock: its request may reach a cell
    already in the next window. It must count there, not reset that window's count."""
    _, key = new_key(manage, api)
    start = NOW - NOW % MINUTE
    limit = [("requests", 1, 5, MINUTE)]
    assert codes(verifier, key, 5, now=start + MINUTE + 10, ratelimits=limit) == ["VALID"] * 5
    assert verifier.verify(key, start + MINUTE - 1, ratelimits=limit).code == "RATE_LIMITED"
    assert verifier.verify(key, start + MINUTE + 20, ratelimits=limit).code == "RATE_LIMITED"


def test_bucket_names_cannot_collide(core):
    assert core.bucket_key(core.KEY_LIMITS, "a\x00b", "c", MINUTE) != core.bucket_key(core.KEY_LIMITS, "a", "b\x00c",
                                                                                      MINUTE)
    assert core.bucket_key(core.KEY_LIMITS, "ab", "c", MINUTE) != core.bucket_key(core.KEY_LIMITS, "a", "bc", MINUTE)
    window = core.bucket_key(core.KEY_LIMITS, "requests", "key_1", MINUTE)
    balance = core.credits_key("key_1")
    assert core.is_window(window) and not core.is_window(balance)
    # A key's balance and its own windows share a prefix: one B-tree path serves both.
    assert window[:7] == balance[:7] == b"k\x05key_1"


@pytest.mark.parametrize(("limit", "duration"), [(0, MINUTE), (10**15 + 1, MINUTE), (1, 999), (1, 2_592_000_001)])
def test_limits_outside_the_contracts_bounds_are_refused(manage, api, limit, duration):
    with pytest.raises(BadRequest):
        manage.create_key(KeySpec(api_id=api.id, ratelimits=[RatelimitSpec("requests", limit, duration)]))


def test_the_largest_limits_are_exact(verifier, manage, api):
    _, key = new_key(manage, api, ratelimits=[RatelimitSpec("big", 10**15, 2_592_000_000, True)])
    result = verifier.verify(key, NOW, ratelimits=[("big", 10**12, None, None)])
    assert result.code == "VALID" and result.ratelimits[0].remaining == 10**15 - 10**12


# -- group commit -------------------------------------------------------------------------------


def batch(*requests):
    """verify_batch's request tuples, from (key, overrides) pairs."""
    out = []
    for key, kw in requests:
        out.append((key, kw.get("permissions"), kw.get("credits_cost", -1), kw.get("ratelimits"), None, None))
    return out


def test_a_batch_charges_each_verification_in_order(verifier, manage, api):
    record, key = new_key(manage, api, credits=CreditsSpec(remaining=3))
    results = verifier.verify_batch(batch(*[(key, {})] * 5), NOW)
    assert [(r.code, r.credits) for r in results] == [("VALID", 2), ("VALID", 1), ("VALID", 0),
                                                      ("USAGE_EXCEEDED", 0), ("USAGE_EXCEEDED", 0)]
    assert manage.credits(record) == 0


def test_a_bad_request_in_a_batch_fails_alone(verifier, manage, api):
    _, key = new_key(manage, api, credits=CreditsSpec(remaining=5),
                     ratelimits=[RatelimitSpec("requests", 2, MINUTE, True), RatelimitSpec("b", 1, MINUTE, True)])
    results = verifier.verify_batch(batch(
        (key, {}),
        (key, {"permissions": "(oops"}),
        (key, {"ratelimits": [("missing", 1, None, None)]}),
        ("sk_unknown", {}),
        (key, {}),  # "b" allows one: denied, and "requests" not counted for it
        (key, {"ratelimits": [("b", 0, None, None)]}),
    ), NOW)
    assert isinstance(results[1], PermissionQuerySyntaxError)
    assert isinstance(results[2], RatelimitNotFoundError)
    assert [r.code for i, r in enumerate(results) if i not in (1, 2)] == ["VALID", "NOT_FOUND", "RATE_LIMITED",
                                                                          "VALID"]
    assert {o.name: o.remaining for o in results[5].ratelimits} == {"requests": 0, "b": 0}
    assert results[5].credits == 3


def test_an_empty_batch_and_one_without_charges(verifier, manage, api):
    _, key = new_key(manage, api)
    assert verifier.verify_batch([], NOW) == []
    assert [r.code for r in verifier.verify_batch(batch((key, {}), (key, {})), NOW)] == ["VALID", "VALID"]

"""The compiled twin is the one loaded, and both twins behave identically: on the pure
functions, on the query language, and on random sequences of operations and clock times."""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile

import pytest
from blake3 import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keysvc._fast as fast
from keysvc._fast import PermissionQuerySyntaxError, RatelimitNotFoundError
from keysvc._fast import _core_c as compiled
from keysvc._fast import _core_py as python
from keysvc._fast import _query_c, _query_py
from keysvc.management import CreditsSpec, KeySpec, Management, RatelimitSpec
from keysvc.store import LmdbStore, StoreConfig

DAY = 86_400_000
YEAR_2000 = 946_684_800_000
YEAR_2100 = 4_102_444_800_000


def test_the_compiled_twin_is_loaded_after_install():
    assert compiled.COMPILED is True
    assert compiled.__file__.endswith(".so"), compiled.__file__
    assert fast.COMPILED is True and fast.Verifier is compiled.Verifier
    assert _query_c.__file__.endswith(".so")
    assert python.COMPILED is False


def test_keysvc_no_extensions_selects_the_python_twin():
    code = "import keysvc._fast as f; print(f.COMPILED, f.Verifier.__module__)"
    env = dict(os.environ, KEYSVC_NO_EXTENSIONS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "keysvc._fast._core_py"]


# -- pure functions -----------------------------------------------------------------------------

counts = st.integers(0, 10**15)
durations = st.integers(1000, 2_592_000_000)
times = st.integers(YEAR_2000, YEAR_2100)


@given(prev=counts, duration=durations, data=st.data())
def test_weighted_previous_is_exact_and_identical(prev, duration, data):
    elapsed = data.draw(st.integers(0, duration - 1))
    expected = prev * (duration - elapsed) // duration
    assert compiled.weighted_previous(prev, elapsed, duration) == expected
    assert python.weighted_previous(prev, elapsed, duration) == expected


def test_the_compiled_hash_is_blake3_at_every_length_up_to_two_chunks():
    # blake3_chunk.h hashes one chunk (1,024 bytes) in C; past it the package does. Every block
    # boundary is crossed here, and the spec's digest of the empty input is pinned.
    assert compiled.hash_key("").hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    text = "".join(chr(33 + (i * 7919) % 94) for i in range(2048))
    for length in range(2049):
        key = text[:length]
        assert compiled.hash_key(key) == python.hash_key(key) == blake3(key.encode()).digest(), length


@given(st.text(max_size=700))
def test_the_twins_hash_any_text_alike(key):
    # Non-ASCII keys take the UTF-8 of the string, as the package's key.encode() does.
    try:
        expected = blake3(key.encode()).digest()
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8, an error in both
        for core in (compiled, python):
            with pytest.raises(UnicodeEncodeError):
                core.hash_key(key)
        return
    assert compiled.hash_key(key) == python.hash_key(key) == expected


@given(days=st.integers(-1000, 200_000))
def test_civil_dates_match_the_standard_library(days):
    date = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    for core in (compiled, python):
        assert core.civil_from_days(days) == (date.year, date.month, date.day)
        assert core.days_from_civil(date.year, date.month, date.day) == days


@given(now=times, day=st.integers(1, 31), remaining=counts, last=times, amount=st.integers(1, 10**12))
def test_refills_are_identical(now, day, remaining, last, amount):
    for kind in (python.REFILL_NONE, python.REFILL_DAILY, python.REFILL_MONTHLY):
        instant = python.last_refill_instant(now, kind, day) if kind else None
        if kind:
            assert compiled.last_refill_instant(now, kind, day) == instant
            assert instant <= now and instant % DAY == 0
        assert compiled.apply_refill(remaining, last, kind, amount, day, now) == python.apply_refill(
            remaining, last, kind, amount, day, now)


@given(now=times, day=st.integers(1, 31))
def test_a_monthly_refill_is_on_its_day_or_the_months_last(now, day):
    instant = dt.datetime.fromtimestamp(python.last_refill_instant(now, python.REFILL_MONTHLY, day) / 1000,
                                        dt.timezone.utc)
    next_day = instant + dt.timedelta(days=1)
    assert instant.day == day or (instant.day < day and next_day.month != instant.month)


query_chars = st.sampled_from(list("ab.:*_-/()  \t") + ["AND", "OR", "and", "Or", "x1", "é", "&"])


@given(st.lists(query_chars, max_size=30).map("".join))
def test_the_query_parsers_agree(query):
    outcomes = []
    for module in (_query_c, _query_py):
        try:
            outcomes.append(("ok", module.parse_permission_query(query)))
        except PermissionQuerySyntaxError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]


@given(st.recursive(st.sampled_from(["a", "b", "c", "d"]),
                    lambda inner: st.tuples(st.sampled_from(["AND", "OR"]), st.lists(inner, min_size=2, max_size=3)),
                    max_leaves=12),
       st.frozensets(st.sampled_from(["a", "b", "c", "d"])))
def test_query_evaluation_matches_python_boolean_logic(tree, held):
    def text(node):
        if isinstance(node, str):
            return node
        return "(" + f" {node[0]} ".join(map(text, node[1])) + ")"

    def truth(node):
        if isinstance(node, str):
            return node in held
        values = [truth(child) for child in node[1]]
        return all(values) if node[0] == "AND" else any(values)

    query = text(tree)
    for module in (_query_c, _query_py):
        assert module.permission_query_holds(module.parse_permission_query(query), held) is truth(tree)


# -- whole verifications ------------------------------------------------------------------------

NAMES = ["requests", "tokens", "burst"]

ratelimit_specs = st.lists(
    st.builds(RatelimitSpec, name=st.sampled_from(NAMES), limit=st.integers(1, 5),
              duration=st.sampled_from([1000, 60_000, 3_600_000]), auto_apply=st.booleans()),
    max_size=3, unique_by=lambda spec: spec.name,
)
credit_specs = st.one_of(
    st.none(),
    st.builds(CreditsSpec, remaining=st.integers(0, 6)),
    st.builds(CreditsSpec, remaining=st.integers(0, 6), refill_interval=st.just("daily"),
              refill_amount=st.integers(1, 6)),
    st.builds(CreditsSpec, remaining=st.integers(0, 6), refill_interval=st.just("monthly"),
              refill_amount=st.integers(1, 6), refill_day=st.integers(1, 31)),
)
key_specs = st.fixed_dictionaries({
    "ratelimits": ratelimit_specs,
    "credits": credit_specs,
    "permissions": st.lists(st.sampled_from(["read", "write", "admin"]), max_size=3, unique=True),
    "enabled": st.sampled_from([True, True, True, False]),
    "expires_in": st.one_of(st.none(), st.none(), st.integers(-DAY, 40 * DAY)),
    "identity": st.booleans(),
})
requested_limits = st.lists(
    st.tuples(st.sampled_from(NAMES), st.one_of(st.none(), st.integers(0, 3)),
              st.one_of(st.none(), st.integers(0, 5)), st.one_of(st.none(), st.sampled_from([1000, 60_000]))),
    max_size=2, unique_by=lambda item: item[0],
)
verifications = st.tuples(st.just("verify"), st.integers(0, 3), st.fixed_dictionaries({
    "permissions": st.sampled_from([None, None, None, "read", "read AND write", "admin OR write", "(read"]),
    "credits_cost": st.sampled_from([-1, -1, 0, 1, 2, 5]),
    "ratelimits": st.one_of(st.none(), st.none(), requested_limits),
}))
batches = st.tuples(st.just("batch"), st.lists(verifications, min_size=1, max_size=6))
operations = st.one_of(
    verifications, verifications, verifications, verifications, batches,
    st.tuples(st.just("advance"), st.sampled_from([1, 250, 999, 30_000, 59_999, 3_600_000, DAY, 31 * DAY])),
    st.tuples(st.just("credits"), st.integers(0, 3), st.sampled_from(["set", "increment", "decrement"]),
              st.integers(0, 4)),
    st.tuples(st.just("toggle"), st.integers(0, 3)),
    st.tuples(st.just("identity"), ratelimit_specs),
)


class Node:
    """A store with keys made from the same specs, verified by one twin."""

    def __init__(self, core, path, specs, start):
        self.store = LmdbStore(StoreConfig(data_dir=path, map_size=1 << 26, counters_map_size=1 << 24))
        self.manage = Management(self.store)
        self.verifier = core.Verifier(self.store, cache_size=2)  # small: misses and hits both happen
        self.identity = self.manage.create_identity("acme")
        api = self.manage.create_api("twins")
        self.keys = []
        for spec in specs:
            expires = None if spec["expires_in"] is None else start + spec["expires_in"]
            record, plaintext = self.manage.create_key(KeySpec(
                api_id=api.id, ratelimits=spec["ratelimits"], credits=spec["credits"], enabled=spec["enabled"],
                permissions=spec["permissions"], expires=expires,
                external_id="acme" if spec["identity"] else None,
            ))
            self.keys.append((record, plaintext))

    def run(self, op, now):
        kind = op[0]
        if kind == "batch":
            requests = [(self.keys[v[1] % len(self.keys)][1], v[2]["permissions"], v[2]["credits_cost"],
                         v[2]["ratelimits"], None, None) for v in op[1]]
            return [type(r).__name__ if isinstance(r, Exception) else self.describe(r)
                    for r in self.verifier.verify_batch(requests, now)]
        if kind == "verify":
            record, plaintext = self.keys[op[1] % len(self.keys)]
            try:
                result = self.verifier.verify(plaintext, now, **op[2])
            except (PermissionQuerySyntaxError, RatelimitNotFoundError) as exc:
                return type(exc).__name__
            return self.describe(result)
        if kind == "credits":
            record = self.keys[op[1] % len(self.keys)][0]
            try:
                return self.manage.update_credits(record.id, op[2], op[3])[1]
            except Exception as exc:
                return type(exc).__name__
        if kind == "toggle":
            record = self.keys[op[1] % len(self.keys)][0]
            current = self.manage.get_key(record.id)
            self.manage.update_key(record.id, enabled=not current.enabled)
            return current.enabled
        if kind == "identity":
            self.manage.update_identity("acme", ratelimits=op[1])
            return None
        raise AssertionError(kind)

    @staticmethod
    def describe(result):
        limits = sorted((o.name, o.limit, o.duration, o.exceeded, o.remaining, o.reset, o.auto_apply)
                        for o in result.ratelimits or ())
        return result.code, result.credits, result.spent, limits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(key_specs, min_size=1, max_size=4), ops=st.lists(operations, min_size=5, max_size=60),
       start=st.integers(YEAR_2000, YEAR_2100 - 400 * DAY))
def test_twins_agree_on_random_operations_and_clock_times(specs, ops, start):
    # Credits set by management are stamped with the wall clock; start the simulated clock after
    # it so that refills are judged the same way in both stores.
    start = max(start, python.last_refill_instant(fast_now(), python.REFILL_DAILY, 0) + DAY + 1)
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [Node(core, os.path.join(tmp, name), specs, start) for core, name in ((compiled, "c"), (python, "p"))]
        try:
            now = start
            for op in ops:
                if op[0] == "advance":
                    now += op[1]
                    continue
                results = [node.run(op, now) for node in nodes]
                assert results[0] == results[1], (op, now)
        finally:
            for node in nodes:
                node.store.close()


def fast_now():
    from keysvc.management import now_ms

    return now_ms()

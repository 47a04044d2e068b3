"""The verification hot path: hash the key, find its decoded record in this worker's cache,
run the checks in the contract's order, and apply rate limits and credits in one LMDB write
transaction shared by every worker of the node.

    Verifier.verify(key, now_ms, ...)  (or verify_batch: many, one write txn)  -> VerifyResult
      hash_key (blake3; compiled: blake3_chunk.h)     the cache is keyed by the digest, never the key
      _sync_cache -> store.change_hint()               one 8-byte read; replays the change log if it moved
      _cache.get(digest) or _load -> store.resolve_key  miss: one LMDB read txn, decoded into a KeyView
      enabled, expires, api scope, permissions         from the KeyView, no I/O
      _charge -> counters env write txn                all rate limits, then credits: all or nothing

One source, two twins: Cython compiles this file as `_core_c` (through the `_core_c.py`
link, with the declarations in `_core_c.pxd`), and Python runs it as `_core_py`.
"""

import struct

from blake3 import blake3

from .errors import PermissionQuerySyntaxError, RatelimitNotFoundError

try:
    import cython

    COMPILED = cython.compiled
except ImportError:  # the pure-Python twin needs no Cython at run time
    COMPILED = False

if COMPILED:
    from ._query_c import parse_permission_query, permission_query_holds
else:
    from ._query_py import parse_permission_query, permission_query_holds

VALID = "VALID"
NOT_FOUND = "NOT_FOUND"
DISABLED = "DISABLED"
EXPIRED = "EXPIRED"
INSUFFICIENT_PERMISSIONS = "INSUFFICIENT_PERMISSIONS"
RATE_LIMITED = "RATE_LIMITED"
USAGE_EXCEEDED = "USAGE_EXCEEDED"

DAY_MS = 86_400_000
REFILL_NONE = 0
REFILL_DAILY = 1
REFILL_MONTHLY = 2

_CELL = struct.Struct("<qqq")  # window sequence, count in it, count in the one before
_CREDITS = struct.Struct("<qq")  # remaining, last refill (ms)
_DURATION = struct.Struct(">Q")

# The counters table: rate-limit windows and credit balances, keyed identifier first, so that a
# key's balance and its own windows sit side by side and one B-tree path serves a verification:
#
#     scope | len | identifier | "$"                                 a credit balance (scope "k")
#     scope | len | identifier | "w" | len | name | duration (8 B)    a window
#
# Buckets are (namespace, identifier, duration), never the limit (contract section 10.4). Key and
# identity limits are in scope "k", named by the limit's name; the ratelimit API's namespaces in
# scope "n", so that a key limit named like a namespace never shares its counter. Parts are
# length-prefixed, so that no two different (name, identifier) pairs meet in one key.
KEY_LIMITS = b"k"
NAMESPACE_LIMITS = b"n"
_BALANCE = b"$"
_WINDOW = b"w"
_MAX_BUCKET_PART = 200  # longer parts are hashed: LMDB keys are at most 511 bytes


def _part(text):
    raw = text.encode()
    if len(raw) > _MAX_BUCKET_PART:
        raw = b"#" + blake3(raw).digest()
    return bytes((len(raw),)) + raw


def hash_key(key):
    """The digest a key is stored and cached under: blake3 of the whole key string."""
    if COMPILED:
        return _blake3_one_chunk(key)
    return blake3(key.encode()).digest()


def _blake3_one_chunk(key):
    # Compiled twin only: the names it calls are C declarations in _core_c.pxd. A key of at most
    # one BLAKE3 chunk (every key keysvc issues) is hashed in C (blake3_chunk.h), without the
    # blake3 package's hasher object and calls; the same digest (tests/test_twins.py).
    data = PyUnicode_AsUTF8AndSize(key, cython.address(size))  # noqa: F821
    if keysvc_blake3_chunk(data, size, out) != 0:  # noqa: F821 - longer than a chunk
        return blake3(key.encode()).digest()
    return cython.cast(cython.p_char, out)[:32]  # noqa: F821


def bucket_key(scope, namespace, identifier, duration):
    """The counters-table key of one rate-limit window."""
    return scope + _part(identifier) + _WINDOW + _part(namespace) + _DURATION.pack(duration)


def credits_key(key_id):
    """The counters-table key of a key's credit balance."""
    return KEY_LIMITS + _part(key_id) + _BALANCE


def is_window(counter_key):
    """Whether a counters-table key names a window (else a balance)."""
    return counter_key[2 + counter_key[1]] == _WINDOW[0]


# -- the sliding window (contract section 6.4) -------------------------------------------------


def window_counts(raw, seq):
    """(the window's sequence, count in it, count in the one before) for a request in window
    `seq`, from a stored cell. A request stamped before the stored window (its worker took the
    time, then waited for the writer lock) counts in the stored window, never resets it."""
    if raw is None:
        return seq, 0, 0
    stored_seq, cur, prev = _CELL.unpack(raw)
    if stored_seq >= seq:
        return stored_seq, cur, prev
    if stored_seq == seq - 1:
        return seq, 0, cur
    return seq, 0, 0


def weighted_previous(prev, elapsed, duration):
    """trunc(prev * (1 - elapsed / duration)) in exact integer arithmetic: no overflow in 64 bits
    for a duration up to 2**31.5 ms (the contract allows 30 days, 2,592,000,000 ms)."""
    rest = duration - elapsed
    return (prev // duration) * rest + ((prev % duration) * rest) // duration


def cell_is_expired(bucket, raw, now_ms):
    """Whether a stored window can no longer count in any window (for the sweeper)."""
    duration = _DURATION.unpack(bucket[len(bucket) - 8:])[0]
    return _CELL.unpack(raw)[0] < now_ms // duration - 1


# -- credits and lazy refills (contract section 6.2) -----------------------------------------


def days_from_civil(y, m, d):
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    if m <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    mp = m - 3 if m > 2 else m + 9
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days):
    """(year, month, day) of a day number since 1970-01-01."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if m <= 2 else 0), m, d


def days_in_month(y, m):
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def last_refill_instant(now_ms, kind, refill_day):
    """The newest scheduled refill at or before now: 00:00 UTC today (daily), or 00:00 UTC of
    the refill day of this or last month, a day past the month's end meaning its last day."""
    today = now_ms // DAY_MS
    if kind == REFILL_DAILY:
        return today * DAY_MS
    y, m, d = civil_from_days(today)
    target = min(refill_day, days_in_month(y, m))
    if d < target:
        m -= 1
        if m == 0:
            y -= 1
            m = 12
        target = min(refill_day, days_in_month(y, m))
    return days_from_civil(y, m, target) * DAY_MS


def apply_refill(remaining, last_refill_at, kind, amount, refill_day, now_ms):
    """The balance as the refill schedule has it now. A refill SETS the balance to the amount
    (if below it) and nothing rolls over; applied lazily, so no refill is missed after downtime."""
    if kind == REFILL_NONE:
        return remaining, last_refill_at
    instant = last_refill_instant(now_ms, kind, refill_day)
    if last_refill_at < instant:
        if remaining < amount:
            remaining = amount
        last_refill_at = instant
    return remaining, last_refill_at


# -- what a verification returns -----------------------------------------------------------


class RatelimitRule:
    """A configured limit of a key or identity, with its bucket precomputed."""

    def __init__(self, id, name, limit, duration, auto_apply, bucket):
        self.id = id
        self.name = name
        self.limit = limit
        self.duration = duration
        self.auto_apply = auto_apply
        self.bucket = bucket


class RatelimitOutcome:
    """One checked limit, as verifyKey's `data.ratelimits[]` reports it."""

    def __init__(self, id, name, limit, duration, auto_apply, exceeded, remaining, reset):
        self.id = id
        self.name = name
        self.limit = limit
        self.duration = duration
        self.auto_apply = auto_apply
        self.exceeded = exceeded
        self.remaining = remaining
        self.reset = reset


class LimitOutcome:
    """One item of the ratelimit API's limit/multiLimit."""

    def __init__(self, passed, limit, remaining, reset):
        self.passed = passed
        self.limit = limit
        self.remaining = remaining
        self.reset = reset


class KeyView:
    """A key record decoded once, with its permissions as a set and its limits resolved."""

    def __init__(self, record):
        key = record.key
        identity = record.identity
        self.record = record
        self.key_id = key.id
        self.api_id = key.api_id
        self.keyspace_id = key.keyspace_id
        self.enabled = key.enabled
        self.expires = key.expires if key.expires is not None else -1
        self.permissions = frozenset(record.permission_slugs)
        self.has_credits = key.has_credits
        self.credits_key = credits_key(key.id)
        refill = key.refill
        if refill is None:
            self.refill_kind = REFILL_NONE
            self.refill_amount = 0
            self.refill_day = 0
        else:
            self.refill_kind = REFILL_MONTHLY if refill.interval == "monthly" else REFILL_DAILY
            self.refill_amount = refill.amount
            self.refill_day = refill.refill_day if refill.refill_day is not None else 1
        # Identity limits are counted on the identity id, so all its keys share them; a key
        # limit of the same name wins (contract section 6.3).
        rules = {}
        if identity is not None:
            for rl in identity.ratelimits:
                rules[rl.name] = RatelimitRule(
                    rl.id, rl.name, rl.limit, rl.duration, rl.auto_apply,
                    bucket_key(KEY_LIMITS, rl.name, identity.id, rl.duration),
                )
        for rl in key.ratelimits:
            rules[rl.name] = RatelimitRule(
                rl.id, rl.name, rl.limit, rl.duration, rl.auto_apply,
                bucket_key(KEY_LIMITS, rl.name, key.id, rl.duration),
            )
        self.rules = rules
        self.auto_rules = tuple(rule for rule in rules.values() if rule.auto_apply)


class Charge:
    """A verification that passed every check before the counters, with what it will charge."""

    def __init__(self, view, checks, cost):
        self.view = view
        self.checks = checks  # [(RatelimitRule, cost)], or None
        self.cost = cost  # credits


class VerifyResult:
    def __init__(self, code, key, credits, ratelimits, spent):
        self.code = code
        self.valid = code == VALID
        self.key = key  # the KeyView, or None for NOT_FOUND
        self.credits = credits  # remaining after this call; None when the key has no limit
        self.ratelimits = ratelimits  # list of RatelimitOutcome, or None when none was checked
        self.spent = spent  # credits charged by this call


class Verifier:
    """One per worker process, over the node's `LmdbStore` opened in that process."""

    def __init__(self, store, cache_size=200_000, query_cache_size=4096):
        self._store = store
        self._counters = store.counters_env
        self._counters_db = store.counters_db
        self._cache = {}
        self._cache_ids = {}
        self._cache_size = max(cache_size, 16)
        self._queries = {}
        self._query_cache_size = max(query_cache_size, 16)
        # A new worker caches nothing, so no committed change before now concerns it. Not the
        # hint: it can be ahead of the log, and a change numbered at it would then be missed.
        self._seen = store.last_change()
        self.hits = 0
        self.misses = 0

    # -- the key cache ----------------------------------------------------------------------

    def _sync_cache(self):
        if self._store.change_hint() == self._seen:
            return
        seen, changed = self._store.changes_since(self._seen)
        if changed is None:
            self._cache.clear()
            self._cache_ids.clear()
        else:
            for key_id in changed:
                digest = self._cache_ids.pop(key_id, None)
                if digest is not None:
                    self._cache.pop(digest, None)
        self._seen = seen

    def _load(self, key, digest):
        record = self._store.resolve_key(key, digest)
        if record is None:
            return None
        view = KeyView(record)
        if len(self._cache) >= self._cache_size:
            self._evict()
        self._cache[digest] = view
        self._cache_ids[view.key_id.encode()] = digest
        return view

    def _evict(self):
        # Oldest tenth first (dict order is insertion order): amortised O(1), no LRU bookkeeping
        # on the hit path.
        victims = []
        count = self._cache_size // 10 + 1
        for digest in self._cache:
            victims.append(digest)
            if len(victims) >= count:
                break
        for digest in victims:
            view = self._cache.pop(digest)
            self._cache_ids.pop(view.key_id.encode(), None)

    def lookup(self, key):
        """The cached view of a live key, or None: what whoami and root-key auth need."""
        digest = hash_key(key)
        self._sync_cache()
        view = self._cache.get(digest)
        if view is None:
            self.misses += 1
            view = self._load(key, digest)
        else:
            self.hits += 1
        return view

    def cache_len(self):
        return len(self._cache)

    def parse_query(self, query):
        """Parsed once per worker; raises PermissionQuerySyntaxError."""
        node = self._queries.get(query)
        if node is None:
            node = parse_permission_query(query)
            if len(self._queries) >= self._query_cache_size:
                self._queries.clear()
            self._queries[query] = node
        return node

    # -- verification ------------------------------------------------------------------------

    def verify(self, key, now_ms, permissions=None, credits_cost=-1, ratelimits=None, api_ids=None,
               keyspace_ids=None):
        """Verify one key. `permissions` is a query string; `credits_cost` -1 means 'not given'
        (a key with credits then costs 1); `ratelimits` is a list of (name, cost, limit, duration)
        with None for what the request left out; `api_ids`/`keyspace_ids` restrict which keys may
        be found (None: any). Raises PermissionQuerySyntaxError or RatelimitNotFoundError for bad
        requests, before anything is charged."""
        prepared = self._prepare(key, now_ms, permissions, credits_cost, ratelimits, api_ids, keyspace_ids)
        if type(prepared) is VerifyResult:
            return prepared
        txn = self._counters.begin(write=True, db=self._counters_db)
        try:
            result = self._charge(txn, prepared, now_ms)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
        return result

    def verify_batch(self, requests, now_ms):
        """Verify many keys, charging all of them in ONE write transaction (group commit): the
        writer lock, the commit and py-lmdb's GIL hand-offs are paid once per batch. Each
        verification is still all-or-nothing and sees the charges of those before it. `requests`
        holds verify()'s arguments after now_ms, as tuples; the answer holds a VerifyResult, or
        the exception that request raised, for each."""
        results = []
        pending = []
        for i in range(len(requests)):
            key, permissions, credits_cost, ratelimits, api_ids, keyspace_ids = requests[i]
            try:
                prepared = self._prepare(key, now_ms, permissions, credits_cost, ratelimits, api_ids, keyspace_ids)
            except (PermissionQuerySyntaxError, RatelimitNotFoundError) as exc:
                results.append(exc)
                continue
            if type(prepared) is not VerifyResult:
                pending.append(i)
            results.append(prepared)
        if pending:
            txn = self._counters.begin(write=True, db=self._counters_db)
            try:
                for i in pending:
                    results[i] = self._charge(txn, results[i], now_ms)
                txn.commit()
            except BaseException:
                txn.abort()
                raise
        return results

    def _prepare(self, key, now_ms, permissions, credits_cost, ratelimits, api_ids, keyspace_ids):
        """Everything before the counters: the final VerifyResult, or a Charge still to apply."""
        query = None
        if permissions is not None:
            query = self.parse_query(permissions)
        view = self.lookup(key)
        if view is None or not view.api_id:  # a root key belongs to no API and verifies as none
            return VerifyResult(NOT_FOUND, None, None, None, 0)
        if api_ids is not None and view.api_id not in api_ids:
            return VerifyResult(NOT_FOUND, None, None, None, 0)
        if keyspace_ids is not None and view.keyspace_id not in keyspace_ids:
            return VerifyResult(NOT_FOUND, None, None, None, 0)
        if not view.enabled:
            return self._denied(DISABLED, view, now_ms)
        if view.expires >= 0 and now_ms > view.expires:
            return self._denied(EXPIRED, view, now_ms)
        if query is not None and not permission_query_holds(query, view.permissions):
            return self._denied(INSUFFICIENT_PERMISSIONS, view, now_ms)
        checks = self._ratelimit_checks(view, ratelimits)
        if checks is None and not view.has_credits:
            return VerifyResult(VALID, view, None, None, 0)
        cost = 0
        if view.has_credits:
            cost = 1 if credits_cost < 0 else credits_cost
        return Charge(view, checks, cost)

    def _ratelimit_checks(self, view, requested):
        """[(rule, cost)] for this verification: auto-applied rules at cost 1, each replaced by
        a requested entry of the same name; a requested entry with limit and duration is ad hoc."""
        if not requested:
            if not view.auto_rules:
                return None
            return [(rule, 1) for rule in view.auto_rules]
        chosen = {}
        for rule in view.auto_rules:
            chosen[rule.name] = (rule, 1)
        for name, cost, limit, duration in requested:
            if cost is None:
                cost = 1
            if limit is not None and duration is not None:
                rule = RatelimitRule(
                    None, name, limit, duration, False, bucket_key(KEY_LIMITS, name, view.key_id, duration)
                )
            else:
                rule = view.rules.get(name)
                if rule is None:
                    raise RatelimitNotFoundError(name)
            chosen[name] = (rule, cost)
        return list(chosen.values())

    def _denied(self, code, view, now_ms):
        credits = None
        if view.has_credits:
            with self._counters.begin(db=self._counters_db) as txn:
                credits = self._balance(txn, view, now_ms)[0]
        return VerifyResult(code, view, credits, None, 0)

    def _balance(self, txn, view, now_ms):
        """(remaining, last refill) of the key as its refill schedule has it now."""
        raw = txn.get(view.credits_key)
        if raw is None:
            return 0, now_ms
        remaining, last_refill_at = _CREDITS.unpack(raw)
        return apply_refill(remaining, last_refill_at, view.refill_kind, view.refill_amount, view.refill_day,
                            now_ms)

    def _charge(self, txn, charge, now_ms):
        """Rate limits, then credits, inside a write transaction: written only if all pass, so
        a denied request is charged nothing."""
        view = charge.view
        checks = charge.checks
        outcomes = None
        cells = []
        if checks is not None:
            outcomes = []
            passed = True
            for rule, rule_cost in checks:
                ok, remaining, reset, cell = self._window(txn, rule.bucket, rule.limit, rule.duration, rule_cost, now_ms)
                if not ok:
                    passed = False
                elif cell is not None:
                    cells.append((rule.bucket, cell))
                outcomes.append(RatelimitOutcome(
                    rule.id, rule.name, rule.limit, rule.duration, rule.auto_apply, not ok, remaining, reset,
                ))
            if not passed:
                credits = self._balance(txn, view, now_ms)[0] if view.has_credits else None
                return VerifyResult(RATE_LIMITED, view, credits, outcomes, 0)
        credits = None
        cost = charge.cost
        if view.has_credits:
            balance, last_refill_at = self._balance(txn, view, now_ms)
            if cost > 0 and balance < cost:
                return VerifyResult(USAGE_EXCEEDED, view, balance, outcomes, 0)
            balance -= cost
            txn.put(view.credits_key, _CREDITS.pack(balance, last_refill_at))
            credits = balance
        for bucket, cell in cells:
            txn.put(bucket, cell)
        return VerifyResult(VALID, view, credits, outcomes, cost)

    def _window(self, txn, bucket, limit, duration, cost, now_ms):
        """(passes, remaining, reset, the cell to store if it passes and costs) for one bucket:
        effective = cur + trunc(prev * (1 - elapsed)) + cost, denied if over the limit (a limit
        of 0 always denies)."""
        seq, cur, prev = window_counts(txn.get(bucket), now_ms // duration)
        start = seq * duration
        elapsed = now_ms - start if now_ms > start else 0
        effective = cur + weighted_previous(prev, elapsed, duration) + cost
        if limit > 0 and effective <= limit:
            cell = _CELL.pack(seq, cur + cost, prev) if cost > 0 else None
            return True, limit - effective, start + duration, cell
        return False, 0, start + duration, None

    # -- the ratelimit API (ratelimit.limit / multiLimit) ------------------------------------------

    def limit(self, items, now_ms):
        """Check (bucket, limit, duration, cost) items all-or-nothing: counters are incremented
        only if every item passes. Returns (all passed, [LimitOutcome])."""
        txn = self._counters.begin(write=True, db=self._counters_db)
        try:
            outcomes = []
            cells = []
            passed = True
            for bucket, limit, duration, cost in items:
                ok, remaining, reset, cell = self._window(txn, bucket, limit, duration, cost, now_ms)
                if not ok:
                    passed = False
                elif cell is not None:
                    cells.append((bucket, cell))
                outcomes.append(LimitOutcome(ok, limit, remaining, reset))
            if passed:
                for bucket, cell in cells:
                    txn.put(bucket, cell)
                txn.commit()
            else:
                txn.abort()
        except BaseException:
            txn.abort()
            raise
        return passed, outcomes

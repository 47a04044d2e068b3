"""Where does one verification's time go? The hot path of hotpath.py, taken apart.

    .venv/bin/python bench/hotpath_parts.py            # full run, a few minutes (builds a 1M-key store)
    .venv/bin/python bench/hotpath_parts.py --quick    # 100k keys, fewer repeats

Times each piece of `Verifier.verify` on its own, in both twins where the piece is ours: the
lookup (blake3, the change hint, the cache dict), the LMDB write transaction of the counters
environment done with raw py-lmdb calls (what no twin can make faster), and the whole path.
Then the same pieces on random keys among 10k and among 1M stored keys, for the scale row.
Same method as hotpath.py: batches timed with perf_counter, round-robin, medians.
"""

import argparse
import gc
import itertools
import random
import sys
from pathlib import Path
from time import perf_counter

from blake3 import blake3

sys.dont_write_bytecode = True  # no __pycache__ in bench/ for importing the sibling script
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hotpath  # noqa: E402  (the sibling script: its machine header, stores and timing helpers)
from hotpath import DURATION_MS, core_c, core_py, key_spec, now_ms  # noqa: E402


def each(fn, item):
    """run(n): fn(item) n times."""

    def run(n):
        batch = [item] * n
        start = perf_counter()
        for x in batch:
            fn(x)
        return perf_counter() - start

    return run


def empty_loop(item):
    def run(n):
        batch = [item] * n
        start = perf_counter()
        for _ in batch:
            pass
        return perf_counter() - start

    return run


def no_arg(fn):
    def run(n):
        start = perf_counter()
        for _ in itertools.repeat(None, n):
            fn()
        return perf_counter() - start

    return run


def verify_each(verifier, keys):
    def run(n):
        return hotpath.time_verify(verifier, (keys * (n // len(keys) + 1))[:n])

    return run


def limit_each(verifier, bucket):
    items = [(bucket, hotpath.HUGE_LIMIT, DURATION_MS, 1)]

    def run(n):
        limit = verifier.limit
        now = now_ms()
        start = perf_counter()
        for _ in itertools.repeat(None, n):
            limit(items, now)
        return perf_counter() - start

    return run


def write_txn(store, pairs, rate_limit=True, credits=True, commit=True):
    """run(n): one counters write transaction per item of `pairs` ((bucket, credits key), in
    order, cycled), reading and rewriting the values the way `_charge` does, with raw py-lmdb."""
    env, db = store.counters_env, store.counters_db

    def run(n):
        batch = (pairs * (n // len(pairs) + 1))[:n]
        begin = env.begin
        start = perf_counter()
        for bucket, credits_key in batch:
            txn = begin(write=True, db=db)
            if rate_limit:
                txn.put(bucket, txn.get(bucket))
            if credits:
                txn.put(credits_key, txn.get(credits_key))
            if commit:
                txn.commit()
            else:
                txn.abort()
        return perf_counter() - start

    return run


def write_txn_positional(store, pairs):
    """write_txn with every argument positional: py-lmdb then builds no keyword dict per call."""
    env, db = store.counters_env, store.counters_db

    def run(n):
        batch = (pairs * (n // len(pairs) + 1))[:n]
        begin = env.begin
        start = perf_counter()
        for bucket, credits_key in batch:
            txn = begin(db, None, True)
            txn.put(bucket, txn.get(bucket))
            txn.put(credits_key, txn.get(credits_key))
            txn.commit()
        return perf_counter() - start

    return run

    return run


def lookup_each(verifier, keys):
    def run(n):
        batch = (keys * (n // len(keys) + 1))[:n]
        lookup = verifier.lookup
        start = perf_counter()
        for key in batch:
            lookup(key)
        return perf_counter() - start

    return run


# -- the pieces -------------------------------------------------------------------------------------


def hot_pieces(stores):
    """(label, compiled or only run, pure-Python run or None) on one hot key of each kind."""
    store, management, api = stores.new("parts")
    _, plain = management.create_key(key_spec(api.id, ratelimit=False, credits=False))
    key, full = management.create_key(key_spec(api.id, ratelimit=True, credits=True))
    _, limited = management.create_key(key_spec(api.id, ratelimit=True, credits=False))
    c, p = core_c.Verifier(store, cache_size=1000), core_py.Verifier(store, cache_size=1000)
    bucket = core_c.bucket_key(core_c.KEY_LIMITS, "requests", key.id, DURATION_MS)
    c.verify(full, now_ms())  # the cell and the balance exist before they are timed
    pair = [(bucket, core_c.credits_key(key.id))]
    limiter_bucket = core_c.bucket_key(core_c.NAMESPACE_LIMITS, "bench", "user_1", DURATION_MS)
    digest = core_c.hash_key(full)
    cache = {digest: object()}
    return [
        ("A1 empty loop (subtract from every row)", empty_loop(full), None),
        ("A2 blake3(key.encode()).digest(), inline", each(lambda k: blake3(k.encode()).digest(), full), None),
        ("A3 hash_key(key)", each(core_c.hash_key, full), each(core_py.hash_key, full)),
        ("A4 store.change_hint()", no_arg(store.change_hint), None),
        ("A5 dict.get(digest), 1 entry", each(cache.get, digest), None),
        ("A6 Verifier.lookup(key): A3 + A4 + A5", lookup_each(c, [full]), lookup_each(p, [full])),
        ("A7 verify: no ratelimit, no credits (hotpath 1/4)", verify_each(c, [plain]), verify_each(p, [plain])),
        ("B1 counters write txn: begin + abort", write_txn(store, pair, False, False, False), None),
        ("B2 counters write txn: begin + commit, nothing written", write_txn(store, pair, False, False), None),
        ("B3 B2 + get/put of one rate-limit cell", write_txn(store, pair, True, False), None),
        ("B4 B2 + get/put of the cell and of the balance", write_txn(store, pair), None),
        ("B5 B4 with positional arguments (no db= keyword)", write_txn_positional(store, pair), None),
        ("C1 Verifier.limit, one bucket (hotpath 7a)", limit_each(c, limiter_bucket), limit_each(p, limiter_bucket)),
        ("C2 verify: + 1 ratelimit (hotpath 2/5)", verify_each(c, [limited]), verify_each(p, [limited])),
        ("C3 verify: + ratelimit and credits (hotpath 3/6)", verify_each(c, [full]), verify_each(p, [full])),
    ]


def counters_stats(store):
    """The B-tree shape of the counters table: a write transaction copies the pages on its path
    (copy-on-write); a key's balance and its windows share one path."""
    with store.counters_env.begin() as txn:
        return [("counters", txn.stat(store.counters_db))]


def scale_pieces(stores, counts, depths):
    """(label, {column: run}) on random keys among `counts` stored keys (and on one hot key)."""
    rows = {"lookup": {}, "cell": {}, "txn": {}, "verify": {}}
    for count in counts:
        store, management, api = stores.new(f"parts-{count}")
        started = perf_counter()
        plaintexts, key_ids = hotpath.import_many(management, api.id, count)
        verifier = core_c.Verifier(store, cache_size=count + 1000)
        hotpath.time_verify(verifier, random.Random(count).sample(plaintexts, count))
        print(f"  {count:>9,} keys ready in {perf_counter() - started:.1f} s", file=sys.stderr)
        depths.append(f"{count:,} keys: " + ", ".join(
            f"{name} db depth {stat['depth']}, {stat['leaf_pages']:,} leaf pages"
            for name, stat in counters_stats(store)))
        rng = random.Random(-count)
        order = [rng.randrange(count) for _ in range(200_000)]
        keys = [plaintexts[i] for i in order]
        pairs = [(core_c.bucket_key(core_c.KEY_LIMITS, "requests", key_ids[i], DURATION_MS), core_c.credits_key(key_ids[i]))
                 for i in order]
        column = f"random of {count:,}"
        rows["lookup"][column] = lookup_each(verifier, keys)
        rows["cell"][column] = write_txn(store, pairs, True, False)
        rows["txn"][column] = write_txn(store, pairs)
        rows["verify"][column] = verify_each(verifier, keys)
        if count == counts[0]:
            rows["lookup"]["one hot key"] = lookup_each(verifier, keys[:1])
            rows["cell"]["one hot key"] = write_txn(store, pairs[:1], True, False)
            rows["txn"]["one hot key"] = write_txn(store, pairs[:1])
            rows["verify"]["one hot key"] = verify_each(verifier, keys[:1])
    return [
        ("Verifier.lookup (A6)", rows["lookup"]),
        ("raw counters write txn, cell only (B3)", rows["cell"]),
        ("raw counters write txn, cell + balance (B4)", rows["txn"]),
        ("verify: ratelimit and credits (C3, hotpath 8)", rows["verify"]),
    ]


def measure(runs, mode):
    """{name: median us/op} of every run, calibrated then timed round-robin."""
    sizes = {name: hotpath.calibrate(run, mode.batch_seconds) for name, run in runs.items()}
    samples = {name: [] for name in runs}
    for _ in range(mode.repeats):
        for name, run in runs.items():
            samples[name].append(run(sizes[name]) / sizes[name] * 1e6)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k keys and fewer repeats")
    args = parser.parse_args()
    mode_name, mode = ("quick", hotpath.QUICK) if args.quick else ("full", hotpath.FULL)
    header = hotpath.machine_lines(mode_name, mode)
    counts = (mode.small_keys, mode.large_keys)
    stores = hotpath.Stores()
    try:
        print("setting up stores ...", file=sys.stderr)
        hot = hot_pieces(stores)
        depths = []
        scale = scale_pieces(stores, counts, depths)
        runs = {}
        for label, c_run, p_run in hot:
            runs[(label, "c")] = c_run
            if p_run is not None:
                runs[(label, "py")] = p_run
        for label, columns in scale:
            for column, run in columns.items():
                runs[(label, column)] = run
        gc.collect()
        print("measuring ...", file=sys.stderr)
        medians = measure(runs, mode)
    finally:
        stores.close()

    print("# keysvc hot path, taken apart: median us per operation\n")
    for line in header:
        print(f"- {line}")
    print("\n| piece | compiled (or the only) | pure-Python twin | python - compiled |")
    print("| --- | ---: | ---: | ---: |")
    for label, _, p_run in hot:
        c_us = medians[(label, "c")]
        if p_run is None:
            print(f"| {label} | {c_us:.3f} | — | — |")
        else:
            p_us = medians[(label, "py")]
            print(f"| {label} | {c_us:.3f} | {p_us:.3f} | {p_us - c_us:+.3f} |")
    columns = ["one hot key"] + [f"random of {count:,}" for count in counts]
    print(f"\n| compiled, us/op | {' | '.join(columns)} | {columns[2]} / {columns[1]} |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    for label, runs_by_column in scale:
        values = [medians[(label, column)] for column in columns]
        print(f"| {label} | {' | '.join(f'{v:.3f}' for v in values)} | {values[2] / values[1]:.2f}x |")
    print()
    for line in depths:
        print(f"- counters env after warming, {line}")


if __name__ == "__main__":
    main()

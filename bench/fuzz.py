"""Does any request make `keysvc serve` break its own contract? The long run of tests/test_fuzz.py's part a.

    .venv/bin/python bench/fuzz.py [--examples 500] [--seed N] [--mode all] [--workers 2] [--operations REGEX]
                                   [--cli] [--url URL --root-key KEY]

Starts `keysvc serve --workers 2` on loopback (fresh data dir, a root key with every permission; the
way tests/server.py does), loads the server's own GET /openapi.json with schemathesis, and for every
operation and generation mode (positive: bodies the schema accepts; negative: bodies it refuses) runs
`--examples` hypothesis examples from `--seed` (random unless given, printed first: pass it back to
repeat a run exactly), some with the ids of real resources (an API, a key, an identity, a permission,
a role, a namespace and override, made first) swapped in so that handlers answer with real data,
each sent with the root key as bearer auth and checked as the test does:
not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
and the contract's envelope (meta.requestId on every answer, then data or error; error.status equal
to the HTTP status). A failure is shrunk by hypothesis and printed with a curl command that
reproduces it. Prints the machine, the seed, one row per operation and mode (requests sent, the
statuses seen, the result), then every failure.

--cli also runs schemathesis' own engine (`schemathesis run`: its coverage, fuzzing and stateful
phases, the stateful one chaining createKey -> getKey and the like) against the same server, with
the same checks, seed and example count, this file loaded as its hooks module for the envelope
check; its output follows the table. --url/--root-key fuzz a server that is already running.

Unlike the benchmarks beside it, this exits 1 if any check failed (2 if the run itself broke).
"""
# ruff: noqa: E402
from __future__ import annotations

import os
import sys

# Run as `python bench/fuzz.py`, this file's folder comes first on sys.path, and bench/http.py would
# shadow the standard library's `http` package (which requests imports): move that folder last.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))  # last: the standard library first, bench/machine.py still found

import argparse
import collections
import importlib.util
import json
import platform
import random
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import schemathesis
from machine import REPO, keysvc_revision, version

REQUEST_ID = re.compile(r"^req_[A-Za-z0-9]{9}$")
ERROR_TYPE = "https://unkey.com/docs/errors/"
CHECK_NAMES = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance"]


def _routes() -> dict[str, tuple[bool, bool]]:
    """path -> (answers meta only, paginated), from the route table."""
    import keysvc.http.app  # noqa: F401  (registers every route)
    from keysvc.http.routing import ROUTES

    return {path: (r.response_type is None, r.paginated) for path, r in ROUTES.items()}


ROUTES = _routes()


@schemathesis.check
def keysvc_envelope(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every answer, whatever its status, is in the contract's envelope (docs/unkey-v2-contract.md section 2)."""
    if case.path == "/openapi.json":
        return
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type in ("application/json", "application/problem+json"), f"content-type {content_type!r}"
    doc = json.loads(response.content)
    assert isinstance(doc, dict) and isinstance(doc.get("meta"), dict), f"no meta object: {doc!r:.300}"
    assert set(doc["meta"]) == {"requestId"} and REQUEST_ID.match(str(doc["meta"]["requestId"])), \
        f"bad meta: {doc['meta']!r}"
    status = response.status_code
    meta_only, paginated = ROUTES.get(case.path, (False, False))
    if 200 <= status < 300:
        expected = {"meta"} if meta_only else {"meta", "data", "pagination"} if paginated else {"meta", "data"}
        assert set(doc) == expected, f"a {status} with keys {sorted(doc)}, not {sorted(expected)}"
    else:
        assert set(doc) == {"meta", "error"}, f"a {status} with keys {sorted(doc)}, not ['error', 'meta']"
        error = doc["error"]
        assert error.get("status") == status, f"error.status {error.get('status')!r} on a {status}"
        assert str(error.get("type", "")).startswith(ERROR_TYPE), f"error.type {error.get('type')!r}"
        if status == 400:
            assert isinstance(error.get("errors"), list), "a 400 without error.errors[]"


# -- a world of real resources, swapped into some generated bodies (as tests/test_fuzz.py does) ------

DESTRUCTIVE = {"/v2/apis.deleteApi", "/v2/keys.deleteKey", "/v2/keys.rerollKey", "/v2/identities.deleteIdentity",
               "/v2/permissions.deletePermission", "/v2/permissions.deleteRole", "/v2/ratelimit.deleteOverride"}


def make_world(session: Any, base_url: str, root_key: str, tag: str) -> dict[str, list[Any]]:
    """Real resources, by the request field that names them, so that handlers run past "not found"
    and the answers' schemas are checked on real data too."""
    def post(path: str, body: Any) -> Any:
        response = session.post(base_url + path, json=body, headers={"Authorization": f"Bearer {root_key}"},
                                timeout=30)
        response.raise_for_status()
        return response.json()["data"]

    api = post("/v2/apis.createApi", {"name": f"{tag}-api"})["apiId"]
    post("/v2/permissions.createPermission", {"name": f"{tag}.read", "slug": f"{tag}.read"})
    post("/v2/permissions.createRole", {"name": f"{tag}-role", "permissions": [f"{tag}.read"]})
    key = post("/v2/keys.createKey", {
        "apiId": api, "externalId": f"{tag}_ext", "roles": [f"{tag}-role"], "permissions": [f"{tag}.write"],
        "meta": {"tier": "fuzz", "n": [1, 2.5, None, True]},
        "credits": {"remaining": 100, "refill": {"interval": "daily", "amount": 100}},
        "ratelimits": [{"name": f"{tag}-rl", "limit": 1000, "duration": 60_000, "autoApply": True}],
    })
    post("/v2/ratelimit.limit", {"namespace": f"{tag}-ns", "identifier": f"{tag}-id", "limit": 5, "duration": 60_000})
    post("/v2/ratelimit.setOverride", {"namespace": f"{tag}-ns", "identifier": f"{tag}-id", "limit": 7,
                                       "duration": 60_000})
    return {
        "apiId": [api], "keyId": [key["keyId"]], "key": [key["key"]], "externalId": [f"{tag}_ext"],
        "identity": [f"{tag}_ext"], "permission": [f"{tag}.read"], "permissions": [[f"{tag}.read"], f"{tag}.read"],
        "role": [f"{tag}-role"], "roles": [[f"{tag}-role"]], "name": [f"{tag}-rl", f"{tag}-role"],
        "namespace": [f"{tag}-ns"], "identifier": [f"{tag}-id"],
    }


def with_world(data: Any, value: Any, world: dict[str, list[Any]], path: str) -> Any:
    from hypothesis import strategies as st

    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in world and path not in DESTRUCTIVE and data.draw(st.booleans(), label=f"real {key}"):
                out[key] = data.draw(st.sampled_from(world[key]), label=key)
            else:
                out[key] = with_world(data, item, world, path)
        return out
    if isinstance(value, list):
        return [with_world(data, item, world, path) for item in value]
    return value


# -- the machine ----------------------------------------------------------------------------------






def load_test_server() -> Any:
    """tests/server.py (the end-to-end tests' server), by path: bench/ is no package."""
    spec = importlib.util.spec_from_file_location("keysvc_test_server", REPO / "tests" / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the run --------------------------------------------------------------------------------------


class Outcome:
    def __init__(self, label: str, mode: str) -> None:
        self.label = label
        self.mode = mode
        self.statuses: collections.Counter[int] = collections.Counter()
        self.error: str | None = None
        self.curl: str | None = None
        self.seconds = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())


def fuzz_operation(operation: Any, mode: Any, args: argparse.Namespace, base_url: str, root_key: str,
                   session: Any, world: dict[str, list[Any]]) -> Outcome:
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis import strategies as st
    from schemathesis import checks

    check_list = [getattr(checks, name) for name in CHECK_NAMES] + [keysvc_envelope]
    outcome = Outcome(operation.label, mode.value)
    auth = {"Authorization": f"Bearer {root_key}"}
    last_failure: list[Any] = []

    @seed(args.seed)
    @settings(max_examples=args.examples, database=None, deadline=None, derandomize=False, print_blob=False,
              phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), data=st.data())
    def run(case: schemathesis.Case, data: Any) -> None:
        if isinstance(case.body, (dict, list)):
            case.body = with_world(data, case.body, world, case.path)
        response = case.call(base_url=base_url, session=session, headers=auth, timeout=30)
        outcome.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=check_list, headers=auth)
        except BaseException:
            last_failure[:] = [case]
            raise

    started = time.perf_counter()
    try:
        run()
    except BaseException as exc:  # noqa: BLE001 - a failed check (or a group of them) is a result
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome.error = f"{type(exc).__name__}: {exc}"
        if last_failure and "curl " not in outcome.error:  # schemathesis' failures carry their own
            outcome.curl = last_failure[0].as_curl_command(headers={"Authorization": "Bearer $ROOT_KEY"})
    outcome.seconds = time.perf_counter() - started
    return outcome


def run_cli(args: argparse.Namespace, base_url: str, root_key: str) -> int:
    """schemathesis' own engine: coverage, fuzzing and stateful phases, with this file's envelope check."""
    argv = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base_url}/openapi.json",
            "--header", f"Authorization: Bearer {root_key}", "--checks", ",".join([*CHECK_NAMES, "keysvc_envelope"]),
            "--max-examples", str(args.examples), "--seed", str(args.seed), "--mode", args.mode,
            "--phases", "examples,coverage,fuzzing,stateful", "--no-color", "--warnings", "off"]
    if args.operations:
        argv += ["--include-path-regex", args.operations]
    shown = [a if not a.startswith("Authorization:") else "Authorization: Bearer $ROOT_KEY" for a in argv]
    print(f"\n## schemathesis run (its own engine)\n\n    SCHEMATHESIS_HOOKS={Path(__file__).resolve()} "
          f"{shlex.join(shown)}\n", flush=True)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).resolve())}
    return subprocess.run(argv, env=env, cwd=tempfile.gettempdir()).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="hypothesis examples per operation and mode")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--mode", choices=["all", "positive", "negative"], default="all")
    parser.add_argument("--workers", type=int, default=2, help="keysvc serve --workers")
    parser.add_argument("--operations", default=None, help="only the paths this regex finds, e.g. 'keys\\.'")
    parser.add_argument("--cli", action="store_true", help="also run schemathesis' engine (coverage, stateful)")
    parser.add_argument("--url", default=None, help="fuzz this running server instead of starting one")
    parser.add_argument("--root-key", default=None, help="with --url: a root key with every permission")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    if bool(args.url) != bool(args.root_key):
        parser.error("--url and --root-key go together")

    import requests
    from schemathesis import GenerationMode

    print("# bench/fuzz.py: schemathesis against keysvc's own /openapi.json\n")
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"- python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"- packages: schemathesis {version('schemathesis')}, hypothesis {version('hypothesis')}, "
          f"granian {version('granian')}, msgspec {version('msgspec')}")
    print(f"- keysvc: {keysvc_revision()}")
    print(f"- seed: {args.seed}   (repeat with --seed {args.seed})")
    print(f"- examples: {args.examples} per operation and mode; modes: {args.mode}; checks: "
          f"{', '.join(CHECK_NAMES)}, keysvc_envelope")

    server = None
    workdir = tempfile.TemporaryDirectory(prefix="keysvc-fuzz-")
    try:
        if args.url:
            base_url, root_key = args.url.rstrip("/"), args.root_key
            print(f"- server: {base_url} (already running)")
        else:
            server = load_test_server().Server(Path(workdir.name) / "data", workers=args.workers)
            base_url, root_key = server.url, server.root_key
            print(f"- server: keysvc serve --workers {args.workers} on {base_url}, log {server.log_path}")
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=30)
        operations = []
        for result in schema.get_all_operations():
            operation = result.ok()  # raises on an operation schemathesis cannot read: a schema problem
            if args.operations is None or re.search(args.operations, operation.path):
                operations.append(operation)
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if args.mode == "all" \
            else [GenerationMode(args.mode)]
        print(f"- operations: {len(operations)} (OpenAPI {schema.raw_schema.get('openapi')})\n", flush=True)

        outcomes: list[Outcome] = []
        started = time.perf_counter()
        with requests.Session() as session:
            world = make_world(session, base_url, root_key, f"fuzz{random.SystemRandom().randrange(16**8):08x}")
            for operation in operations:
                for mode in modes:
                    has_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
                    if mode is GenerationMode.NEGATIVE and not has_input:
                        continue  # nothing to make invalid
                    outcome = fuzz_operation(operation, mode, args, base_url, root_key, session, world)
                    outcomes.append(outcome)
                    mark = "FAIL" if outcome.error else "ok"
                    print(f"  {mark:4} {outcome.label} [{outcome.mode}] {outcome.requests} requests, "
                          f"{outcome.seconds:.1f} s", flush=True)
        elapsed = time.perf_counter() - started

        print("\n| operation | mode | requests | statuses seen | result |")
        print("| --- | --- | ---: | --- | --- |")
        for o in outcomes:
            statuses = ", ".join(f"{s}×{n}" for s, n in sorted(o.statuses.items()))
            print(f"| {o.label} | {o.mode} | {o.requests} | {statuses} | {'FAIL' if o.error else 'pass'} |")
        failed = [o for o in outcomes if o.error]
        total = collections.Counter[int]()
        for o in outcomes:
            total.update(o.statuses)
        print(f"\n{len(outcomes)} runs, {sum(total.values())} requests in {elapsed:.0f} s; statuses: "
              + ", ".join(f"{s}×{n}" for s, n in sorted(total.items())))
        print(f"{len(failed)} failed; 5xx answers: {sum(n for s, n in total.items() if s >= 500)}; seed {args.seed}")
        for o in failed:
            print(f"\n## FAIL {o.label} [{o.mode}]\n\n{o.error}\n")
            if o.curl:
                print(f"Reproduce with:\n\n    {o.curl}\n")
            print("(schemathesis filters the Authorization header out of its curl commands: send "
                  "'Authorization: Bearer <a root key of that server>')")
        if server is not None and server.process.poll() is not None:
            print(f"\nkeysvc serve exited with {server.process.returncode} during the run:\n{server.log()[-3000:]}")
            return 2
        cli_status = run_cli(args, base_url, root_key) if args.cli else 0
        return 1 if failed or cli_status else 0
    finally:
        if server is not None:
            log = server.log()
            tracebacks = log.count("Traceback (most recent call last)")
            code = server.stop()
            print(f"\nkeysvc serve: stopped (exit {code}); {tracebacks} tracebacks in its log")
        workdir.cleanup()


if __name__ == "__main__":
    sys.exit(main())

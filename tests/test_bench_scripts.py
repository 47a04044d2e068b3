"""bench/soak.py, bench/timing.py and bench/app.py, run as bench/README.md says but with short settings, as
subprocesses: each must run to its end, print its tables and verdict, and exit 0. timing.py's exit code is
SECURITY.md's timing claim (over HTTP, the median verification of an unknown key within 2x of a VALID one's);
soak.py's is "no errors" (its RSS and p99 verdicts are printed, and judged only by the full run,
bench/README.md). Also the soak's RSS verdict itself, on made-up samples: a leak is caught, a cache that levels
off is not."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout)


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    """The rows of the markdown tables whose first cell matches `first_cell` (a regex)."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(first_cell, cells[0]):
            rows.append(cells)
    return rows


def test_soak_runs_short_and_reports_every_process() -> None:
    # Capacity is measured with wrk where it is installed (the full run needs it), else given.
    capacity = ["--capacity-seconds", "2"] if shutil.which("wrk") else ["--capacity", "2000"]
    out = run("soak.py", "--duration", "8", "--interval", "2", "--warmup", "2", "--connections", "16",
              "--baseline-seconds", "4", *capacity, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert re.search(r"processes: serve \(pid \d+\), flusher \(pid \d+\), worker 1 \(pid \d+\), worker 2", text), text
    assert re.search(r"capacity: [\d,]+ req/s, closed loop" if shutil.which("wrk") else r"capacity: 2,000", text), text
    header = next(line for line in text.splitlines() if line.startswith("| t (s) |"))
    for label in ("serve MiB", "flusher MiB", "worker 1 MiB", "worker 2 MiB"):
        assert label in header, header
    rows = table_rows(text, r"\d+")
    assert len(rows) >= 4, text
    column = {name.strip(): i for i, name in enumerate(header.strip("|").split(" | "))}
    for row in rows:
        assert row[column["errors"]] == "0", f"errors in {row}"
        assert re.fullmatch(r"<= [\d.]+", row[column["app p99 ms"]]), row  # the app's own p99, from its histogram
        assert re.fullmatch(r"\d+%", row[column["idle"]]), row  # the machine's idle CPU
        assert all(re.fullmatch(r"\d+/\d+", cell) for cell in row[-4:]), row  # RSS/anonymous RSS of each
    assert "| errors (non-200, not VALID, dropped, unanswered) | 0 | 0 | PASS |" in text, text
    assert re.search(r"\| credits spent = VALID answers \| [\d,]+ / [\d,]+ \| equal \| PASS \|", text), text
    assert re.search(r"\| anonymous RSS flat, every process \|", text), text
    assert re.search(r"\| p99 stable: median interval p99, last third / first third \|", text), text
    # The same-rate baseline: the raw ASGI ceiling soaked first, without an error, and keysvc's p99 over its.
    assert re.search(r"same-rate baseline: the raw ASGI ceiling .* interval p99 min / median / max [\d.]+ / [\d.]+ / "
                     r"[\d.]+ ms, gen lag at most [\d.]+ ms, errors 0$", text, re.MULTILINE), text
    assert re.search(r"\| p99 against the same-rate ceiling: median interval p99, keysvc / ceiling \| [\d.]+ / "
                     r"[\d.]+ ms = [\d.]+ \|", text), text
    verdict = table_rows(text, r"serve|flusher|worker \d")
    assert {row[0] for row in verdict} == {"serve", "flusher", "worker 1", "worker 2"}, text


def test_timing_runs_short_and_meets_its_target() -> None:
    out = run("timing.py", "--rounds", "300", "--warmup", "50", "--core-calls", "1000", "--core-rounds", "3",
              timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    cases = {"valid", "valid_charged", "unknown", "near_miss", "out_of_scope"}
    http = [row for row in table_rows(text, "|".join(cases)) if len(row) == 8]
    core = [row for row in table_rows(text, "|".join(cases)) if len(row) == 5]
    assert {row[0] for row in http} == cases, text
    assert {row[0] for row in core} == cases, text
    for row in http:
        assert row[1] == ("VALID" if row[0].startswith("valid") else "NOT_FOUND")
        assert int(row[6].replace(",", "")) == 300
    not_found_sizes = {row[2] for row in http if row[1] == "NOT_FOUND"}
    assert len(not_found_sizes) == 1, "every NOT_FOUND answer has the same size"
    assert text.count("| PASS |") == 2, text


def test_app_bench_runs_short_and_times_every_workload() -> None:
    out = run("app.py", "--rounds", "1", "--requests", "160", timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = table_rows(out.stdout, r"keysvc, analytics off|keysvc, analytics on \(spooling only\)|raw ASGI app.*")
    assert len(rows) == 3, out.stdout
    for row in rows:
        assert float(row[1]) > 0, row
    assert "Task was destroyed" not in out.stdout + out.stderr, out.stderr  # the apps' lifespans end


# -- the soak's RSS verdict, on made-up samples ----------------------------------------------------------


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    """bench/soak.py as a module; bench/ goes last on sys.path (for its `machine`), after the standard
    library, whose `http` bench/http.py would otherwise shadow."""
    spec = importlib.util.spec_from_file_location("bench_soak", BENCH / "soak.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.append(str(BENCH))
    written = sys.dont_write_bytecode
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(BENCH))
        sys.dont_write_bytecode = written
    return module


def samples(anon_mib: list[float], step: float = 10.0) -> list[tuple[float, dict[str, dict[str, int]]]]:
    return [(i * step, {"worker 1": {"VmRSS": int((a + 20) * 1024), "RssAnon": int(a * 1024)}})
            for i, a in enumerate(anon_mib)]


@pytest.mark.parametrize(("anon", "flat"), [
    ([32.0] * 60, True),                                        # flat
    ([32.0 + 0.1 * i for i in range(60)], True),                # floor +5 MiB over the run, +2 over the last half
    ([170.0 + 30 * ((i % 5) - 2) / 2 for i in range(60)], True),  # a sawtooth of 60 MiB, no trend
    ([100.0 + min(i, 8) * 1.0 for i in range(60)], True),       # a cache that levels off early
    ([145.0 + min(i, 12) * 2.0 for i in range(60)], True),      # +24 MiB over 2 minutes, then flat (a warm-up)
    ([32.0 + min(i, 30) * 1.5 for i in range(60)], False),      # grows by 45 MiB, then levels off: still flagged
    ([32.0 + 0.5 * i for i in range(60)], False),               # a leak: floor +25 MiB, +10 over the last half
    ([300.0 + 0.4 * i for i in range(60)], False),              # a slow leak in a big process: +7%, but +8 late
], ids=["flat", "noise", "sawtooth", "levels-off", "warm-up", "grows-a-lot", "leak", "slow-leak"])
def test_rss_verdict(soak: ModuleType, anon: list[float], flat: bool) -> None:
    lines, ok = soak.rss_verdict(samples(anon), warmup=0)
    assert ok is flat, lines


@pytest.mark.parametrize(("p99s", "thirds"), [
    ([20.0, 22.0, 21.0, 90.0, 20.0, 23.0, 19.0, 22.0, 21.0], (21.0, 21.0)),  # one spike: no drift
    ([10.0, 11.0, 12.0, 20.0, 21.0, 22.0, 30.0, 31.0, 32.0], (11.0, 31.0)),  # a p99 that climbs: drift
    ([5.0, 7.0], (5.0, 7.0)),                                                # fewer than 3 rows
], ids=["spike", "climbs", "short"])
def test_p99_thirds(soak: ModuleType, p99s: list[float], thirds: tuple[float, float]) -> None:
    assert soak.p99_thirds(p99s) == thirds

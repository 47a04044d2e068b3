"""The per-minute, -hour, -day and -month rollups, built by the flusher from the raw rows inserted
since it last built them (schema version 3; before it, a materialized view did it on every insert).

Why not the view: it aggregated each insert of a batch on its own, and a node's keys, tags and
outcomes make nearly as many minute groups in a batch as it has rows; fanned out to four grains,
the view wrote about 1.6 rollup rows per event, and took 70% of an insert's CPU, on the cores the
workers answer on (bench/README.md, "analytics.py"). Rolled up every `analytics.rollup_interval`
seconds, and whenever the spool is empty, a busy minute is aggregated a few times instead of once
per batch. The price is freshness: the `*_per_*_v1` aliases show an event once its rollup has run,
at most rollup_interval after it reached the raw table, at once when the node is not busy.

Exactly once, by the raw rows' insert block numbers (`_block_number`): a source's progress row
holds the block up to which it is rolled up (`done`) and the range a rollup in progress covers
(`planned`). A rollup records its plan, inserts the rollups of the blocks (done, planned] under a
deduplication token naming that range, then records the range done. A flusher that died between
two steps finds the plan and inserts the same range under the same token again: ClickHouse drops
that insert if the first one had landed.
"""
from __future__ import annotations

import logging
from typing import Any

from keysvc.analytics import schema

log = logging.getLogger("keysvc.analytics")

# One thread and one insert thread, so that a range's rollup splits into the same blocks each
# time it is inserted: the deduplication token covers blocks by their position.
_SETTINGS = {"insert_deduplicate": 1, "max_threads": 1, "max_insert_threads": 1, "async_insert": 0}


class Rollups:
    """The flusher's: it alone writes the raw tables, so block numbers only grow while it runs."""

    def __init__(self) -> None:
        self.progress: dict[str, tuple[int, int, int]] = {}  # raw table -> (done, planned, seq)

    def run(self, client: Any) -> int:
        """Roll up every raw block not rolled up yet; returns how many ranges it inserted (a plan
        left by a flusher that died is one, the blocks since another)."""
        rolled = 0
        for source in schema.ROLLUP_SOURCES:
            while True:
                done, planned, _ = self._progress(client, source.raw)
                newest = int(client.command(schema.max_block_sql(source.raw)) or 0)
                if newest < max(done, planned):
                    # Block numbers restart from the newest part on disk when a table is loaded; if
                    # TTL removed every part past the mark, the rows now there are newer than it.
                    log.warning("%s: the newest insert block (%d) is below the rolled-up mark (%d): its numbering "
                                "restarted; rolling up from the start", source.raw, newest, max(done, planned))
                    self._record(client, source.raw, 0, 0)
                    continue
                hi = planned if planned > done else newest
                if hi <= done:
                    break
                if planned != hi:
                    self._record(client, source.raw, done, hi)
                where = f"\n    WHERE r._block_number > {done} AND r._block_number <= {hi}"
                client.command(f"INSERT INTO {source.rollups}" + schema.rollup_select(source.raw, source.keys,
                                                                                     source.sums, where),
                               settings=dict(_SETTINGS, insert_deduplication_token=f"rollup:{source.raw}:{done}-{hi}"))
                self._record(client, source.raw, hi, hi)
                rolled += 1
        return rolled

    def _progress(self, client: Any, raw: str) -> tuple[int, int, int]:
        if raw not in self.progress:
            rows = client.query(f"SELECT done, planned, seq FROM {schema.ROLLUP_PROGRESS_TABLE} FINAL "
                                f"WHERE source = '{raw}'").result_rows
            self.progress[raw] = tuple(int(v) for v in rows[0]) if rows else (0, 0, 0)  # type: ignore[assignment]
        return self.progress[raw]

    def _record(self, client: Any, raw: str, done: int, planned: int) -> None:
        # The newest record wins by its seq, never by a clock.
        seq = self.progress[raw][2] + 1
        client.command(f"INSERT INTO {schema.ROLLUP_PROGRESS_TABLE} (source, done, planned, seq) "
                       f"VALUES ('{raw}', {done}, {planned}, {seq})", settings={"async_insert": 0})
        self.progress[raw] = (done, planned, seq)

"""The node's event spool: an LMDB environment every worker appends to and the flusher drains.

Appending costs one small write transaction (no fsync) per batch of events and no network I/O.
Like the counters, a commit survives `kill -9` of any process; an OS crash can lose the last
unsynced ones. Writemap, as the counters: a commit is then a store into the shared mapping, where
a plain write costs two system calls (about 6 us of the 9 us an append transaction took, and
one append per batch of verifications). The file's disk blocks are allocated ahead of the pages
in use (store.lmdb.ReservedEnv): a page the file system could not back would kill the process with
SIGBUS, where a reserve that cannot be kept is a StoreFullError, and the events are counted as
dropped. Entries are keyed by a sequence number kept in the environment, never reused even when
the spool empties, so that a range of it names a batch forever: the flusher's deduplication token.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path

import lmdb

from keysvc.store.errors import StoreFullError
from keysvc.store.lmdb import ReservedEnv

log = logging.getLogger("keysvc.analytics")

_SEQ = struct.Struct(">Q")
# The spool's disk reserve (see ReservedEnv), smaller than the counters': an append writes a few
# pages, and the disk's room is better left to ClickHouse, which refuses inserts without some.
SPOOL_RESERVE_PAGES = 512
SPOOL_MIN_RESERVE_PAGES = 256
LAND_CHUNK = 500  # entries removed per write transaction (see Spool.land)
_NEXT = b"next"
_DROPPED = b"dropped"
_INFLIGHT = b"inflight"
_EPOCH = b"epoch"


def _flight_range(raw: bytes | None) -> tuple[int, int] | None:
    if raw is None or len(raw) != 2 * _SEQ.size:
        return None
    first, last = _SEQ.unpack(raw[:8])[0], _SEQ.unpack(raw[8:])[0]
    return (first, last) if first <= last else None


class Spool:
    def __init__(self, data_dir: str, map_size: int) -> None:
        path = Path(data_dir) / "spool"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = lmdb.open(str(path), map_size=map_size, max_dbs=2, mode=0o600, sync=False, metasync=False,
                        writemap=True, readahead=False)
        self.env = ReservedEnv(env, path / "data.mdb", str(path), SPOOL_RESERVE_PAGES, SPOOL_MIN_RESERVE_PAGES)
        self.env.reader_check()
        self.events = self.env.open_db(b"events")
        self.meta = self.env.open_db(b"meta")
        self._failures_logged_at = 0.0
        # Events counted as dropped while the count itself could not be written (a full disk):
        # added by the next write that goes through, or by close().
        self._unsaved_drops = 0
        with self.env.begin(db=self.meta) as txn:
            epoch = txn.get(_EPOCH)
        if epoch is None:  # a new spool (a write transaction only then: the disk may be full)
            with self.env.begin(write=True, db=self.meta) as txn:
                if txn.get(_EPOCH) is None:
                    txn.put(_EPOCH, os.urandom(8).hex().encode())
                epoch = txn.get(_EPOCH)
        self.epoch = epoch.decode()

    def close(self) -> None:
        if self._unsaved_drops:
            self._count_dropped(0, "")
        self.env.close()

    # -- the workers' side -----------------------------------------------------------------------

    def append(self, events: list[bytes]) -> bool:
        """Spool encoded events in one transaction. Never raises: analytics must not fail a
        request; a full spool counts the events as dropped (and says so, at most once a minute)."""
        try:
            with self.env.begin(write=True, db=self.events) as txn:
                raw = txn.get(_NEXT, db=self.meta)
                seq = _SEQ.unpack(raw)[0] if raw is not None else 1
                for event in events:
                    key = _SEQ.pack(seq)
                    # append=True fails (returns False) unless the key sorts last: a corrupted key
                    # after the sequence numbers (read() removes it) must not lose the event.
                    if not txn.put(key, event, append=True) and not txn.put(key, event, overwrite=False):
                        raise lmdb.KeyExistsError(f"sequence number {seq} is taken: the spool's counter is corrupted")
                    seq += 1
                txn.put(_NEXT, _SEQ.pack(seq), db=self.meta)
                if self._unsaved_drops:
                    self._add_drops(txn, self._unsaved_drops)
            self._unsaved_drops = 0
            return True
        except (lmdb.Error, struct.error, StoreFullError) as exc:  # struct.error: a corrupted counter in meta
            self._count_dropped(len(events), f"the event spool refused {len(events)} event(s): {exc}")
            return False

    def _add_drops(self, txn: lmdb.Transaction, count: int) -> None:
        raw = txn.get(_DROPPED, db=self.meta)
        txn.put(_DROPPED, _SEQ.pack((_SEQ.unpack(raw)[0] if raw else 0) + count), db=self.meta)

    def count_dropped(self, count: int, reason: str) -> None:
        """Count events lost on the flusher's side (e.g. records that could not be decoded)."""
        self._count_dropped(count, reason)

    def _count_dropped(self, count: int, reason: str) -> None:
        self._unsaved_drops += count
        try:
            with self.env.begin(write=True, db=self.meta) as txn:
                self._add_drops(txn, self._unsaved_drops)
            self._unsaved_drops = 0
        except (lmdb.Error, struct.error, StoreFullError):
            pass
        now = time.monotonic()
        if reason and now - self._failures_logged_at >= 60:
            self._failures_logged_at = now
            log.error("%s; dropped events are counted in keysvc_analytics_dropped_events_total", reason)

    # -- the flusher's side --------------------------------------------------------------------------

    def read(self, max_items: int, start: int = 0) -> list[tuple[int, bytes]]:
        """The oldest spooled (sequence, event) pairs from `start` on. Records whose key is no
        sequence number (a corrupted spool) are removed, and counted as dropped."""
        out = []
        corrupt = []
        with self.env.begin(db=self.events) as txn:
            cursor = txn.cursor()
            if cursor.set_range(_SEQ.pack(start)):
                for key, value in cursor:
                    if len(key) != _SEQ.size:
                        corrupt.append(key)
                        continue
                    out.append((_SEQ.unpack(key)[0], value))
                    if len(out) >= max_items:
                        break
        if corrupt:
            self._remove_corrupt(corrupt)
        return out

    def _remove_corrupt(self, keys: list[bytes]) -> None:
        with self.env.begin(write=True, db=self.events) as txn:
            removed = sum(bool(txn.delete(key)) for key in keys)
            self._add_drops(txn, removed)
        log.error("removed %d spooled record(s) whose key is not a sequence number (%s): the spool is corrupted; "
                  "they are counted in keysvc_analytics_dropped_events_total", removed,
                  ", ".join(key[:16].hex() for key in keys[:5]) + (", ..." if len(keys) > 5 else ""))

    def range(self, first: int, last: int) -> list[tuple[int, bytes]]:
        return [(seq, value) for seq, value in self.read(last - first + 1, first) if seq <= last]

    def inflight(self) -> tuple[int, int] | None:
        """The batch being written to ClickHouse when the flusher last stopped, if any. A mark
        that is no range of sequence numbers (a corrupted spool) counts as none: see
        drop_corrupt_mark."""
        with self.env.begin(db=self.meta) as txn:
            return _flight_range(txn.get(_INFLIGHT))

    def drop_corrupt_mark(self) -> bytes | None:
        """Remove an in-flight mark that is no range of sequence numbers; returns it, if there was one."""
        with self.env.begin(write=True, db=self.meta) as txn:
            raw = txn.get(_INFLIGHT)
            if raw is None or _flight_range(raw) is not None:
                return None
            txn.delete(_INFLIGHT)
            return raw

    def begin_flight(self, first: int, last: int, durable: bool) -> None:
        """Mark [first, last] in flight; `durable`: on disk before this returns, so that even an OS
        crash cannot make the batch's range, and so its deduplication token, change before it
        lands. That costs an msync of the spool, and the workers' next writes to its pages fault
        (about 8% of the node's throughput in a within-run comparison on a 2-core VM, see
        bench/README.md): worth it only when ClickHouse keeps what it acknowledged through an OS
        crash better than this node keeps its spool, i.e. a server elsewhere. The embedded chDB
        does not fsync the parts it writes (MergeTree's fsync_after_insert is 0): an OS crash
        that loses the spool's last writes can lose its last parts too."""
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(_INFLIGHT, _SEQ.pack(first) + _SEQ.pack(last))
        if durable:
            self.env.sync(True)

    def land(self, first: int, last: int) -> None:
        """ClickHouse has the batch: remove it from the spool, and the in-flight mark with it.

        In transactions of LAND_CHUNK entries: the workers append under the same writer lock, and
        one long transaction would hold them up for its whole length (the flusher makes it at the
        workers' priority, see priority.py, but not faster). A flusher that dies half-way leaves
        the mark: the next one sends what is left of the range with the same deduplication
        token, which ClickHouse drops, and lands it."""
        end = _SEQ.pack(last)
        done = False
        while not done:
            with self.env.begin(write=True, db=self.events) as txn:
                cursor = txn.cursor()
                removed = 0
                if cursor.set_range(_SEQ.pack(first)):
                    # delete() moves to the next entry; past the last one the cursor has no key.
                    # Compared as bytes (big-endian: the same order), which a corrupted key survives.
                    while removed < LAND_CHUNK and (key := cursor.key()) and key <= end and cursor.delete():
                        removed += 1
                done = removed < LAND_CHUNK
                if done:
                    txn.delete(_INFLIGHT, db=self.meta)
        # Not synced: a landing that an OS crash undoes leaves the in-flight mark, and the batch
        # goes again with the same token, which ClickHouse drops.

    def depth(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.events)["entries"]

    def size_bytes(self) -> int:
        with self.env.begin() as txn:
            stat = txn.stat(self.events)
        return stat["psize"] * (stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"])

    def dropped(self) -> int:
        """Events dropped so far: as recorded, and as this process could not record yet."""
        with self.env.begin(db=self.meta) as txn:
            raw = txn.get(_DROPPED)
        return (_SEQ.unpack(raw)[0] if raw else 0) + self._unsaved_drops

    def enforce_cap(self, cap_bytes: int, chunk: int = LAND_CHUNK) -> int:
        """Drop the oldest events (never the in-flight batch) until the spool is under its cap."""
        dropped = 0
        inflight = self.inflight()
        while (size := self.size_bytes()) > cap_bytes:
            # About the excess, from the events' mean size (so that a small cap is not emptied by
            # one whole chunk), at most `chunk` per transaction.
            step = max(1, min(chunk, (size - cap_bytes) * self.depth() // size + 1))
            with self.env.begin(write=True, db=self.events) as txn:
                cursor = txn.cursor()
                if not cursor.first():
                    break
                removed = 0
                while removed < step:
                    key = cursor.key()
                    if not key:  # past the last entry
                        break
                    if inflight is not None and _SEQ.pack(inflight[0]) <= key <= _SEQ.pack(inflight[1]):
                        if not cursor.next():
                            break
                        continue
                    if not cursor.delete():
                        break
                    removed += 1
            if removed == 0:
                break
            dropped += removed
        if dropped:
            self._count_dropped(dropped, f"the event spool is over its cap of {cap_bytes} bytes: dropped the "
                                         f"oldest {dropped} event(s)")
        return dropped

"""The node's LMDB store: two environments and a change hint, under one data directory.

    <data_dir>/store/     records and their indexes; every commit is synced (durable)
    <data_dir>/counters/  rate-limit windows and credit balances (one table, see _core_py.py);
                          sync off, writemap on (with disk blocks reserved ahead: `ReservedEnv`)
    <data_dir>/changes.hint  8 bytes, mmap'd: the newest change-log sequence number

Why two environments: a verification with a rate limit or credits is one write transaction
in `counters` (about 1.3 us with writemap and no fsync), while a key record is fsynced on
commit (about 250 us). A process killed at any moment loses nothing committed in either:
the pages are in the OS page cache, and LMDB's copy-on-write commit is atomic. Only an OS
crash or power loss can lose the counters' last unsynced commits (see `sync_counters`).

Why the hint: each worker caches decoded key records. Every write that changes what a
verification would see appends the key id to the `changes` log in the same transaction and
raises the hint before commit; a worker compares the hint with the last sequence it applied
on every verification (one 8-byte read) and replays the log only when it moved. So a
change is visible to the next verification on every worker, at the cost of no syscall.

Environments are opened in the process that uses them (after Granian forks its workers),
never at import: `LmdbStore(...)` checks the pid on every `write()`/`read()`.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from keysvc._fast import cell_is_expired, credits_key, is_window

from . import records as r
from .errors import NewerSchemaError, StoreError, StoreFullError, StoreLockedError, StoreUnreadableError

SCHEMA_VERSION = 1

GiB = 1 << 30

_U64 = struct.Struct("<Q")
_SEQ = struct.Struct(">Q")  # big-endian so that LMDB's byte order is numeric order
_CREDITS = struct.Struct("<qq")  # remaining, last_refill_at (ms)

# Index keys of the hash table carry the algorithm, so both kinds can live side by side.
HASH_BLAKE3 = b"\x01"
HASH_SHA256 = b"\x02"
_HASH_TAG = {"blake3": HASH_BLAKE3, "sha256": HASH_SHA256}

CHANGE_ALL = b"*"  # a change log entry that invalidates every cached record

_STORE_DBS = (
    b"meta", b"apis", b"keys", b"key_hash", b"keys_by_keyspace", b"identities", b"identity_by_external_id",
    b"keys_by_identity", b"permissions", b"permission_by_slug", b"roles", b"role_by_name", b"namespaces",
    b"namespace_by_name", b"overrides", b"changes",
)


@dataclass(frozen=True)
class StoreConfig:
    data_dir: str = "./keysvc-data"
    # Sparse: the files grow with the data, so a generous map costs nothing up front, and no
    # process ever has to grow the map under the others (MDB_MAP_RESIZED).
    map_size: int = 64 * GiB
    counters_map_size: int = 8 * GiB
    max_readers: int = 1024
    change_log_size: int = 100_000


_encoders = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(record: msgspec.Struct) -> bytes:
    return _encoders.encode(record)


def decode(kind: type, data: bytes) -> Any:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder.decode(data)


# LMDB keys are at most 511 bytes; names the contract allows can be longer (up to 512
# characters, so 2 KiB of UTF-8). Longer ones are indexed by their SHA-256 instead.
_MAX_INDEX_KEY = 400


def _name(text: str) -> bytes:
    raw = text.encode()
    return raw if len(raw) <= _MAX_INDEX_KEY else b"\xff#" + hashlib.sha256(raw).digest()


def _pair(a: str, b: str) -> bytes:
    """`a` NUL `b`, `b` hashed if too long: keys of one `a` stay together, for prefix scans."""
    return f"{a}\x00".encode() + _name(b)


def translate_lmdb_error(exc: BaseException, where: str) -> StoreError:
    """One clear message for each way LMDB can refuse, naming the cause."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, lmdb.MapFullError):
        return StoreFullError(
            f"the store at {where} is full: its map size is used up. Raise storage.map_size "
            f"(or storage.counters_map_size) in the config and restart; nothing was written"
        )
    if isinstance(exc, lmdb.DiskError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return StoreFullError(f"the disk holding {where} is full; nothing was written")
    text = str(exc)
    if isinstance(exc, (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError)):
        return StoreUnreadableError(f"{where} is not a readable keysvc store ({text})")
    if isinstance(exc, PermissionError) or "Permission denied" in text or "Read-only file system" in text:
        return StoreUnreadableError(f"cannot open {where}: permission denied or read-only ({text})")
    if isinstance(exc, lmdb.LockError) or "Resource temporarily unavailable" in text:
        return StoreLockedError(f"{where} is locked by another process ({text})")
    if isinstance(exc, NotADirectoryError) or "Not a directory" in text:
        return StoreUnreadableError(f"{where} is not a directory")
    return StoreError(f"the store at {where} failed: {text}")


# Disk blocks kept allocated past the last page of a writemap environment (see ReservedEnv).
RESERVE_PAGES = 2048  # the reserve each write transaction starts with, when the disk has room
MIN_RESERVE_PAGES = 512  # on a full disk: writes go on while this much is left, then are refused
RETRY_FULL_DISK = 1.0  # seconds between two attempts to allocate on a full disk
CHECK_EVERY = 32  # write transactions between two looks at the last page in use


class ReservedEnv:
    """A writemap environment (the counters, the analytics spool) whose file has disk blocks
    allocated ahead of the pages LMDB uses, so that a full disk is a StoreFullError and not a dead
    process.

    With writemap, LMDB stores pages through a shared mapping of a sparse file. When the file
    system cannot back a page on first write (a full disk), the kernel kills the process with
    SIGBUS: no error code, no exception, and Granian's respawned worker dies the same way at its
    next new page. So before each write transaction, the blocks of the next `reserve_pages` pages
    past the last page in use are allocated (posix_fallocate, up to twice that at once). When the
    disk cannot give them, writes go on within what is still reserved (charges of existing keys
    mostly reuse freed pages and need none), and are refused with StoreFullError once less than
    `min_reserve_pages` is left. Everything else is the wrapped environment's own."""

    __slots__ = ("env", "where", "reserve_pages", "min_reserve_pages", "_info", "_fd", "_psize", "_map_size",
                 "_allocated", "_last_ok", "_retry_at", "_writes")

    def __init__(self, env: lmdb.Environment, data_file: Path, where: str, reserve_pages: int = RESERVE_PAGES,
                 min_reserve_pages: int = MIN_RESERVE_PAGES) -> None:
        self.env = env
        self.where = where
        self.reserve_pages = reserve_pages
        self.min_reserve_pages = min_reserve_pages
        self._info = env.info
        self._fd = os.open(data_file, os.O_RDWR | os.O_CLOEXEC)
        self._psize = env.stat()["psize"]
        self._map_size = env.info()["map_size"]
        self._allocated = 0  # bytes from the file's start known to have blocks, in this process
        self._last_ok = -1  # the highest last page in use that leaves reserve_pages allocated
        self._retry_at = 0.0  # time.monotonic() before which a full disk is not asked again
        self._writes = CHECK_EVERY  # the first write transaction looks

    def begin(self, db: Any = None, parent: Any = None, write: bool = False, buffers: bool = False) -> Any:
        # The hot path's cost: a count, and one mdb_env_info (a dict, ~1 us) every CHECK_EVERY
        # write transactions; between two looks a few dozen transactions cannot use up a reserve
        # of reserve_pages, nor on a full disk the min_reserve_pages left.
        if write:
            self._writes += 1
            if self._writes >= CHECK_EVERY:
                self._writes = 0
                if self._info()["last_pgno"] > self._last_ok:
                    self.reserve()
        return self.env.begin(db, parent, write, buffers)

    def reserve(self, pages: int | None = None) -> None:
        """Make sure the next `pages` (default: reserve_pages) pages past the last one in use have
        disk blocks; raises StoreFullError if the disk cannot give min_reserve_pages of them. On a
        full disk, the whole reserve is asked for again at most every RETRY_FULL_DISK seconds."""
        pages = self.reserve_pages if pages is None else pages
        used = (self._info()["last_pgno"] + 1) * self._psize
        if used + pages * self._psize <= self._allocated:
            return
        needed = min(self._map_size, used + min(pages, self.min_reserve_pages) * self._psize)
        if time.monotonic() >= self._retry_at:
            if self._fallocate(min(self._map_size, used + 2 * pages * self._psize)):
                return
            self._retry_at = time.monotonic() + RETRY_FULL_DISK
        # The disk is full: go on within what is reserved, down to the minimum, and look before
        # every write transaction until the whole reserve is back: CHECK_EVERY of them could use
        # up the minimum, and one page past it is a SIGBUS.
        self._writes = CHECK_EVERY
        if not self._fallocate(needed):
            raise StoreFullError(f"the disk holding {self.where} is full; nothing was written")

    def _fallocate(self, end: int) -> bool:
        """Blocks for [0, end); False if the disk is full."""
        if end <= self._allocated:
            return True
        try:
            # From 0, not from what this process allocated: another one may have left holes
            # below (a failed allocation on a file system that keeps part of it).
            os.posix_fallocate(self._fd, 0, end)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                return False
            # No way to reserve on this file system (EOPNOTSUPP, EINVAL, ...): as plain LMDB.
            end = self._map_size
        self._allocated = end
        self._last_ok = end // self._psize - self.reserve_pages - 1 if end < self._map_size else 1 << 62
        return True

    def close(self) -> None:
        self.env.close()
        os.close(self._fd)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class LmdbStore:
    """Opens (creating if needed) the node's store in this process."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config = config or StoreConfig()
        self.pid = os.getpid()
        self.path = path = Path(config.data_dir)
        try:
            old_umask = os.umask(0o077)
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                    if os.statvfs(path).f_flag & os.ST_RDONLY:
                        raise OSError(errno.EROFS, "Read-only file system", str(path))
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                self.store_env = self._open(path / "store", config.map_size, len(_STORE_DBS), sync=True)
                counters = self._open(path / "counters", config.counters_map_size, 1, sync=False, writemap=True)
                self.counters_env = ReservedEnv(counters, path / "counters" / "data.mdb", str(path))
                self._hint_file, self.hint = self._open_hint(path / "changes.hint")
            finally:
                os.umask(old_umask)
            self.dbs = {name.decode(): self.store_env.open_db(name) for name in _STORE_DBS}
            self.counters_db = self.counters_env.open_db(b"counters")
            self._check_schema()
        except (lmdb.Error, OSError) as exc:
            raise translate_lmdb_error(exc, str(path)) from None

    def _open(self, path: Path, map_size: int, max_dbs: int, **flags: bool) -> lmdb.Environment:
        path.mkdir(mode=0o700, exist_ok=True)
        env = lmdb.open(
            str(path), map_size=map_size, max_dbs=max_dbs, max_readers=self.config.max_readers,
            mode=0o600, metasync=flags.get("sync", True), readahead=False, **flags,
        )
        # Slots of readers killed with SIGKILL would otherwise stay taken until the slots run out.
        env.reader_check()
        return env

    @staticmethod
    def _open_hint(path: Path) -> tuple[Any, mmap.mmap]:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size < mmap.PAGESIZE:
            os.ftruncate(fd, mmap.PAGESIZE)
        hint = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return os.fdopen(fd, "rb"), hint

    def _check_schema(self) -> None:
        with self.store_env.begin(write=True, db=self.dbs["meta"]) as txn:
            stored = txn.get(b"schema_version")
            if stored is None:
                txn.put(b"schema_version", str(SCHEMA_VERSION).encode())
            elif int(stored) > SCHEMA_VERSION:
                raise NewerSchemaError(
                    f"{self.path} was written by a newer keysvc (store schema version {int(stored)}; this "
                    f"keysvc reads up to {SCHEMA_VERSION}). Upgrade keysvc, or restore a backup made by this version"
                )

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # the parent's handles are not ours to close
        self.hint.close()
        self._hint_file.close()
        self.store_env.close()
        self.counters_env.close()

    def _check_pid(self) -> None:
        if self.pid != os.getpid():
            raise StoreError("an LMDB store opened before fork() was used in the child; open it in each worker")

    # -- writes -------------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[WriteTxn]:
        """One durable transaction over the records. Raises StoreError, never an lmdb error."""
        self._check_pid()
        try:
            with self.store_env.begin(write=True) as txn:
                writer = WriteTxn(self, txn)
                yield writer
                writer.log_changes()
        except (lmdb.Error, OSError) as exc:
            # A failed commit leaves the hint above the log. Readers then look at the log on each
            # verification, find nothing new, and stop when the next write numbers past it.
            raise translate_lmdb_error(exc, str(self.path)) from None

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        self._check_pid()
        try:
            with self.store_env.begin() as txn:
                yield ReadTxn(self, txn)
        except (lmdb.Error, OSError) as exc:
            raise translate_lmdb_error(exc, str(self.path)) from None

    # -- credit balances (counters environment) ------------------------------------------------

    def get_credits(self, key_id: str) -> tuple[int, int] | None:
        self._check_pid()
        with self.counters_env.begin(db=self.counters_db) as txn:
            raw = txn.get(credits_key(key_id))
        return None if raw is None else _CREDITS.unpack(raw)

    def update_credits(self, key_id: str, update: Any) -> tuple[int, int] | None:
        """Atomically replace a balance with `update(current or None)` (None deletes it)."""
        self._check_pid()
        name = credits_key(key_id)
        try:
            with self.counters_env.begin(write=True, db=self.counters_db) as txn:
                raw = txn.get(name)
                new = update(None if raw is None else _CREDITS.unpack(raw))
                if new is None:
                    txn.delete(name)
                else:
                    txn.put(name, _CREDITS.pack(*new))
            self.sync_counters()
        except (lmdb.Error, OSError) as exc:
            raise translate_lmdb_error(exc, str(self.path)) from None
        return new

    def set_credits_many(self, balances: list[tuple[str, int, int]]) -> None:
        """Set (key id, remaining, last refill) balances in one transaction, synced."""
        self._check_pid()
        try:
            self.counters_env.reserve(RESERVE_PAGES + len(balances) // 16)  # an import may write many pages
            with self.counters_env.begin(write=True, db=self.counters_db) as txn:
                for key_id, remaining, last_refill_at in balances:
                    txn.put(credits_key(key_id), _CREDITS.pack(remaining, last_refill_at))
            self.sync_counters()
        except (lmdb.Error, OSError) as exc:
            raise translate_lmdb_error(exc, str(self.path)) from None

    def get_credits_many(self, key_ids: list[str]) -> list[tuple[int, int] | None]:
        """The stored (remaining, last refill) of each key, None where it has none, read in one
        transaction: what an export reads per batch of keys."""
        self._check_pid()
        try:
            with self.counters_env.begin(db=self.counters_db) as txn:
                raws = [txn.get(credits_key(key_id)) for key_id in key_ids]
        except (lmdb.Error, OSError) as exc:
            raise translate_lmdb_error(exc, str(self.path)) from None
        return [None if raw is None else _CREDITS.unpack(raw) for raw in raws]

    def sync_counters(self) -> None:
        """Flush the counters environment to disk: bounds what an OS crash could lose."""
        self.counters_env.sync(True)

    def sweep_ratelimits(self, now_ms: int, max_items: int = 10_000, start: bytes = b"") -> bytes:
        """Delete rate-limit cells whose both windows have passed, looking at up to `max_items`
        entries; resumable from the returned key (b"" when the table's end was reached)."""
        self._check_pid()
        with self.counters_env.begin(write=True, db=self.counters_db) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(start):
                return b""
            for _ in range(max_items):
                key = cursor.key()
                if is_window(key) and cell_is_expired(key, cursor.value(), now_ms):
                    if not cursor.delete():
                        return b""
                elif not cursor.next():
                    return b""
            return cursor.key()

    # -- what the hot path reads -----------------------------------------------------------------

    def change_hint(self) -> int:
        return _U64.unpack_from(self.hint, 0)[0]

    def last_change(self) -> int:
        """The newest committed change: where a new cache starts (the hint may be ahead of it
        while a commit is in flight, or after one failed)."""
        with self.store_env.begin(db=self.dbs["changes"]) as txn:
            cursor = txn.cursor()
            return _SEQ.unpack(cursor.key())[0] if cursor.last() else 0

    def changes_since(self, seq: int) -> tuple[int, list[bytes] | None]:
        """The key ids changed after `seq` and the last sequence read; None means 'all of them'
        (the log no longer reaches back to `seq`, or an entry says so)."""
        changed: list[bytes] = []
        with self.store_env.begin(db=self.dbs["changes"]) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(_SEQ.pack(seq + 1)):
                return seq, changed
            first = _SEQ.unpack(cursor.key())[0]
            last = seq
            everything = first != seq + 1
            for key, value in cursor:
                last = _SEQ.unpack(key)[0]
                if value == CHANGE_ALL:
                    everything = True
                elif not everything:
                    changed.append(value)
        return last, None if everything else changed

    def resolve_key(self, key: str, digest: bytes) -> r.VerificationRecord | None:
        """The live key with this plaintext (given with its blake3 digest), with what its
        identity, roles and permissions add. Keys imported by their Unkey SHA-256 hash are
        looked up too, only when the store holds any, so unknown keys cost one hash."""
        with self.read() as reader:
            record = reader.resolve(digest, "blake3")
            if record is None and reader.meta_int(b"sha256_keys") > 0:
                record = reader.resolve(hashlib.sha256(key.encode()).digest(), "sha256")
            return record


class ReadTxn:
    def __init__(self, store: LmdbStore, txn: lmdb.Transaction) -> None:
        self.store = store
        self.txn = txn
        self.dbs = store.dbs

    def _get(self, kind: type, db: str, key: bytes) -> Any:
        if len(key) > 511:  # no record has such an id; LMDB would refuse to look
            return None
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else decode(kind, raw)

    def meta_int(self, name: bytes) -> int:
        raw = self.txn.get(name, db=self.dbs["meta"])
        return 0 if raw is None else int(raw)

    def api(self, api_id: str) -> r.Api | None:
        return self._get(r.Api, "apis", api_id.encode())

    def key(self, key_id: str) -> r.Key | None:
        return self._get(r.Key, "keys", key_id.encode())

    def key_id_by_hash(self, digest: bytes, hash_alg: str = "blake3") -> str | None:
        raw = self.txn.get(_HASH_TAG[hash_alg] + digest, db=self.dbs["key_hash"])
        return None if raw is None else raw.decode()

    def identity(self, identity_id: str) -> r.Identity | None:
        return self._get(r.Identity, "identities", identity_id.encode())

    def identity_by_external_id(self, external_id: str) -> r.Identity | None:
        raw = self.txn.get(_name(external_id), db=self.dbs["identity_by_external_id"])
        return None if raw is None else self.identity(raw.decode())

    def permission(self, permission_id: str) -> r.Permission | None:
        return self._get(r.Permission, "permissions", permission_id.encode())

    def permission_by_slug(self, slug: str) -> r.Permission | None:
        raw = self.txn.get(_name(slug), db=self.dbs["permission_by_slug"])
        return None if raw is None else self.permission(raw.decode())

    def role(self, role_id: str) -> r.Role | None:
        return self._get(r.Role, "roles", role_id.encode())

    def role_by_name(self, name: str) -> r.Role | None:
        raw = self.txn.get(_name(name), db=self.dbs["role_by_name"])
        return None if raw is None else self.role(raw.decode())

    def namespace(self, namespace_id: str) -> r.Namespace | None:
        return self._get(r.Namespace, "namespaces", namespace_id.encode())

    def namespace_by_name(self, name: str) -> r.Namespace | None:
        raw = self.txn.get(_name(name), db=self.dbs["namespace_by_name"])
        return None if raw is None else self.namespace(raw.decode())

    def override(self, namespace_id: str, identifier: str) -> r.Override | None:
        return self._get(r.Override, "overrides", _pair(namespace_id, identifier))

    def overrides(self, namespace_id: str, after: str = "") -> Iterator[r.Override]:
        prefix = f"{namespace_id}\x00".encode()
        for _, raw in self._scan("overrides", prefix, _pair(namespace_id, after) if after else prefix):
            yield decode(r.Override, raw)

    def key_ids_of_keyspace(self, keyspace_id: str, after: str = "") -> Iterator[str]:
        prefix = f"{keyspace_id}\x00".encode()
        for key, _ in self._scan("keys_by_keyspace", prefix, prefix + after.encode()):
            yield key[len(prefix):].decode()

    def key_ids_of_identity(self, identity_id: str) -> Iterator[str]:
        prefix = f"{identity_id}\x00".encode()
        for key, _ in self._scan("keys_by_identity", prefix, prefix):
            yield key[len(prefix):].decode()

    def _scan(self, db: str, prefix: bytes, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        cursor = self.txn.cursor(db=self.dbs[db])
        if not cursor.set_range(start):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key, value

    def count(self, db: str) -> int:
        """How many entries one table holds (LMDB keeps the number: no scan)."""
        return int(self.txn.stat(self.dbs[db])["entries"])

    def records_from(self, db: str, kind: type, start: str = "") -> Iterator[Any]:
        """Records of one table in key order, from `start` on."""
        cursor = self.txn.cursor(db=self.dbs[db])
        if not cursor.set_range(start.encode()):
            return
        for _, raw in cursor:
            yield decode(kind, raw)

    def resolve(self, digest: bytes, hash_alg: str) -> r.VerificationRecord | None:
        key_id = self.key_id_by_hash(digest, hash_alg)
        key = None if key_id is None else self.key(key_id)
        if key is None or key.deleted_at is not None:
            return None
        if key.api_id:
            api = self.api(key.api_id)
            if api is None or api.deleted_at is not None:
                return None
        identity = self.identity(key.identity_id) if key.identity_id else None
        slugs = [p.slug for p in map(self.permission, key.permission_ids) if p is not None]
        role_names = []
        for role in map(self.role, key.role_ids):
            if role is not None:
                role_names.append(role.name)
                slugs.extend(p.slug for p in map(self.permission, role.permission_ids) if p is not None)
        slugs.extend(key.grants)
        return r.VerificationRecord(key=key, identity=identity, permission_slugs=slugs, role_names=role_names)


class WriteTxn(ReadTxn):
    """Record-level writes that keep the indexes and the change log right. This is the whole
    write surface of the store: management operations and replication both go through it."""

    def __init__(self, store: LmdbStore, txn: lmdb.Transaction) -> None:
        super().__init__(store, txn)
        self._changed: set[bytes] = set()

    def _put(self, db: str, key: bytes, record: msgspec.Struct) -> None:
        self.txn.put(key, encode(record), db=self.dbs[db])

    def _index(self, db: str, key: bytes, value: bytes | None) -> None:
        if value is None:
            self.txn.delete(key, db=self.dbs[db])
        else:
            self.txn.put(key, value, db=self.dbs[db])

    def key_changed(self, key_id: str) -> None:
        self._changed.add(key_id.encode())

    def everything_changed(self) -> None:
        self._changed.add(CHANGE_ALL)

    def add_meta_int(self, name: bytes, delta: int) -> None:
        self.txn.put(name, str(self.meta_int(name) + delta).encode(), db=self.dbs["meta"])

    def put_api(self, api: r.Api) -> None:
        old = self.api(api.id)
        self._put("apis", api.id.encode(), api)
        if old is not None and old.deleted_at != api.deleted_at:
            self.everything_changed()

    def put_key(self, key: r.Key) -> None:
        old = self.key(key.id)
        kid = key.id.encode()
        if old is not None:
            if old.hash != key.hash or old.hash_alg != key.hash_alg:
                self._index("key_hash", _HASH_TAG[old.hash_alg] + old.hash, None)
                self.add_meta_int(b"sha256_keys", -(old.hash_alg == "sha256"))
            if old.identity_id and old.identity_id != key.identity_id:
                self._index("keys_by_identity", _pair(old.identity_id, key.id), None)
        if old is None or old.hash != key.hash or old.hash_alg != key.hash_alg:
            hash_key = _HASH_TAG[key.hash_alg] + key.hash
            existing = self.txn.get(hash_key, db=self.dbs["key_hash"])
            if existing is not None and existing != kid:
                raise StoreError("a key with this hash exists already")
            self._index("key_hash", hash_key, kid)
            self.add_meta_int(b"sha256_keys", key.hash_alg == "sha256")
        self._index("keys_by_keyspace", _pair(key.keyspace_id, key.id), b"")
        if key.identity_id:
            self._index("keys_by_identity", _pair(key.identity_id, key.id), b"")
        self._put("keys", kid, key)
        self.key_changed(key.id)

    def delete_key(self, key_id: str) -> r.Key | None:
        old = self.key(key_id)
        if old is None:
            return None
        self._index("key_hash", _HASH_TAG[old.hash_alg] + old.hash, None)
        self.add_meta_int(b"sha256_keys", -(old.hash_alg == "sha256"))
        self._index("keys_by_keyspace", _pair(old.keyspace_id, key_id), None)
        if old.identity_id:
            self._index("keys_by_identity", _pair(old.identity_id, key_id), None)
        self.txn.delete(key_id.encode(), db=self.dbs["keys"])
        self.key_changed(key_id)
        return old

    def put_identity(self, identity: r.Identity) -> None:
        old = self.identity(identity.id)
        if old is not None and old.external_id != identity.external_id:
            self._index("identity_by_external_id", _name(old.external_id), None)
        self._index("identity_by_external_id", _name(identity.external_id), identity.id.encode())
        self._put("identities", identity.id.encode(), identity)
        for key_id in self.key_ids_of_identity(identity.id):
            self.key_changed(key_id)

    def delete_identity(self, identity_id: str) -> r.Identity | None:
        old = self.identity(identity_id)
        if old is None:
            return None
        self._index("identity_by_external_id", _name(old.external_id), None)
        self.txn.delete(identity_id.encode(), db=self.dbs["identities"])
        for key_id in list(self.key_ids_of_identity(identity_id)):
            self.key_changed(key_id)
        return old

    def put_permission(self, permission: r.Permission) -> None:
        old = self.permission(permission.id)
        if old is not None and old.slug != permission.slug:
            self._index("permission_by_slug", _name(old.slug), None)
        self._index("permission_by_slug", _name(permission.slug), permission.id.encode())
        self._put("permissions", permission.id.encode(), permission)
        if old is not None:
            self.everything_changed()

    def delete_permission(self, permission_id: str) -> None:
        old = self.permission(permission_id)
        if old is not None:
            self._index("permission_by_slug", _name(old.slug), None)
            self.txn.delete(permission_id.encode(), db=self.dbs["permissions"])
            self.everything_changed()

    def put_role(self, role: r.Role) -> None:
        old = self.role(role.id)
        if old is not None and old.name != role.name:
            self._index("role_by_name", _name(old.name), None)
        self._index("role_by_name", _name(role.name), role.id.encode())
        self._put("roles", role.id.encode(), role)
        if old is not None:
            self.everything_changed()

    def delete_role(self, role_id: str) -> None:
        old = self.role(role_id)
        if old is not None:
            self._index("role_by_name", _name(old.name), None)
            self.txn.delete(role_id.encode(), db=self.dbs["roles"])
            self.everything_changed()

    def put_namespace(self, namespace: r.Namespace) -> None:
        self._index("namespace_by_name", _name(namespace.name), namespace.id.encode())
        self._put("namespaces", namespace.id.encode(), namespace)
    def put_override(self, override: r.Override) -> None:
        self._put("overrides", _pair(override.namespace_id, override.identifier), override)

    def delete_override(self, namespace_id: str, identifier: str) -> bool:
        return self.txn.delete(_pair(namespace_id, identifier), db=self.dbs["overrides"])

    def log_changes(self) -> None:
        if not self._changed:
            return
        db = self.dbs["changes"]
        cursor = self.txn.cursor(db=db)
        # Past the hint too: a commit that failed after raising it must not have its number
        # reused, or a reader that saw the hint would take this change for one it has applied.
        seq = max(_SEQ.unpack(cursor.key())[0] if cursor.last() else 0, self.store.change_hint())
        for change in sorted(self._changed):
            seq += 1
            self.txn.put(_SEQ.pack(seq), change, db=db)
        oldest = seq - self.store.config.change_log_size
        if oldest > 0 and cursor.first():
            while _SEQ.unpack(cursor.key())[0] <= oldest and cursor.delete():
                pass
        # Raised before the commit, while this transaction holds the writer lock: the hint only
        # ever grows, and by the time the commit returns every reader will look.
        _U64.pack_into(self.store.hint, 0, seq)


@contextmanager
def node_lock(data_dir: str) -> Iterator[None]:
    """Held by `keysvc serve` for its lifetime: one server per data dir (its flusher alone may
    open the embedded ClickHouse). Raises StoreLockedError naming the holder."""
    path = Path(data_dir) / "serve.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # a read-only file system, a full disk, ...: one clear message
        raise translate_lmdb_error(exc, data_dir) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StoreLockedError(
                f"{data_dir} is locked: another keysvc serve (pid {holder}) is using it"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            # The pid only names the holder: a full disk must not keep the node from serving.
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise translate_lmdb_error(exc, data_dir) from None
        yield
    finally:
        os.close(fd)

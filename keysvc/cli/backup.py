"""`keysvc export` and `keysvc import`: the whole store as a JSON Lines stream, and back; and the
import of keys exported from Unkey, by their SHA-256 hashes (the keys.migrateKeys path)."""
from __future__ import annotations

import argparse
import os
import stat
import sys
import textwrap
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Union

import msgspec
from msgspec import Meta

from keysvc.store import LmdbStore, StoreError
from keysvc.store import records as r

from .common import (
    UsageError,
    add_json_flag,
    add_progress_flag,
    add_store_flags,
    guarded,
    open_store,
    print_object,
    print_rows,
)
from .progress import Progress

FORMAT = "keysvc-export"
VERSION = 1
BATCH = 1000  # records per store transaction on import: big enough to amortise the fsync
EXPORT_CHUNK = 1000  # keys whose balances are read in one counters transaction
MAX_INT64 = (1 << 63) - 1
HASH_BYTES = 32  # blake3 and SHA-256 digests alike
HASH_ALGS = ("blake3", "sha256")  # ours, and Unkey's for imported keys

FORMAT_HELP = f"""\
The export format (JSON Lines, UTF-8, one object per line, each with a "type"):

  {{"type": "header", "format": "{FORMAT}", "version": {VERSION}, "store_schema": 1, "keysvc": "0.1.0",
   "exported_at": <unix ms>, "counts": {{"<table>": <entries>, ...}}}}      the first line
  {{"type": "api", ...}}                    an API (deleted ones too, with deleted_at)
  {{"type": "ratelimit_namespace", ...}}    a rate-limit namespace
  {{"type": "ratelimit_override", ...}}     an override of a namespace's limit for an identifier
  {{"type": "permission", ...}}  {{"type": "role", ...}}  {{"type": "identity", ...}}
  {{"type": "key", ...}}                    a key, with its hash ("hash": base64 of the digest,
                                          "hash_alg": "blake3", or "sha256" for keys from Unkey)
  {{"type": "root_key", ...}}               a root key, with its hash
  {{"type": "credits", "key_id": ..., "remaining": <n>, "last_refill_at": <unix ms>}}
                                          the credit balance of the key on the line before
  {{"type": "end", "records": <lines between header and end>}}             the last line

Every other field is the store record's, by its name (snake_case); a field at its default may be
left out. Plaintext keys are never exported (keysvc never has them); rate-limit windows are not
either (they are counters of the moment), credit balances are. Import restores ids, hashes and
times as they were, so every key verifies as it did: same code, credits, permissions, roles,
identity, limits, expiry.

Unkey keys (--unkey): one JSON object per line, each the object keys.migrateKeys takes in its
"keys" array (camelCase), plus an optional "apiId" (else --api-id), "start" (the key's first
characters, for display) and "type": "unkey_key":

  {{"type": "unkey_key", "apiId": "api_...", "hash": "<base64 of the key's SHA-256>", "start": "sk_AbCd",
   "name": ..., "externalId": ..., "meta": {{...}}, "roles": [...], "permissions": [...],
   "expires": <unix ms>, "enabled": true, "credits": {{"remaining": 100, "refill": {{...}}}},
   "ratelimits": [{{"name": ..., "limit": ..., "duration": ..., "autoApply": false}}]}}

The keys then verify with their old plaintexts. A hash already in the store is skipped, and
reported."""


# -- the line types ----------------------------------------------------------------------------------------
#
# Records are array-like msgpack in the store; the export names every field instead, so that a
# line can be read by a person and by jq. The named twins are made from the record types
# themselves: a field added to a record is exported without anyone remembering to.

_twins: dict[type, Any] = {}


def _named(kind: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _twin(kind, None)
    origin = typing.get_origin(kind)
    if origin is list:
        return list[_named(typing.get_args(kind)[0])]  # type: ignore[misc]
    if origin in (Union, types.UnionType):
        return Union[tuple(_named(arg) for arg in typing.get_args(kind))]
    return kind


def _twin(kind: type[msgspec.Struct], tag: str | None) -> Any:
    if tag is None and kind in _twins:
        return _twins[kind]
    fields: list[tuple[Any, ...]] = []
    for info in msgspec.structs.fields(kind):
        named = _named(info.type)
        if info.required:
            fields.append((info.name, named))
        elif info.default_factory is not msgspec.NODEFAULT:
            fields.append((info.name, named, msgspec.field(default_factory=info.default_factory)))
        else:
            fields.append((info.name, named, info.default))
    options: dict[str, Any] = {"tag_field": "type", "tag": tag} if tag else {}
    twin = msgspec.defstruct(f"{kind.__name__}Line", fields, kw_only=True, forbid_unknown_fields=True,
                             omit_defaults=True, **options)
    if tag is None:
        _twins[kind] = twin
    return twin


RECORD_TABLES: tuple[tuple[str, str, type[msgspec.Struct]], ...] = (
    ("api", "apis", r.Api),
    ("ratelimit_namespace", "namespaces", r.Namespace),
    ("ratelimit_override", "overrides", r.Override),
    ("permission", "permissions", r.Permission),
    ("role", "roles", r.Role),
    ("identity", "identities", r.Identity),
    ("key", "keys", r.Key),
)
LINE_TYPES: dict[str, Any] = {tag: _twin(kind, tag) for tag, _, kind in RECORD_TABLES}
LINE_TYPES["root_key"] = _twin(r.Key, "root_key")
RECORD_OF: dict[Any, type[msgspec.Struct]] = {LINE_TYPES[tag]: kind for tag, _, kind in RECORD_TABLES}
RECORD_OF[LINE_TYPES["root_key"]] = r.Key
TAG_OF: dict[Any, str] = {line_type: tag for tag, line_type in LINE_TYPES.items()}


class Header(msgspec.Struct, tag_field="type", tag="header", kw_only=True):
    format: str
    version: int
    store_schema: int = 1
    keysvc: str = ""
    exported_at: int = 0
    counts: dict[str, int] = {}


class Credits(msgspec.Struct, tag_field="type", tag="credits", kw_only=True, forbid_unknown_fields=True):
    key_id: str
    remaining: Annotated[int, Meta(ge=0, le=MAX_INT64)]
    last_refill_at: Annotated[int, Meta(ge=0, le=MAX_INT64)]


class End(msgspec.Struct, tag_field="type", tag="end", kw_only=True, forbid_unknown_fields=True):
    records: int


_LINE = Union[(Header, Credits, End, *LINE_TYPES.values())]  # type: ignore[valid-type]


# -- the commands ----------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write the whole store as JSON Lines (a backup)",
        description=textwrap.fill(
            "Write every record of the store, with the key hashes and credit balances, as JSON Lines: a backup "
            "that `keysvc import` restores into an empty data dir. Works while a server runs (one consistent "
            "snapshot of the records).", 100),
        epilog=FORMAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("-o", "--output", metavar="FILE",
                        help="write to FILE (created mode 0600; it holds key hashes) instead of stdout")
    add_progress_flag(export)
    add_store_flags(export)
    export.set_defaults(run=run_export)

    imports = commands.add_parser(
        "import", help="restore an export into an empty data dir, or import keys from Unkey",
        description=textwrap.fill(
            "Restore a `keysvc export` into a data dir that holds no records yet (root keys, such as the one a "
            "first `keysvc serve` makes, do not count), or with --merge into any: records of the same id are "
            "replaced. A file is checked whole before anything is written; stdin is written as it is read. With "
            "--unkey, import keys exported from Unkey by their SHA-256 hashes into an existing API, like "
            "keys.migrateKeys. Exit code 2, with the line number, on a line it cannot use.", 100),
        epilog=FORMAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imports.add_argument("input", metavar="FILE", help="the JSON Lines to read, or - for stdin")
    imports.add_argument("--merge", action="store_true",
                         help="import into a data dir that holds records: a record of the same id is replaced; "
                              "one whose name (hash, slug, external id) is another record's is refused")
    imports.add_argument("--unkey", action="store_true", help="the lines are keys exported from Unkey (see below)")
    imports.add_argument("--api-id", metavar="ID", help="with --unkey: the API of lines that name no apiId")
    add_progress_flag(imports)
    add_store_flags(imports)
    add_json_flag(imports)
    imports.set_defaults(run=run_import)


class _ReaderGone(Exception):
    """stdout's reader went away (`| head`). Not an OSError: the store's transaction would take
    one raised inside it for its own failure."""


class _Writer:
    """The output, with its failures told apart from the store's."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.stream = stream
        self.name = name

    def write(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except BrokenPipeError:
            raise _ReaderGone from None
        except OSError as exc:
            raise UsageError(f"cannot write {self.name}: {exc.strerror}") from None


@guarded
def run_export(args: argparse.Namespace) -> int:
    output, finish, abandon = _output(args.output)
    try:
        with open_store(args, must_exist=True) as store:
            written = _export(store, _Writer(output, args.output or "stdout"), args.progress)
        try:
            finish()
        except BrokenPipeError:
            raise _ReaderGone from None
        except OSError as exc:
            raise UsageError(f"cannot write {args.output or 'stdout'}: {exc.strerror}") from None
    except _ReaderGone:
        abandon()
        # Nothing to report and nothing more to write; stdout is pointed at /dev/null so that the
        # interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except BaseException:
        abandon()
        raise
    if args.output:
        print(f"exported {written} records to {args.output}", file=sys.stderr)
    return 0


def _output(path: str | None) -> tuple[IO[bytes], Callable[[], None], Callable[[], None]]:
    """The stream to write to, what makes it final, and what throws it away. A file is written
    under a temporary name and renamed at the end, so that a failed export leaves no file that
    looks like a backup."""
    if path is None or path == "-":
        stdout = sys.stdout.buffer
        return stdout, stdout.flush, lambda: None
    target = Path(path)
    if target.exists() and not target.is_file():
        # A pipe or a device: written in place, as there is nothing to rename over it.
        try:
            device = open(target, "wb")  # noqa: SIM115 (closed by the returned callables)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None

        def drop() -> None:
            try:
                device.close()
            except OSError:
                pass  # the failure that brought us here has been reported

        return device, device.close, drop
    partial = target.with_name(f".{target.name}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    stream = os.fdopen(fd, "wb", buffering=1 << 20)

    def finish() -> None:
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        os.replace(partial, target)

    def abandon() -> None:
        try:
            stream.close()
        except OSError:
            pass  # the failure that brought us here has been reported
        partial.unlink(missing_ok=True)

    return stream, finish, abandon


def _export(store: LmdbStore, output: _Writer, progress_flag: bool | None) -> int:
    """Writes the export; returns the number of lines between header and end."""
    from keysvc import __version__
    from keysvc.management import now_ms
    from keysvc.store.lmdb import SCHEMA_VERSION

    encode = msgspec.json.Encoder().encode
    written = records = 0
    # One read transaction: the records are one consistent snapshot, however long the export.
    with store.read() as reader:
        counts = {table: reader.count(table) for _, table, _ in RECORD_TABLES}
        progress = Progress("exporting", sum(counts.values()), progress_flag)
        output.write(encode(Header(format=FORMAT, version=VERSION, store_schema=SCHEMA_VERSION, keysvc=__version__,
                                   exported_at=now_ms(), counts=counts)) + b"\n")
        for tag, table, kind in RECORD_TABLES:
            if kind is r.Key:
                continue
            line_type = LINE_TYPES[tag]
            for record in reader.records_from(table, kind):
                output.write(encode(msgspec.convert(record, line_type, from_attributes=True)) + b"\n")
                records += 1
                written += 1
                progress.update(records)
        chunk: list[r.Key] = []
        for key in reader.records_from("keys", r.Key):
            chunk.append(key)
            if len(chunk) == EXPORT_CHUNK:
                written += _export_keys(store, chunk, output, encode)
                records += len(chunk)
                progress.update(records)
                chunk = []
        written += _export_keys(store, chunk, output, encode)
        records += len(chunk)
    output.write(encode(End(records=written)) + b"\n")
    progress.finish(records)
    return written


def _export_keys(store: LmdbStore, keys: list[r.Key], output: _Writer, encode: Callable[[Any], bytes]) -> int:
    """Each key's line, then its balance's: the import keeps the two in one transaction."""
    with_credits = [key.id for key in keys if key.has_credits]
    balances = dict(zip(with_credits, store.get_credits_many(with_credits)))
    written = 0
    for key in keys:
        line_type = LINE_TYPES["key" if key.api_id else "root_key"]
        output.write(encode(msgspec.convert(key, line_type, from_attributes=True)) + b"\n")
        written += 1
        balance = balances.get(key.id)
        if balance is not None:
            output.write(encode(Credits(key_id=key.id, remaining=balance[0], last_refill_at=balance[1])) + b"\n")
            written += 1
    return written


@guarded
def run_import(args: argparse.Namespace) -> int:
    if args.api_id and not args.unkey:
        raise UsageError("--api-id goes with --unkey")
    if args.unkey and args.merge:
        raise UsageError("--merge is for keysvc exports: --unkey always imports into an existing API")
    source = _Source(args.input)
    with open_store(args) as store:
        result = _import_unkey(args, store, source) if args.unkey else _import_export(args, store, source)
    if args.json:
        print_object({"imported": dict(result.counts), "skipped": result.skipped}, True)
        return 0
    print_rows([{"type": kind, "imported": count} for kind, count in result.counts.items()], ("type", "imported"),
               False)
    if result.skipped:
        print(f"skipped {len(result.skipped)} key(s) whose hash the store holds already (or that came twice):",
              file=sys.stderr)
        for encoded in result.skipped:
            print(f"  {encoded}", file=sys.stderr)
    return 0


@dataclass
class Imported:
    counts: Counter[str] = field(default_factory=Counter)  # lines imported, by type
    skipped: list[str] = field(default_factory=list)  # Unkey hashes the store held already


class _BadLine(UsageError):
    """A line that cannot be imported; raised before anything of it is written."""


class _Source:
    """The input's lines, numbered from 1, blank ones left out. A regular file can be read twice:
    checked whole first, then imported; stdin or a pipe once, imported as it is read."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = None if name == "-" else Path(name)
        self.size: int | None = None
        self.position = 0
        if self.path is not None:
            try:
                found = self.path.stat()
            except OSError as exc:
                raise UsageError(f"cannot read {name}: {exc.strerror}") from None
            if stat.S_ISDIR(found.st_mode):
                raise UsageError(f"{name} is a directory")
            if stat.S_ISREG(found.st_mode):
                self.size = found.st_size

    @property
    def rereadable(self) -> bool:
        return self.size is not None

    def lines(self) -> Iterator[tuple[int, bytes]]:
        self.position = 0
        if self.path is None:
            yield from self._numbered(sys.stdin.buffer)
            return
        try:
            with self.path.open("rb") as stream:
                yield from self._numbered(stream)
        except OSError as exc:
            raise UsageError(f"cannot read {self.name}: {exc.strerror}") from None

    def _numbered(self, stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
        for number, raw in enumerate(stream, 1):
            self.position += len(raw)
            if raw.strip():
                yield number, raw


# -- restoring an export -------------------------------------------------------------------------------------


def _import_export(args: argparse.Namespace, store: LmdbStore, source: _Source) -> Imported:
    from keysvc.errors import KeysvcError
    from keysvc.management import Management

    if not args.merge:
        held = _held(store)
        if held:
            listed = ", ".join(f"{count} {table}" for table, count in held.items())
            raise UsageError(f"{store.config.data_dir} holds records already ({listed}): import restores into an "
                             f"empty data dir; --merge imports into this one, replacing records of the same id")
    if source.rereadable:
        checking = Progress("checking", source.size, args.progress, unit="lines")
        try:
            for number, _ in _ExportLines(source.lines()):
                checking.update(source.position, number)
        except _BadLine as exc:
            raise UsageError(f"{_bare(exc)}; nothing was imported") from None
        checking.finish()

    manage = Management(store)
    result = Imported()
    records: list[msgspec.Struct] = []
    balances: list[tuple[str, int, int]] = []
    pending: Counter[str] = Counter()
    first_line = last_line = 0  # of the batch being gathered
    done_through = 0  # the last line whose record is committed
    seen = 0

    def flush() -> None:
        nonlocal done_through
        if not records:
            return
        try:
            manage.restore(records, balances)
        except KeysvcError as exc:
            raise UsageError(f"lines {first_line}-{last_line}: {_bare(exc)}{_committed(done_through)}") from None
        except StoreError as exc:
            raise type(exc)(f"{_bare(exc)}{_committed(done_through)}") from None
        result.counts.update(pending)
        done_through = last_line
        records.clear()
        balances.clear()
        pending.clear()

    parsed = _ExportLines(source.lines())
    progress = Progress("importing", None, args.progress)
    try:
        for number, item in parsed:
            if isinstance(item, Credits):
                # Kept with its key, which the line before put in this batch.
                balances.append((item.key_id, item.remaining, item.last_refill_at))
                pending["credits"] += 1
            else:
                if len(records) >= BATCH:
                    flush()
                if not records:
                    first_line = number
                records.append(item)
                pending[parsed.tag] += 1
                seen += 1
                if progress.total is None and parsed.header is not None:
                    progress.total = sum(parsed.header.counts.values()) or None
                progress.update(seen)
            last_line = number
    except _BadLine as exc:
        # Only when reading stdin, or a file that changed since it was checked.
        raise UsageError(f"{_bare(exc)}{_committed(done_through)}") from None
    flush()
    progress.finish(seen)
    return result


def _bare(exc: BaseException) -> str:
    """The message without its full stop, to go on with what was and was not imported."""
    return str(exc).rstrip(". ")


def _committed(done_through: int) -> str:
    if not done_through:
        return "; nothing was imported"
    return (f"; the records of lines 2-{done_through} were imported, none after: import the whole export "
            f"into an empty data dir again")


class _ExportLines:
    """The records of an export's lines (and its balances as Credits), each checked; UsageError,
    with the line number, for the first line that is not right."""

    def __init__(self, lines: Iterator[tuple[int, bytes]]) -> None:
        self.lines = lines
        self.header: Header | None = None
        self.tag = ""
        self._decode = msgspec.json.Decoder(_LINE).decode

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        from keysvc.management import ROOT_KEYSPACE

        first = next(self.lines, None)
        if first is None:
            raise _BadLine("the input is empty: an export starts with its header line")
        self.header = _header(*first)
        records = 0
        keys: set[str] = set()
        last_key = ""
        end: End | None = None
        number = first[0]
        for number, raw in self.lines:
            if end is not None:
                raise _BadLine(f"line {number}: a line after the end line")
            try:
                line = self._decode(raw)
            except msgspec.ValidationError as exc:
                hint = " (keys exported from Unkey are imported with --unkey)" if b"unkey_key" in raw else ""
                raise _BadLine(f"line {number}: {exc}{hint}") from None
            except msgspec.DecodeError as exc:
                raise _BadLine(f"line {number}: not valid JSON ({exc})") from None
            if isinstance(line, Header):
                raise _BadLine(f"line {number}: a second header")
            if isinstance(line, End):
                end = line
                continue
            records += 1
            if isinstance(line, Credits):
                if line.key_id != last_key:
                    raise _BadLine(f"line {number}: the credits of key {line.key_id!r} must follow that key's line")
                last_key = ""
                yield number, line
                continue
            last_key = ""
            self.tag = TAG_OF[type(line)]
            record = msgspec.convert(line, RECORD_OF[type(line)], from_attributes=True)
            if isinstance(record, r.Key):
                problem = _key_problem(record, self.tag == "root_key", ROOT_KEYSPACE)
                if problem:
                    raise _BadLine(f"line {number}: {problem}")
                if record.id in keys:
                    raise _BadLine(f"line {number}: key {record.id} comes twice")
                keys.add(record.id)
                last_key = record.id
            yield number, record
        if end is None:
            raise _BadLine(f"the input ends at line {number} without the export's end line: it is cut short")
        if end.records != records:
            raise _BadLine(f"the end line counts {end.records} records, but the export holds {records}: "
                             f"lines are missing")


def _header(number: int, raw: bytes) -> Header:
    try:
        header = msgspec.json.decode(raw, type=Header)
        if header.format != FORMAT:
            raise ValueError
    except (msgspec.DecodeError, ValueError):
        raise _BadLine(f"line {number}: not a keysvc export: its first line must be the header "
                         f'{{"type": "header", "format": "{FORMAT}", ...}}; keys exported from Unkey are '
                         f"imported with --unkey") from None
    if header.version > VERSION:
        raise _BadLine(f"line {number}: the export is format version {header.version}, written by a newer "
                         f"keysvc; this one reads up to version {VERSION}")
    return header


def _key_problem(key: r.Key, root: bool, root_keyspace: str) -> str | None:
    if key.hash_alg not in HASH_ALGS:
        return f"key {key.id}: hash_alg is {key.hash_alg!r}, not one of {', '.join(HASH_ALGS)}"
    if len(key.hash) != HASH_BYTES:
        return f"key {key.id}: its hash is {len(key.hash)} bytes, not {HASH_BYTES}"
    if root and (key.api_id or key.keyspace_id != root_keyspace):
        return f"root key {key.id} belongs to an API: a key of an API is a \"key\" line"
    if not root and not key.api_id:
        return f"key {key.id} belongs to no API: a root key is a \"root_key\" line"
    return None


def _held(store: LmdbStore) -> dict[str, int]:
    """Records the data dir holds besides root keys (a first `keysvc serve` makes one)."""
    from keysvc.management import ROOT_KEYSPACE

    with store.read() as reader:
        counts = {table: reader.count(table) for _, table, _ in RECORD_TABLES}
        counts["keys"] -= sum(1 for _ in reader.key_ids_of_keyspace(ROOT_KEYSPACE))
    return {table: count for table, count in counts.items() if count}


# -- keys from Unkey -----------------------------------------------------------------------------------------


def _import_unkey(args: argparse.Namespace, store: LmdbStore, source: _Source) -> Imported:
    from keysvc.errors import KeysvcError
    from keysvc.management import Management

    manage = Management(store)
    checker = _UnkeyChecker(manage, args.api_id)
    if source.rereadable:
        checking = Progress("checking", source.size, args.progress, unit="lines")
        try:
            for number, raw in source.lines():
                checker.check(number, raw)
                checking.update(source.position, number)
        except _BadLine as exc:
            raise UsageError(f"{_bare(exc)}; nothing was imported") from None
        checking.finish()

    result = Imported()
    batch: dict[str, list[tuple[str, Any, str]]] = {}
    size = first_line = done_through = 0

    def flush(last_line: int) -> None:
        nonlocal size, done_through
        for api_id, items in batch.items():
            try:
                migrated, failed = manage.migrate_keys(api_id, items)
            except KeysvcError as exc:
                raise UsageError(f"lines {first_line}-{last_line}: {_bare(exc)}{_unkey_committed(done_through)}") from None
            result.counts["unkey_key"] += len(migrated)
            result.skipped.extend(failed)
        batch.clear()
        size = 0
        done_through = last_line

    progress = Progress("importing", source.size, args.progress, unit="lines")
    number = 0
    try:
        for number, raw in source.lines():
            api_id, item = checker.check(number, raw)
            if not size:
                first_line = number
            batch.setdefault(api_id, []).append(item)
            size += 1
            if size >= BATCH:
                flush(number)
            progress.update(source.position, number)
    except _BadLine as exc:
        raise UsageError(f"{_bare(exc)}{_unkey_committed(done_through)}") from None
    flush(number)
    progress.finish()
    if not result.counts and not result.skipped:
        raise UsageError("the input holds no keys")
    return result


def _unkey_committed(done_through: int) -> str:
    if not done_through:
        return "; nothing was imported"
    return f"; the keys of lines 1-{done_through} were imported, none after"


class _UnkeyChecker:
    """Each line as the (api id, (hash, spec, start)) migrate_keys takes, checked as far as it can
    be before writing: its shape and limits (those of keys.migrateKeys), its API, roles, hash,
    refill and meta."""

    def __init__(self, manage: Any, default_api: str | None) -> None:
        self.manage = manage
        self.default_api = default_api
        from .unkey_lines import UnkeyKey

        self.decode = msgspec.json.Decoder(UnkeyKey).decode
        self.apis: set[str] = set()
        self.roles: set[str] = set()

    def check(self, number: int, raw: bytes) -> tuple[str, tuple[str, Any, str]]:
        from keysvc.errors import KeysvcError
        from keysvc.http.errors import HttpError
        from keysvc.http.routes.keys import checked_meta, credits_spec, ratelimit_specs, value
        from keysvc.keys import unkey_hash_to_digest
        from keysvc.management import KeySpec

        try:
            line = self.decode(raw)
        except msgspec.ValidationError as exc:
            raise _BadLine(f"line {number}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise _BadLine(f"line {number}: not valid JSON ({exc})") from None
        api_id = value(line.api_id, self.default_api)
        if api_id is None:
            raise _BadLine(f"line {number}: no apiId: give one on each line, or --api-id")
        try:
            unkey_hash_to_digest(line.hash)
        except ValueError as exc:
            raise _BadLine(f"line {number}: the hash is not an Unkey key hash ({exc})") from None
        try:
            if api_id not in self.apis:
                self.manage.get_api(api_id)
                self.apis.add(api_id)
            for role in value(line.roles, ()):
                if role not in self.roles:
                    self.manage.get_role(role)
                    self.roles.add(role)
            spec = KeySpec(
                api_id=api_id, name=value(line.name), external_id=value(line.external_id),
                meta=checked_meta(value(line.meta), "meta"), roles=value(line.roles, ()),
                permissions=value(line.permissions, ()), expires=value(line.expires),
                credits=credits_spec(line.credits), ratelimits=ratelimit_specs(line.ratelimits),
                enabled=line.enabled,
            )
            if spec.credits is not None:
                spec.credits.refill()
        except KeysvcError as exc:
            raise _BadLine(f"line {number}: {exc}") from None
        except HttpError as exc:
            raise _BadLine(f"line {number}: {exc.detail}") from None
        return api_id, (line.hash, spec, value(line.start, ""))

"""The analytics rows, as the workers spool them: the columns of the contract's section 8.

A spooled event is a msgpack array: the struct's tag, then its fields in the raw table's column
names and order. Without the array header and the tag, what is left is that row in ClickHouse's
MsgPack input format, so the flusher inserts spooled records as they are, with no Python work per
row beyond checking them (`rows`).
"""
from __future__ import annotations

import gc
from typing import Annotated

import msgspec

Int64 = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
UInt64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec decodes no int past 2**64 - 1


class VerificationEvent(msgspec.Struct, array_like=True, tag=1):
    request_id: str
    time: Int64  # unix ms
    key_space_id: str  # '' for NOT_FOUND: keysvc records those too, so that key guessing shows
    identity_id: str
    external_id: str
    key_id: str
    outcome: str
    tags: list[str]
    spent_credits: Int64
    latency: float  # ms


class RatelimitEvent(msgspec.Struct, array_like=True, tag=2):
    request_id: str
    time: Int64
    namespace_id: str
    identifier: str
    passed: bool
    latency: float
    override_id: str
    limit: UInt64
    remaining: UInt64
    reset_at: Int64
    tokens: UInt64


Event = VerificationEvent | RatelimitEvent

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Event).decode

VERIFICATION_FIELDS = msgspec.structs.fields(VerificationEvent)
RATELIMIT_FIELDS = msgspec.structs.fields(RatelimitEvent)
VERIFICATION_COLUMNS = tuple(field.name for field in VERIFICATION_FIELDS)
RATELIMIT_COLUMNS = tuple(field.name for field in RATELIMIT_FIELDS)
# A fixarray header (fewer than 16 elements) and a positive fixint tag: two bytes.
_VERIFICATION_HEAD = bytes([0x90 | (len(VERIFICATION_FIELDS) + 1), 1])
_RATELIMIT_HEAD = bytes([0x90 | (len(RATELIMIT_FIELDS) + 1), 2])
_check_verifications = msgspec.msgpack.Decoder(list[VerificationEvent]).decode
_check_ratelimits = msgspec.msgpack.Decoder(list[RatelimitEvent]).decode


class Rows(msgspec.Struct):
    """A spool batch as the raw tables' MsgPack rows, and the sequence numbers of records that
    are not well-formed events (corrupt: skipped, counted and logged by the flusher)."""

    verifications: bytes
    verification_count: int
    ratelimits: bytes
    ratelimit_count: int
    bad: list[int]


def rows(batch: list[tuple[int, bytes]]) -> Rows:
    verifications: list[tuple[int, bytes]] = []
    ratelimits: list[tuple[int, bytes]] = []
    bad: list[int] = []
    for seq, raw in batch:
        head = raw[:2]
        if head == _VERIFICATION_HEAD:
            verifications.append((seq, raw))
        elif head == _RATELIMIT_HEAD:
            ratelimits.append((seq, raw))
        else:
            bad.append(seq)
    verifications = _well_formed(verifications, _check_verifications, VerificationEvent, bad)
    ratelimits = _well_formed(ratelimits, _check_ratelimits, RatelimitEvent, bad)
    bad.sort()
    return Rows(b"".join([raw[2:] for _, raw in verifications]), len(verifications),
                b"".join([raw[2:] for _, raw in ratelimits]), len(ratelimits), bad)


def _well_formed(records: list[tuple[int, bytes]], check_all, kind: type, bad: list[int]) -> list[tuple[int, bytes]]:
    """The records that decode as `kind` with nothing left over; one decoder call for the usual
    batch where all do, one per record to find the ones that don't."""
    if not records:
        return records
    payload = b"\xdd" + len(records).to_bytes(4, "big") + b"".join([raw for _, raw in records])
    # Decoding makes tens of thousands of short-lived objects: with the collector on, they set off
    # collections that walk the whole heap (chDB's client included), six times the decoding itself.
    collecting = gc.isenabled()
    gc.disable()
    try:
        check_all(payload)
        return records
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):  # ValueError: UnicodeDecodeError
        pass
    finally:
        if collecting:
            gc.enable()
    good = []
    for seq, raw in records:
        try:
            if type(decode(raw)) is kind:
                good.append((seq, raw))
                continue
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            pass
        bad.append(seq)
    return good

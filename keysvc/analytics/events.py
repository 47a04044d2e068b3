"""The analytics rows, as the workers spool them: the columns of the contract's section 8."""
from __future__ import annotations

import msgspec

WORKSPACE = "ws_local"  # one workspace per keysvc node
REGION = "local"


class VerificationEvent(msgspec.Struct, array_like=True, tag=1):
    request_id: str
    time: int  # unix ms
    key_space_id: str  # '' for NOT_FOUND: keysvc records those too, so that key guessing shows
    identity_id: str
    external_id: str
    key_id: str
    outcome: str
    tags: list[str]
    spent_credits: int
    latency: float  # ms


class RatelimitEvent(msgspec.Struct, array_like=True, tag=2):
    request_id: str
    time: int
    namespace_id: str
    identifier: str
    passed: bool
    latency: float
    override_id: str
    limit: int
    remaining: int
    reset_at: int
    tokens: int


Event = VerificationEvent | RatelimitEvent

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder(Event).decode

"""The workers' side of analytics queries: ClickHouse (chDB) is open in the flusher process only,
so a worker asks the flusher over the Unix socket <data_dir>/analytics.sock.

Protocol: one request per connection. Each message is a 4-byte big-endian length, then that many
bytes of JSON. Request: {"sql": str, "timeout": float, "max_rows": int (optional)}. Answer:
{"rows": [{column: value, ...}, ...]} or {"error": str, "kind": "rejected" | "unavailable"}.
The flusher runs the SQL with readonly=1 and max_execution_time=timeout. In the rows, DateTime and
Date values are unix milliseconds, NaN and infinities null, Decimals numbers, UUIDs and IPs strings.
"""
from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path
from typing import Any

import msgspec

SOCKET_NAME = "analytics.sock"
_FRAME = struct.Struct(">I")
_MAX_RESPONSE = 64 << 20
_MARGIN = 5.0  # seconds past the query's own timeout before the flusher counts as stuck


class AnalyticsUnavailable(Exception):
    """The flusher is not running, or ClickHouse is unreachable (HTTP 503)."""


class QueryFailed(Exception):
    """ClickHouse rejected the query or timed it out; str(exc) is ClickHouse's message (HTTP 400)."""


async def run_query(data_dir: str, sql: str, timeout: float, *, max_rows: int | None = None) -> list[dict]:
    """The rows of `sql`, run read-only by the node's flusher within `timeout` seconds."""
    request: dict[str, Any] = {"sql": sql, "timeout": timeout}
    if max_rows is not None:
        request["max_rows"] = max_rows
    try:
        answer = await asyncio.wait_for(_exchange(str(Path(data_dir) / SOCKET_NAME), msgspec.json.encode(request)),
                                        timeout + _MARGIN)
    except asyncio.TimeoutError:
        raise AnalyticsUnavailable("the analytics flusher did not answer in time") from None
    except (OSError, asyncio.IncompleteReadError, EOFError) as exc:
        raise AnalyticsUnavailable(f"the analytics flusher is not running ({exc.__class__.__name__})") from None
    try:
        response = msgspec.json.decode(answer)
    except msgspec.DecodeError:
        raise AnalyticsUnavailable("the analytics flusher answered garbage") from None
    if not isinstance(response, dict):
        raise AnalyticsUnavailable("the analytics flusher answered garbage")
    if "error" in response:
        if response.get("kind") == "unavailable":
            raise AnalyticsUnavailable(str(response["error"]))
        raise QueryFailed(str(response["error"]))
    rows = response.get("rows")
    if not isinstance(rows, list):
        raise AnalyticsUnavailable("the analytics flusher answered garbage")
    return rows


async def _exchange(path: str, payload: bytes) -> bytes:
    reader, writer = await _open(path)
    try:
        writer.write(_FRAME.pack(len(payload)) + payload)
        await writer.drain()
        (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
        if size > _MAX_RESPONSE:
            raise EOFError("answer too large")
        return await reader.readexactly(size)
    finally:
        writer.close()


async def _open(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if len(path.encode()) < 100:
        return await asyncio.open_unix_connection(path, limit=1 << 20)
    # Past sun_path's 108 bytes: through /proc/self/fd/<an O_PATH descriptor of the directory>.
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{fd}/{os.path.basename(path)}", limit=1 << 20)
    finally:
        os.close(fd)

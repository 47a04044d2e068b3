"""GET /v2/liveness and GET /openapi.json: no auth."""
from __future__ import annotations

from typing import Any

import msgspec

from ..routing import route


class LivenessData(msgspec.Struct):
    message: str


_OK = LivenessData(message="OK")


@route("/v2/liveness", None, LivenessData, method="GET", auth=False)
def liveness(ctx: Any, body: None) -> LivenessData:
    """Whether this worker answers."""
    return _OK

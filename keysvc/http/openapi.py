"""GET /openapi.json: an OpenAPI 3.1 document of every route, generated from the msgspec
types the server decodes and validates requests with and encodes answers from."""
from __future__ import annotations

from functools import cache
from typing import Any

import msgspec

from keysvc import __version__

from . import envelope
from .routing import ROUTES, Raw, Route, route

REF = "#/components/schemas/{name}"
ERROR_STATUSES = {
    "400": "The request is malformed, fails validation, or lacks a well-formed Authorization header.",
    "401": "The root key is unknown.",
    "403": "The root key lacks a permission this request needs.",
    "404": "A named resource does not exist.",
    "405": "The route exists, with another method.",
    "409": "The resource exists already.",
    "410": "The rate-limit namespace has been deleted.",
    "412": "A precondition failed (an unknown named rate limit; a vault for recoverable keys).",
    "413": "The request body is over the size limit.",
    "500": "An unexpected error; it has been logged.",
    "503": "The store cannot take the request (full, unreadable).",
}


def _operation(path: str, r: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    meta = {"$ref": REF.format(name="Meta")}
    if r.response_type is None:
        body = {"type": "object", "required": ["meta"], "properties": {"meta": meta}}
    else:
        body = {"type": "object", "required": ["meta", "data"],
                "properties": {"meta": meta, "data": schemas[r.response_type]}}
        if r.paginated:
            body["required"].append("pagination")
            body["properties"]["pagination"] = {"$ref": REF.format(name="Pagination")}
    error = {"$ref": REF.format(name="Failure")}
    operation: dict[str, Any] = {
        "operationId": path.rsplit("/", 1)[-1],
        "summary": r.summary,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": body}}},
            **{status: {"description": text,
                        "content": {"application/json": {"schema": error},
                                    "application/problem+json": {"schema": error}}}
               for status, text in ERROR_STATUSES.items()},
        },
    }
    if r.auth:
        operation["security"] = [{"rootKey": []}]
    if r.request_type is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": schemas[r.request_type]}}}
    return operation


@cache
def document() -> bytes:
    served = [r for r in ROUTES.values() if r.path != "/openapi.json"]
    types = [envelope.Failure, envelope.Pagination, envelope.Meta]
    for r in served:
        types += [t for t in (r.request_type, r.response_type) if t is not None]
    types = list(dict.fromkeys(types))
    generated, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(types, generated))
    paths = {r.path: {r.method.lower(): _operation(r.path, r, schemas)} for r in served}
    return msgspec.json.encode({
        "openapi": "3.1.0",
        "info": {"title": "keysvc", "version": __version__,
                 "description": "A self-hosted API-key service, wire-compatible with Unkey's v2 API."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"rootKey": {"type": "http", "scheme": "bearer",
                                            "description": "A root key: Authorization: Bearer <root key>"}},
        },
    })


@route("/openapi.json", None, None, method="GET", auth=False)
def openapi(ctx: Any, body: None) -> Raw:
    """The OpenAPI 3.1 document of this server."""
    return Raw(document())

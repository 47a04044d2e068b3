"""Root keys: `Authorization: Bearer <root key>`, looked up through the same cache as keys,
with permissions in the contract's form (`api.*.create_key`, `api.<apiId>.verify_key`, ...).
A root key created with no named permission holds `*`, everything."""
from __future__ import annotations

from keysvc._fast import KeyView
from keysvc.management import ROOT_KEYSPACE, now_ms

from .errors import HttpError, forbidden
from .node import Node

ALL = "*"


def authenticate(node: Node, authorization: bytes | None) -> KeyView:
    if not authorization:
        raise HttpError(400, "unkey/authentication/missing",
                        "Authorization header is missing: send 'Authorization: Bearer <root key>'.")
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise HttpError(400, "unkey/authentication/malformed",
                        "Authorization header is malformed: expected 'Bearer <root key>'.")
    try:
        text = token.decode()
    except UnicodeDecodeError:
        raise HttpError(400, "unkey/authentication/malformed", "Authorization header is not valid UTF-8.") from None
    view = node.verifier.lookup(text) if len(text) <= 512 else None
    if (view is None or view.keyspace_id != ROOT_KEYSPACE or not view.enabled
            or (view.expires >= 0 and now_ms() > view.expires)):
        raise HttpError(401, "unkey/authentication/key_not_found", "The provided root key is invalid.")
    return view


def allows(root: KeyView, group: str, action: str, resource: str | None = None) -> bool:
    held = root.permissions
    return (
        ALL in held
        or f"{group}.*.{action}" in held
        or (resource is not None and f"{group}.{resource}.{action}" in held)
    )


def require(root: KeyView, group: str, action: str, resource: str | None = None) -> None:
    if not allows(root, group, action, resource):
        raise forbidden(f"{group}.{resource or '*'}.{action}")


def verify_scope(root: KeyView) -> frozenset[str] | None:
    """The API ids whose keys this root key may verify; None means all of them."""
    held = root.permissions
    if ALL in held or "api.*.verify_key" in held:
        return None
    return frozenset(p[4:-11] for p in held if p.startswith("api.") and p.endswith(".verify_key"))

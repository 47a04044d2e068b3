"""The line of `keysvc import --unkey`: a key as keys.migrateKeys takes it, plus where it goes and
how it starts. Its own module, imported only by that import: it needs the HTTP layer's types."""
from __future__ import annotations

from typing import Annotated, Literal

from msgspec import UNSET, Meta, UnsetType

from keysvc.http.routes.keys import MigrateKey
from keysvc.http.wire import ApiId


class UnkeyKey(MigrateKey, kw_only=True):
    type: Literal["unkey_key"] | UnsetType = UNSET
    api_id: ApiId | UnsetType = UNSET  # else --api-id
    start: Annotated[str, Meta(max_length=255)] | UnsetType = UNSET  # the key's first characters, for display

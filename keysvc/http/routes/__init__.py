"""The routes, one module per group of the Unkey v2 API."""


def register_all() -> None:
    from . import analytics, apis, identities, keys, liveness, permissions, ratelimit  # noqa: F401  (they register)
    from .. import openapi  # noqa: F401

"""Errors the hot path raises for bad requests, shared by both twins so callers catch one class."""


class PermissionQuerySyntaxError(ValueError):
    """The verifyKey `permissions` query does not parse (the HTTP layer answers 400)."""


class RatelimitNotFoundError(LookupError):
    """verifyKey named a rate limit that neither the key nor its identity has (HTTP 412)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"ratelimit '{name}' was requested but does not exist for this key or its identity")
        self.name = name

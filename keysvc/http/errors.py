"""Errors that become error envelopes: status, title, Unkey's error code, and a detail."""
from __future__ import annotations

from collections.abc import Sequence

from keysvc.errors import KeysvcError

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflicting Resource",
    410: "Resource Gone",
    412: "Precondition Failed",
    413: "Content Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ValidationIssue:
    __slots__ = ("location", "message", "fix")

    def __init__(self, location: str, message: str, fix: str | None = None) -> None:
        self.location = location
        self.message = message
        self.fix = fix


class HttpError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        issues: Sequence[ValidationIssue] = (),
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.issues = list(issues)
        self.headers = list(headers)

    @classmethod
    def from_domain(cls, exc: KeysvcError) -> HttpError:
        issues = [ValidationIssue("body", exc.detail)] if exc.status == 400 else []
        return cls(exc.status, exc.code, exc.detail, issues)


def bad_request(detail: str, location: str = "body", code: str = "unkey/application/invalid_input") -> HttpError:
    return HttpError(400, code, detail, [ValidationIssue(location, detail)])


def forbidden(permission: str) -> HttpError:
    return HttpError(
        403, "unkey/authorization/insufficient_permissions",
        f"Missing permission: the root key needs '{permission}' for this request.",
    )

"""Domain errors of the management operations; the HTTP layer maps each to its status."""


class KeysvcError(Exception):
    status = 500
    code = "unkey/application/unexpected_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(KeysvcError):
    status = 400
    code = "unkey/application/invalid_input"


class NotFound(KeysvcError):
    status = 404

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(detail)
        self.code = f"unkey/data/{what}_not_found"


class Conflict(KeysvcError):
    status = 409

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(detail)
        self.code = f"unkey/data/{what}_already_exists"


class PreconditionFailed(KeysvcError):
    status = 412
    code = "unkey/application/precondition_failed"


class Gone(KeysvcError):
    status = 410
    code = "unkey/data/ratelimit_namespace_gone"

"""Opaque ids in Unkey's style: a prefix and random alphanumerics (`req_`, `key_`, `api_`, ...)."""
import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 16) -> str:
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(length))}"


def request_id() -> str:
    return new_id("req", 9)

"""Key material: generation (contract section 5) and the one-way digests keys are stored as."""
import base64
import hashlib
import secrets

from keysvc._fast import hash_key

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58(data: bytes) -> str:
    """Bitcoin-alphabet base58; each leading zero byte becomes '1'."""
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_BASE58[rem])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def generate_key(prefix: str | None, byte_length: int = 16) -> tuple[str, str]:
    """(key, start): `byte_length` bytes from the OS CSPRNG in base58, behind `prefix_` if any."""
    body = base58(secrets.token_bytes(byte_length))
    if prefix:
        return f"{prefix}_{body}", f"{prefix}_{body[:4]}"
    return body, body[:4]


def key_digest(key: str) -> bytes:
    """What keysvc stores for a key it generated: blake3 of the whole key string."""
    return hash_key(key)


def unkey_hash_to_digest(encoded: str) -> bytes:
    """Unkey's stored hash (SHA-256, standard base64 with padding) as raw digest bytes."""
    digest = base64.b64decode(encoded, validate=True)
    if len(digest) != 32:
        raise ValueError("an Unkey key hash is the base64 of 32 bytes (SHA-256)")
    return digest


def unkey_hash(key: str) -> str:
    """The hash Unkey stores for a key, for tests and for importing."""
    return base64.b64encode(hashlib.sha256(key.encode()).digest()).decode()

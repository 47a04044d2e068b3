"""The Unkey v2-compatible HTTP API: plain ASGI callables, msgspec for JSON and validation."""

"""keysvc: a fast, self-hosted API-key service, wire-compatible with Unkey's v2 API."""

__version__ = "0.1.0"

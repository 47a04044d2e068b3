"""The hot path, compiled or not.

`_core_c`/`_query_c` are Cython builds of `_core_py`/`_query_py` (one source each). The
compiled twin is used unless it is missing or KEYSVC_NO_EXTENSIONS is set to a non-empty
value; both behave identically, which the tests hold them to.
"""
import os

from .errors import PermissionQuerySyntaxError, RatelimitNotFoundError

NO_EXTENSIONS = bool(os.environ.get("KEYSVC_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    from . import _core_py as core
else:
    try:
        from . import _core_c as core

        if not core.COMPILED:  # the .py link, imported because the build is missing
            raise ImportError
    except ImportError:
        from . import _core_py as core

COMPILED: bool = core.COMPILED
Verifier = core.Verifier
KeyView = core.KeyView
VerifyResult = core.VerifyResult
hash_key = core.hash_key
bucket_key = core.bucket_key
credits_key = core.credits_key
is_window = core.is_window
apply_refill = core.apply_refill
cell_is_expired = core.cell_is_expired
KEY_LIMITS = core.KEY_LIMITS
NAMESPACE_LIMITS = core.NAMESPACE_LIMITS
REFILL_NONE, REFILL_DAILY, REFILL_MONTHLY = core.REFILL_NONE, core.REFILL_DAILY, core.REFILL_MONTHLY

__all__ = [
    "COMPILED", "KEY_LIMITS", "NAMESPACE_LIMITS", "KeyView", "PermissionQuerySyntaxError", "REFILL_DAILY",
    "REFILL_MONTHLY", "REFILL_NONE", "RatelimitNotFoundError", "Verifier", "VerifyResult", "apply_refill",
    "bucket_key", "cell_is_expired", "credits_key", "hash_key", "is_window",
]

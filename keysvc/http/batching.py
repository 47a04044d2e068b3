"""Group commit for verifications: every verifyKey that becomes ready in one pass of the event
loop is verified in one `Verifier.verify_batch` call, so the counters' write transaction (its
writer lock, its commit, and py-lmdb's GIL hand-offs) is paid once per batch rather than once
per request. Under load a batch holds the requests that arrived together; alone, a request
waits only for the rest of the current loop pass."""
from __future__ import annotations

import asyncio
from typing import Any

from keysvc._fast import Verifier, VerifyResult
from keysvc.management import now_ms


class VerifyBatcher:
    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self.requests: list[tuple[Any, ...]] = []
        self.waiters: list[asyncio.Future[VerifyResult]] = []

    def verify(self, request: tuple[Any, ...]) -> asyncio.Future[VerifyResult]:
        """The result of verify(now, *request), once this loop pass's batch has run."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self.requests:
            loop.call_soon(self.run)
        self.requests.append(request)
        self.waiters.append(waiter)
        return waiter

    def run(self) -> None:
        requests, waiters = self.requests, self.waiters
        self.requests, self.waiters = [], []
        try:
            results = self.verifier.verify_batch(requests, now_ms())
        except Exception as exc:  # the store failed: every request of the batch learns it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, result in zip(waiters, results):
            if waiter.done():  # its client went away
                continue
            if isinstance(result, Exception):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

"""Group commit for verifications: every verifyKey that becomes ready in one pass of the event
loop is verified in one `Verifier.verify_batch` call, so the counters' write transaction (its
writer lock, its commit, and py-lmdb's GIL hand-offs) is paid once per batch rather than once
per request; the batch's analytics events are spooled together too. Under load a batch holds
the requests that arrived together; alone, a request waits only for the rest of the loop pass.
Each batch's outcomes are counted in the worker's metrics file (keysvc.metrics) as they are
handed out."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from keysvc._fast import Verifier, VerifyResult
from keysvc.analytics import events
from keysvc.analytics.spool import Spool
from keysvc.management import now_ms
from keysvc.metrics import WorkerMetrics


class VerifyBatcher:
    def __init__(self, verifier: Verifier, spool: Spool | None, metrics: WorkerMetrics | None = None) -> None:
        self.verifier = verifier
        self.spool = spool
        self.metrics = metrics
        self.requests: list[tuple[Any, ...]] = []
        self.waiters: list[asyncio.Future[VerifyResult]] = []
        self.origins: list[tuple[str, list[str], float]] = []

    def verify(self, request: tuple[Any, ...], request_id: str, tags: list[str]) -> asyncio.Future[VerifyResult]:
        """The result of verify(now, *request), once this loop pass's batch has run."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self.requests:
            loop.call_soon(self.run)
        self.requests.append(request)
        self.waiters.append(waiter)
        self.origins.append((request_id, tags, time.perf_counter()))
        return waiter

    def run(self) -> None:
        requests, waiters, origins = self.requests, self.waiters, self.origins
        self.requests, self.waiters, self.origins = [], [], []
        now = now_ms()
        try:
            results = self.verifier.verify_batch(requests, now)
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
        if self.metrics is not None:
            self.metrics.verified(results, self.verifier)
        if self.spool is not None:
            self.spool.append(verification_events(results, origins, now))


def verification_events(results: list[Any], origins: list[tuple[str, list[str], float]], now: int) -> list[bytes]:
    finished = time.perf_counter()
    encoded = []
    for result, (request_id, tags, started) in zip(results, origins):
        if isinstance(result, Exception):  # a bad request, answered 400/412: no verification
            continue
        view = result.key
        if view is None:
            event = events.VerificationEvent(request_id, now, "", "", "", "", result.code, tags, 0,
                                             (finished - started) * 1000)
        else:
            identity = view.record.identity
            event = events.VerificationEvent(
                request_id, now, view.keyspace_id, identity.id if identity else "",
                identity.external_id if identity else "", view.key_id, result.code, tags, result.spent,
                (finished - started) * 1000,
            )
        encoded.append(events.encode(event))
    return encoded

"""Who is calling (auth), and how much of the engines they may hold (admission).

A request's tenant is RequestContext.tenant ("default" when empty).  With
`auth: required` its token must equal the configured one; the error never
says which part was wrong beyond what the caller already sent.

Admission is the queue in front of every engine.  A request runs when its
tenant holds fewer than max_in_flight running requests and its model has a
free slot (a generation model has `parallel` slots, matching the engine's
own concurrent sequences; the embedding batcher has no slot limit, it
interleaves requests itself).  Otherwise it waits, unless its tenant already
has max_queued waiting: then RESOURCE_EXHAUSTED.  Freed slots go to waiting
tenants in turn (round-robin), so one tenant's backlog does not starve
another.  The time spent waiting here is the request's queue time.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator

from llmfdw.sidecar import metrics
from llmfdw.sidecar.config import DEFAULT_TENANT, Limits, SidecarConfig


class Unauthenticated(Exception):
    """No valid token for the tenant (gRPC UNAUTHENTICATED)."""


class LimitExceeded(Exception):
    """The tenant is at its limits (gRPC RESOURCE_EXHAUSTED)."""


def authenticate(config: SidecarConfig, tenant: str, token: str) -> str:
    """The tenant the request is metered to; raises Unauthenticated when auth is
    required and the token does not match (an unknown tenant reads the same)."""
    name = tenant or DEFAULT_TENANT
    if config.auth == "off":
        return name
    if not token:
        raise Unauthenticated(f"this sidecar requires a token and the request for tenant {name!r} "
                              f"carries none")
    known = config.tenants.get(name)
    # compare_digest even for an unknown tenant, so timing does not tell which tenants exist
    expected = known.token if known is not None else "\0"
    if not hmac.compare_digest(expected.encode(), token.encode()) or known is None:
        raise Unauthenticated(f"the token given for tenant {name!r} is not valid")
    return name


@dataclass
class _Waiter:
    limits: Limits
    future: asyncio.Future


class Admission:
    """Per-tenant limits and per-model slots; see the module docstring."""

    def __init__(self, slots: dict[str, int | None]) -> None:
        self._free = dict(slots)                    # model -> free slots (None: unlimited)
        self._waiting: dict[str, OrderedDict[str, deque[_Waiter]]] = {m: OrderedDict() for m in slots}
        self._running: dict[str, int] = {}          # tenant -> requests holding a slot
        self._queued: dict[str, int] = {}           # tenant -> requests waiting

    def queued(self, tenant: str) -> int:
        return self._queued.get(tenant, 0)

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str, limits: Limits, model: str) -> AsyncIterator[int]:
        """Hold a slot of `model` for `tenant`; yields the nanoseconds waited for it."""
        arrived = time.monotonic_ns()
        if not self._waiting[model].get(tenant) and self._may_start(tenant, limits, model):
            self._take(tenant, model)
        else:
            await self._wait(tenant, limits, model)
        try:
            yield time.monotonic_ns() - arrived
        finally:
            self._release(tenant, model)

    def _may_start(self, tenant: str, limits: Limits, model: str) -> bool:
        free = self._free[model]
        return self.running(tenant) < limits.max_in_flight and (free is None or free > 0)

    def _take(self, tenant: str, model: str) -> None:
        self._running[tenant] = self.running(tenant) + 1
        if self._free[model] is not None:
            self._free[model] -= 1

    def _release(self, tenant: str, model: str) -> None:
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]
        if self._free[model] is not None:
            self._free[model] += 1
        self._dispatch()

    async def _wait(self, tenant: str, limits: Limits, model: str) -> None:
        if self.queued(tenant) >= limits.max_queued:
            raise LimitExceeded(
                f"tenant {tenant!r} already has {self.running(tenant)} requests running "
                f"(max_in_flight {limits.max_in_flight}) and {self.queued(tenant)} waiting "
                f"(max_queued {limits.max_queued}); retry when some finish")
        waiter = _Waiter(limits, asyncio.get_running_loop().create_future())
        self._waiting[model].setdefault(tenant, deque()).append(waiter)
        self._queued[tenant] = self.queued(tenant) + 1
        gauge = metrics.QUEUED.labels(model, tenant)
        gauge.inc()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(tenant, model)       # granted just as the caller left
            else:
                self._forget(tenant, model, waiter)
            raise
        finally:
            gauge.dec()

    def _forget(self, tenant: str, model: str, waiter: _Waiter) -> None:
        queue = self._waiting[model][tenant]
        queue.remove(waiter)
        if not queue:
            del self._waiting[model][tenant]
        self._unqueue(tenant)
        self._dispatch()   # it may have stood in front of others

    def _unqueue(self, tenant: str) -> None:
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]

    def _dispatch(self) -> None:
        """Hand free slots to waiters: per model, tenants in turn, oldest first within a tenant."""
        progress = True
        while progress:
            progress = False
            for model, tenants in self._waiting.items():
                if self._free[model] == 0:
                    continue
                for tenant, queue in tenants.items():
                    waiter = queue[0]
                    # a cancelled waiter is removed by its own task, which dispatches again
                    if waiter.future.cancelled() or not self._may_start(tenant, waiter.limits, model):
                        continue
                    queue.popleft()
                    if queue:
                        tenants.move_to_end(tenant)   # its next request waits for the others' turn
                    else:
                        del tenants[tenant]
                    self._unqueue(tenant)
                    self._take(tenant, model)
                    waiter.future.set_result(None)
                    progress = True
                    break

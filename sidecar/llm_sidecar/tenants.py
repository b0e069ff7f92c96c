"""Who is calling (auth), and how much of the engines they may hold (admission).

A request's tenant is RequestContext.tenant ("default" when empty).  With
`auth: required` its token must equal the configured one; the error never
says which part was wrong beyond what the caller already sent.

Admission is the queue in front of every engine.  A request runs when its
tenant holds fewer than max_in_flight running requests, its model has a free
slot (a generation model has `parallel` slots, matching the engine's own
concurrent sequences; the embedding batcher has no slot limit, it
interleaves requests itself) and its session holds fewer than the model's
session cap.  Otherwise it waits, unless its tenant already has max_queued
waiting: then LimitExceeded (RESOURCE_EXHAUSTED, marked as an admission
rejection by the servicer, so a caller knows that backing off helps).

Fairness has two levels.  All roles of a database usually share one tenant,
so a tenant is split into sessions (RequestContext.session; the FDW sends one
per Postgres backend).  Freed slots go to waiting tenants in turn
(round-robin); within the chosen tenant to the waiting session that holds
the fewest slots of the model (ties: the one served longest ago); within a
session, oldest request first.  A request without a session is a session of
its own: callers that do not say who they are keep the old per-tenant
behaviour (only the tenant's limits apply), and one request can never hog
more than one slot anyway.

Running generations cannot be preempted, so fairness on hand-out alone
would let one session that arrives first with `prompt = ANY(16 prompts)`
fill every slot and make the next session wait for a whole long answer.  So
the engine has `session_reserve` slots beyond the model's `parallel` (default
max(1, parallel // 8), see config.py) and one session may hold at most
`parallel` of them: a newcomer always finds a free slot at once, and as the
hog's answers finish, its freed slots go to sessions holding fewer.  The
reserve is added, not carved out, so one session alone still runs `parallel`
sequences at once.  The time spent waiting here is the request's queue time.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import AsyncIterator

from llm_sidecar import metrics
from llm_sidecar.config import DEFAULT_TENANT, Limits, SidecarConfig


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
    known = config.tenant(name)
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
    """Per-tenant limits, per-model slots and per-session caps; see the module docstring."""

    def __init__(self, slots: dict[str, int | None], reserve: dict[str, int] | None = None) -> None:
        """slots: model -> engine slots (None: unlimited); reserve: model -> slots that one
        session may never take (its cap is slots - reserve, at least 1)."""
        reserve = reserve or {}
        self._free = dict(slots)                    # model -> free slots (None: unlimited)
        self._cap = {m: None if n is None else max(1, n - reserve.get(m, 0)) for m, n in slots.items()}
        # model -> tenant -> session -> waiters; each mapping in turn order (next served first)
        self._waiting: dict[str, OrderedDict[str, OrderedDict[str, deque[_Waiter]]]] = \
            {m: OrderedDict() for m in slots}
        self._running: dict[str, int] = {}          # tenant -> requests holding a slot
        self._queued: dict[str, int] = {}           # tenant -> requests waiting
        self._held: dict[tuple[str, str, str], int] = {}   # (model, tenant, session) -> slots held
        self._anonymous = itertools.count()

    def queued(self, tenant: str) -> int:
        return self._queued.get(tenant, 0)

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    def held(self, model: str, tenant: str, session: str) -> int:
        """Slots of `model` held by a named session of `tenant`."""
        return self._held.get((model, tenant, "s:" + session), 0)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str, limits: Limits, model: str, session: str = "") -> AsyncIterator[int]:
        """Hold a slot of `model` for `session` of `tenant`; yields the nanoseconds waited for it."""
        arrived = time.monotonic_ns()
        # named sessions and anonymous requests can never share a key
        key = "s:" + session if session else f"a:{next(self._anonymous)}"
        waiting = self._waiting[model].get(tenant)
        if not (waiting and waiting.get(key)) and self._may_start(tenant, key, limits, model):
            self._take(tenant, key, model)
        else:
            await self._wait(tenant, key, limits, model)
        try:
            yield time.monotonic_ns() - arrived
        finally:
            self._release(tenant, key, model)

    def _may_start(self, tenant: str, session: str, limits: Limits, model: str) -> bool:
        free, cap = self._free[model], self._cap[model]
        return (self.running(tenant) < limits.max_in_flight and (free is None or free > 0)
                and (cap is None or self._held.get((model, tenant, session), 0) < cap))

    def _take(self, tenant: str, session: str, model: str) -> None:
        self._running[tenant] = self.running(tenant) + 1
        held = (model, tenant, session)
        self._held[held] = self._held.get(held, 0) + 1
        if self._free[model] is not None:
            self._free[model] -= 1

    def _release(self, tenant: str, session: str, model: str) -> None:
        self._running[tenant] -= 1
        if not self._running[tenant]:
            del self._running[tenant]
        held = (model, tenant, session)
        self._held[held] -= 1
        if not self._held[held]:
            del self._held[held]
        if self._free[model] is not None:
            self._free[model] += 1
        self._dispatch()

    async def _wait(self, tenant: str, session: str, limits: Limits, model: str) -> None:
        if self.queued(tenant) >= limits.max_queued:
            raise LimitExceeded(
                f"tenant {tenant!r} already has {self.running(tenant)} requests running "
                f"(max_in_flight {limits.max_in_flight}) and {self.queued(tenant)} waiting "
                f"(max_queued {limits.max_queued}); retry when some finish")
        waiter = _Waiter(limits, asyncio.get_running_loop().create_future())
        sessions = self._waiting[model].setdefault(tenant, OrderedDict())
        sessions.setdefault(session, deque()).append(waiter)
        self._queued[tenant] = self.queued(tenant) + 1
        gauge = metrics.QUEUED.labels(model, tenant)
        gauge.inc()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(tenant, session, model)       # granted just as the caller left
            else:
                self._forget(tenant, session, model, waiter)
            raise
        finally:
            gauge.dec()

    def _forget(self, tenant: str, session: str, model: str, waiter: _Waiter) -> None:
        sessions = self._waiting[model][tenant]
        sessions[session].remove(waiter)
        if not sessions[session]:
            del sessions[session]
            if not sessions:
                del self._waiting[model][tenant]
        self._unqueue(tenant)
        self._dispatch()   # it may have stood in front of others

    def _unqueue(self, tenant: str) -> None:
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]

    def _next_session(self, tenant: str, model: str, sessions: OrderedDict[str, deque[_Waiter]]) -> str | None:
        """The session of `tenant` to serve next on `model`: of those whose oldest waiter may
        start, the one holding the fewest slots (the first in turn among equals)."""
        # a cancelled waiter is removed by its own task, which dispatches again
        ready = [s for s, queue in sessions.items()
                 if not queue[0].future.cancelled() and self._may_start(tenant, s, queue[0].limits, model)]
        return min(ready, key=lambda s: self._held.get((model, tenant, s), 0), default=None)

    def _dispatch(self) -> None:
        """Hand free slots to waiters: per model, tenants in turn, then sessions (see
        _next_session), oldest first within a session."""
        progress = True
        while progress:
            progress = False
            for model, tenants in self._waiting.items():
                if self._free[model] == 0:
                    continue
                for tenant, sessions in tenants.items():
                    session = self._next_session(tenant, model, sessions)
                    if session is None:
                        continue
                    queue = sessions[session]
                    waiter = queue.popleft()
                    if queue:
                        sessions.move_to_end(session)   # its next request waits for the others' turn
                    else:
                        del sessions[session]
                    if sessions:
                        tenants.move_to_end(tenant)
                    else:
                        del tenants[tenant]
                    self._unqueue(tenant)
                    self._take(tenant, session, model)
                    waiter.future.set_result(None)
                    progress = True
                    break

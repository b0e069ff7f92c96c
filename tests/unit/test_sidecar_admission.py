"""Admission (sidecar/llm_sidecar/tenants.py) on a real event loop: limits, turns between tenants and between
sessions, the per-session cap, cancellation."""
from __future__ import annotations

import asyncio

import pytest

from llm_sidecar.config import Limits
from llm_sidecar.tenants import Admission, LimitExceeded

ROOMY = Limits(max_in_flight=10, max_queued=10)


async def hold(admission: Admission, tenant: str, model: str, order: list[str], name: str,
               release: asyncio.Event, limits: Limits = ROOMY, session: str = "") -> int:
    async with admission.slot(tenant, limits, model, session) as waited:
        order.append(name)
        await release.wait()
        return waited


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_freed_slots_go_to_tenants_in_turn():
    async def scenario() -> list[str]:
        admission = Admission({"gen": 1})
        order: list[str] = []
        gates = {name: asyncio.Event() for name in ("a1", "a2", "a3", "a4", "b1")}
        tasks = []
        for name in ("a1", "a2", "a3", "a4", "b1"):    # a1 runs; then a2-a4 queue before b1
            tasks.append(asyncio.create_task(hold(admission, name[0], "gen", order, name, gates[name])))
            await settle()
        assert admission.queued("a") == 3 and admission.queued("b") == 1
        for _ in range(5):
            gates[order[-1]].set()          # let the one running finish
            await settle()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["a1", "a2", "b1", "a3", "a4"]


def test_limits_in_flight_then_queued_then_refused():
    async def scenario() -> None:
        admission = Admission({"emb": None})      # no slot limit: only the tenant's limits
        limits = Limits(max_in_flight=2, max_queued=1)
        order: list[str] = []
        gate = asyncio.Event()
        tasks = [asyncio.create_task(hold(admission, "t", "emb", order, f"r{i}", gate, limits)) for i in range(3)]
        await settle()
        assert order == ["r0", "r1"] and admission.running("t") == 2 and admission.queued("t") == 1
        with pytest.raises(LimitExceeded, match=r"'t'.*max_in_flight 2.*1 waiting \(max_queued 1\)"):
            async with admission.slot("t", limits, "emb"):
                pass
        async with admission.slot("u", limits, "emb"):   # another tenant is unaffected
            pass
        gate.set()
        waited = await asyncio.gather(*tasks)
        assert order == ["r0", "r1", "r2"] and waited[2] > 0
        assert admission.running("t") == 0 and admission.queued("t") == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_runs():
    async def scenario() -> None:
        admission = Admission({"gen": 1})
        order: list[str] = []
        gates = {name: asyncio.Event() for name in ("first", "gone", "next")}
        tasks = {name: asyncio.create_task(hold(admission, "t", "gen", order, name, gates[name]))
                 for name in gates}
        await settle()
        assert admission.queued("t") == 2
        tasks["gone"].cancel()
        await settle()
        assert admission.queued("t") == 1
        gates["first"].set()
        gates["next"].set()
        await asyncio.gather(tasks["first"], tasks["next"])
        assert order == ["first", "next"]
        assert admission.running("t") == 0 and admission.queued("t") == 0

    asyncio.run(scenario())


def test_one_session_never_takes_the_reserved_slots_and_freed_slots_go_to_sessions_holding_fewer():
    async def scenario() -> None:
        admission = Admission({"gen": 4}, {"gen": 1})      # a session may hold 3 of the 4 slots
        order: list[str] = []
        gates = {f"a{i}": asyncio.Event() for i in range(6)} | {"b1": asyncio.Event(), "c1": asyncio.Event()}
        tasks = [asyncio.create_task(hold(admission, "t", "gen", order, name, gates[name], session=name[0]))
                 for name in gates]                        # a0-a5 first, then b1, then c1
        await settle()
        # a holds 3 and waits with 3 more; b found the reserved slot at once; c waits
        assert order == ["a0", "a1", "a2", "b1"]
        assert admission.held("gen", "t", "a") == 3 and admission.queued("t") == 4
        gates["a0"].set()
        await settle()
        assert order[-1] == "c1"                           # c held none, a held 2: c goes first
        for name in ("a1", "a2", "b1", "c1"):
            gates[name].set()
            await settle()
        assert admission.held("gen", "t", "a") == 3        # never more than its cap
        for name in ("a3", "a4", "a5"):
            gates[name].set()
        await asyncio.gather(*tasks)
        assert order[5:] == ["a3", "a4", "a5"]
        assert admission.running("t") == 0 and admission.held("gen", "t", "a") == 0

    asyncio.run(scenario())


def test_sessions_of_a_tenant_take_turns_like_tenants():
    async def scenario() -> list[str]:
        admission = Admission({"gen": 1})
        order: list[str] = []
        names = ("x1", "x2", "x3", "y1")
        gates = {name: asyncio.Event() for name in names}
        tasks = []
        for name in names:                  # x1 runs; x2, x3 queue before y1, all in tenant t
            tasks.append(asyncio.create_task(hold(admission, "t", "gen", order, name, gates[name],
                                                  session=name[0])))
            await settle()
        for _ in names:
            gates[order[-1]].set()
            await settle()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == ["x1", "x2", "y1", "x3"]


def test_requests_without_a_session_are_sessions_of_their_own():
    """An anonymous request is never capped as if it shared a session with the others."""
    async def scenario() -> None:
        admission = Admission({"gen": 2}, {"gen": 1})      # a named session may hold 1
        order: list[str] = []
        gate = asyncio.Event()
        tasks = [asyncio.create_task(hold(admission, "t", "gen", order, f"r{i}", gate)) for i in range(2)]
        tasks.append(asyncio.create_task(hold(admission, "t", "gen", order, "s1", gate, session="s")))
        await settle()
        assert order == ["r0", "r1"] and admission.queued("t") == 1
        gate.set()
        await asyncio.gather(*tasks)
        assert order[2] == "s1"

    asyncio.run(scenario())

"""Single flight inside one sidecar (steps/inflight.py): one flow at a time holds a step's slot;
the others wait for it, each looking again when woken, up to their own deadline."""

from __future__ import annotations

import asyncio

from durable_sidecar.steps.inflight import InFlight

SLOT = ("r", "k", 0)


def test_one_sender_per_step_however_many_flows_wait_for_it() -> None:
    """Three flows on one step: each waiter re-checks the slot when woken, so one holds it at a time
    (were a woken waiter to take it without looking, two would send the step at once)."""

    async def scenario() -> int:
        in_flight, holding, most = InFlight(), 0, 0

        async def flow() -> None:
            nonlocal holding, most
            assert await in_flight.enter(("r", "k", 0), 5)
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.01)
            holding -= 1
            in_flight.leave(("r", "k", 0))

        await asyncio.gather(*(flow() for _ in range(3)))
        return most

    assert asyncio.run(scenario()) == 1


def test_a_waiter_gives_up_after_its_timeout_while_the_step_stays_in_flight() -> None:
    """durable_in_flight_wait bounds the wait: the second flow gets False (a 503, nothing sent)
    once it has waited that long, not a wait for as long as the sender takes."""

    async def scenario() -> tuple[bool, float]:
        in_flight = InFlight()
        assert await in_flight.enter(("r", "k", 0), 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        entered = await asyncio.wait_for(in_flight.enter(("r", "k", 0), 0.05), 5)
        return entered, loop.time() - started

    entered, waited = asyncio.run(scenario())
    assert not entered and waited < 4


def test_slots_are_apart_and_counted() -> None:
    async def scenario() -> None:
        in_flight = InFlight()
        assert len(in_flight) == 0
        assert await in_flight.enter(("r", "k", 0), 0) and await in_flight.enter(("r", "k", 1), 0)
        assert await in_flight.enter(("r2", "k", 0), 0) and len(in_flight) == 3
        assert not await in_flight.enter(("r", "k", 0), 0)  # held: no wait allowed, no entry
        in_flight.leave(("r", "k", 0))
        assert len(in_flight) == 2 and await in_flight.enter(("r", "k", 0), 0)

    asyncio.run(scenario())


def test_leaving_wakes_the_waiter_at_once_and_twice_is_harmless() -> None:
    async def scenario() -> float:
        in_flight = InFlight()
        assert await in_flight.enter(SLOT, 0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, in_flight.leave, SLOT)
        started = loop.time()
        assert await in_flight.enter(SLOT, 30)
        waited = loop.time() - started
        in_flight.leave(SLOT)
        in_flight.leave(SLOT)
        in_flight.leave(None)
        assert len(in_flight) == 0
        return waited

    assert asyncio.run(scenario()) < 5  # woken by the leave, not by its 30 s deadline


def test_a_waiter_that_gives_up_leaves_the_others_waiting() -> None:
    """One waiter's timeout must not cancel what the others wait on (the holder's future)."""

    async def scenario() -> tuple[bool, bool]:
        in_flight = InFlight()
        assert await in_flight.enter(SLOT, 0)
        patient = asyncio.ensure_future(in_flight.enter(SLOT, 30))
        hasty = await in_flight.enter(SLOT, 0.05)
        await asyncio.sleep(0.05)
        assert not patient.done()  # still waiting, not woken by the other's timeout
        in_flight.leave(SLOT)
        return hasty, await asyncio.wait_for(patient, 5)

    assert asyncio.run(scenario()) == (False, True)


def test_a_short_wait_still_gets_the_slot_when_it_frees_in_time() -> None:
    async def scenario() -> bool:
        in_flight = InFlight()
        assert await in_flight.enter(SLOT, 0)
        asyncio.get_running_loop().call_later(0.05, in_flight.leave, SLOT)
        return await in_flight.enter(SLOT, 0.8)

    assert asyncio.run(scenario())


def test_a_waiter_whose_agent_hung_up_gives_up_at_its_next_look() -> None:
    """An agent that hung up while waiting (an SDK's timeout) gets False within a look or two, not
    when the sender is done: its claim must go back before its retry claims the step."""

    async def scenario() -> tuple[bool, float, bool]:
        in_flight, hung_up = InFlight(), False
        assert await in_flight.enter(SLOT, 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        waiting = asyncio.ensure_future(in_flight.enter(SLOT, 30, lambda: hung_up))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # still there while its agent is
        hung_up = True
        entered = await asyncio.wait_for(waiting, 5)
        return entered, loop.time() - started, len(in_flight) == 1

    entered, waited, still_held = asyncio.run(scenario())
    assert not entered and waited < 10 and still_held  # not the 30 s wait; the sender keeps its slot

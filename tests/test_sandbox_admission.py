"""The node's restore gate (sandbox/admission.py) on its own: the bound, the order, a pool fill
yielding to creates, a caller gone while queued dropped, a closing service failing the queue.
The gate through the real service and QEMU is tests/test_sandbox_service.py's fifty-create test."""

from __future__ import annotations

import asyncio

import pytest

from sandbox.admission import AdmissionError, QueueFullError, RestoreGate


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_burst_runs_at_most_limit_at_once_in_arrival_order() -> None:
    async def main() -> tuple[list[int], int, int]:
        gate = RestoreGate(2)
        order: list[int] = []
        running = [0, 0]  # now, most

        async def one(i: int) -> None:
            async with gate.slot():
                order.append(i)
                running[0] += 1
                running[1] = max(running[1], running[0])
                await asyncio.sleep(0.01)
                running[0] -= 1

        tasks = []
        for i in range(20):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)  # arrivals one after another
        await asyncio.gather(*tasks)
        return order, running[1], gate.peak

    order, most, peak = run(main())  # type: ignore[misc]
    assert most == peak == 2
    assert order == list(range(20))


def test_a_pool_fill_waits_behind_every_queued_create() -> None:
    async def main() -> list[str]:
        gate = RestoreGate(1)
        order: list[str] = []
        hold = asyncio.Event()

        async def one(name: str, low: bool = False) -> None:
            async with gate.slot(low=low):
                order.append(name)
                if name == "first":
                    await hold.wait()

        first = asyncio.create_task(one("first"))
        await asyncio.sleep(0)
        fill = asyncio.create_task(one("fill", low=True))
        await asyncio.sleep(0)
        creates = [asyncio.create_task(one(f"c{i}")) for i in range(3)]
        await asyncio.sleep(0)
        hold.set()
        await asyncio.gather(first, fill, *creates)
        return order

    assert run(main()) == ["first", "c0", "c1", "c2", "fill"]


def test_a_caller_gone_while_queued_is_dropped_not_restored() -> None:
    async def main() -> tuple[list[str], int, str, int]:
        gate = RestoreGate(1)
        ran: list[str] = []
        hold = asyncio.Event()
        gone = {"a": False}

        async def one(name: str) -> None:
            async with gate.slot(gone=lambda: gone.get(name, False)):
                ran.append(name)
                if name == "first":
                    await hold.wait()

        first = asyncio.create_task(one("first"))
        await asyncio.sleep(0)
        a = asyncio.create_task(one("a"))
        b = asyncio.create_task(one("b"))
        await asyncio.sleep(0.05)
        assert gate.queued == 2
        gone["a"] = True  # its client closed the connection
        hold.set()
        await asyncio.gather(first, b)
        with pytest.raises(AdmissionError) as err:
            await a
        return ran, gate.dropped, str(err.value), gate.running

    ran, dropped, message, running = run(main())  # type: ignore[misc]
    assert ran == ["first", "b"]
    assert dropped == 1 and "went away" in message
    assert running == 0


def test_a_cancelled_waiter_leaves_the_queue_and_its_slot_goes_on() -> None:
    async def main() -> tuple[list[str], int]:
        gate = RestoreGate(1)
        ran: list[str] = []
        hold = asyncio.Event()

        async def one(name: str) -> None:
            async with gate.slot():
                ran.append(name)
                if name == "first":
                    await hold.wait()

        first = asyncio.create_task(one("first"))
        await asyncio.sleep(0)
        a = asyncio.create_task(one("a"))
        b = asyncio.create_task(one("b"))
        await asyncio.sleep(0)
        a.cancel()
        hold.set()
        await asyncio.gather(first, b)
        assert a.cancelled()
        return ran, gate.running

    assert run(main()) == (["first", "b"], 0)


def test_a_closing_service_fails_the_queue_at_once() -> None:
    async def main() -> tuple[list[object], str]:
        gate = RestoreGate(1)
        hold = asyncio.Event()

        async def one(wait: bool) -> str:
            async with gate.slot():
                if wait:
                    await hold.wait()
                return "ran"

        first = asyncio.create_task(one(True))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(one(False)) for _ in range(3)]
        await asyncio.sleep(0)
        gate.close()
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1.0)
        hold.set()
        assert await first == "ran"
        with pytest.raises(AdmissionError):
            await one(False)
        metrics = "\n".join(gate.metrics())
        return results, metrics

    results, metrics = run(main())  # type: ignore[misc]
    assert all(isinstance(r, AdmissionError) and "stopping" in str(r) for r in results)
    assert "cubefs_sandbox_restores_limit 1" in metrics
    assert "cubefs_sandbox_restores_running_peak 1" in metrics


def test_the_limit_must_be_one_or_more() -> None:
    with pytest.raises(ValueError):
        RestoreGate(0)
    assert RestoreGate().limit >= 1


def test_a_create_whose_turn_would_come_too_late_is_refused_at_once_with_retry_after() -> None:
    """Restores of 0.1 s, one at a time, a 0.25 s bound: with one running, the second and third
    creates queue (expected 0.1 and 0.2 s); the fourth would wait 0.3 s and is refused at once
    (nothing queued, Retry-After given); a rollback and a pool fill queue whatever the wait (no
    caller that times out); before any restore was seen nothing is refused, however long the queue."""
    async def main() -> tuple[list[object], list[object], str]:
        gate = RestoreGate(1, max_wait=0.25)
        hold = asyncio.Event()

        async def one(seconds: float = 0.1, low: bool = False, caller: bool = True) -> str:
            async with gate.slot((lambda: False) if caller else None, low=low):
                await (hold.wait() if seconds < 0 else asyncio.sleep(seconds))
                return "ran"

        unseen = [asyncio.create_task(one(-1.0))]  # the first, held until told
        await asyncio.sleep(0)
        unseen += [asyncio.create_task(one()) for _ in range(5)]  # no restore seen: all queue
        await asyncio.sleep(0)
        queued_unseen = gate.queued
        hold.set()
        first = await asyncio.gather(*unseen, return_exceptions=True)

        hold.clear()
        running = asyncio.create_task(one(-1.0))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(one()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.queued == 2 and gate.expected_wait() > 0.25, (gate.queued, gate.expected_wait())
        with pytest.raises(QueueFullError) as refused:
            await one()
        fill = asyncio.create_task(one(low=True))
        rollback = asyncio.create_task(one(caller=False))  # no caller to time out: it waits its turn
        await asyncio.sleep(0)
        assert gate.queued == 4  # the rollback and the fill queued behind the two creates
        hold.set()
        later = await asyncio.gather(running, *tasks, rollback, fill, return_exceptions=True)
        return [queued_unseen, *first], [refused.value.retry_after, *later], "\n".join(gate.metrics())

    first, later, metrics = run(main())  # type: ignore[misc]
    assert first == [5] + ["ran"] * 6
    assert later[0] >= 1 and later[1:] == ["ran"] * 5
    assert "cubefs_sandbox_restore_queue_refused_total 1" in metrics

"""byzps.cli.cancel_until / _until_signal: a signalled PS stops even when a single cancel
would be lost inside ``asyncio.wait_for`` (Python 3.10/3.11), and its shutdown is not cut
short by the repeated cancels."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from byzps.cli import SigTerm, _until_signal, cancel_until


async def _race(stop_with) -> bool:
    """The race of CPython gh-86296: a consumer looping on ``wait_for(q.get())``; an item
    arrives, the inner get completes, and the cancel lands in that same loop iteration.
    True when the consumer stopped."""
    q: asyncio.Queue = asyncio.Queue()

    async def consumer() -> None:
        while True:
            await asyncio.wait_for(q.get(), 5)

    t = asyncio.create_task(consumer())
    for _ in range(3):
        await asyncio.sleep(0)
    q.put_nowait(1)
    await asyncio.sleep(0)
    stop_with(t)
    try:
        await asyncio.wait_for(asyncio.shield(t), 2.0)
    except asyncio.CancelledError:
        return True
    except (asyncio.TimeoutError, TimeoutError):
        t.cancel()
        return False
    return True


def test_cancel_until_stops_a_task_whose_cancel_wait_for_drops():
    stopped = [asyncio.run(_race(lambda t: cancel_until(t, lambda: False, every=0.01)))
               for _ in range(20)]
    assert all(stopped)


def test_cancel_until_leaves_a_stopping_task_alone():
    cleaned: list[str] = []
    stopping = [False]

    async def ps_like() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            stopping[0] = True
            await asyncio.sleep(0.1)     # the shutdown: ten re-cancel periods long
            cleaned.append("stop sent")

    async def main() -> None:
        t = asyncio.create_task(ps_like())
        await asyncio.sleep(0)
        cancel_until(t, lambda: stopping[0], every=0.01)
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())
    assert cleaned == ["stop sent"]


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, SigTerm),
                                            (signal.SIGINT, KeyboardInterrupt)])
def test_until_signal_maps_the_signal_and_lets_shutdown_finish(signum, raised):
    stopping = [False]
    cleaned: list[str] = []

    async def ps_like() -> None:
        q: asyncio.Queue = asyncio.Queue()

        async def feed() -> None:
            while True:   # a steady stream of events, as gradients reach a PS
                q.put_nowait(1)
                await asyncio.sleep(0.001)

        feeder = asyncio.create_task(feed())
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signum)
        try:
            while True:
                await asyncio.wait_for(q.get(), 5)
        finally:
            stopping[0] = True
            feeder.cancel()
            await asyncio.sleep(0.3)
            cleaned.append("stop sent")

    with pytest.raises(raised):
        asyncio.run(_until_signal(ps_like(), lambda: stopping[0]))
    assert cleaned == ["stop sent"]

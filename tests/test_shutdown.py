"""The loops of the return path stop when cancelled, even when their wake-up lands at the same moment.

On Python 3.11, ``asyncio.wait_for`` can swallow a cancellation that arrives as the awaited
event fires; a worker written with it then never stops, and relayd hangs on SIGTERM.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from relayd.config import Retry
from relayd.ledger import Ledger
from relayd.outbound.delivery import DeliveryWorker
from relayd.outbound.outbox import Outbox
from relayd.outbound.watcher import DropWatcher


def run_abandoning_stuck_tasks(coro) -> int:
    """Run ``coro`` on a fresh loop and close it without waiting for tasks that ignored their cancellation."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _stops_every_time(start, wake, rounds: int = 200) -> int:
    """Start a loop, wake it and cancel it in the same breath; count the runs that did not stop."""
    stuck = 0
    for _ in range(rounds):
        if stuck:
            break  # one is enough to fail, and each costs a two-second wait
        task = asyncio.create_task(start())
        await asyncio.sleep(0.001)
        wake()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2)
        stuck += not done
    return stuck


def test_the_delivery_worker_stops_when_cancelled_as_it_wakes(tmp_path: Path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        outbox = Outbox(ledger, tmp_path / "outbox", tmp_path / "sent", Retry())

        async def scenario() -> int:
            worker = DeliveryWorker(outbox, None, poll_seconds=0.01)
            return await _stops_every_time(worker.run, worker.wake, rounds=100)

        assert run_abandoning_stuck_tasks(scenario()) == 0
    finally:
        ledger.close()


def test_the_watcher_stops_when_cancelled_as_it_wakes(tmp_path: Path):
    async def scenario() -> int:
        watcher = DropWatcher([tmp_path], settle_seconds=0, rescan_seconds=0.01)
        return await _stops_every_time(watcher.next_batch, watcher._hint.set)

    assert run_abandoning_stuck_tasks(scenario()) == 0

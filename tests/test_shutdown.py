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
from platform_sshd import platform_sshd_fixture  # noqa: F401  (registers the fixture)


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


def test_a_graceful_stop_lets_the_file_under_way_finish_and_starts_no_other(tmp_path: Path, platform_sshd):
    """SIGTERM's part for the outbox: the delivery in progress completes and is recorded; the next one waits."""
    import os

    from relayd.config import ReturnServer
    from relayd.outbound.outbox import Queued
    from relayd.pec.replies import ReplyPackage

    sshd = platform_sshd()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        outbox = Outbox(ledger, tmp_path / "outbox", tmp_path / "sent", Retry())
        # Two dossiers, so both entries are due together; large enough that the stop lands mid-upload.
        for n in (1, 2):
            outbox.enqueue(ReplyPackage(f"msg-{n}", f"Retour-A-9-STOPTEST{n}-clos.zip", "Retour", os.urandom(24 << 20)),
                           Queued(kind="Retour", numero=f"A-9-STOPTEST{n}"))
        server = ReturnServer.model_validate(sshd.relay_config(sshd.client_key))

        async def scenario() -> str:
            worker = DeliveryWorker(outbox, server)
            task = asyncio.create_task(worker.run())
            async with asyncio.timeout(60):
                while worker._step is None or not worker._step[0].startswith("delivering"):
                    await asyncio.sleep(0.001)
            what = worker._step[0]
            worker.stop()
            async with asyncio.timeout(60):
                await task  # returns by itself: no cancellation needed
            return what

        under_way = run_abandoning_stuck_tasks(scenario())
        statuses = {e.numero: e.status for e in outbox.entries(("pending", "delivered", "dead"))}
        first = "A-9-STOPTEST1" if "#1 " in under_way else "A-9-STOPTEST2"
        assert statuses[first] == "delivered"
        assert list(statuses.values()).count("pending") == 1
        # The server has the finished file, and no .part.
        assert [f for f in sshd.files() if f.endswith(".zip")] == [f"Retour-{first}-clos.zip"]
        assert not [f for f in sshd.files() if f.endswith(".part")]
    finally:
        ledger.close()

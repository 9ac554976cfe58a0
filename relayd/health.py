"""Is relayd healthy? The answer feeds systemd's watchdog and the STATUS= line of ``systemctl status``.

Healthy means: the event loop turns (this check runs on it), no intake processing and no
outbox step has overrun its bound, and every background task is alive. Only then is
WATCHDOG=1 sent; when something is wrong, STATUS= says what, and systemd restarts the
service once the watchdog period runs out.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from relayd.inbound.server import ServerState
from relayd.outbound.delivery import DeliveryWorker
from relayd.outbound.outbox import Outbox
from relayd.systemd import Notifier, watchdog_seconds

log = structlog.get_logger("relayd.health")

#: without a systemd watchdog, health is still checked (and logged) this often
DEFAULT_INTERVAL_SECONDS = 10.0


class Health:
    """Watches the parts, pings the watchdog while they are healthy, and writes the live summary."""

    def __init__(self, notifier: Notifier, state: ServerState, outbox: Outbox, worker: DeliveryWorker,
                 tasks: list[asyncio.Task[None]]):
        self.notifier = notifier
        self.state = state
        self.outbox = outbox
        self.worker = worker
        self.tasks = tasks
        #: outbox counts as last read; read in the background, so that a stuck ledger never stops this check
        self._counts: dict[str, int] = {}
        self._reading: asyncio.Future[dict[str, int]] | None = None

    def summary(self, note: str | None = None) -> str:
        """The STATUS= line: connections, uploads under way, the outbox backlog, and what is wrong, if anything."""
        text = (f"{len(self.state.connections)} connection(s), {self.state.uploads_in_flight()} upload(s) under way; "
                f"outbox {self._counts.get('pending', 0)} pending, {self._counts.get('dead', 0)} dead")
        return f"{text}; {note}" if note else text

    def problems(self) -> list[str]:
        """What keeps relayd from being healthy now; empty when all is well."""
        problems = []
        stalled = self.worker.stalled()
        if stalled is not None:
            problems.append(f"outbox worker stalled: {stalled}")
        intake_stalled = self.state.intake.stalled()
        if intake_stalled is not None:
            problems.append(f"intake stalled: {intake_stalled}")
        problems += [f"{task.get_name()} stopped" for task in self.tasks if task.done()]
        return problems

    async def read_counts(self, timeout: float = 5.0) -> None:
        """Read the outbox counts now (start-up, reload), waiting at most ``timeout`` for the ledger."""
        self.refresh_counts()
        assert self._reading is not None
        try:
            async with asyncio.timeout(timeout):
                self._counts = await asyncio.shield(self._reading)
        except TimeoutError:
            log.warning("health.counts_late", timeout_seconds=timeout)

    def refresh_counts(self) -> None:
        """Start reading the outbox counts, unless the last read is still waiting on the ledger."""
        if self._reading is not None:
            if not self._reading.done():
                return
            if self._reading.exception() is None:
                self._counts = self._reading.result()
        self._reading = asyncio.ensure_future(asyncio.to_thread(self.outbox.counts))

    async def run(self) -> None:
        """Check every half watchdog period (sd_watchdog_enabled(3)), or every 10 s outside systemd."""
        period = watchdog_seconds()
        interval = period / 2 if period else DEFAULT_INTERVAL_SECONDS
        unhealthy = False
        while True:
            started = time.monotonic()
            self.refresh_counts()
            problems = self.problems()
            if problems:
                if not unhealthy:
                    log.error("health.unhealthy", problems=problems)
                unhealthy = True
                self.notifier.status(self.summary("; ".join(problems)))
            else:
                if unhealthy:
                    log.info("health.recovered")
                unhealthy = False
                self.notifier.watchdog(self.summary())
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

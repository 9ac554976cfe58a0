"""The delivery worker: take due outbox entries to the platform's return server, one at a time.

One at a time keeps each dossier's order without any locking, and one connection is
enough for the volumes of a commune. When the server cannot be reached at all (connection,
authentication, host key, timeout), every entry due in this round records the failed
attempt, so that a round means the same thing for each entry and backoff applies to all.

Failures fall in three kinds (README, "Which errors dead-letter"):

* an outage (:data:`OUTAGE_FAILURES`): nothing is wrong with the entries; they wait for ever,
  with the capped backoff, and an outage that lasts ``platform.alert_after_hours`` alerts the
  administrator (and again when it clears);
* what no retry can mend (:data:`PERMANENT_FAILURES`): dead-letter at once, for an operator;
* anything else the server answers (``remote_error``, ``size_mismatch``): retried, and
  dead-lettered after ``retry.max_attempts`` or ``retry.max_age_hours``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from relayd.config import ReturnServer
from relayd.events import NO_EVENTS, Events, HostKeyMismatch, ReturnServerOutage
from relayd.outbound.outbox import Entry, Outbox
from relayd.outbound.sftp_client import CHUNK_BYTES, DeliveryError, ReturnServerClient

log = structlog.get_logger("relayd.delivery")

#: failures that say nothing about the entry itself, only about reaching the server: waited out, never dead-lettered.
#: A host key that is not pinned holds the queue too (and alerts), until an admin pins the new key.
OUTAGE_FAILURES = frozenset({"host_key_mismatch", "auth_failed", "connect_failed", "timeout"})
#: failures that no retry can mend: the entry goes to dead-letter at once, for an operator
PERMANENT_FAILURES = frozenset({"payload_missing", "remote_conflict", "remote_denied", "remote_dir_missing"})
#: a ledger step that takes longer than this means the ledger (or its disk) is stuck
LEDGER_STEP_SECONDS = 10.0

T = TypeVar("T")


class DeliveryWorker:
    """Deliver due entries until cancelled."""

    def __init__(self, outbox: Outbox, server: ReturnServer | None, *, poll_seconds: float = 5.0,
                 events: Events = NO_EVENTS):
        self.outbox = outbox
        self.events = events
        self.server = server
        self.client = ReturnServerClient(server) if server is not None else None
        # The CLI can change entries behind our back (retry, purge): look again this often.
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        #: the step under way and when it should be over by (monotonic): the watchdog's measure of "wedged"
        self._step: tuple[str, float, float] | None = None
        #: when the server went out of reach (time.time()), and whether the administrator was told
        self.outage_since: float | None = None
        self._outage_alerted = False

    def reconfigure(self, server: ReturnServer | None) -> None:
        """Use these return-server settings from the next connection on (SIGHUP)."""
        if server == self.server:
            return
        old = self.client
        self.server = server
        self.client = ReturnServerClient(server) if server is not None else None
        if old is not None:
            # The connection in use (if any) finishes its file; it is closed at the next idle check.
            asyncio.get_running_loop().create_task(old.close())
        self.wake()

    def stop(self) -> None:
        """Finish the file under way, start no other, and return from :meth:`run` (graceful stop)."""
        self._stopping = True
        self._wake.set()

    def stalled(self) -> str | None:
        """What the worker is stuck on, if a step has overrun its bound; None when it is healthy.

        Every step is bounded (SFTP operations by their timeouts, ledger writes by SQLite's),
        so a step that overruns means a wedge: a hung disk, a lost thread, a bug.
        """
        if self._step is None:
            return None
        what, started, bound = self._step
        late = time.monotonic() - started
        return f"{what} for {late:.0f} s" if late > bound else None

    async def _bounded(self, what: str, bound: float, work: Callable[[], Awaitable[T]]) -> T:
        """Run one step, noting it for :meth:`stalled`."""
        self._step = (what, time.monotonic(), bound)
        try:
            return await work()
        finally:
            self._step = None

    async def _ledger(self, what: str, func: Callable[..., T], *args, **kwargs) -> T:
        return await self._bounded(what, LEDGER_STEP_SECONDS, lambda: asyncio.to_thread(func, *args, **kwargs))

    def wake(self) -> None:
        """Look at the outbox now (call from the event loop's thread)."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled."""
        if self.client is None:
            log.warning("delivery.no_return_server", hint="configure `platform:`; acks and returns wait in the outbox")
        try:
            while not self._stopping:
                self._wake.clear()
                if self.client is not None:
                    try:
                        await self.deliver_due()
                    except Exception as exc:  # noqa: BLE001 - the worker outlives any one surprise
                        log.exception("delivery.round_failed", error=type(exc).__name__)
                        await asyncio.sleep(self.poll_seconds)
                if self._stopping:
                    break
                wait = await self._ledger("reading the outbox", self.outbox.next_attempt_in)
                timeout = self.poll_seconds if wait is None else min(wait, self.poll_seconds)
                # asyncio.timeout, not wait_for: on Python 3.11, wait_for can swallow a cancellation
                # that lands as the event fires, and the worker would then never stop.
                try:
                    async with asyncio.timeout(max(timeout, 0.05)):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            if self.client is not None:
                await self.client.close()

    async def deliver_due(self) -> int:
        """Deliver everything due now, a dossier's next entry as soon as the one before is through.

        Recording a delivery in the ledger runs while the next entry uploads: a batch from
        :meth:`Outbox.due` holds one entry per dossier, so no order is at stake, and every record
        is settled before the next batch is asked for. A crash before a record lands costs
        nothing: the next attempt finds the file on the server and records it then.
        """
        assert self.client is not None
        delivered = 0
        while not self._stopping and (entries := await self._ledger("reading the outbox", self.outbox.due)):
            records: list[asyncio.Task[None]] = []
            try:
                for i, entry in enumerate(entries):
                    if self._stopping:
                        break
                    try:
                        await self._bounded(f"delivering outbox #{entry.id} ({entry.size} bytes)",
                                            self._delivery_bound(entry), lambda e=entry: self._deliver(e))
                    except DeliveryError as exc:
                        if exc.code == "host_key_mismatch" and self.server is not None:
                            self.events.publish(HostKeyMismatch(host=self.server.host, port=self.server.port,
                                                                message=exc.message))
                        outage = exc.code in OUTAGE_FAILURES
                        await self._ledger("recording a failed attempt", self.outbox.failed, entry, exc.code,
                                           exc.message, permanent=exc.code in PERMANENT_FAILURES, outage=outage)
                        if outage:
                            for rest in entries[i + 1:]:
                                await self._ledger("recording a failed attempt", self.outbox.failed, rest, exc.code,
                                                   exc.message, outage=True)
                            await self._out_of_reach(exc)
                            return delivered + len(records)
                        continue
                    await self._in_reach()
                    records.append(asyncio.create_task(asyncio.to_thread(self.outbox.delivered, entry)))
            finally:
                # Settle every record, even when cancelled: each stands for a file the server has.
                if records:
                    settled = asyncio.gather(*records)
                    try:
                        await asyncio.shield(self._bounded("recording deliveries", LEDGER_STEP_SECONDS,
                                                           lambda: settled))
                    except asyncio.CancelledError:
                        await settled  # a few milliseconds; the ledger closes only after this
                        raise
            if not records:
                break
            delivered += len(records)
        return delivered

    async def _out_of_reach(self, exc: DeliveryError) -> None:
        """Note an outage; once it has lasted ``alert_after_hours``, tell the administrator (once)."""
        assert self.server is not None
        now = time.time()
        if self.outage_since is None:
            self.outage_since = now
        lasted = now - self.outage_since
        if self._outage_alerted or lasted < self.server.alert_after_hours * 3600:
            return
        self._outage_alerted = True
        pending = (await self._ledger("reading the outbox", self.outbox.counts)).get("pending", 0)
        log.error("delivery.return_server_down", server=f"{self.server.host}:{self.server.port}",
                  since_seconds=round(lasted), code=exc.code, error=exc.message, pending=pending,
                  hint="entries wait and are sent once the server answers again; nothing is dead-lettered")
        self.events.publish(ReturnServerOutage(down=True, host=self.server.host, port=self.server.port, seconds=lasted,
                                               error_code=exc.code, error=exc.message, pending=pending))

    async def _in_reach(self) -> None:
        """A delivery went through: an outage is over; say so if it was alerted."""
        if self.outage_since is None:
            return
        assert self.server is not None
        lasted, alerted = time.time() - self.outage_since, self._outage_alerted
        self.outage_since, self._outage_alerted = None, False
        log.info("delivery.return_server_back", server=f"{self.server.host}:{self.server.port}",
                 outage_seconds=round(lasted, 1))
        if alerted:
            pending = (await self._ledger("reading the outbox", self.outbox.counts)).get("pending", 0)
            self.events.publish(ReturnServerOutage(down=False, host=self.server.host, port=self.server.port,
                                                   seconds=lasted, error_code="", error="", pending=pending))

    def _delivery_bound(self, entry: Entry) -> float:
        """How long one delivery may take at most: connecting, logging in, and each SFTP operation's timeout."""
        assert self.server is not None
        server = self.server
        operations = 8 + math.ceil(entry.size / CHUNK_BYTES)  # stat, open, writes, fsync, close, rename, stat...
        return server.connect_timeout_seconds + server.login_timeout_seconds + operations * server.operation_timeout_seconds

    async def _deliver(self, entry: Entry) -> None:
        assert self.client is not None and self.server is not None
        if not entry.payload.is_file():
            raise DeliveryError("payload_missing", f"the local copy {entry.payload} is gone; nothing can be sent")
        remote_dir = self.server.remote_dir if entry.kind == "Retour" else (self.server.acks_dir or self.server.remote_dir)
        log.debug("delivery.start", id=entry.id, kind=entry.kind, numero=entry.numero, remote_name=entry.remote_name)
        await self.client.deliver(entry.payload, entry.remote_name, remote_dir=remote_dir)

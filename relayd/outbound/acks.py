"""Acknowledgements: what intake's outcomes become for the platform.

Intake asks :class:`Acknowledger` (its ``AckSink``) for the ack an outcome owes (AVL for a
dossier handed over or resent, ANL for a refused package whose envelope can address one),
built before the outcome's ledger transaction, and records it *inside* that transaction:
a package is never recorded without the ack it owes, and no file write stands between the
commit and the client's answer (the outbox writes the ack's file before sending it). The
envelope says whether the platform wants acks, which kinds and to whom (``AckRequired``,
``AckType``, ``AckTo``). A resend of an accepted package is acked again, unless its previous
ack is still waiting in the outbox.

:class:`AckRepair` finds what is owed and missing (an accepted dossier with no AVL, an entry
whose file is gone), at start and every :data:`REPAIR_SECONDS` while relayd runs.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog

from relayd.config import Config
from relayd.outbound.outbox import Outbox, Queued
from relayd.outbound.returns import ReturnDrops
from relayd.pec.envelope import NUMERO_PATTERN, Message, Routing
from relayd.pec.package import Package
from relayd.pec.replies import ReplyInvalid, ReplyPackage, build_ack
from relayd.rejections import Rejection

log = structlog.get_logger("relayd.acks")

#: how often the running daemon looks for acks owed and missing
REPAIR_SECONDS = 60.0
#: how far back the repair looks for accepted dossiers without their AVL (older ones were settled long ago)
REPAIR_HOURS = 48


def wants_ack(routing: Routing, kind: str) -> bool:
    """Whether the envelope asks for acks of this kind (all kinds when it names none)."""
    types = {t.strip().upper() for t in routing.ack_types if t.strip()}
    return routing.ack_required and (not types or kind in types)


def sends_ack(config: Config, routing: Routing, kind: str) -> bool:
    """Whether relayd sends this ack: the envelope asks for it and ``platform.acks`` allows it."""
    return kind in config.ack_kinds and wants_ack(routing, kind)


@dataclass
class OwedAck:
    """An ack built before its outcome's transaction; calling it records it inside that transaction."""

    outbox: Outbox
    reply: ReplyPackage
    queued: Queued
    #: the outbox entry, once recorded (None when an ack already waiting answers this outcome too)
    entry_id: int | None = field(default=None, init=False)

    def __call__(self, db: sqlite3.Connection) -> None:
        waiting = db.execute("SELECT 1 FROM outbox WHERE kind = ? AND ref_message_id = ? AND status = 'pending' LIMIT 1",
                             (self.queued.kind, self.queued.ref_message_id)).fetchone()
        # The platform resent before our ack left: one ack answers both.
        self.entry_id = None if waiting else self.outbox.owe(db, self.reply, self.queued)


class Acknowledger:
    """The ack sink: AVL and ANL recorded with their outcome, and the automatic receipt where a commune wants one."""

    def __init__(self, config: Config, outbox: Outbox, drops: ReturnDrops):
        self.config = config
        self.outbox = outbox
        self.drops = drops
        #: called once an ack is committed, from intake's thread (wakes :class:`AckRepair` to write its file)
        self.on_owed: Callable[[], None] | None = None

    def owed(self, envelope: Message | None, kind: str, rejection: Rejection | None = None) -> OwedAck | None:
        """The ack this outcome owes, or None when the envelope asks for none or cannot address one."""
        if envelope is None:
            log.info("acks.anl_not_addressable", code=rejection.reason.value if rejection else None)
            return None
        routing = envelope.header.routing
        if not sends_ack(self.config, routing, kind):
            return None
        numero = envelope.numero if NUMERO_PATTERN.match(envelope.numero) else None
        try:
            reply = build_ack(routing, kind=kind, numero=numero, demarche=envelope.demarche, rejection=rejection,
                              style=self.config.reply_style)
        except Rejection as why:
            log.warning("acks.not_addressable", kind=kind, message_id=envelope.message_id, code=why.reason.value,
                        reason=why.detail)
            return None
        except ReplyInvalid as why:
            # Intake refuses such a Routing (check_answerable), so this is the ANL of that refusal: it
            # cannot be built either, and failing here would leave the package staged, retried for ever.
            log.error("acks.not_buildable", kind=kind, message_id=envelope.message_id, reason=str(why)[:600])
            return None
        return OwedAck(self.outbox, reply, Queued(kind=kind, numero=numero, ref_message_id=envelope.message_id,
                                                  source="intake"))

    def committed(self, owed: OwedAck | None, package: Package | None = None) -> None:
        """After the outcome's transaction: wake the sender, then the automatic receipt for a handed-over dossier."""
        if owed is not None and owed.entry_id is not None:
            self.outbox.announce(owed.entry_id)
            if self.on_owed is not None:
                self.on_owed()
        if package is None:
            return
        commune = self.config.commune(package.insee)
        if commune is None or not commune.auto_receipt:
            return
        try:
            self.drops.auto_receipt(package.numero)
        except Exception as exc:  # noqa: BLE001 - the dossier and its AVL are safe; the business software sends "reçu"
            log.exception("acks.auto_receipt_failed", numero=package.numero, error=type(exc).__name__)

    # -- what is owed and missing ------------------------------------------------------

    def repair(self) -> int:
        """Queue the AVLs accepted dossiers lack and write the files pending entries lack; returns how many.

        Raises nothing: what cannot be repaired now is logged and tried again at the next round.
        """
        repaired = 0
        for dossier in self.drops.ledger.query(
            "SELECT d.* FROM dossiers d WHERE d.message_id != '' AND d.routing IS NOT NULL AND d.received_at >= ?"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.kind = 'AVL' AND o.ref_message_id = d.message_id)",
            ((datetime.now(UTC) - timedelta(hours=REPAIR_HOURS)).isoformat(timespec="milliseconds"),),
        ):
            repaired += self._requeue_avl(dossier)
        return repaired + self.write_files()

    def write_files(self) -> int:
        """Write the files pending entries lack (from the bytes their rows keep); returns how many."""
        try:
            return self.outbox.repair()
        except OSError as exc:
            log.warning("acks.outbox_unusable", folder=str(self.outbox.folder), error=exc.strerror or str(exc),
                        effect="the entries wait; their files are written once the folder is usable")
            return 0

    def _requeue_avl(self, dossier: sqlite3.Row) -> int:
        try:
            routing = Routing.from_xml(dossier["routing"])
            if not sends_ack(self.config, routing, "AVL"):
                return 0
            numero = dossier["numero"] if NUMERO_PATTERN.match(dossier["numero"]) else None
            reply = build_ack(routing, kind="AVL", numero=numero, demarche=dossier["demarche"],
                              style=self.config.reply_style)
        except Exception as exc:  # noqa: BLE001 - an unreadable routing cannot be acked; say so, keep going
            log.warning("acks.not_addressable", kind="AVL", numero=dossier["numero"], error=type(exc).__name__)
            return 0
        owed = OwedAck(self.outbox, reply, Queued(kind="AVL", numero=numero, ref_message_id=dossier["message_id"],
                                                  source="repair"))
        with self.drops.ledger.transaction() as db:
            owed(db)
        if owed.entry_id is None:
            return 0
        log.warning("acks.requeued", kind="AVL", numero=dossier["numero"], id=owed.entry_id,
                    why="the dossier was recorded without the ack it owes")
        self.outbox.announce(owed.entry_id)
        return 1


class AckRepair:
    """The daemon part that repairs owed acks every ``every`` seconds (the first round runs at start).

    It is also woken when an ack is committed, so that the ack's file is written soon after the
    client's answer (the delivery worker writes it too, before sending, if it gets there first).
    """

    name = "ack-repair"

    def __init__(self, acks: Acknowledger, every: float = REPAIR_SECONDS):
        self.acks = acks
        self.every = every
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Write the files of new entries now (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Repair, then wait for the period or a wake-up, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self.acks.on_owed = self.wake
        full = True
        while True:
            if full:
                await asyncio.to_thread(self.acks.repair)
            else:
                await asyncio.to_thread(self.acks.write_files)
            self._wake.clear()
            try:
                async with asyncio.timeout(self.every):
                    await self._wake.wait()
                full = False
            except TimeoutError:
                full = True

    def reconfigure(self, config: Config) -> None:
        """Nothing to follow: the configuration is read through the acknowledger."""
        return None

"""Acknowledgements: what intake's outcomes become for the platform.

Intake calls :class:`Acknowledger` (its ``AckSink``) after the durable hand-off (AVL) or
after quarantine (ANL). The envelope says whether the platform wants acks, which kinds
and to whom (``AckRequired``, ``AckType``, ``AckTo``). A resend of an accepted package is
acked again, unless its previous ack is still waiting in the outbox.
"""

from __future__ import annotations

import structlog

from relayd.config import Config
from relayd.outbound.outbox import Outbox, Queued
from relayd.outbound.returns import ReturnDrops
from relayd.pec.envelope import NUMERO_PATTERN, Message, Routing
from relayd.pec.package import Package
from relayd.pec.replies import build_ack
from relayd.rejections import Rejection

log = structlog.get_logger("relayd.acks")


def wants_ack(routing: Routing, kind: str) -> bool:
    """Whether the envelope asks for acks of this kind (all kinds when it names none)."""
    types = {t.strip().upper() for t in routing.ack_types if t.strip()}
    return routing.ack_required and (not types or kind in types)


def sends_ack(config: Config, routing: Routing, kind: str) -> bool:
    """Whether relayd sends this ack: the envelope asks for it and ``platform.acks`` allows it."""
    return kind in config.ack_kinds and wants_ack(routing, kind)


class Acknowledger:
    """The ack sink: queues AVL and ANL, and the automatic receipt where a commune wants one."""

    def __init__(self, config: Config, outbox: Outbox, drops: ReturnDrops):
        self.config = config
        self.outbox = outbox
        self.drops = drops

    def package_accepted(self, package: Package) -> None:
        """Queue an AVL (and "reçu" under ``auto_receipt``) for a dossier now durably handed over."""
        message = package.message
        try:
            self._ack(message, "AVL", None)
            commune = self.config.commune(package.insee)
            if commune is not None and commune.auto_receipt:
                self.drops.auto_receipt(package.numero)
        except Exception as exc:  # noqa: BLE001 - the dossier is safe; the platform's resend brings another chance
            log.exception("acks.queue_failed", numero=package.numero, error=type(exc).__name__)

    def package_rejected(self, envelope: Message | None, rejection: Rejection) -> None:
        """Queue an ANL carrying the reason, when the envelope is readable enough to address one."""
        if envelope is None:
            log.info("acks.anl_not_addressable", code=rejection.reason.value)
            return
        try:
            self._ack(envelope, "ANL", rejection)
        except Exception as exc:  # noqa: BLE001 - the package is in quarantine; only the ack is lost
            log.exception("acks.queue_failed", message_id=envelope.message_id, error=type(exc).__name__)

    def _ack(self, message: Message, kind: str, rejection: Rejection | None) -> None:
        routing = message.header.routing
        if not sends_ack(self.config, routing, kind):
            return
        if self.outbox.pending_ack(kind, message.message_id) is not None:
            return  # the platform resent before our ack left: one ack answers both
        numero = message.numero if NUMERO_PATTERN.match(message.numero) else None
        reply = build_ack(routing, kind=kind, numero=numero, demarche=message.demarche, rejection=rejection,
                          style=self.config.reply_style)
        self.outbox.enqueue(reply, Queued(kind=kind, numero=numero, ref_message_id=message.message_id, source="intake"))

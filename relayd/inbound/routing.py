"""Which commune a dossier is for: by its CodeINSEE, or by its recipient's SIRET.

The DAUA package names the commune in ``Routage/Donnee`` (``Id`` = ``CodeINSEE``); the DIA
flow's envelope has no CodeINSEE and is routed by ``Recipients/Recipient/Location/Siret``
(docs/formats.md). A commune may declare its SIRET (``communes[].siret``). When an envelope
carries both and they name different communes, relayd refuses it rather than guess.
"""

from __future__ import annotations

from relayd.config import Commune, Config
from relayd.pec.envelope import Message
from relayd.rejections import Reason, Rejection


def route_commune(config: Config, message: Message) -> Commune:
    """The configured commune this envelope is for.

    Raises ``Rejection`` with ``insee_unknown``, ``siret_unknown`` or ``routing_conflict``.
    A recipient SIRET that no commune declares does not count against a known CodeINSEE (the
    real DAUA package carries a placeholder SIRET): only a declared one must agree.
    """
    insee, siret = message.insee, message.recipient_siret
    by_siret = config.commune_by_siret(siret) if siret else None
    if insee:
        commune = config.commune(insee)
        if commune is None:
            raise Rejection(Reason.INSEE_UNKNOWN, f"no commune with INSEE code {insee} is configured here.")
        if by_siret is not None and by_siret.insee != commune.insee:
            raise Rejection(
                Reason.ROUTING_CONFLICT,
                f"CodeINSEE {insee} names commune {commune.insee}, but the recipient's SIRET {siret} is commune "
                f"{by_siret.insee}'s.",
            )
        if commune.siret and siret and siret != commune.siret:
            raise Rejection(
                Reason.ROUTING_CONFLICT,
                f"CodeINSEE {insee} names commune {commune.insee}, whose SIRET is {commune.siret}, "
                f"but the recipient's SIRET is {siret}.",
            )
        return commune
    if by_siret is None:
        raise Rejection(Reason.SIRET_UNKNOWN, f"no commune with SIRET {siret} is configured here, and the envelope has no CodeINSEE.")
    return by_siret

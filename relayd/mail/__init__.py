"""E-mail: the agents' new-dossier mail, the daily digest of late dossiers, and the administrator's alerts.

Mail is queued in the ledger (:mod:`relayd.mail.spool`) and sent by :class:`~relayd.mail.mailer.Mailer`
in the background, so an SMTP outage delays mail and never holds up a dossier.
"""

from relayd.mail.mailer import Mailer

__all__ = ["Mailer"]

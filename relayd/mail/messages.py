"""What each mail says: the new-dossier mail, the daily digest and the administrator's alerts.

Pure functions from what happened to a :class:`Draft` (recipients, subject, body), in French for
the agents and the commune's administrator. Nothing here reads a secret: the platform's
``EmailConfiguration`` body is used as given (it names the file that holds the password, never the
password), and alerts carry only relayd's own error texts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import TYPE_CHECKING

from relayd.config import Commune, Config
from relayd.events import DeadLetter, DiskLow, HostKeyMismatch, PackageAccepted, PackageRejected, ReturnServerOutage

if TYPE_CHECKING:
    from relayd.deadlines import DossierAge, StatusReport

#: a platform-provided subject or body longer than this is cut (a bounded row in the spool)
MAX_SUBJECT_CHARS = 250
MAX_BODY_CHARS = 64 * 1024

SIGNATURE = "-- \nMessage envoyé automatiquement par relayd, le relais sFTP de la commune avec mon.service-public.fr."


@dataclass(frozen=True)
class Draft:
    """A mail to queue: ``kind`` is ``new_dossier``, ``digest`` or ``alert``; ``numero`` ties it to a dossier."""

    kind: str
    recipients: tuple[str, ...]
    subject: str
    body: str
    numero: str | None = None


# -- new dossier -----------------------------------------------------------------------


def new_dossier(event: PackageAccepted, commune: Commune) -> Draft | None:
    """The mail to the commune's service for a new dossier; None when the commune has no address.

    The platform's subject and body are used when the envelope has them (its body talks of the
    dossier's files, so a short paragraph says where relayd put them); else a French default.
    """
    if not commune.emails:
        return None
    where = (f"Le dossier {event.numero} ({event.demarche}) pour {commune.name} ({commune.insee}) a été déposé "
             f"par relayd dans le répertoire de réception :\n    {commune.inbox}")
    subject = _one_line(event.email_subject or "")
    body = (event.email_body or "").strip()
    if body:
        # The platform's template names the password file with placeholders; fill in the two relayd knows.
        body = body.replace("{numeroTeledossier}", event.numero).replace("{nomDemarche}", event.demarche)
        body = f"{body[:MAX_BODY_CHARS]}\n\n{where}\n\n{SIGNATURE}\n"
    else:
        body = (f"Bonjour,\n\nUn nouveau dossier est arrivé de mon.service-public.fr.\n\n"
                f"    Numéro du dossier : {event.numero}\n"
                f"    Démarche : {event.demarche}\n"
                f"    Commune : {commune.name} ({commune.insee})\n"
                f"    Répertoire de réception : {commune.inbox}\n\n"
                f"Il est à traiter dans les 30 jours suivant son dépôt.\n\n{SIGNATURE}\n")
    if not subject:
        subject = f"Nouveau dossier {event.numero} ({event.demarche}) à traiter"
    return Draft("new_dossier", tuple(commune.emails), subject, body, numero=event.numero)


# -- daily digest ----------------------------------------------------------------------


def digests(report: StatusReport, config: Config, admin: Sequence[str], now: datetime) -> list[Draft]:
    """One digest per commune with late or overdue dossiers (to its addresses), and one for ``admin`` covering all.

    Nothing late, no mail.
    """
    overdue = sorted(report.overdue, key=lambda d: d.received_at)
    seen = {d.numero for d in overdue}
    late = sorted((d for d in report.late if d.numero not in seen), key=lambda d: d.received_at)
    if not overdue and not late:
        return []
    today = now.astimezone().strftime("%d/%m/%Y")
    warn, limit = config.deadlines.warn_days, config.deadlines.overdue_days
    drafts = []
    for commune in config.communes:
        c_overdue = [d for d in overdue if d.insee == commune.insee]
        c_late = [d for d in late if d.insee == commune.insee]
        if commune.emails and (c_overdue or c_late):
            body = (f"Bonjour,\n\nVoici les dossiers de {commune.name} ({commune.insee}) qui approchent ou ont dépassé "
                    f"le délai de traitement de {limit:g} jours, au {today}.\n\n"
                    f"{_digest_sections(c_overdue, c_late, warn, limit, with_commune=False)}\n"
                    f"Un dossier est retiré de cette liste quand il est clos.\n\n{SIGNATURE}\n")
            drafts.append(Draft("digest", tuple(commune.emails),
                                f"[relayd] {commune.name} : {_counts(c_overdue, c_late)}", body))
    if admin:
        names = {c.insee: c.name for c in config.communes}
        body = (f"Bonjour,\n\nVoici tous les dossiers qui approchent ou ont dépassé le délai de traitement de "
                f"{limit:g} jours, au {today}.\n\n"
                f"{_digest_sections(overdue, late, warn, limit, with_commune=True, names=names)}\n{SIGNATURE}\n")
        drafts.append(Draft("digest", tuple(admin), f"[relayd] Dossiers en retard : {_counts(overdue, late)}", body))
    return drafts


def _counts(overdue: Sequence[DossierAge], late: Sequence[DossierAge]) -> str:
    parts = []
    if overdue:
        parts.append(f"{len(overdue)} hors délai")
    if late:
        parts.append(f"{len(late)} bientôt hors délai")
    return ", ".join(parts)


def _digest_sections(overdue: Sequence[DossierAge], late: Sequence[DossierAge], warn: float, limit: float, *,
                     with_commune: bool, names: dict[str, str] | None = None) -> str:
    out = []
    if overdue:
        out.append(f"Hors délai (plus de {limit:g} jours) :\n" + _lines(overdue, with_commune, names))
    if late:
        out.append(f"Bientôt hors délai (plus de {warn:g} jours) :\n" + _lines(late, with_commune, names))
    return "\n".join(out)


def _lines(dossiers: Iterable[DossierAge], with_commune: bool, names: dict[str, str] | None) -> str:
    lines = []
    for d in dossiers:
        where = f", {(names or {}).get(d.insee, 'commune')} ({d.insee})" if with_commune else ""
        lines.append(f"  - {d.numero} ({d.demarche}{where}) : reçu le {_date(d.received_at)}, il y a "
                     f"{int(d.age_days)} jours, état « {d.state} », limite le {_date(d.deadline)}\n")
    return "".join(lines)


# -- alerts to the administrator -------------------------------------------------------


#: at most this many entries are listed in one dead-letter alert; `relayd outbox list` has them all
DEAD_LETTERS_LISTED = 50


def dead_letters(events: Sequence[DeadLetter], admin: Sequence[str]) -> Draft:
    """Outbox entries that will not be retried by themselves any more: one, or those held since the last alert."""
    first = events[0]
    if len(events) == 1:
        dossier = f" du dossier {first.numero}" if first.numero else ""
        subject = f"[relayd] Envoi abandonné : {first.kind}{dossier}"
        intro = (f"Un envoi vers la plateforme ({first.kind}{dossier}) a été abandonné après {first.attempts} "
                 f"tentative(s) : il ne sera plus retenté automatiquement.")
    else:
        subject = f"[relayd] {len(events)} envois abandonnés"
        intro = (f"{len(events)} envois vers la plateforme ont été abandonnés depuis la dernière alerte : ils ne seront "
                 f"plus retentés automatiquement.")
    lines = [f"    #{e.entry_id}  {e.kind:<6}  {e.numero or '-':<12}  {e.attempts} tentative(s)  "
             f"{e.error_code} : {_one_line(e.error)}" for e in events[:DEAD_LETTERS_LISTED]]
    if len(events) > DEAD_LETTERS_LISTED:
        lines.append(f"    ... et {len(events) - DEAD_LETTERS_LISTED} autre(s)")
    ids = " ".join(str(e.entry_id) for e in events[:DEAD_LETTERS_LISTED])
    body = (f"Bonjour,\n\n{intro}\n\n    Entrée  Type    Dossier       Tentatives      Erreur\n" + "\n".join(lines) +
            f"\n\nUne fois la cause corrigée, relancez-les :\n    relayd outbox retry -c <fichier de configuration> {ids}\n"
            f"ou tous les envois abandonnés d'un coup :\n    relayd outbox retry -c <fichier de configuration> --dead\n"
            f"Tant qu'un envoi abandonné n'est ni relancé ni abandonné pour de bon (relayd outbox purge <id>), les "
            f"envois suivants du même dossier attendent derrière lui.\n"
            f"(`relayd outbox list` montre tous les envois en attente ou abandonnés.) Les abandons suivants sont "
            f"regroupés dans une alerte par heure au plus.\n\n{SIGNATURE}\n")
    return Draft("alert", tuple(admin), subject, body, numero=first.numero if len(events) == 1 else None)


def host_key_mismatch(event: HostKeyMismatch, admin: Sequence[str]) -> Draft:
    """The return server's key is not the pinned one: nothing goes to the platform."""
    body = (f"Bonjour,\n\nLe serveur de retour de la plateforme, {event.host}:{event.port}, a présenté une clé d'hôte "
            f"qui n'est pas celle qui est épinglée dans la configuration. Par sécurité, relayd ne lui envoie plus rien : "
            f"accusés de réception et retours attendent dans l'outbox.\n\n"
            f"    {_one_line(event.message)}\n\n"
            f"Vérifiez auprès de la plateforme si sa clé a changé, puis mettez à jour platform.known_hosts ou "
            f"platform.host_key_fingerprints et rechargez relayd (systemctl reload relayd).\n"
            f"Cette alerte est répétée au plus une fois par jour.\n\n{SIGNATURE}\n")
    return Draft("alert", tuple(admin), f"[relayd] Clé d'hôte inattendue sur {event.host}:{event.port}", body)


def return_server_outage(event: ReturnServerOutage, admin: Sequence[str]) -> Draft:
    """The return server has been out of reach for a while (or is back): acks and returns wait, none is lost."""
    where = f"{event.host}:{event.port}"
    hours = event.seconds / 3600
    if event.down:
        subject = f"[relayd] Serveur de retour injoignable : {where}"
        body = (f"Bonjour,\n\nLe serveur de retour de la plateforme, {where}, est injoignable depuis {hours:.1f} h :\n\n"
                f"    {event.error_code} : {_one_line(event.error)}\n\n"
                f"{event.pending} envoi(s) (accusés de réception et retours) attendent dans l'outbox. relayd réessaie "
                f"sans fin et les enverra dans l'ordre dès que le serveur répondra : aucun n'est abandonné. "
                f"Un second message dira quand la liaison sera rétablie.\n\n{SIGNATURE}\n")
    else:
        subject = f"[relayd] Serveur de retour de nouveau joignable : {where}"
        body = (f"Bonjour,\n\nLe serveur de retour de la plateforme, {where}, répond de nouveau, après {hours:.1f} h "
                f"d'interruption. Les envois en attente partent ({event.pending} encore en attente).\n\n{SIGNATURE}\n")
    return Draft("alert", tuple(admin), subject, body)


def disk_low(event: DiskLow, admin: Sequence[str]) -> Draft:
    """Free space under the storage root fell below the threshold: uploads are refused."""
    body = (f"Bonjour,\n\nL'espace libre sous {event.path} est de {_size(event.free_bytes)}, sous le seuil de "
            f"{_size(event.threshold_bytes)} (limits.min_free_bytes). relayd refuse les dépôts de la plateforme "
            f"jusqu'à ce que de la place soit libérée ; la plateforme les renverra.\n\n{SIGNATURE}\n")
    return Draft("alert", tuple(admin), f"[relayd] Espace disque insuffisant sous {event.path}", body)


def rejections(events: Sequence[PackageRejected], minutes: float, admin: Sequence[str]) -> Draft:
    """Several packages were refused within a short time."""
    reasons = Counter(e.reason for e in events)
    summary = "".join(f"    {reason} : {count}\n" for reason, count in reasons.most_common())
    recent = "".join(
        f"  - {e.reason} ({e.account}, {e.peer}{', dossier ' + e.numero if e.numero else ''}) : {_one_line(e.detail)}\n"
        for e in events[-10:]
    )
    body = (f"Bonjour,\n\n{len(events)} paquets ont été refusés en moins de {minutes:g} minutes.\n\n"
            f"Motifs :\n{summary}\nDerniers refus :\n{recent}\n"
            f"Chaque paquet refusé est en quarantaine avec son motif (storage.root/quarantine), et la plateforme a "
            f"reçu un accusé négatif (ANL). Pas d'autre alerte de ce type avant {minutes:g} minutes.\n\n{SIGNATURE}\n")
    return Draft("alert", tuple(admin), f"[relayd] {len(events)} paquets refusés en {minutes:g} minutes", body)


# -- the wire form ---------------------------------------------------------------------


def render(*, sender: str, recipients: Sequence[str], subject: str, body: str, message_id: str,
           date: datetime) -> EmailMessage:
    """The RFC 5322 message: UTF-8 text in quoted-printable, the subject RFC 2047-encoded by the email package."""
    message = EmailMessage(policy=SMTP)
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = _one_line(subject)
    message["Date"] = format_datetime(date.astimezone())
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a robot
    message.set_content(body, charset="utf-8", cte="quoted-printable")
    return message


# -- helpers ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """A header-safe single line: the platform's subject must not smuggle in a header."""
    return re.sub(r"\s+", " ", text).strip()[:MAX_SUBJECT_CHARS]


def _date(moment: datetime) -> str:
    return moment.astimezone().strftime("%d/%m/%Y")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("o", "Kio", "Mio", "Gio"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "o" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} Tio"

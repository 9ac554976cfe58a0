"""The 30-day deadline: which dossiers are open, late or overdue, and what waits in the outbox.

The platform gives a commune 30 days to process a dossier; past that, the citizen must file
it again. relayd counts a dossier's age from the moment it received it (``dossiers.received_at``
in the ledger) until the platform has been told "clos" (the state moves to ``clos`` when that
Retour is delivered). Open dossiers older than ``deadlines.warn_days`` are *late*; older than
``deadlines.overdue_days``, *overdue*. The report is computed at a given moment, so that an
operator (or a test) can ask what will be overdue on a later date (``relayd status --now``).

The report only reads the ledger: it can run while the daemon writes (WAL mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from relayd import dossiers
from relayd.config import Config
from relayd.ledger import Ledger

_DAY = 86400.0


@dataclass(frozen=True)
class DossierAge:
    """One open dossier and where it stands against the deadline."""

    numero: str
    demarche: str
    insee: str
    state: str
    #: when relayd received the dossier (aware, UTC)
    received_at: datetime
    age_days: float
    #: received_at + deadlines.overdue_days: past it, the citizen must start over
    deadline: datetime
    #: days until the deadline; negative once it has passed
    days_left: float
    #: a state queued for the platform and not yet delivered ("recu" or "clos"), if any
    requested_state: str | None = None

    @property
    def days_overdue(self) -> float:
        """Days past the deadline; 0 while it has not passed."""
        return max(0.0, -self.days_left)

    def as_dict(self) -> dict[str, Any]:
        """The dossier as ``relayd status --json`` prints it."""
        return {
            "numero": self.numero,
            "demarche": self.demarche,
            "insee": self.insee,
            "state": self.state,
            "requested_state": self.requested_state,
            "received_at": self.received_at.isoformat(timespec="seconds"),
            "age_days": round(self.age_days, 2),
            "deadline": self.deadline.isoformat(timespec="seconds"),
            "days_left": round(self.days_left, 2),
            "days_overdue": round(self.days_overdue, 2),
        }


@dataclass(frozen=True)
class StatusReport:
    """Everything ``relayd status`` shows, computed at ``generated_at``."""

    generated_at: datetime
    warn_days: float
    overdue_days: float
    #: dossiers per (INSEE code, démarche, state), every state included
    counts: dict[tuple[str, str, str], int]
    #: open dossiers older than warn_days but not yet overdue, oldest first
    late: list[DossierAge]
    #: open dossiers older than overdue_days, oldest first
    overdue: list[DossierAge]
    #: outbox entries waiting to be delivered
    outbox_pending: int
    #: when the oldest pending entry was queued (or last sent again by an operator)
    outbox_oldest_pending_at: datetime | None
    #: outbox entries in dead-letter, which nothing retries by itself
    outbox_dead: int
    #: the configured communes' names, by INSEE code
    communes: dict[str, str] = field(default_factory=dict)

    @property
    def open_count(self) -> int:
        """Dossiers not closed."""
        return sum(n for (_, _, state), n in self.counts.items() if not dossiers.is_final(state))

    @property
    def outbox_oldest_pending_seconds(self) -> float | None:
        """How long the oldest pending entry has waited, in seconds."""
        if self.outbox_oldest_pending_at is None:
            return None
        return max(0.0, (self.generated_at - self.outbox_oldest_pending_at).total_seconds())

    @property
    def needs_attention(self) -> bool:
        """True when a dossier is overdue or an outbox entry is in dead-letter (``status`` exits 1)."""
        return bool(self.overdue) or self.outbox_dead > 0

    def as_dict(self) -> dict[str, Any]:
        """The report as ``relayd status --json`` prints it."""
        oldest = self.outbox_oldest_pending_seconds
        return {
            "generated_at": self.generated_at.isoformat(timespec="seconds"),
            "warn_days": self.warn_days,
            "overdue_days": self.overdue_days,
            "counts": [
                {"insee": insee, "commune": self.communes.get(insee), "demarche": demarche, "state": state, "count": n}
                for (insee, demarche, state), n in sorted(self.counts.items(), key=_count_order)
            ],
            "open": self.open_count,
            "late": [d.as_dict() for d in self.late],
            "overdue": [d.as_dict() for d in self.overdue],
            "outbox": {
                "pending": self.outbox_pending,
                "oldest_pending_at": (self.outbox_oldest_pending_at.isoformat(timespec="seconds")
                                      if self.outbox_oldest_pending_at else None),
                "oldest_pending_seconds": round(oldest, 1) if oldest is not None else None,
                "dead": self.outbox_dead,
            },
            "needs_attention": self.needs_attention,
        }


def build_report(ledger: Ledger, config: Config, now: datetime) -> StatusReport:
    """Read the ledger and place every open dossier against the deadlines, as of ``now`` (aware)."""
    now = _aware(now)
    warn, overdue_days = config.deadlines.warn_days, config.deadlines.overdue_days
    counts = {
        (row["insee"], row["demarche"], row["state"]): row["n"]
        for row in ledger.query("SELECT insee, demarche, state, COUNT(*) AS n FROM dossiers"
                                " GROUP BY insee, demarche, state")
    }
    late: list[DossierAge] = []
    overdue: list[DossierAge] = []
    rows = ledger.query("SELECT numero, demarche, insee, state, requested_state, received_at FROM dossiers"
                        " WHERE state != ? ORDER BY received_at, numero", (dossiers.CLOS,))
    for row in rows:
        received = _parse(row["received_at"])
        age = (now - received).total_seconds() / _DAY
        if age < warn:
            continue
        dossier = DossierAge(
            numero=row["numero"], demarche=row["demarche"], insee=row["insee"], state=row["state"],
            received_at=received, age_days=age, deadline=received + timedelta(days=overdue_days),
            days_left=overdue_days - age, requested_state=row["requested_state"],
        )
        (overdue if age >= overdue_days else late).append(dossier)
    backlog = ledger.query("SELECT status, COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox"
                           " WHERE status IN ('pending', 'dead') GROUP BY status")
    by_status = {row["status"]: row for row in backlog}
    pending = by_status.get("pending")
    return StatusReport(
        generated_at=now,
        warn_days=warn,
        overdue_days=overdue_days,
        counts=counts,
        late=late,
        overdue=overdue,
        outbox_pending=pending["n"] if pending else 0,
        outbox_oldest_pending_at=_parse(pending["oldest"]) if pending else None,
        outbox_dead=by_status["dead"]["n"] if "dead" in by_status else 0,
        communes={c.insee: c.name for c in config.communes},
    )


# -- the command -------------------------------------------------------------------------


def run_command(ledger: Ledger, config: Config, now: datetime, *, as_json: bool = False) -> int:
    """``relayd status``: print the report; 1 when a dossier is overdue or an entry is in dead-letter, else 0."""
    report = build_report(ledger, config, now)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_table(report))
    return 1 if report.needs_attention else 0


# -- the table ---------------------------------------------------------------------------


def format_table(report: StatusReport) -> str:
    """The report as ``relayd status`` prints it for people: counts, late and overdue dossiers, the outbox."""
    local = report.generated_at.astimezone()
    lines = [f"relayd status at {local:%Y-%m-%d %H:%M} {local.tzname()}: "
             f"late after {report.warn_days:g} days, overdue after {report.overdue_days:g}", ""]
    lines += _counts_table(report)
    for title, dossiers in (
        (f"Overdue: open for more than {report.overdue_days:g} days; the citizen must file again", report.overdue),
        (f"Late: open for more than {report.warn_days:g} days", report.late),
    ):
        lines += ["", f"{title} ({len(dossiers)})"]
        if dossiers:
            lines += _dossier_table(dossiers)
    lines.append("")
    oldest = report.outbox_oldest_pending_seconds
    waited = f" (the oldest has waited {_duration(oldest)})" if oldest is not None else ""
    dead = f"{report.outbox_dead} in dead-letter" + (": see `relayd outbox list`" if report.outbox_dead else "")
    lines.append(f"Outbox: {report.outbox_pending} pending{waited}, {dead}")
    return "\n".join(lines)


def _counts_table(report: StatusReport) -> list[str]:
    if not report.counts:
        return ["No dossier received yet."]
    pairs = sorted({(insee, demarche) for insee, demarche, _ in report.counts})
    names = [f"{insee} {report.communes.get(insee, '(not configured)')}" for insee, _ in pairs]
    width = max(len("commune"), *(len(n) for n in names))
    dwidth = max(len("démarche"), *(len(d) for _, d in pairs))
    states = "  ".join(f"{dossiers.WORDS[s]:>8}" for s in dossiers.STATES)
    header = f"{'commune':{width}}  {'démarche':{dwidth}}  {states}"
    out = [header]
    for name, (insee, demarche) in zip(names, pairs, strict=True):
        cells = "  ".join(f"{report.counts.get((insee, demarche, s), 0):>8}" for s in dossiers.STATES)
        out.append(f"{name:{width}}  {demarche:{dwidth}}  {cells}")
    return out


def _dossier_table(dossiers: list[DossierAge]) -> list[str]:
    nwidth = max(len("numero"), *(len(d.numero) for d in dossiers))
    dwidth = max(len("démarche"), *(len(d.demarche) for d in dossiers))
    out = [f"  {'numero':{nwidth}}  {'commune':7}  {'démarche':{dwidth}}  {'state':8}  {'received':16}  "
           f"{'age (d)':>7}  {'deadline':16}  days left"]
    for d in dossiers:
        left = f"{d.days_left:.1f}" if d.days_left >= 0 else f"{d.days_overdue:.1f} over"
        state = d.state + (f" ({d.requested_state} queued)" if d.requested_state and d.requested_state != d.state else "")
        out.append(f"  {d.numero:{nwidth}}  {d.insee:7}  {d.demarche:{dwidth}}  {state:8}  "
                   f"{d.received_at.astimezone():%Y-%m-%d %H:%M}  {d.age_days:>7.1f}  "
                   f"{d.deadline.astimezone():%Y-%m-%d %H:%M}  {left}")
    return out


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _count_order(item: tuple[tuple[str, str, str], int]) -> tuple[str, str, int]:
    (insee, demarche, state), _ = item
    return insee, demarche, dossiers.STATES.index(state) if state in dossiers.STATES else len(dossiers.STATES)


def _parse(text: str) -> datetime:
    return _aware(datetime.fromisoformat(text))


def _aware(moment: datetime) -> datetime:
    # The ledger writes UTC; a naive value can only be one of those.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

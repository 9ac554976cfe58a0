"""``relayd dossier NUMERO``: one dossier's story, from the ledger.

Each package received for it (accepted, duplicate or refused, and why), each ack and return
queued for the platform with its state (pending, delivered, dead, purged) and times, the
dossier's state now, and where it stands against the 30-day limit (the rule of
:mod:`relayd.deadlines`). It only reads the ledger, so it is safe while the daemon runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

from relayd import dossiers
from relayd.config import Config
from relayd.deadlines import DossierAge
from relayd.ledger import Ledger

_DAY = 86400.0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dossier`` to the ``relayd`` parser."""
    from relayd.cli import add_config_argument

    p = sub.add_parser("dossier", help="one dossier's history: packages received, acks and returns, state, days left",
                       description="Print what relayd knows of one dossier: each package received (accepted, "
                                   "duplicate, refused), each ack and return with its state and times, the state "
                                   "now and the days left before deadlines.overdue_days. Exit status: 0, 1 when "
                                   "relayd never heard of it, 2 on a configuration error.")
    add_config_argument(p)
    p.add_argument("numero", help="the dossier number, e.g. A-9-X3UGO4V7")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=run)


def history(ledger: Ledger, config: Config, numero: str, now: datetime) -> dict[str, Any] | None:
    """The dossier's story as a dict (what ``--json`` prints); None when the ledger knows nothing of it."""
    dossier = ledger.dossier(numero)
    packages = ledger.packages(numero)
    outbox = ledger.query("SELECT * FROM outbox WHERE numero = ? ORDER BY id", (numero,))
    if dossier is None and not packages and not outbox:
        return None
    out: dict[str, Any] = {
        "numero": numero,
        "packages": [{"received_at": p["received_at"], "outcome": p["outcome"], "reason": p["reason"],
                      "detail": p["detail"], "upload_name": p["upload_name"], "size": p["size"],
                      "account": p["account"], "message_id": p["message_id"]} for p in packages],
        "replies": [{"id": o["id"], "kind": o["kind"], "state": o["target_state"], "status": o["status"],
                     "queued_at": o["created_at"], "delivered_at": o["delivered_at"], "attempts": o["attempts"],
                     "last_error": (f"{o['last_error_code']}: {o['last_error']}" if o["last_error_code"] else None),
                     "remote_name": o["remote_name"]} for o in outbox],
        "dossier": None,
    }
    if dossier is not None:
        age = age_of(dossier, config, now)
        out["dossier"] = {
            "demarche": dossier["demarche"], "insee": dossier["insee"],
            "commune": (config.commune(dossier["insee"]).name if config.commune(dossier["insee"]) else None),
            "state": dossier["state"], "state_label": dossiers.LABELS.get(dossier["state"]),
            "requested_state": dossier["requested_state"], "received_at": dossier["received_at"],
            "updated_at": dossier["updated_at"], "inbox_path": dossier["inbox_path"],
            "age_days": round(age.age_days, 2), "deadline": age.deadline.isoformat(timespec="seconds"),
            # Once closed, the limit no longer runs: the citizen has the answer.
            "days_left": None if dossiers.is_final(dossier["state"]) else round(age.days_left, 2),
        }
    return out


def age_of(row: Any, config: Config, now: datetime) -> DossierAge:
    """Where a ledger dossier row stands against the deadline at ``now``, counted as ``relayd status`` counts."""
    received = datetime.fromisoformat(row["received_at"])
    received = received if received.tzinfo else received.replace(tzinfo=UTC)
    age = (now - received).total_seconds() / _DAY
    overdue = config.deadlines.overdue_days
    return DossierAge(numero=row["numero"], demarche=row["demarche"], insee=row["insee"], state=row["state"],
                      received_at=received, age_days=age, deadline=received + timedelta(days=overdue),
                      days_left=overdue - age, requested_state=row["requested_state"])


def format_history(story: dict[str, Any]) -> str:
    """The story for a person: the state first, then the packages and the replies, with times."""
    lines = [f"dossier {story['numero']}"]
    d = story["dossier"]
    if d is None:
        lines.append("  state: never handed over (no package of it was accepted)")
    else:
        pending = f", {d['requested_state']} on its way to the platform" if d["requested_state"] else ""
        lines.append(f"  commune {d['insee']} ({d['commune'] or 'not configured'}), démarche {d['demarche']}")
        lines.append(f"  state: {d['state']} ({d['state_label']}){pending}, since {_when(d['updated_at'])}")
        if d["days_left"] is None:
            lines.append(f"  closed; received {_when(d['received_at'])}")
        elif d["days_left"] >= 0:
            lines.append(f"  received {_when(d['received_at'])}: {d['days_left']:.1f} days left before the limit "
                         f"({_when(d['deadline'])})")
        else:
            lines.append(f"  received {_when(d['received_at'])}: OVERDUE by {-d['days_left']:.1f} days "
                         f"(the limit was {_when(d['deadline'])})")
    lines.append("packages received:")
    for p in story["packages"]:
        why = f" ({p['reason']}: {p['detail']})" if p["outcome"] == "rejected" else ""
        lines.append(f"  {_when(p['received_at'])}  {p['outcome']:9}  {p['upload_name'] or '-'}{why}")
    if not story["packages"]:
        lines.append("  none")
    lines.append("acks and returns:")
    for r in story["replies"]:
        label = r["kind"] + (f" {r['state']}" if r["state"] else "")
        times = f"queued {_when(r['queued_at'])}"
        if r["delivered_at"]:
            times += f", delivered {_when(r['delivered_at'])}"
        error = f"; last error {r['last_error']}" if r["last_error"] and r["status"] != "delivered" else ""
        lines.append(f"  #{r['id']:<4} {label:11} {r['status']:9}  {times} ({r['attempts']} attempt(s)){error}")
    if not story["replies"]:
        lines.append("  none")
    return "\n".join(lines)


def _when(stamp: str) -> str:
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return stamp


def run(args: argparse.Namespace) -> int:
    """``relayd dossier NUMERO``."""
    from relayd.cli import _load_or_exit

    config = _load_or_exit(args.config)
    if not config.storage.ledger.exists():
        print(f"relayd: no ledger at {config.storage.ledger}: relayd has not run with this configuration",
              file=sys.stderr)
        return 2
    with closing(Ledger(config.storage.ledger)) as ledger:
        story = history(ledger, config, args.numero, datetime.now(UTC))
    if story is None:
        print(f"relayd: no dossier {args.numero} in the ledger (no package, ack or return)", file=sys.stderr)
        return 1
    print(json.dumps(story, indent=2, ensure_ascii=False) if args.json else format_history(story))
    return 0

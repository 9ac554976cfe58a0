"""Operator commands of the return path: ``relayd return`` and ``relayd outbox list|retry|purge``.

They work on the files and the ledger directly, so they work whether the daemon runs or
not; a running daemon notices the changes within its poll period.
"""

from __future__ import annotations

import io
import json
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from relayd.config import Config
from relayd.fsutil import resolve_gid, write_durably
from relayd.ledger import Ledger
from relayd.outbound.outbox import Entry, Outbox
from relayd.outbound.returns import check_attachment, next_state_error
from relayd.pec.status import StatusAttachment, StatusFile, write_status_file
from relayd.rejections import Rejection


def drop_status(config: Config, numero: str, state: str, *, comment: str | None = None,
                attachments: list[Path] | None = None, insee: str | None = None, demarche: str | None = None) -> int:
    """Write a status file (a zip when it has attachments) atomically into the dossier's return directory.

    What the daemon would refuse (an impossible state, a bad attachment) is refused here at once,
    so that an agent at a terminal learns it now rather than from the rejected folder.
    """
    attachments = attachments or []
    ledger = Ledger(config.storage.ledger)
    try:
        dossier = ledger.dossier(numero)
    finally:
        ledger.close()
    if dossier is None and insee is None:
        return _fail(f"dossier {numero} is not in the ledger; give --insee and --demarche if the commune "
                     "allows returns for dossiers this relay never received")
    commune_code = insee or dossier["insee"]
    commune = config.commune(commune_code)
    if commune is None or commune.returns is None:
        return _fail(f"commune {commune_code} has no return directory (communes[].returns) in the configuration")
    if dossier is not None:
        refusal = next_state_error(numero, dossier["requested_state"] or dossier["state"], state)
        if refusal is not None:
            return _fail(f"{refusal.reason.value}: {refusal.detail}")
    for path in attachments:
        try:
            check_attachment(path.name, path.read_bytes(), config.returns)
        except OSError as exc:
            return _fail(f"attachment {path}: {exc.strerror}")
        except Rejection as refusal:
            return _fail(f"{refusal.reason.value}: {refusal.detail}")
    try:
        status = StatusFile(
            numero=numero, state=state, comment=comment, demarche=demarche, insee=insee,
            attachments=[StatusAttachment(file=p.name) for p in attachments],
        )
    except ValidationError as exc:
        return _fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors(include_input=False)))
    document = write_status_file(status)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    base = f"{numero}-{state}-{stamp}"
    if attachments:
        # One zip, renamed into place in one step: the watcher never sees half of a return.
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{base}.xml", document)
            for path in attachments:
                zf.write(path, path.name)
        target, data = commune.returns / f"{base}.zip", buffer.getvalue()
    else:
        target, data = commune.returns / f"{base}.xml", document
    write_durably(target, data, mode=commune.mode, gid=resolve_gid(commune.group))
    print(target)
    print("relayd takes it within seconds; `relayd outbox list` shows it until the platform has it", file=sys.stderr)
    return 0


def outbox_list(config: Config, *, everything: bool = False, as_json: bool = False) -> int:
    """Print the outbox: pending and dead-letter entries, or all of them."""
    with _outbox(config) as outbox:
        statuses = ("pending", "delivered", "dead", "purged") if everything else ("pending", "dead")
        entries = outbox.entries(statuses)
    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print("the outbox is empty" if not everything else "no entries")
        return 0
    print(f"{'id':>5}  {'status':9} {'kind':7} {'state':5} {'numero':13} {'tries':>5}  {'queued (UTC)':19}  "
          f"{'next try / delivered':20}  last error")
    # A dossier's entries leave in order: say which ones wait behind another, and which.
    blocker: dict[str, int] = {}
    for e in entries:
        next_try = datetime.fromtimestamp(e.next_attempt_at, UTC).strftime("%Y-%m-%d %H:%M:%S") if e.status == "pending" \
            else _utc(e.delivered_at) if e.delivered_at else "-"
        error = f"{e.last_error_code}: {e.last_error}" if e.last_error_code else ""
        if e.status in ("pending", "dead"):
            if e.queue_key in blocker:
                error = f"waits for #{blocker[e.queue_key]} (same dossier, sent in order)" + (f"; {error}" if error else "")
            else:
                blocker[e.queue_key] = e.id
        print(f"{e.id:>5}  {e.status:9} {e.kind:7} {e.target_state or '-':5} {e.numero or '-':13} {e.attempts:>5}  "
              f"{_utc(e.created_at):19}  {next_try:20}  {error}")
    return 0


def _utc(stamp: str) -> str:
    """A ledger time (ISO 8601, UTC) as ``YYYY-MM-DD HH:MM:SS``."""
    try:
        return datetime.fromisoformat(stamp).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def outbox_retry(config: Config, ids: list[int], *, dead: bool = False) -> int:
    """Make entries due now; ``dead`` takes every dead-letter entry."""
    with _outbox(config) as outbox:
        if dead:
            ids = ids + [e.id for e in outbox.entries(("dead",))]
        if not ids:
            return _fail("name entries to retry, or give --dead")
        changed = outbox.retry_now(ids)
    _report("retrying", changed, ids)
    return 0 if len(changed) == len(set(ids)) else 1


def outbox_purge(config: Config, ids: list[int]) -> int:
    """Abandon dead-letter entries."""
    with _outbox(config) as outbox:
        purged = outbox.purge(ids)
    _report("purged", purged, ids)
    return 0 if len(purged) == len(set(ids)) else 1


class _outbox:
    """The outbox over the configured ledger, closed on exit."""

    def __init__(self, config: Config):
        self.ledger = Ledger(config.storage.ledger)
        self.outbox = Outbox.from_config(self.ledger, config)

    def __enter__(self) -> Outbox:
        return self.outbox

    def __exit__(self, *exc: object) -> None:
        self.ledger.close()


def _report(verb: str, done: list[Entry], asked: list[int]) -> None:
    for entry in done:
        print(f"{verb} #{entry.id} ({entry.kind} {entry.numero or ''})".rstrip())
    missed = sorted(set(asked) - {e.id for e in done})
    if missed:
        print(f"not {verb}: {', '.join(f'#{i}' for i in missed)} (unknown, delivered, or not in a state for this)",
              file=sys.stderr)


def _fail(message: str) -> int:
    print(f"relayd: {message}", file=sys.stderr)
    return 2

"""The mail spool: queued mail lives in the ledger until the SMTP server has taken it.

Queuing is one small INSERT, so a listener called from intake never waits on the network. A
sent mail's row is deleted (the spool keeps no personal data once its job is done); a failed
one waits with a doubling backoff, and is given up once too old. Both tables are relayd's own
and created here, beside the ledger's, with ``CREATE TABLE IF NOT EXISTS``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import make_msgid

from relayd.ledger import Ledger
from relayd.mail.messages import Draft

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS mail (
        id              INTEGER PRIMARY KEY,
        created_at      REAL NOT NULL,      -- seconds since the epoch, by the mailer's clock
        kind            TEXT NOT NULL,      -- new_dossier, digest, alert
        numero          TEXT,
        recipients      TEXT NOT NULL,      -- a JSON list
        subject         TEXT NOT NULL,
        body            TEXT NOT NULL,
        message_id      TEXT NOT NULL,      -- the same at every attempt, so a receiver can spot a resend
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error      TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS mail_due ON mail(next_attempt_at)",
    # Small facts that must survive a restart, e.g. the day of the last digest.
    "CREATE TABLE IF NOT EXISTS mail_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]

#: the longest wait between two attempts at one mail
MAX_BACKOFF_SECONDS = 3600.0


@dataclass(frozen=True)
class QueuedMail:
    """One row of the spool."""

    id: int
    created_at: float
    kind: str
    numero: str | None
    recipients: list[str]
    subject: str
    body: str
    message_id: str
    attempts: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> QueuedMail:
        return cls(row["id"], row["created_at"], row["kind"], row["numero"], json.loads(row["recipients"]),
                   row["subject"], row["body"], row["message_id"], row["attempts"])

    @property
    def created(self) -> datetime:
        return datetime.fromtimestamp(self.created_at, UTC)


class Spool:
    """Queued mail in the ledger file. Thread-safe, as the ledger is."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        with ledger.transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    def add(self, drafts: Sequence[Draft], now: float, *, domain: str,
            state: tuple[str, str] | None = None) -> list[int]:
        """Queue ``drafts``, due at once; with ``state``, also set that state row in the same transaction."""
        ids = []
        with self.ledger.transaction() as db:
            for d in drafts:
                cur = db.execute(
                    "INSERT INTO mail (created_at, kind, numero, recipients, subject, body, message_id, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, d.kind, d.numero, json.dumps(list(d.recipients)), d.subject, d.body,
                     make_msgid("relayd", domain=domain), now),
                )
                ids.append(int(cur.lastrowid or 0))
            if state is not None:
                db.execute("INSERT INTO mail_state (key, value) VALUES (?, ?)"
                           " ON CONFLICT(key) DO UPDATE SET value = excluded.value", state)
        return ids

    def due(self, now: float, limit: int = 20) -> list[QueuedMail]:
        """Mail whose next attempt is due, oldest first."""
        rows = self.ledger.query("SELECT * FROM mail WHERE next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                                 (now, limit))
        return [QueuedMail.from_row(r) for r in rows]

    def next_attempt_at(self) -> float | None:
        """When the next queued mail is due; None with an empty spool."""
        rows = self.ledger.query("SELECT MIN(next_attempt_at) AS at FROM mail")
        return rows[0]["at"] if rows else None

    def pending(self) -> int:
        """How many mails wait."""
        return int(self.ledger.query("SELECT COUNT(*) AS n FROM mail")[0]["n"])

    def sent(self, mail: QueuedMail, detail: str) -> None:
        """The server took it: delete the row; a dossier's mail leaves a ``mail_sent`` step in its history."""
        with self.ledger.transaction() as db:
            db.execute("DELETE FROM mail WHERE id = ?", (mail.id,))
            if mail.kind == "new_dossier" and mail.numero:
                Ledger.event(db, mail.numero, "mail_sent", detail)

    def failed(self, mail: QueuedMail, error: str, now: float, *, retry_seconds: float,
               max_age_hours: float) -> float | None:
        """Record a failed attempt. Returns the wait before the next one, or None when the mail is given up.

        A given-up mail is deleted and leaves a ``mail_given_up`` event in the ledger's history.
        """
        attempts = mail.attempts + 1
        if now - mail.created_at >= max_age_hours * 3600:
            with self.ledger.transaction() as db:
                db.execute("DELETE FROM mail WHERE id = ?", (mail.id,))
                Ledger.event(db, mail.numero, "mail_given_up",
                             f"{mail.kind} mail #{mail.id} not sent after {attempts} attempts in {max_age_hours:g} h: {error}")
            return None
        wait = min(retry_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        with self.ledger.transaction() as db:
            db.execute("UPDATE mail SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                       (attempts, now + wait, error, mail.id))
        return wait

    def state(self, key: str) -> str | None:
        """A state value, or None."""
        rows = self.ledger.query("SELECT value FROM mail_state WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

"""The ledger: SQLite in WAL mode, the one memory relayd keeps across restarts.

It records every package received (accepted, duplicate or rejected), every dossier with
its state, the outbox of acks and returns bound for the platform, and an event history. Transactions are short and nothing is held only in
memory, so several worker processes can share one ledger file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: a step that runs inside an outcome's own transaction (the outbox entry owing its ack)
Also = Callable[[sqlite3.Connection], None] | None

#: Dossier states, in order. The labels are the platform's exact wording.
STATE_LABELS = {
    "transmis": "Dossier transmis au service traitant",
    "recu": "Dossier reçu par le service traitant",
    "clos": "Dossier clos",
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packages (
    id           INTEGER PRIMARY KEY,
    received_at  TEXT NOT NULL,
    account      TEXT,
    peer         TEXT,
    upload_name  TEXT,
    size         INTEGER,
    sha256       TEXT NOT NULL,
    message_id   TEXT,
    numero       TEXT,
    demarche     TEXT,
    insee        TEXT,
    outcome      TEXT NOT NULL CHECK (outcome IN ('accepted', 'duplicate', 'rejected')),
    reason       TEXT,
    detail       TEXT,
    location     TEXT
);
-- One accepted row per content: a resend can only ever be a 'duplicate'.
CREATE UNIQUE INDEX IF NOT EXISTS packages_accepted_sha256 ON packages(sha256) WHERE outcome = 'accepted';
CREATE INDEX IF NOT EXISTS packages_message_id ON packages(message_id);
CREATE INDEX IF NOT EXISTS packages_numero ON packages(numero);

CREATE TABLE IF NOT EXISTS dossiers (
    numero        TEXT PRIMARY KEY,
    demarche      TEXT NOT NULL,
    insee         TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('transmis', 'recu', 'clos')),
    deposited_at  TEXT,
    received_at   TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    inbox_path    TEXT,
    archive_path  TEXT,
    routing       TEXT,
    requested_state TEXT CHECK (requested_state IN ('recu', 'clos')),
    scrubbed_at   TEXT
);

CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    at      TEXT NOT NULL,
    numero  TEXT,
    kind    TEXT NOT NULL,
    detail  TEXT
);
CREATE INDEX IF NOT EXISTS events_numero ON events(numero);

-- What goes back to the platform. A row exists before anything is sent (contract 5).
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    created_at      TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('AVL', 'ANL', 'Retour')),
    numero          TEXT,
    queue_key       TEXT NOT NULL,
    target_state    TEXT CHECK (target_state IN ('recu', 'clos')),
    message_id      TEXT NOT NULL UNIQUE,
    ref_message_id  TEXT,
    remote_name     TEXT NOT NULL UNIQUE,
    payload         TEXT NOT NULL,
    size            INTEGER NOT NULL,
    sha256          TEXT NOT NULL,
    source_sha256   TEXT,
    source          TEXT,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'purged')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error_code TEXT,
    last_error      TEXT,
    delivered_at    TEXT
);
CREATE INDEX IF NOT EXISTS outbox_status ON outbox(status, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_queue ON outbox(queue_key, id);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_source ON outbox(source_sha256) WHERE source_sha256 IS NOT NULL;
"""

# Columns added after the first release: an older ledger gains them at open.
_MIGRATIONS = {
    "dossiers": {
        "routing": "TEXT",
        "requested_state": "TEXT CHECK (requested_state IN ('recu', 'clos'))",
        "scrubbed_at": "TEXT",  # set by retention once the dossier's personal data has left the ledger
    },
    # An ack is recorded with its package in one transaction, its bytes in the row; the file comes after.
    "outbox": {"payload_data": "BLOB"},
}


def utcnow() -> str:
    """Now, as the ledger stores times: ISO 8601 in UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class PackageRecord:
    """What intake tells the ledger about one received package."""

    sha256: str
    size: int
    account: str | None = None
    peer: str | None = None
    upload_name: str | None = None
    message_id: str | None = None
    numero: str | None = None
    demarche: str | None = None
    insee: str | None = None


class DuplicatePackage(Exception):
    """Another worker accepted the same content first."""


class Ledger:
    """A handle on the ledger file. Safe to share between threads of one process."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._db.executescript(_SCHEMA)
            for table, columns in _MIGRATIONS.items():
                have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A short write transaction, taken at once so workers queue instead of deadlocking."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run a read query."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- packages -------------------------------------------------------------------

    def accepted_by_sha256(self, sha256: str) -> sqlite3.Row | None:
        """The accepted package with this content, if any."""
        rows = self.query("SELECT * FROM packages WHERE sha256 = ? AND outcome = 'accepted'", (sha256,))
        return rows[0] if rows else None

    def conflicting(self, message_id: str, numero: str, sha256: str) -> sqlite3.Row | None:
        """An accepted package with the same MessageId or dossier number but other content."""
        rows = self.query(
            "SELECT * FROM packages WHERE outcome = 'accepted' AND sha256 != ? AND (message_id = ? OR numero = ?)",
            (sha256, message_id, numero),
        )
        return rows[0] if rows else None

    def record_accepted(
        self, rec: PackageRecord, *, deposited_at: str | None, inbox_path: str, archive_path: str,
        routing: str | None = None, also: Also = None,
    ) -> None:
        """Record an accepted package and its dossier (state "transmis") in one transaction.

        ``also`` runs in that transaction (the ack it owes). Raises :class:`DuplicatePackage`
        when the same content was accepted meanwhile.
        """
        now = utcnow()
        try:
            with self.transaction() as db:
                self._insert_package(db, rec, "accepted", location=inbox_path, at=now)
                db.execute(
                    "INSERT INTO dossiers (numero, demarche, insee, state, deposited_at, received_at, updated_at,"
                    " message_id, sha256, inbox_path, archive_path, routing)"
                    " VALUES (?, ?, ?, 'transmis', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.numero, rec.demarche, rec.insee, deposited_at, now, now, rec.message_id, rec.sha256,
                     inbox_path, archive_path, routing),
                )
                self._event(db, rec.numero, "received", f"handed over to {inbox_path}", at=now)
                if also is not None:
                    also(db)
        except sqlite3.IntegrityError as exc:
            raise DuplicatePackage(str(exc)) from None

    def record_duplicate(self, rec: PackageRecord, *, location: str | None, also: Also = None) -> None:
        """Record a resend of content that was already accepted; ``also`` runs in the same transaction."""
        now = utcnow()
        with self.transaction() as db:
            self._insert_package(db, rec, "duplicate", location=location, at=now)
            self._event(db, rec.numero, "resent", "same content received again; no second hand-over", at=now)
            if also is not None:
                also(db)

    def record_rejected(self, rec: PackageRecord, *, reason: str, detail: str, location: str, also: Also = None) -> None:
        """Record a refused package and where it was quarantined; ``also`` runs in the same transaction."""
        now = utcnow()
        with self.transaction() as db:
            self._insert_package(db, rec, "rejected", location=location, at=now, reason=reason, detail=detail)
            self._event(db, rec.numero, "rejected", f"{reason}: {detail}", at=now)
            if also is not None:
                also(db)

    def packages(self, numero: str | None = None) -> list[sqlite3.Row]:
        """Every package row, oldest first, optionally for one dossier."""
        if numero is None:
            return self.query("SELECT * FROM packages ORDER BY id")
        return self.query("SELECT * FROM packages WHERE numero = ? ORDER BY id", (numero,))

    # -- dossiers -------------------------------------------------------------------

    def dossier(self, numero: str) -> sqlite3.Row | None:
        """The dossier with this number, if the relay has received it."""
        rows = self.query("SELECT * FROM dossiers WHERE numero = ?", (numero,))
        return rows[0] if rows else None

    def events(self, numero: str) -> list[sqlite3.Row]:
        """A dossier's history, oldest first."""
        return self.query("SELECT * FROM events WHERE numero = ? ORDER BY id", (numero,))

    def record_event(self, numero: str | None, kind: str, detail: str) -> None:
        """Add one step to a dossier's history (or to the relay's, without a number)."""
        with self.transaction() as db:
            self._event(db, numero, kind, detail, at=utcnow())

    # -- internals ------------------------------------------------------------------

    @staticmethod
    def _insert_package(
        db: sqlite3.Connection, rec: PackageRecord, outcome: str, *, location: str | None, at: str,
        reason: str | None = None, detail: str | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO packages (received_at, account, peer, upload_name, size, sha256, message_id, numero,"
            " demarche, insee, outcome, reason, detail, location) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at, rec.account, rec.peer, rec.upload_name, rec.size, rec.sha256, rec.message_id, rec.numero,
             rec.demarche, rec.insee, outcome, reason, detail, location),
        )

    @staticmethod
    def event(db: sqlite3.Connection, numero: str | None, kind: str, detail: str) -> None:
        """Add a history step inside a transaction that the caller holds."""
        Ledger._event(db, numero, kind, detail, at=utcnow())

    @staticmethod
    def _event(db: sqlite3.Connection, numero: str | None, kind: str, detail: str, *, at: str) -> None:
        db.execute("INSERT INTO events (at, numero, kind, detail) VALUES (?, ?, ?, ?)", (at, numero, kind, detail))

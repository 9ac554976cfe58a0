"""The ledger: SQLite in WAL mode, the one memory relayd keeps across restarts.

It records every package received (accepted, duplicate or rejected), every dossier with
its state, the outbox of acks and returns bound for the platform, and an event history. Transactions are short and nothing is held only in
memory, so several worker processes can share one ledger file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from relayd import dossiers

#: a step that runs inside an outcome's own transaction (the outbox entry owing its ack)
Also = Callable[[sqlite3.Connection], None] | None

# The CHECKs name the states that relayd.dossiers defines, so the ledger cannot hold another.
_STATES_SQL = ", ".join(f"'{s}'" for s in dossiers.STATES)
_RETURN_STATES_SQL = ", ".join(f"'{s}'" for s in dossiers.RETURN_STATES)

_SCHEMA = f"""
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
    state         TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
    deposited_at  TEXT,
    received_at   TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    sha256        TEXT NOT NULL,
    inbox_path    TEXT,
    archive_path  TEXT,
    routing       TEXT,
    requested_state TEXT CHECK (requested_state IN ({_RETURN_STATES_SQL})),
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
    target_state    TEXT CHECK (target_state IN ({_RETURN_STATES_SQL})),
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

-- The defender's memory (relayd/inbound/banbook.py). Times are Unix seconds, so that they outlive a restart.
-- A prefix is a network ('203.0.113.7/32', '2001:db8:1:2::/64'); lo and hi are its first and last address as
-- 32 hex digits (IPv4 in the IPv4-mapped range), so that "which ban holds this address" is a range query.
CREATE TABLE IF NOT EXISTS defender_failures (
    id      INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    prefix  TEXT NOT NULL,
    weight  REAL NOT NULL,
    method  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS defender_failures_prefix ON defender_failures(prefix, at);
CREATE INDEX IF NOT EXISTS defender_failures_at ON defender_failures(at);
CREATE TABLE IF NOT EXISTS defender_bans (
    prefix        TEXT PRIMARY KEY,
    lo            TEXT NOT NULL,
    hi            TEXT NOT NULL,
    banned_at     REAL NOT NULL,
    banned_until  REAL NOT NULL,
    bans          INTEGER NOT NULL,
    failures      REAL NOT NULL,
    last_ip       TEXT
);
CREATE INDEX IF NOT EXISTS defender_bans_range ON defender_bans(lo, hi);
CREATE TABLE IF NOT EXISTS defender_logins (
    prefix      TEXT PRIMARY KEY,
    last_login  REAL NOT NULL
);
"""

# Columns added after the first release: an older ledger gains them at open.
_MIGRATIONS = {
    "dossiers": {
        "routing": "TEXT",
        "requested_state": f"TEXT CHECK (requested_state IN ({_RETURN_STATES_SQL}))",
        "scrubbed_at": "TEXT",  # set by retention once the dossier's personal data has left the ledger
    },
    "outbox": {
        # of ``attempts``, those an outage of the return server took: they do not count towards dead-letter
        "outage_attempts": "INTEGER NOT NULL DEFAULT 0",
        # An ack is recorded with its package in one transaction, its bytes in the row; the file comes after.
        "payload_data": "BLOB",
    },
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


#: exit status of ``relayd run`` when the ledger cannot be used as it is (corrupt, or forgotten while storage
#: shows earlier use): an operator must act, so systemd must not restart (sysexits' EX_DATAERR)
EXIT_LEDGER_UNUSABLE = 65
#: exit status when the ledger stayed locked by another process past ``storage.ledger_lock_timeout_seconds``:
#: a restart may succeed (sysexits' EX_TEMPFAIL)
EXIT_LEDGER_LOCKED = 75


class LedgerUnusable(Exception):
    """The ledger cannot be opened; ``message`` is one line for a sysadmin, ``exit_status`` what ``relayd run`` returns."""

    def __init__(self, message: str, exit_status: int = EXIT_LEDGER_UNUSABLE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status


def is_fresh(path: Path) -> bool:
    """Whether opening ``path`` would start an empty ledger: no file, or a 0-byte one (SQLite takes both as new)."""
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


class Ledger:
    """A handle on the ledger file. Safe to share between threads of one process."""

    def __init__(self, path: Path, *, lock_timeout: float = 30.0, on_wait: Callable[[], None] | None = None):
        """Open (or create) the ledger; raise :class:`LedgerUnusable` if it is corrupt or stays locked.

        ``on_wait`` is called once, at once, if another process holds the ledger, before waiting
        up to ``lock_timeout`` seconds for it.
        """
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # No busy wait while opening: a lock held elsewhere must be said at once, not waited out in silence.
        self._db = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        deadline = time.monotonic() + lock_timeout
        waited = False
        while True:
            try:
                self._open()
                break
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    self._db.close()
                    raise _unusable(path, exc) from None
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                if time.monotonic() >= deadline:
                    self._db.close()
                    raise LedgerUnusable(
                        f"the ledger {path} is still locked by another process after {lock_timeout:g} s "
                        "(another relayd, a backup or an sqlite3 shell?); stop it and start relayd again",
                        EXIT_LEDGER_LOCKED) from None
                time.sleep(0.1)
            except sqlite3.DatabaseError as exc:
                self._db.close()
                raise _unusable(path, exc) from None
        self._db.execute("PRAGMA busy_timeout = 30000")

    def _open(self) -> None:
        """Check the file, then bring the schema up to date in a write transaction (so that a lock shows now)."""
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # Outside the write transaction: in WAL mode the check only reads, and holds up no writer of the daemon.
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(_SCHEMA):
                    self._db.execute(statement)
                for table, columns in _MIGRATIONS.items():
                    have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
                    for name, decl in columns.items():
                        if name not in have:
                            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

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
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.numero, rec.demarche, rec.insee, dossiers.TRANSMIS, deposited_at, now, now, rec.message_id, rec.sha256,
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


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def _unusable(path: Path, exc: sqlite3.Error) -> LedgerUnusable:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return LedgerUnusable(
        f"the ledger {path} is corrupt ({first[:200]}); relayd will not start on it. "
        f"Move it aside and run `relayd ledger rebuild -c <config>`, or restore a backup (`relayd ledger backup`)")


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of ``script``, one by one; a ``;`` inside a comment or a string does not end one."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending

"""The outbox: acks and returns bound for the platform, kept in the ledger until delivered.

An entry is the reply package's bytes in ``<storage>/outbox/`` plus a ledger row. The
file is durable before the row exists, and the row exists before anything is sent, so a
crash at any moment loses nothing (contract 5). Entries of one dossier leave in the order
they were queued: an entry waits while an older one of the same dossier is pending or
dead. A failed delivery is retried with exponential backoff, jitter and a cap. An outage of
the server is waited out for ever; a failure retrying cannot mend goes to dead-letter at once,
and one the server keeps giving after too many attempts, or once too old; there an operator
sees it (``relayd outbox list``) and can send it again (``relayd outbox retry``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from relayd.config import Config, Retry
from relayd.events import NO_EVENTS, DeadLetter, Events, ReplyDelivered
from relayd.fsutil import ensure_dir, fsync_dir, publish_file, write_durably
from relayd.ledger import Ledger, utcnow
from relayd.pec.replies import ReplyPackage

log = structlog.get_logger("relayd.outbox")

#: statuses an entry can have; ``pending`` and ``dead`` hold back the dossier's later entries
STATUSES = ("pending", "delivered", "dead", "purged")


@dataclass(frozen=True)
class Entry:
    """One outbox row."""

    id: int
    created_at: str
    kind: str
    numero: str | None
    queue_key: str
    target_state: str | None
    message_id: str
    ref_message_id: str | None
    remote_name: str
    payload: Path
    size: int
    sha256: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error_code: str | None
    last_error: str | None
    delivered_at: str | None
    source: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Entry:
        """Build an entry from its ledger row."""
        fields = {name: row[name] for name in cls.__dataclass_fields__}
        fields["payload"] = Path(row["payload"])
        return cls(**fields)

    def as_dict(self) -> dict[str, object]:
        """The entry as ``relayd outbox list --json`` prints it."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["payload"] = str(self.payload)
        out["next_attempt_at"] = datetime.fromtimestamp(self.next_attempt_at, UTC).isoformat(timespec="seconds")
        return out


@dataclass(frozen=True)
class Queued:
    """What to record with a new entry, besides the package itself."""

    kind: str
    numero: str | None
    ref_message_id: str | None = None
    target_state: str | None = None
    #: sha256 of the drop a return was made from: the same drop twice is queued once
    source_sha256: str | None = None
    #: where the entry came from, for people (a drop's name, or "intake")
    source: str | None = None


class Outbox:
    """Queue, schedule and settle deliveries. Safe to share between threads."""

    def __init__(self, ledger: Ledger, folder: Path, archive: Path, retry: Retry,
                 *, clock: Callable[[], float] = time.time, on_enqueue: Callable[[], None] | None = None,
                 events: Events = NO_EVENTS):
        self.ledger = ledger
        self.events = events
        self.folder = folder
        self.archive = archive
        self.retry = retry
        self.clock = clock
        #: called after an entry is committed, from whichever thread queued it (wakes the worker)
        self.on_enqueue = on_enqueue

    @classmethod
    def from_config(cls, ledger: Ledger, config: Config) -> Outbox:
        """The outbox in the configured storage, with the return server's retry policy."""
        return cls(ledger, config.storage.outbox, config.storage.archive / "sent", _retry_policy(config))

    def reconfigure(self, config: Config) -> None:
        """Take the retry policy of a reloaded configuration; it applies from the next failed attempt."""
        self.retry = _retry_policy(config)

    # -- queueing --------------------------------------------------------------------

    def enqueue(self, reply: ReplyPackage, queued: Queued,
                also: Callable[[sqlite3.Connection], None] | None = None) -> Entry:
        """Make ``reply`` durable, then record it; ``also`` runs in the same transaction.

        Raises :class:`sqlite3.IntegrityError` when an entry with the same ``source_sha256``
        exists: the caller asked to queue the same drop twice.
        """
        ensure_dir(self.folder, 0o700)
        payload = self.folder / reply.name
        write_durably(payload, reply.data, mode=0o600)
        now = self.clock()
        key = queued.numero or f"message:{reply.message_id}"
        try:
            with self.ledger.transaction() as db:
                cursor = db.execute(
                    "INSERT INTO outbox (created_at, kind, numero, queue_key, target_state, message_id, ref_message_id,"
                    " remote_name, payload, size, sha256, source_sha256, source, status, attempts, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?)",
                    (_iso(now), queued.kind, queued.numero, key, queued.target_state, reply.message_id,
                     queued.ref_message_id, reply.name, str(payload), len(reply.data), hashlib.sha256(reply.data).hexdigest(),
                     queued.source_sha256, queued.source, now),
                )
                entry_id = cursor.lastrowid
                what = queued.kind if queued.target_state is None else f"Retour {queued.target_state}"
                Ledger.event(db, queued.numero, "queued", f"{what} queued as outbox #{entry_id} ({reply.name})")
                if also is not None:
                    also(db)
        except BaseException:
            payload.unlink(missing_ok=True)
            raise
        log.info("outbox.queued", id=entry_id, kind=queued.kind, numero=queued.numero, state=queued.target_state,
                 remote_name=reply.name, size=len(reply.data))
        if self.on_enqueue is not None:
            self.on_enqueue()
        return self.get(entry_id)

    def pending_ack(self, kind: str, ref_message_id: str) -> Entry | None:
        """A not-yet-delivered ack of this kind for this incoming message, if one waits."""
        rows = self.ledger.query(
            "SELECT * FROM outbox WHERE kind = ? AND ref_message_id = ? AND status = 'pending' ORDER BY id LIMIT 1",
            (kind, ref_message_id),
        )
        return Entry.from_row(rows[0]) if rows else None

    def by_source(self, source_sha256: str) -> Entry | None:
        """The entry queued from a drop with this content, if any."""
        rows = self.ledger.query("SELECT * FROM outbox WHERE source_sha256 = ?", (source_sha256,))
        return Entry.from_row(rows[0]) if rows else None

    # -- scheduling ------------------------------------------------------------------

    def due(self, limit: int = 100) -> list[Entry]:
        """Pending entries whose time has come and that no older entry of their dossier holds back."""
        rows = self.ledger.query(
            "SELECT * FROM outbox o WHERE status = 'pending' AND next_attempt_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.queue_key = o.queue_key AND p.id < o.id"
            "                 AND p.status IN ('pending', 'dead'))"
            " ORDER BY next_attempt_at, id LIMIT ?",
            (self.clock(), limit),
        )
        return [Entry.from_row(r) for r in rows]

    def next_attempt_in(self) -> float | None:
        """Seconds until the earliest pending entry is due (0 if one is), None if nothing is pending."""
        rows = self.ledger.query("SELECT MIN(next_attempt_at) AS t FROM outbox WHERE status = 'pending'")
        if rows[0]["t"] is None:
            return None
        return max(0.0, rows[0]["t"] - self.clock())

    # -- settling --------------------------------------------------------------------

    def delivered(self, entry: Entry) -> None:
        """Record a delivery; a Retour moves its dossier to the state it carried.

        The row changes first and the file moves to the archive after: a crash in between
        leaves the file in the outbox folder, where :meth:`recover` finishes the move.
        """
        archived = self._archive_path(entry)
        now = utcnow()
        with self.ledger.transaction() as db:
            db.execute("UPDATE outbox SET status = 'delivered', delivered_at = ?, payload = ?, attempts = attempts + 1,"
                       " last_error_code = NULL, last_error = NULL WHERE id = ?", (now, str(archived), entry.id))
            if entry.target_state is not None and entry.numero is not None:
                db.execute("UPDATE dossiers SET state = ?, updated_at = ? WHERE numero = ?",
                           (entry.target_state, now, entry.numero))
                Ledger.event(db, entry.numero, f"state_{entry.target_state}",
                             f"Retour delivered as {entry.remote_name}: the platform now shows this state")
            else:
                Ledger.event(db, entry.numero, "delivered", f"{entry.kind} delivered as {entry.remote_name}")
        self._move_to_archive(entry.payload, archived)
        latency = max(0.0, self.clock() - datetime.fromisoformat(entry.created_at).timestamp())
        self.events.publish(ReplyDelivered(kind=entry.kind, numero=entry.numero, latency_seconds=latency))
        log.info("outbox.delivered", id=entry.id, kind=entry.kind, numero=entry.numero, state=entry.target_state,
                 remote_name=entry.remote_name, attempts=entry.attempts + 1)

    def failed(self, entry: Entry, code: str, message: str, *, permanent: bool = False, outage: bool = False) -> Entry:
        """Record a failed attempt: schedule the next one, or send the entry to dead-letter.

        ``permanent`` failures (retrying cannot help) go to dead-letter at once. An ``outage``
        (the server out of reach) says nothing about the entry: it waits, however long, with the
        capped backoff. Other failures go to dead-letter after ``max_attempts`` or ``max_age_hours``,
        counted without the attempts and the time an outage took: a server back from three days
        away with a full disk gets the whole budget again.
        """
        attempts = entry.attempts + 1
        now = self.clock()
        with self.ledger.transaction() as db:
            waited = db.execute("SELECT outage_attempts FROM outbox WHERE id = ?", (entry.id,)).fetchone()
            outages = (waited["outage_attempts"] if waited else 0) + (1 if outage else 0)
            age_hours = (now - datetime.fromisoformat(entry.created_at).timestamp()) / 3600
            worn_out = attempts - outages >= self.retry.max_attempts or (
                outages == 0 and age_hours >= self.retry.max_age_hours)
            dead = permanent or (worn_out and not outage)
            next_at = now if dead else now + self.backoff(attempts)
            db.execute("UPDATE outbox SET status = ?, attempts = ?, outage_attempts = ?, next_attempt_at = ?,"
                       " last_error_code = ?, last_error = ? WHERE id = ? AND status = 'pending'",
                       ("dead" if dead else "pending", attempts, outages, next_at, code, message, entry.id))
            if dead:
                Ledger.event(db, entry.numero, "dead_letter",
                             f"{entry.kind} #{entry.id} gave up after {attempts} attempts: {code}: {message}")
        if dead:
            log.error("outbox.dead_letter", id=entry.id, kind=entry.kind, numero=entry.numero, attempts=attempts,
                      code=code, error=message)
            self.events.publish(DeadLetter(entry_id=entry.id, kind=entry.kind, numero=entry.numero, attempts=attempts,
                                           error_code=code, error=message))
        else:
            log.warning("outbox.retry_later", id=entry.id, kind=entry.kind, numero=entry.numero, attempts=attempts,
                        code=code, error=message, retry_in=round(next_at - now, 1))
        return self.get(entry.id)

    def backoff(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failure: exponential, jittered, capped."""
        base = self.retry.initial_seconds * self.retry.factor ** max(0, attempts - 1)
        jittered = base * (1 + random.uniform(-self.retry.jitter, self.retry.jitter))
        return min(self.retry.max_seconds, jittered)

    # -- operator commands -----------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """How many entries are in each status (pending, delivered, dead, purged)."""
        rows = self.ledger.query("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    def get(self, entry_id: int) -> Entry:
        """One entry by id. Raises KeyError."""
        rows = self.ledger.query("SELECT * FROM outbox WHERE id = ?", (entry_id,))
        if not rows:
            raise KeyError(entry_id)
        return Entry.from_row(rows[0])

    def entries(self, statuses: Iterable[str] = ("pending", "dead")) -> list[Entry]:
        """Entries with these statuses, oldest first."""
        wanted = tuple(statuses)
        marks = ",".join("?" * len(wanted))
        rows = self.ledger.query(f"SELECT * FROM outbox WHERE status IN ({marks}) ORDER BY id", wanted)
        return [Entry.from_row(r) for r in rows]

    def retry_now(self, ids: Iterable[int]) -> list[Entry]:
        """Make these pending or dead entries due now, with a fresh attempt budget."""
        changed = []
        with self.ledger.transaction() as db:
            for entry_id in ids:
                cursor = db.execute(
                    "UPDATE outbox SET status = 'pending', attempts = 0, outage_attempts = 0, next_attempt_at = ?,"
                    " created_at = ?"
                    " WHERE id = ? AND status IN ('pending', 'dead')", (self.clock(), _iso(self.clock()), entry_id))
                if cursor.rowcount:
                    changed.append(entry_id)
                    numero = db.execute("SELECT numero FROM outbox WHERE id = ?", (entry_id,)).fetchone()["numero"]
                    Ledger.event(db, numero, "retry", f"outbox #{entry_id} sent again by an operator")
        if changed and self.on_enqueue is not None:
            self.on_enqueue()
        return [self.get(i) for i in changed]

    def purge(self, ids: Iterable[int]) -> list[Entry]:
        """Give up on these dead entries for good. Their files stay in the archive."""
        purged = []
        for entry_id in ids:
            try:
                entry = self.get(entry_id)
            except KeyError:
                continue
            if entry.status != "dead":
                continue
            archived = self._archive_path(entry)
            with self.ledger.transaction() as db:
                db.execute("UPDATE outbox SET status = 'purged', payload = ? WHERE id = ? AND status = 'dead'",
                           (str(archived), entry_id))
                Ledger.event(db, entry.numero, "purged", f"outbox #{entry_id} abandoned by an operator")
                if entry.target_state is not None:
                    # The abandoned state will never reach the platform: the next return must carry it again.
                    latest = db.execute(
                        "SELECT target_state FROM outbox WHERE numero = ? AND kind = 'Retour' AND status != 'purged'"
                        " ORDER BY id DESC LIMIT 1", (entry.numero,)).fetchone()
                    db.execute("UPDATE dossiers SET requested_state = ? WHERE numero = ?",
                               (latest["target_state"] if latest else None, entry.numero))
            self._move_to_archive(entry.payload, archived)
            purged.append(self.get(entry_id))
        return purged

    def recover(self) -> None:
        """Tidy the outbox folder after a crash; call before the worker starts.

        A file that a settled row (delivered or purged) names in the archive finishes its
        move there; a file that no row names (a crash between the file and its row) goes.
        """
        if not self.folder.is_dir():
            return
        waiting = {r["payload"] for r in self.ledger.query("SELECT payload FROM outbox WHERE status IN ('pending', 'dead')")}
        settled = {Path(r["payload"]).name: Path(r["payload"]) for r in self.ledger.query(
            "SELECT payload FROM outbox WHERE status IN ('delivered', 'purged')")}
        for path in self.folder.iterdir():
            if not path.is_file() or str(path) in waiting:
                continue
            archived = settled.get(path.name)
            if archived is not None and not archived.exists():
                log.info("outbox.archive_finished", file=path.name)
                self._move_to_archive(path, archived)
            else:
                log.warning("outbox.orphan_removed", file=path.name)
                path.unlink()

    def _archive_path(self, entry: Entry) -> Path:
        """Where a settled entry's file is kept: ``archive/sent/YYYY/MM``."""
        if entry.payload.parent != self.folder:
            return entry.payload
        return self.archive / datetime.now(UTC).strftime("%Y/%m") / entry.payload.name

    def _move_to_archive(self, payload: Path, archived: Path) -> None:
        if payload == archived or not payload.exists():
            return
        ensure_dir(archived.parent, 0o700)
        try:
            # The payload was fsynced when it was queued, and recover() finishes a move a crash
            # interrupts: a rename and the archive folder's fsync are all that is needed here.
            os.replace(payload, archived)
            fsync_dir(archived.parent)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            publish_file(payload, archived, mode=0o600, move=True)


def _retry_policy(config: Config) -> Retry:
    return config.platform.retry if config.platform is not None else Retry()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")

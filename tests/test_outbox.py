"""The outbox on its own: durability before sending, per-dossier order, backoff, dead-letter and operator commands.

These run in-process on a real ledger file, with a clock the test moves. Deliveries over
the wire are in ``test_return_path.py``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relayd.config import Retry
from relayd.ledger import Ledger
from relayd.outbound.outbox import Outbox, Queued
from relayd.pec.replies import ReplyPackage


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def outbox(tmp_path: Path, clock: Clock) -> Outbox:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    retry = Retry(initial_seconds=10, factor=2, max_seconds=60, jitter=0.2, max_attempts=5, max_age_hours=24)
    yield Outbox(ledger, tmp_path / "outbox", tmp_path / "archive", retry, clock=clock)
    ledger.close()


def reply(n: int) -> ReplyPackage:
    return ReplyPackage(message_id=f"M{n}", name=f"reply-{n}.zip", kind="Retour", data=f"package {n}".encode())


def test_the_file_is_durable_before_the_row_and_the_row_before_any_send(outbox):
    entry = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    assert entry.payload.read_bytes() == b"package 1"
    assert entry.status == "pending" and entry.attempts == 0
    assert [e.id for e in outbox.due()] == [entry.id]


def test_a_failed_transaction_leaves_no_file(outbox):
    def boom(db: sqlite3.Connection) -> None:
        raise RuntimeError("the caller's own check failed")

    with pytest.raises(RuntimeError):
        outbox.enqueue(reply(1), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="recu"), also=boom)
    assert outbox.entries(("pending", "dead", "delivered")) == []
    assert list(outbox.folder.iterdir()) == []


def test_the_same_drop_is_queued_once(outbox):
    outbox.enqueue(reply(1), Queued(kind="Retour", numero="A-1-AAAAAAAA", source_sha256="abc"))
    with pytest.raises(sqlite3.IntegrityError):
        outbox.enqueue(reply(2), Queued(kind="Retour", numero="A-1-AAAAAAAA", source_sha256="abc"))
    assert outbox.by_source("abc").message_id == "M1"


def test_a_dossier_entries_wait_for_the_one_before(outbox, clock):
    first = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    second = outbox.enqueue(reply(2), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="recu"))
    other = outbox.enqueue(reply(3), Queued(kind="AVL", numero="A-1-BBBBBBBB"))
    assert [e.id for e in outbox.due()] == [first.id, other.id]
    outbox.failed(first, "connect_failed", "down")
    # Still held back while the first waits for its retry, even though the second is "due".
    assert [e.id for e in outbox.due()] == [other.id]
    clock.now += 60
    assert sorted(e.id for e in outbox.due()) == [first.id, other.id]
    outbox.delivered(outbox.get(first.id))
    assert second.id in [e.id for e in outbox.due()]


def test_backoff_grows_with_jitter_up_to_the_cap(outbox):
    waits = {n: [outbox.backoff(n) for _ in range(200)] for n in (1, 2, 3, 6, 20)}
    assert all(8 <= w <= 12 for w in waits[1])
    assert all(16 <= w <= 24 for w in waits[2])
    assert all(32 <= w <= 48 for w in waits[3])
    assert all(w <= 60 for w in waits[6] + waits[20])
    assert len(set(waits[1])) > 100  # jittered, not a fixed step


def test_dead_letter_after_max_attempts_then_retry_and_purge(outbox, clock):
    entry = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    for _ in range(5):
        clock.now += 120
        entry = outbox.failed(outbox.due()[0], "connect_failed", "the server is down")
    assert entry.status == "dead" and entry.attempts == 5
    assert outbox.due() == []
    (revived,) = outbox.retry_now([entry.id])
    assert revived.status == "pending" and revived.attempts == 0
    assert [e.id for e in outbox.due()] == [entry.id]
    # Purge only takes dead entries.
    assert outbox.purge([entry.id]) == []
    for _ in range(5):
        clock.now += 120
        outbox.failed(outbox.due()[0], "connect_failed", "still down")
    (purged,) = outbox.purge([entry.id])
    assert purged.status == "purged" and purged.payload.read_bytes() == b"package 1"
    assert purged.payload.parent != outbox.folder


def test_dead_letter_by_age(outbox, clock):
    entry = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    clock.now += 25 * 3600
    assert outbox.failed(entry, "timeout", "no answer").status == "dead"


def test_a_dead_entry_holds_back_its_dossier_until_purged(outbox, clock):
    first = outbox.enqueue(reply(1), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="recu"))
    second = outbox.enqueue(reply(2), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="clos"))
    clock.now += 25 * 3600
    outbox.failed(first, "remote_error", "permission denied")
    assert outbox.due() == []
    outbox.purge([first.id])
    assert [e.id for e in outbox.due()] == [second.id]


def test_delivered_archives_the_payload_and_advances_the_dossier(outbox, tmp_path):
    ledger = outbox.ledger
    with ledger.transaction() as db:
        db.execute("INSERT INTO dossiers (numero, demarche, insee, state, received_at, updated_at, message_id, sha256)"
                   " VALUES ('A-1-AAAAAAAA', 'recensementCitoyen', '90017', 'transmis', 'x', 'x', 'M0', 'x')")
    entry = outbox.enqueue(reply(1), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="recu"))
    outbox.delivered(entry)
    done = outbox.get(entry.id)
    assert done.status == "delivered" and done.delivered_at
    assert not entry.payload.exists() and done.payload.read_bytes() == b"package 1"
    assert ledger.dossier("A-1-AAAAAAAA")["state"] == "recu"
    assert "state_recu" in [e["kind"] for e in ledger.events("A-1-AAAAAAAA")]


def test_recover_removes_orphans_and_finishes_archiving(outbox):
    waiting = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    sent = outbox.enqueue(reply(2), Queued(kind="AVL", numero="A-1-BBBBBBBB"))
    orphan = outbox.folder / "crashed-before-its-row.zip"
    orphan.write_bytes(b"x")
    # A crash after the row said "delivered" and before the file moved to the archive:
    with outbox.ledger.transaction() as db:
        db.execute("UPDATE outbox SET status = 'delivered', payload = ? WHERE id = ?",
                   (str(outbox._archive_path(sent)), sent.id))
    outbox.recover()
    assert not orphan.exists()
    assert waiting.payload.exists()
    assert outbox.get(sent.id).payload.read_bytes() == b"package 2"
    assert sorted(p.name for p in outbox.folder.iterdir()) == [waiting.payload.name]


def test_a_permanent_failure_goes_to_dead_letter_at_once(outbox):
    entry = outbox.enqueue(reply(1), Queued(kind="AVL", numero="A-1-AAAAAAAA"))
    assert outbox.failed(entry, "payload_missing", "gone", permanent=True).status == "dead"


def test_purging_a_return_gives_its_state_back(outbox, clock):
    ledger = outbox.ledger
    with ledger.transaction() as db:
        db.execute("INSERT INTO dossiers (numero, demarche, insee, state, received_at, updated_at, message_id, sha256,"
                   " requested_state) VALUES ('A-1-AAAAAAAA', 'recensementCitoyen', '90017', 'transmis', 'x', 'x', 'M0', 'x', 'recu')")
    entry = outbox.enqueue(reply(1), Queued(kind="Retour", numero="A-1-AAAAAAAA", target_state="recu"))
    clock.now += 25 * 3600
    outbox.failed(entry, "remote_error", "refused by the server")
    outbox.purge([entry.id])
    # "reçu" never reached the platform, so the business software may send it again.
    assert ledger.dossier("A-1-AAAAAAAA")["requested_state"] is None


def test_a_ledger_from_the_first_release_gains_the_new_columns(tmp_path):
    import sqlite3 as sql

    path = tmp_path / "old.sqlite"
    db = sql.connect(path)
    db.executescript("""
        CREATE TABLE dossiers (numero TEXT PRIMARY KEY, demarche TEXT NOT NULL, insee TEXT NOT NULL,
            state TEXT NOT NULL, deposited_at TEXT, received_at TEXT NOT NULL, updated_at TEXT NOT NULL,
            message_id TEXT NOT NULL, sha256 TEXT NOT NULL, inbox_path TEXT, archive_path TEXT);
        INSERT INTO dossiers VALUES ('A-1-AAAAAAAA', 'recensementCitoyen', '90017', 'transmis', NULL, 'x', 'x', 'M0', 'x', NULL, NULL);
    """)
    db.close()
    ledger = Ledger(path)
    try:
        row = ledger.dossier("A-1-AAAAAAAA")
        assert row["routing"] is None and row["requested_state"] is None
        assert ledger.query("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 0
    finally:
        ledger.close()

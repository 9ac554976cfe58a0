"""The ledger at start (forgotten, corrupt, locked) and `relayd ledger check | backup | rebuild`, on a real relay."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import sftp_put, wait_for

from relayd.ledger import EXIT_LEDGER_LOCKED, EXIT_LEDGER_UNUSABLE
from relayd.testkit.samples import SampleSpec, build_package, package_filename

NUMERO = "A-9-LEDGER01"


def package(relay, numero: str = NUMERO):
    """A generated package for commune 90017, written next to the relay."""
    spec = SampleSpec(numero=numero, demarche="recensementCitoyen", insee="90017")
    path = relay.root / package_filename(spec)
    path.write_bytes(build_package(spec))
    return path


def used_relay(make_relay, **overrides):
    """A relay that has received one package and was stopped cleanly."""
    relay = make_relay(**overrides)
    path = package(relay)
    assert sftp_put(relay, path, path.name).returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT * FROM dossiers"), what="the dossier recorded")
    relay.stop()
    return relay


def refused_start(relay) -> tuple[int, str]:
    """Start the relay, expect it to refuse; its exit status and the line it wrote for the sysadmin."""
    with pytest.raises(RuntimeError):
        relay.start()
    text = relay.log_text()
    assert "Traceback" not in text, text
    # Off a terminal the line carries the journal's error priority (<3>), as every failed start does.
    lines = [line.removeprefix("<3>") for line in text.splitlines() if line.startswith("<3>relayd: ")]
    assert len(lines) == 1, text
    return relay.proc.returncode, lines[0]


def forget(relay, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        relay.ledger_path.with_name(relay.ledger_path.name + suffix).unlink(missing_ok=True)
    if how == "deleted":
        relay.ledger_path.unlink()
    else:
        relay.ledger_path.write_bytes(b"")


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_forgotten_ledger_with_an_archive_is_refused_with_the_way_out(make_relay, how):
    relay = used_relay(make_relay)
    forget(relay, how)
    status, line = refused_start(relay)
    assert status == EXIT_LEDGER_UNUSABLE
    assert "relayd ledger rebuild" in line and "archive" in line
    assert ("missing" if how == "deleted" else "empty") in line


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_ledger_is_one_line_and_the_no_restart_status(make_relay, damage):
    relay = used_relay(make_relay)
    data = relay.ledger_path.read_bytes()
    if damage == "garbage":
        relay.ledger_path.write_bytes(b"this is not a database, it was overwritten\n" * 200)
    else:
        relay.ledger_path.write_bytes(data[: len(data) // 2])
    status, line = refused_start(relay)
    assert status == EXIT_LEDGER_UNUSABLE
    assert "corrupt" in line and "relayd ledger rebuild" in line
    check = relay.cli("ledger", "check")
    assert check.returncode == EXIT_LEDGER_UNUSABLE and "SQLite" in check.stderr


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.readline()
    db.execute("COMMIT")
""")


@pytest.fixture
def lock_holder():
    """Hold a ledger's write lock in another process until told to let go."""
    procs: list[subprocess.Popen] = []

    def hold(path):
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


def test_a_locked_ledger_is_said_at_once_then_given_up(make_relay, lock_holder):
    relay = used_relay(make_relay, storage={"root": "var", "ledger_lock_timeout_seconds": 1.5})
    lock_holder(relay.ledger_path)
    status, line = refused_start(relay)
    assert status == EXIT_LEDGER_LOCKED
    assert "still locked by another process after 1.5 s" in line
    assert [e for e in relay.events() if e.get("event") == "ledger.locked_waiting"]


def test_a_ledger_released_while_relayd_waits_lets_it_start(make_relay, lock_holder):
    relay = used_relay(make_relay, storage={"root": "var", "ledger_lock_timeout_seconds": 60})
    holder = lock_holder(relay.ledger_path)
    proc_started = time.monotonic()
    starter = threading.Thread(target=relay.start, kwargs={"timeout": 60})
    starter.start()
    wait_for(lambda: any(e.get("event") == "ledger.locked_waiting" for e in relay.events()), timeout=20,
             what="the waiting message")
    assert time.monotonic() - proc_started < 20
    holder.stdin.write("\n")
    holder.stdin.flush()
    starter.join(timeout=60)
    assert relay.proc.poll() is None
    assert relay.cli("status", "--json").returncode == 0


def test_check_passes_on_a_sound_ledger_and_names_a_missing_archive_file(make_relay):
    relay = used_relay(make_relay)
    ok = relay.cli("ledger", "check")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    (archived,) = [r["archive_path"] for r in relay.ledger_rows("SELECT archive_path FROM dossiers")]
    os.unlink(archived)
    bad = relay.cli("ledger", "check")
    assert bad.returncode == 1
    assert NUMERO in bad.stderr and archived in bad.stderr


def test_backup_while_the_relay_runs_and_receives(make_relay, tmp_path):
    relay = make_relay()
    numeros = [f"A-1-BACKUP{i:02d}" for i in range(6)]
    files = [package(relay, numero) for numero in numeros]
    def push_all() -> None:
        for path in files:
            assert sftp_put(relay, path, path.name).returncode == 0

    thread = threading.Thread(target=push_all)
    thread.start()
    copies = []
    while thread.is_alive() or not copies:
        copy = tmp_path / f"backup-{len(copies)}.sqlite"
        result = relay.cli("ledger", "backup", str(copy))
        assert result.returncode == 0, result.stderr
        copies.append(copy)
    thread.join()
    wait_for(lambda: len(relay.ledger_rows("SELECT * FROM dossiers")) == 6, what="six dossiers")
    final = tmp_path / "final.sqlite"
    assert relay.cli("ledger", "backup", str(final)).returncode == 0
    for copy in [*copies, final]:
        db = sqlite3.connect(copy)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
    db = sqlite3.connect(final)
    assert {r[0] for r in db.execute("SELECT numero FROM dossiers")} == set(numeros)
    db.close()
    assert relay.proc.poll() is None


def test_rebuild_from_the_archive_keeps_duplicates_and_dossiers(make_relay):
    relay = used_relay(make_relay)
    before = relay.ledger_rows("SELECT numero, demarche, insee, message_id, sha256, state FROM dossiers")
    forget(relay, "deleted")
    result = relay.cli("ledger", "rebuild")
    assert result.returncode == 0, result.stderr
    assert "1 dossier(s)" in result.stdout
    assert relay.ledger_rows("SELECT numero, demarche, insee, message_id, sha256, state FROM dossiers") == before
    relay.start()
    inbox_before = sorted(p.name for p in relay.inbox("90017").iterdir())
    # The platform sends the same package again: it is a duplicate, not a second hand-over.
    path = package(relay)
    assert sftp_put(relay, path, path.name).returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT * FROM packages WHERE outcome = 'duplicate'"), what="the duplicate")
    assert sorted(p.name for p in relay.inbox("90017").iterdir()) == inbox_before
    status = relay.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["counts"]
    assert [(c["insee"], c["demarche"], c["state"], c["count"]) for c in counts] == [("90017", "recensementCitoyen", "transmis", 1)]


def test_rebuild_keeps_a_ledger_that_still_opens_unless_forced(make_relay):
    relay = used_relay(make_relay)
    refused = relay.cli("ledger", "rebuild")
    assert refused.returncode == 1 and "--force" in refused.stderr
    forced = relay.cli("ledger", "rebuild", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "kept as" in forced.stdout
    assert list(relay.ledger_path.parent.glob("ledger.sqlite.replaced-*"))

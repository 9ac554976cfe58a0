"""`relayd status`: the 30-day deadline as an operator (and a monitoring probe) sees it.

A real relayd receives the real package over OpenSSH sftp; the commune's side moves the dossier
with `relayd return`, and a real OpenSSH sshd plays the platform that receives the returns. The
clock is moved with `--now`, as an operator asks "what will be overdue on date X".
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from conftest import REAL_PACKAGE, sftp_put, wait_for
from platform_sshd import platform_sshd_fixture  # noqa: F401 - registers the fixture

REAL_NUMERO = "A-9-X3UGO4V7"
FAST_RETRY = {"initial_seconds": 0.3, "factor": 2, "max_seconds": 1.0, "jitter": 0.1}


def received_at(relay) -> datetime:
    """When the relay received the real dossier, as its ledger says."""
    wait_for(lambda: relay.ledger_rows("SELECT 1 FROM dossiers WHERE numero = ?", (REAL_NUMERO,)), what="the dossier")
    row = relay.ledger_rows("SELECT received_at FROM dossiers WHERE numero = ?", (REAL_NUMERO,))[0]
    return datetime.fromisoformat(row["received_at"])


def status(relay, *args: str, at: datetime | None = None, expect: int = 0):
    """Run `relayd status` (with `--now` when ``at`` is given) and check its exit status."""
    extra = ["--now", at.isoformat()] if at is not None else []
    result = relay.cli("status", *args, *extra)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout) if "--json" in args else result.stdout


def numeros(items: list[dict]) -> list[str]:
    return [d["numero"] for d in items]


def section(table: str, title: str) -> list[str]:
    """The lines of one section of the table: from its title to the next blank line."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_a_received_dossier_becomes_late_then_overdue(make_relay):
    relay = make_relay()  # no return server: the AVL waits in the outbox
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    received = received_at(relay)

    today = status(relay, "--json")
    assert {"insee": "90017", "commune": "Test 90017", "demarche": "DAUA", "state": "transmis", "count": 1} in today["counts"]
    assert today["open"] == 1
    assert today["late"] == [] and today["overdue"] == []
    assert today["outbox"]["pending"] == 1 and today["outbox"]["dead"] == 0
    assert today["outbox"]["oldest_pending_at"] is not None
    assert today["needs_attention"] is False

    day21 = status(relay, "--json", at=received + timedelta(days=21))
    assert numeros(day21["late"]) == [REAL_NUMERO] and day21["overdue"] == []
    (late,) = day21["late"]
    assert (late["insee"], late["demarche"], late["state"]) == ("90017", "DAUA", "transmis")
    assert abs(late["age_days"] - 21) < 0.01 and abs(late["days_left"] - 9) < 0.01
    assert datetime.fromisoformat(late["deadline"]) == (received + timedelta(days=30)).replace(microsecond=0)
    assert day21["outbox"]["oldest_pending_seconds"] > 20 * 86400  # the AVL has waited as long, by that clock

    # Overdue: monitoring sees exit status 1.
    day31 = status(relay, "--json", at=received + timedelta(days=31), expect=1)
    assert day31["late"] == [] and numeros(day31["overdue"]) == [REAL_NUMERO]
    assert abs(day31["overdue"][0]["days_overdue"] - 1) < 0.01
    assert day31["needs_attention"] is True

    # The same, for people.
    table = status(relay, at=received + timedelta(days=31), expect=1)
    counts = [line.split() for line in table.splitlines() if line.startswith("90017 ")]
    assert counts == [["90017", "Test", "90017", "DAUA", "1", "0", "0"]]
    overdue = section(table, "Overdue")
    assert "(1)" in overdue[0]
    (row,) = [line for line in overdue if REAL_NUMERO in line]
    assert "DAUA" in row and "transmis" in row and row.rstrip().endswith("1.0 over")
    assert section(table, "Late")[0].endswith("(0)")
    assert "Outbox: 1 pending" in table and "0 in dead-letter" in table

    day21_table = status(relay, at=received + timedelta(days=21))
    (row,) = [line for line in section(day21_table, "Late") if REAL_NUMERO in line]
    assert row.split()[-1] == "9.0"  # days left


def test_a_closed_dossier_is_no_longer_late(make_relay, platform_sshd):
    platform = platform_sshd()
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    received = received_at(relay)
    day21 = received + timedelta(days=21)

    # "reçu" is not the end: the dossier still counts against the deadline.
    assert relay.cli("return", REAL_NUMERO, "--state", "recu").returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT state FROM dossiers")[0]["state"] == "recu", what="state recu")
    report = status(relay, "--json", at=day21)
    assert numeros(report["late"]) == [REAL_NUMERO] and report["late"][0]["state"] == "recu"

    assert relay.cli("return", REAL_NUMERO, "--state", "clos", "--comment", "Dossier traité.").returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT state FROM dossiers")[0]["state"] == "clos", what="state clos")
    for moment in (day21, received + timedelta(days=31)):
        report = status(relay, "--json", at=moment)  # exit 0: nothing overdue
        assert report["late"] == [] and report["overdue"] == []
    assert {"insee": "90017", "commune": "Test 90017", "demarche": "DAUA", "state": "clos", "count": 1} in report["counts"]
    assert report["open"] == 0
    assert report["outbox"] == {"pending": 0, "oldest_pending_at": None, "oldest_pending_seconds": None, "dead": 0}
    table = status(relay, at=day21)
    assert REAL_NUMERO not in table
    assert [line.split() for line in table.splitlines() if line.startswith("90017 ")] == [
        ["90017", "Test", "90017", "DAUA", "0", "0", "1"]]


def test_a_dead_letter_makes_status_exit_1(make_relay, platform_sshd):
    platform = platform_sshd()
    # A remote directory that does not exist: no retry mends that, so the AVL goes to dead-letter at once.
    missing = platform.remote_dir.rstrip("/") + "/no-such-dir"
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY, remote_dir=missing))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: [r["status"] for r in relay.outbox()] == ["dead"], what="the AVL in dead-letter")
    report = status(relay, "--json", expect=1)
    assert report["outbox"]["dead"] == 1 and report["overdue"] == [] and report["needs_attention"] is True
    table = status(relay, expect=1)
    assert "1 in dead-letter: see `relayd outbox list`" in table

"""Retention: archive and quarantine purged after their periods, closed dossiers scrubbed, nothing still needed lost.

A real relayd fills its storage the way production does (packages over OpenSSH sftp and
paramiko, broken ones quarantined, refused return drops, returns delivered to a real OpenSSH
sshd); file ages are set with os.utime, or the clock is moved with `--now`; the purge runs
through `relayd retention` and through the daemon's own part.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path

import yaml

from conftest import REAL_PACKAGE, paramiko_put, sftp_put, wait_for
from platform_sshd import platform_sshd_fixture  # noqa: F401 - registers the fixture
from relayd.pec.status import StatusFile, write_status_file
from relayd.testkit.broken import build_broken
from relayd.testkit.samples import SampleSpec, build_package, package_filename

REAL_NUMERO = "A-9-X3UGO4V7"
FAST_RETRY = {"initial_seconds": 0.3, "factor": 2, "max_seconds": 1.0, "jitter": 0.1}
DAY = 86400.0


def age(path: Path, days: float) -> None:
    """Make ``path`` look ``days`` old."""
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def drop_status(relay, numero: str, state: str, name: str, comment: str | None = None) -> None:
    """Play the business software: a status file renamed into the return directory."""
    folder = relay.returns("90017")
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(write_status_file(StatusFile(numero=numero, state=state, comment=comment)))
    tmp.rename(folder / name)


def retention(relay, *args: str, expect: int = 0):
    result = relay.cli("retention", *args)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ledger_dump(relay) -> str:
    db = sqlite3.connect(relay.ledger_path)
    try:
        return "\n".join(db.iterdump())
    finally:
        db.close()


def test_old_files_go_young_ones_stay_and_dry_run_removes_nothing(make_relay, tmp_path):
    relay = make_relay(retention={"archive_days": 30, "quarantine_days": 10})  # no return server: acks wait
    root = relay.root / "var"
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    young_spec = SampleSpec(numero="A-1-RETN0001", demarche="recensementCitoyen", insee="90017")
    young_local = tmp_path / package_filename(young_spec)
    young_local.write_bytes(build_package(young_spec))
    paramiko_put(relay, young_local, young_local.name)
    for i in range(2):
        broken = tmp_path / f"broken-{i}.zip"
        broken.write_bytes(build_broken("xxe", SampleSpec(numero=f"A-1-BRKN000{i}", demarche="recensementCitoyen", insee="90017")))
        assert sftp_put(relay, broken, broken.name).returncode != 0
    for i in range(2):
        drop_status(relay, f"A-1-UNKN000{i}", "recu", f"unknown-{i}.xml")  # refused: never received here
    wait_for(lambda: len(relay.quarantined()) == 2 and len(relay.rejected()) == 2, what="refusals set aside")
    wait_for(lambda: len(relay.outbox()) == 2, what="two AVLs queued")
    relay.stop()  # the command works on the storage whether the daemon runs or not; stopped, nothing else moves

    archived = {p.name: p for p in (root / "archive").rglob("*.zip")}
    old_package = next(p for n, p in archived.items() if n.startswith(REAL_NUMERO))
    young_package = next(p for n, p in archived.items() if n.startswith("A-1-RETN0001"))
    age(old_package, 40)
    age(young_package, 20)
    (q_old, q_young) = relay.quarantined()
    for path in (q_old["_file"], q_old["_file"].with_name(q_old["_file"].name + ".reason.json")):
        age(path, 11)
    age(q_young["_file"], 11)  # its reason file is new: the pair is not old yet
    (r_old, r_young) = relay.rejected()
    for path in (r_old["_file"], r_old["_file"].with_name(r_old["_file"].name + ".reason.json")):
        age(path, 11)
    payloads = [Path(r["payload"]) for r in relay.outbox()]
    for path in payloads:
        age(path, 400)  # pending acks: never removed, however old
    everything = files(root) | files(relay.root / "returns")
    ledger_before = ledger_dump(relay)

    dry = retention(relay, "--dry-run")
    assert files(root) | files(relay.root / "returns") == everything
    assert ledger_dump(relay) == ledger_before
    assert "Dry run: nothing was changed. 5 file(s) to remove" in dry
    assert f"would remove  packages    {old_package}" in dry

    out = retention(relay, "--json")
    result = json.loads(out)
    assert result["removed"]["packages"] == [str(old_package)]
    assert sorted(result["removed"]["quarantine"]) == sorted(
        [str(q_old["_file"]), str(q_old["_file"]) + ".reason.json"])
    assert sorted(result["removed"]["rejected"]) == sorted([str(r_old["_file"]), str(r_old["_file"]) + ".reason.json"])
    gone = {old_package, q_old["_file"], r_old["_file"]}
    assert not any(p.exists() for p in gone)
    assert not q_old["_file"].with_name(q_old["_file"].name + ".reason.json").exists()
    kept = {young_package, q_young["_file"], r_young["_file"], *payloads}
    assert all(p.exists() for p in kept)
    assert [r["status"] for r in relay.outbox()] == ["pending", "pending"]
    # The ledger says what was done, in numbers only.
    (event,) = relay.ledger_rows("SELECT detail FROM events WHERE kind = 'retention'")
    counts = json.loads(event["detail"])
    assert (counts["packages"], counts["quarantine"], counts["rejected"]) == (1, 2, 2)
    assert REAL_NUMERO not in event["detail"] and "unknown" not in event["detail"]

    # Two years on, the pending acks' files are still there; the rest of the archive is not.
    later = (datetime.now().astimezone() + timedelta(days=730)).isoformat()
    retention(relay, "--now", later)
    assert all(p.exists() for p in payloads)
    assert not young_package.exists() and not q_young["_file"].exists() and not r_young["_file"].exists()
    # Month folders emptied by the purge went with their files.
    assert not any(p.is_dir() and not any(p.iterdir()) for p in (root / "quarantine").rglob("*"))
    relay.start()
    assert [r["status"] for r in relay.outbox()] == ["pending", "pending"]


def test_the_package_an_old_open_dossier_routes_from_is_kept(make_relay):
    relay = make_relay(retention={"archive_days": 30})
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT 1 FROM dossiers"), what="the dossier")
    relay.stop()
    db = sqlite3.connect(relay.ledger_path)
    db.execute("UPDATE dossiers SET routing = NULL")  # a ledger from before routing was recorded
    db.commit()
    db.close()
    (archived,) = (relay.root / "var" / "archive").rglob("*.zip")
    age(archived, 40)
    out = retention(relay)
    assert f"kept        in use      {archived}" in out
    assert archived.exists()


def test_a_closed_dossier_is_scrubbed_once_and_keeps_its_reference(make_relay, platform_sshd):
    platform = platform_sshd()
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: [r["status"] for r in relay.outbox()] == ["delivered"], what="the AVL delivered")
    # The business software names its drops after the citizen, and a refused one says more.
    drop_status(relay, REAL_NUMERO, "clos", "Dupont-Jean-clos-trop-tot.xml")
    wait_for(lambda: len(relay.rejected()) == 1, what="the early clos refused")
    drop_status(relay, REAL_NUMERO, "recu", "Dupont-Jean-recu.xml", comment="Pris en charge pour M. Dupont")
    drop_status(relay, REAL_NUMERO, "clos", "Dupont-Jean-clos.xml", comment="Attestation pour M. Dupont")
    wait_for(lambda: relay.ledger_rows("SELECT state FROM dossiers")[0]["state"] == "clos", what="state clos")
    before = relay.ledger_rows("SELECT * FROM dossiers")[0]
    assert before["routing"] and before["scrubbed_at"] is None
    assert "Dupont" in ledger_dump(relay) and "RitaGS" in ledger_dump(relay)
    closed = datetime.fromisoformat(before["updated_at"])

    # 89 days after closing (the default period is 90): nothing yet.
    out = retention(relay, "--now", (closed + timedelta(days=89)).isoformat())
    assert "0 closed dossier(s) scrubbed" in out
    dry = retention(relay, "--dry-run", "--now", (closed + timedelta(days=91)).isoformat())
    assert f"would scrub  dossier  {REAL_NUMERO}" in dry
    assert relay.ledger_rows("SELECT scrubbed_at FROM dossiers")[0]["scrubbed_at"] is None

    out = retention(relay, "--now", (closed + timedelta(days=91)).isoformat())
    assert f"scrubbed  dossier  {REAL_NUMERO}" in out
    after = relay.ledger_rows("SELECT * FROM dossiers")[0]
    reference = ("numero", "demarche", "insee", "state", "deposited_at", "received_at", "updated_at", "message_id",
                 "sha256")
    assert {k: after[k] for k in reference} == {k: before[k] for k in reference}
    assert after["routing"] is None and after["scrubbed_at"] is not None
    # No name the sender or the business software chose, no free text, is left about this dossier.
    dump = ledger_dump(relay)
    assert "Dupont" not in dump and "RitaGS" not in dump
    assert [r["upload_name"] for r in relay.ledger_rows("SELECT upload_name FROM packages")] == [None]
    assert {r["source"] for r in relay.ledger_rows("SELECT source FROM outbox")} == {None}
    history = relay.ledger_rows("SELECT kind, detail FROM events WHERE numero = ? ORDER BY id", (REAL_NUMERO,))
    kinds = [e["kind"] for e in history]
    assert kinds.index("received") < kinds.index("state_recu") < kinds.index("state_clos") < kinds.index("scrubbed")
    assert [e["detail"] for e in history if e["kind"] != "scrubbed"] == [None] * (len(history) - 1)

    # Once only: a later purge leaves it as it is.
    out = retention(relay, "--now", (closed + timedelta(days=200)).isoformat())
    assert "0 closed dossier(s) scrubbed" in out
    assert relay.ledger_rows("SELECT scrubbed_at FROM dossiers")[0]["scrubbed_at"] == after["scrubbed_at"]
    assert [e["kind"] for e in relay.ledger_rows("SELECT kind FROM events")].count("scrubbed") == 1
    # The files keep their own period: the archived package is still there.
    assert after["archive_path"] and Path(after["archive_path"]).exists()

    # The reference still does its job: the same package sent again is recognised, not handed over twice.
    inbox_before = sorted(relay.inbox("90017").iterdir())
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: len(relay.ledger_rows("SELECT 1 FROM packages")) == 2, what="the resend recorded")
    assert [r["outcome"] for r in relay.ledger_rows("SELECT outcome FROM packages ORDER BY id")] == [
        "accepted", "duplicate"]
    assert sorted(relay.inbox("90017").iterdir()) == inbox_before


def test_the_daemon_purges_by_itself_and_follows_a_reload(make_relay, tmp_path):
    relay = make_relay(retention={"quarantine_days": 30, "check_hours": 0.001})  # a purge every 3.6 s
    broken = tmp_path / "broken.zip"
    broken.write_bytes(build_broken("xxe", SampleSpec(numero="A-1-BRKN0009", demarche="recensementCitoyen", insee="90017")))
    assert sftp_put(relay, broken, broken.name).returncode != 0
    wait_for(lambda: len(relay.quarantined()) == 1, what="the package quarantined")
    (entry,) = relay.quarantined()
    pair = [entry["_file"], entry["_file"].with_name(entry["_file"].name + ".reason.json")]
    for path in pair:
        age(path, 2)

    def purges() -> int:
        return sum(e.get("event") == "retention.done" for e in relay.events())

    # Two days old is young for 30 days: a purge runs and keeps it.
    runs = purges()
    wait_for(lambda: purges() > runs, timeout=60, what="a purge by the daemon")
    assert all(p.exists() for p in pair)

    # The period shortened by a reload applies at the next purge.
    relay.config["retention"] = {"quarantine_days": 1, "check_hours": 0.001}
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: not any(p.exists() for p in pair), timeout=60, what="the purge after the reload")

    def done() -> list[dict]:
        return [e for e in relay.events() if e.get("event") == "retention.done" and e.get("quarantine")]

    # The files go first; the purge's summary is logged once it has finished.
    wait_for(done, timeout=30, what="the purge's retention.done")
    assert done()[-1]["quarantine"] == 2
    assert "A-1-BRKN0009" not in json.dumps(done()) and "broken" not in json.dumps(done())
    assert relay.proc.poll() is None

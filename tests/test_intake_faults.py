"""Intake under real faults: a full inbox or outbox disk, an outbox folder gone, an inbox path blocked.

Each test runs a real relayd process, pushes with paramiko (which shows the relay's message;
OpenSSH's sftp prints only the status) and makes the fault real: a small tmpfs the test mounts
(as root) and fills to the last block, or a regular file put where a folder must be. For each:
the client is told the truth, nothing is lost, and the package or its ack goes through once
the fault clears, without a restart.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD, REAL_PACKAGE, free_port, paramiko_client, paramiko_put, wait_for
from platform_sshd import PlatformSshd, platform_sshd_fixture  # noqa: F401 - registers the fixture
from relayd.pec.replies import read_reply
from relayd.rejections import Reason

MiB = 1024 * 1024
REAL_INBOX_NAME = "A-9-X3UGO4V7-DAUA.zip"
DISK_LOW_MESSAGE = f"refused (disk_low): {Reason.DISK_LOW.summary}"
KEPT_MESSAGE = "kept (disk_low): the relay is short of disk space; the package is kept"
FAST_RETRY = {"initial_seconds": 0.3, "factor": 2, "max_seconds": 1.0, "jitter": 0.1}
#: intake's own retries, quick enough for a test
FAST_INTAKE = {"initial_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 50}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def mount_tmpfs() -> Iterator[Callable[[Path], Path]]:
    """Mount a 16 MiB tmpfs on a folder (created if needed); every mount is undone at the end."""
    mounted: list[Path] = []
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")

    def mount(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Take every last block of ``folder``'s file system with a ballast file; return it."""
    ballast = folder / ".ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\0" * MiB, b"\0" * 4096):
            while True:
                try:
                    if os.write(fd, chunk) < len(chunk):
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return ballast


def events(relay, name: str) -> list[dict]:
    return [e for e in relay.events() if e.get("event") == name]


def push_while_filling(relay, name: str, folder: Path) -> tuple[Path, str]:
    """Write a whole package, fill ``folder``'s disk, then close: the hand-over meets a full disk.

    Returns the ballast and what the relay answers to a ``stat`` of the name after the close
    (paramiko ignores errors on close; the relay keeps the outcome for a stat).
    """
    client = paramiko_client(relay, password=PASSWORD)
    try:
        with client.open(name, "wb") as remote:
            remote.write(REAL_PACKAGE.read_bytes())
            remote.flush()  # every byte on the relay before the disk fills: the guard refuses writes after
            ballast = fill(folder)
        try:
            client.stat(name)
        except OSError as exc:
            return ballast, str(exc)
        return ballast, "accepted"
    finally:
        client.close()
        client.get_channel().get_transport().close()


def put_once_taken(relay, name: str) -> None:
    """Push the real package until the relay takes it (the guard trusts its last look for about a second)."""
    def taken() -> bool:
        try:
            paramiko_put(relay, REAL_PACKAGE, name, password=PASSWORD)
        except OSError as exc:
            assert DISK_LOW_MESSAGE in str(exc)
            return False
        return True

    wait_for(taken, timeout=30, what=f"{name} taken")


def refused_now(relay) -> bool:
    """Whether opening a temporary file is refused for low disk now (an accepted open leaves nothing behind)."""
    client = paramiko_client(relay, password=PASSWORD)
    try:
        try:
            client.open("probe.part", "wb").close()
        except OSError as exc:
            assert DISK_LOW_MESSAGE in str(exc)
            return True
        client.remove("probe.part")
        return False
    finally:
        client.close()
        client.get_channel().get_transport().close()


def drop_folder(relay) -> Path:
    return relay.drop()


def staged(relay) -> list[str]:
    return sorted(p.name for p in (relay.root / "var" / "staging").iterdir())


def platform_replies(platform: PlatformSshd) -> list:
    return [read_reply((platform.incoming / n).read_bytes()) for n in platform.files() if not n.endswith(".part")]


@pytest.fixture
def platform(platform_sshd) -> PlatformSshd:
    return platform_sshd()


# --------------------------------------------------------------------------- the ack is recorded with its package


def test_an_ack_owed_survives_an_outbox_folder_replaced_by_a_file(make_relay, platform):
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    outbox = relay.root / "var" / "outbox"
    shutil.rmtree(outbox, ignore_errors=True)
    outbox.write_text("not a folder\n")  # what an operator's slip or a broken mount leaves

    paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)  # told the truth: accepted

    assert (relay.inbox("90017") / REAL_INBOX_NAME).exists()
    (row,) = relay.outbox()
    assert row["kind"] == "AVL" and row["status"] == "pending"  # recorded with the package, in one step
    wait_for(lambda: relay.outbox()[0]["last_error_code"] == "outbox_unwritable", timeout=30,
             what="a failed attempt to write the ack's file")
    assert relay.outbox()[0]["status"] == "pending"  # waiting, not dead
    assert platform.files() == []
    assert not events(relay, "acks.queue_failed")

    pid = relay.proc.pid
    outbox.unlink()  # the folder is back (the relay makes it again)
    wait_for(lambda: relay.outbox()[0]["status"] == "delivered", timeout=60, what="the AVL delivered")
    (ack,) = platform_replies(platform)
    assert ack.kind == "AVL"
    assert relay.proc.pid == pid and relay.proc.poll() is None  # no restart


def test_an_ack_waits_for_space_on_a_full_outbox_disk(make_relay, platform, mount_tmpfs):
    relay = make_relay(start=False, platform=platform.relay_config(platform.client_key, retry=FAST_RETRY),
                       limits={"max_package_bytes": 8 * MiB, "min_free_bytes": 4 * MiB})
    outbox = mount_tmpfs(relay.root / "var" / "outbox")
    relay.start()
    try:
        ballast, answer = push_while_filling(relay, "a.zip", outbox)
        assert answer == "accepted"
        assert (relay.inbox("90017") / REAL_INBOX_NAME).exists()
        wait_for(lambda: relay.outbox()[0]["last_error_code"] == "outbox_unwritable", timeout=30,
                 what="a failed attempt to write the ack's file")
        # The outbox's disk is one relayd writes to: new uploads are refused before any byte is taken.
        wait_for(lambda: refused_now(relay), timeout=30, what="the guard to see the outbox's disk low")
        with pytest.raises(OSError) as refused:
            paramiko_put(relay, REAL_PACKAGE, "b.zip", password=PASSWORD)
        assert DISK_LOW_MESSAGE in str(refused.value)
        assert not list(drop_folder(relay).iterdir())
        assert platform.files() == []

        ballast.unlink()
        wait_for(lambda: relay.outbox()[0]["status"] == "delivered", timeout=60, what="the AVL delivered")
        assert [r.kind for r in platform_replies(platform)] == ["AVL"]
        (low,) = events(relay, "disk.low")
        assert str(outbox) in low["path"]
        put_once_taken(relay, "c.zip")  # a resend, taken again once the guard has looked
        assert events(relay, "disk.ok")
        assert relay.proc.poll() is None
    finally:
        relay.kill()  # before the tmpfs is unmounted


# --------------------------------------------------------------------------- a full inbox disk


def test_a_full_inbox_disk_keeps_the_package_staged_and_hands_it_over_once_space_is_back(make_relay, mount_tmpfs):
    relay = make_relay(start=False, intake=FAST_INTAKE,
                       limits={"max_package_bytes": 8 * MiB, "min_free_bytes": 4 * MiB})
    inbox = mount_tmpfs(relay.inbox("90017"))
    relay.start()
    try:
        ballast, answer = push_while_filling(relay, "a.zip", inbox)
        assert KEPT_MESSAGE in answer  # the truth, with a code: not "No space left on device", not "Failure"
        assert "No space left" not in answer
        assert len([n for n in staged(relay) if n.endswith(".zip")]) == 1
        assert [p.name for p in inbox.iterdir()] == [".ballast"]  # no partial file for the business software
        assert not relay.quarantined()  # the package did nothing wrong
        (low,) = events(relay, "disk.low")
        assert str(inbox) in low["path"]

        # While the inbox's disk is short, uploads are refused before any byte is taken.
        with pytest.raises(OSError) as refused:
            paramiko_put(relay, REAL_PACKAGE, "b.zip", password=PASSWORD)
        assert DISK_LOW_MESSAGE in str(refused.value)
        wait_for(lambda: len(events(relay, "intake.disk_error")) >= 2, timeout=30, what="a second try, in the process")
        assert not (inbox / REAL_INBOX_NAME).exists()

        pid = relay.proc.pid
        ballast.unlink()
        wait_for(lambda: (inbox / REAL_INBOX_NAME).exists(), timeout=30, what="the hand-over once space is back")
        assert relay.proc.pid == pid and relay.proc.poll() is None
        assert hashlib.sha256((inbox / REAL_INBOX_NAME).read_bytes()).hexdigest() == \
            hashlib.sha256(REAL_PACKAGE.read_bytes()).hexdigest()
        wait_for(lambda: staged(relay) == [], timeout=10, what="staging emptied")
        (accepted,) = relay.ledger_rows("SELECT * FROM packages WHERE outcome = 'accepted'")
        assert accepted["location"] == str(inbox / REAL_INBOX_NAME)
        assert [r["kind"] for r in relay.outbox()] == ["AVL"]
        assert not relay.quarantined()
        assert not list(drop_folder(relay).iterdir())  # no 0-byte file left where the client dropped it
        put_once_taken(relay, "c.zip")  # a resend, taken again once the guard has looked
        assert events(relay, "disk.ok")
        assert relay.ledger_rows("SELECT outcome FROM packages ORDER BY id")[-1]["outcome"] == "duplicate"
    finally:
        relay.kill()


# --------------------------------------------------------------------------- unexpected errors


def test_an_unexpected_error_is_retried_while_running_and_clears_without_a_restart(make_relay):
    relay = make_relay(intake=FAST_INTAKE)
    inbox = relay.inbox("90017")
    shutil.rmtree(inbox)
    inbox.write_text("a file where the inbox folder should be\n")

    with pytest.raises(OSError) as told:
        paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)
    assert "internal error: the package is kept and will be processed again" in str(told.value)
    wait_for(lambda: len(events(relay, "intake.retry_later")) >= 3, timeout=30, what="three tries in the process")
    assert not relay.quarantined()

    pid = relay.proc.pid
    inbox.unlink()
    wait_for(lambda: (inbox / REAL_INBOX_NAME).exists(), timeout=30, what="the hand-over once the path is clear")
    assert relay.proc.pid == pid
    wait_for(lambda: staged(relay) == [], timeout=10, what="staging emptied")
    assert [r["kind"] for r in relay.outbox()] == ["AVL"]
    assert not relay.quarantined()


def test_after_too_many_tries_the_package_goes_to_quarantine_with_an_anl_an_alert_and_a_metric(make_relay):
    relay = make_relay(start=False, intake={**FAST_INTAKE, "max_attempts": 3},
                       metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": 0}},
                       mail={"host": "127.0.0.1", "port": free_port(), "sender": "relayd@example.org",
                             "admin": ["admin@example.org"]})
    relay.start()
    inbox = relay.inbox("90017")
    shutil.rmtree(inbox)
    inbox.write_text("a file where the inbox folder should be\n")

    with pytest.raises(OSError):
        paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)
    # The reason file lands first, then the package beside it: wait for both, as an operator would see them.
    wait_for(lambda: [q["_file"].exists() for q in relay.quarantined()] == [True], timeout=30,
             what="the package in quarantine")
    wait_for(lambda: relay.outbox(), timeout=10, what="the ANL recorded")
    (reason,) = relay.quarantined()
    assert reason["code"] == "internal_error" and "3 times" in reason["message"]
    assert reason["numero"] == "A-9-X3UGO4V7"
    assert hashlib.sha256(reason["_file"].read_bytes()).hexdigest() == reason["sha256"]
    assert staged(relay) == []
    assert [(r["kind"], r["status"]) for r in relay.outbox()] == [("ANL", "pending")]
    (rejected,) = relay.ledger_rows("SELECT * FROM packages")
    assert rejected["outcome"] == "rejected" and rejected["reason"] == "internal_error"
    wait_for(lambda: any("internal_error" in a["subject"]
                         for a in relay.ledger_rows("SELECT subject FROM mail WHERE kind = 'alert'")),
             timeout=10, what="the administrator's alert queued")

    (listening,) = events(relay, "metrics.listening")
    with urllib.request.urlopen(f"http://127.0.0.1:{listening['port']}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'relayd_packages_rejected_total{reason="internal_error"} 1.0' in text


# --------------------------------------------------------------------------- the archive, staging notes


def test_the_archive_is_a_copy_the_business_software_cannot_reach(relay):
    paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)
    delivered = relay.inbox("90017") / REAL_INBOX_NAME
    (dossier,) = relay.ledger_rows("SELECT * FROM dossiers")
    archived = Path(dossier["archive_path"])
    assert os.stat(delivered).st_ino != os.stat(archived).st_ino
    assert os.stat(archived).st_nlink == 1
    with open(delivered, "r+b") as business_software:  # edits the dossier in place
        business_software.write(b"scribbled over")
        business_software.truncate(1000)
    assert hashlib.sha256(archived.read_bytes()).hexdigest() == dossier["sha256"]


def test_no_orphan_upload_note_is_left_after_a_clean_stop(relay):
    staging = relay.root / "var" / "staging"
    paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)
    # A note whose package is gone: what a crash between the note and the move leaves.
    (staging / "0123456789abcdef.upload.json").write_text(json.dumps({"account": "plateforme", "peer": "x",
                                                                      "name": "lost.zip"}))
    relay.stop()
    assert list(staging.glob("*.upload.json")) == []


def test_an_accepted_dossier_without_its_ack_gets_one_at_the_next_start(relay):
    paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, password=PASSWORD)
    relay.stop()
    # What an older relayd left when queueing the AVL failed after the record: the dossier, no ack.
    db = sqlite3.connect(relay.ledger_path)
    with db:
        db.execute("DELETE FROM outbox")
    db.close()

    relay.start()
    wait_for(lambda: [r["kind"] for r in relay.outbox()] == ["AVL"], timeout=30, what="the AVL queued again")
    (requeued,) = events(relay, "acks.requeued")
    assert requeued["numero"] == "A-9-X3UGO4V7"
    (row,) = relay.outbox()
    wait_for(lambda: Path(row["payload"]).is_file(), timeout=30, what="the AVL's file written")
    assert read_reply(Path(row["payload"]).read_bytes()).kind == "AVL"


def test_a_drop_folder_filling_up_during_an_upload_is_a_disk_low_refusal_and_leaves_nothing(make_relay, mount_tmpfs):
    relay = make_relay(start=False, limits={"max_package_bytes": 8 * MiB, "min_free_bytes": 1 * MiB})
    drop = mount_tmpfs(relay.drop())
    relay.start()
    try:
        # Room left for 2 MiB of the 3.3 MB package, and above the threshold: the guard lets the upload begin.
        ballast = drop / ".ballast"
        free = os.statvfs(drop).f_bavail * os.statvfs(drop).f_frsize
        with open(ballast, "wb") as fh:
            fh.truncate(0)
            fh.write(b"\0" * (free - 2 * MiB))
        with pytest.raises(OSError) as refused:
            paramiko_put(relay, REAL_PACKAGE, "a.zip", password=PASSWORD)
        assert DISK_LOW_MESSAGE in str(refused.value)  # not a bare "No space left on device" or "Failure"
        wait_for(lambda: [p.name for p in drop.iterdir()] == [".ballast"], timeout=20, what="the partial removed")
        assert not relay.quarantined()
        assert relay.proc.poll() is None
    finally:
        relay.kill()

"""relayd as a systemd service: sd_notify on a real datagram socket, the watchdog, SIGTERM and SIGHUP."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from conftest import REAL_PACKAGE, Relay, free_port, paramiko_client, sftp_batch, wait_for, write_key_pair

NUMERO = "A-9-X3UGO4V7"


class NotifySocket:
    """A real AF_UNIX datagram socket where relayd sends sd_notify messages, as systemd would receive them."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> None:
        """Read every datagram that has arrived."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)

    def wait(self, predicate, *, timeout: float = 30, what: str) -> dict[str, str]:
        """The first message (old or new) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            assert time.monotonic() < deadline, f"no {what} within {timeout} s; got {self.messages[-10:]}"
            self.drain()

    def count(self, key: str) -> int:
        self.drain()
        return sum(key in m for m in self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def notified_relay(make_relay, notify: NotifySocket, *, watchdog_seconds: float = 0.5, **overrides) -> Relay:
    relay = make_relay(start=False, **overrides)
    relay.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_seconds * 1_000_000))}
    relay.start()
    return relay


def test_ready_watchdog_and_stopping_reach_a_real_notify_socket(make_relay, notify: NotifySocket):
    relay = notified_relay(make_relay, notify)
    ready = notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
    assert "connection(s)" in ready["STATUS"] and "outbox" in ready["STATUS"]
    # Half the watchdog period between pings, as sd_watchdog_enabled(3) advises: several arrive.
    wait_for(lambda: notify.count("WATCHDOG") >= 3, timeout=30, what="three WATCHDOG=1")
    relay.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
    assert stopping["STATUS"].startswith("stopping")
    assert relay.proc.wait(timeout=30) == 0


def test_the_watchdog_stops_while_the_outbox_worker_is_wedged_and_resumes_after(make_relay, notify: NotifySocket,
                                                                                 tmp_path: Path):
    # A return server that is never there: every attempt fails at once and is recorded, so the
    # worker writes to the ledger again and again. Holding the ledger's write lock wedges it there.
    key = write_key_pair(tmp_path, "relay_client_key")
    platform = {"host": "127.0.0.1", "port": free_port(), "username": "commune", "private_key": str(key),
                "host_key_fingerprints": ["SHA256:" + "A" * 43], "connect_timeout_seconds": 2,
                "retry": {"initial_seconds": 0.2, "max_seconds": 0.5, "jitter": 0}}
    relay = notified_relay(make_relay, notify, platform=platform)
    assert sftp_batch(relay, [f'put "{REAL_PACKAGE}" "{REAL_PACKAGE.name}"']).returncode == 0
    wait_for(lambda: sum(e.get("event") == "outbox.retry_later" for e in relay.events()) >= 2, what="failed attempts")
    wait_for(lambda: notify.count("WATCHDOG") >= 2, what="WATCHDOG=1 while healthy")

    lock = sqlite3.connect(relay.ledger_path, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")  # the write lock: the worker's next record waits for it
        stalled = notify.wait(lambda m: "outbox worker stalled" in m.get("STATUS", ""), timeout=25,
                              what="a STATUS naming the stalled worker")
        assert "WATCHDOG" not in stalled
        before = notify.count("WATCHDOG")
        time.sleep(1.5)  # three watchdog half-periods
        assert notify.count("WATCHDOG") == before, "WATCHDOG=1 was sent while the outbox worker was wedged"
        assert any(e.get("event") == "health.unhealthy" for e in relay.events())
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: notify.count("WATCHDOG") > before, timeout=30, what="WATCHDOG=1 once the worker moves again")
    assert any(e.get("event") == "health.recovered" for e in relay.events())


# -- SIGTERM ---------------------------------------------------------------------------


def _slow_upload(client: paramiko.SFTPClient, remote: str, chunks: list[bytes], *, on_first_chunk=None,
                 pause: float = 0.1) -> None:
    """Write a package in pieces, as a slow link would, and close it (the commit)."""
    with client.open(remote, "wb") as fh:
        for i, chunk in enumerate(chunks):
            fh.write(chunk)
            fh.flush()
            if i == 0 and on_first_chunk is not None:
                on_first_chunk()
            time.sleep(pause)


def _chunks(data: bytes, size: int = 256 * 1024) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def _with_grace(make_relay, seconds: float, **overrides) -> Relay:
    relay = make_relay(start=False, **overrides)
    relay.config["server"]["stop_grace_seconds"] = seconds
    relay.write_config()
    relay.start()
    return relay


def test_sigterm_lets_an_upload_under_way_finish_and_hands_it_over(make_relay):
    relay = _with_grace(make_relay, 30)
    client = paramiko_client(relay)
    try:
        _slow_upload(client, REAL_PACKAGE.name, _chunks(REAL_PACKAGE.read_bytes()),
                     on_first_chunk=lambda: relay.proc.send_signal(signal.SIGTERM))
        # The commit was answered: the package is accepted, not cut.
        assert client.stat(REAL_PACKAGE.name).st_size == REAL_PACKAGE.stat().st_size
    finally:
        client.close()
        client.get_channel().get_transport().close()
    # Once nothing is under way, it stops long before the grace runs out.
    assert relay.proc.wait(timeout=25) == 0
    assert (relay.inbox("90017") / f"{NUMERO}-DAUA.zip").read_bytes() == REAL_PACKAGE.read_bytes()
    assert relay.ledger_rows("SELECT outcome FROM packages") == [{"outcome": "accepted"}]
    assert list(relay.drop().iterdir()) == []
    assert any(e.get("event") == "relayd.stopping" and e.get("uploads") == 1 for e in relay.events())


def test_sigterm_refuses_new_connections_at_once(make_relay):
    relay = _with_grace(make_relay, 30)
    client = paramiko_client(relay)
    try:
        with client.open("slow.zip.part", "wb") as fh:
            fh.write(b"PK")
            relay.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: any(e.get("event") == "relayd.stopping" for e in relay.events()), what="stopping")
            with pytest.raises((OSError, paramiko.SSHException)):
                paramiko_client(relay)
    finally:
        client.close()
        client.get_channel().get_transport().close()
    assert relay.proc.wait(timeout=25) == 0


def test_sigterm_cuts_an_upload_that_outlasts_the_grace_and_promotes_nothing(make_relay):
    relay = _with_grace(make_relay, 1)
    client = paramiko_client(relay)
    data = REAL_PACKAGE.read_bytes()
    sent_term = time.monotonic()
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        try:
            # 13 pieces, 0.5 s apart: far longer than the 1 s of grace.
            _slow_upload(client, REAL_PACKAGE.name, _chunks(data), pause=0.5,
                         on_first_chunk=lambda: relay.proc.send_signal(signal.SIGTERM))
        finally:
            client.close()
    assert relay.proc.wait(timeout=20) == 0
    assert time.monotonic() - sent_term < 20
    assert not any(relay.inbox("90017").iterdir()), "a cut upload reached the inbox"
    assert list(relay.drop().iterdir()) == []
    assert relay.ledger_rows("SELECT * FROM packages") == []
    events = relay.events()
    assert any(e.get("event") == "sftp.uploads_cut" for e in events)
    assert any(e.get("event") == "sftp.partial_removed" for e in events)


# -- SIGHUP ----------------------------------------------------------------------------


def test_sighup_adds_an_account_that_logs_in_at_once_while_an_upload_goes_on(make_relay, notify: NotifySocket,
                                                                             tmp_path: Path):
    relay = notified_relay(make_relay, notify, watchdog_seconds=5)
    notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
    new_key = write_key_pair(tmp_path, "nouveau_key")
    client = paramiko_client(relay)
    reloaded = []

    def add_account_and_reload() -> None:
        relay.config["accounts"].append({"username": "nouveau", "communes": ["90017"],
                                         "authorized_keys": [new_key.with_name("nouveau_key.pub").read_text().strip()]})
        relay.write_config()
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "reload.done" for e in relay.events()), what="reload.done")
        # The new account logs in while the first session is still uploading.
        listing = sftp_batch(relay, ["ls"], user="nouveau", key=new_key)
        reloaded.append(listing.returncode)

    try:
        _slow_upload(client, REAL_PACKAGE.name, _chunks(REAL_PACKAGE.read_bytes()), on_first_chunk=add_account_and_reload)
        assert client.stat(REAL_PACKAGE.name).st_size == REAL_PACKAGE.stat().st_size
    finally:
        client.close()
        client.get_channel().get_transport().close()
    assert reloaded == [0]
    assert (relay.inbox("90017") / f"{NUMERO}-DAUA.zip").exists()
    reloading = notify.wait(lambda m: m.get("RELOADING") == "1", what="RELOADING=1")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert sum(m.get("READY") == "1" for m in notify.messages) >= 2  # READY=1 again once reloaded


def test_sighup_with_a_broken_config_keeps_the_running_one(make_relay, tmp_path: Path):
    relay = make_relay()
    good = relay.config_path.read_text()
    relay.config_path.write_text(good.replace("username: plateforme", "username: Not A Valid Name"))
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.refused" for e in relay.events()), what="reload.refused")
    refused = next(e for e in relay.events() if e.get("event") == "reload.refused")
    assert "accounts[1].username" in refused["error"]
    # Still serving, under the configuration it had.
    assert relay.proc.poll() is None
    assert sftp_batch(relay, [f'put "{REAL_PACKAGE}" "{REAL_PACKAGE.name}"']).returncode == 0
    wait_for(lambda: (relay.inbox("90017") / f"{NUMERO}-DAUA.zip").exists(), what="the package in the inbox")

    relay.config_path.write_text("storage: [not, a, mapping")
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: sum(e.get("event") == "reload.refused" for e in relay.events()) == 2, what="second reload.refused")
    assert sftp_batch(relay, ["ls"]).returncode == 0


def test_sighup_removes_an_account_for_new_logins(make_relay):
    relay = make_relay()
    assert sftp_batch(relay, ["ls"]).returncode == 0
    relay.config["accounts"][0]["authorized_keys"] = []
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.done" for e in relay.events()), what="reload.done")
    assert sftp_batch(relay, ["ls"]).returncode != 0


def test_a_reload_that_changes_the_port_says_a_restart_is_needed(make_relay):
    relay = make_relay()
    relay.config["server"]["listen"]["port"] = free_port()
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.needs_restart" for e in relay.events()), what="needs_restart")
    assert sftp_batch(relay, ["ls"]).returncode == 0  # still on the old port


def test_outside_systemd_nothing_is_sent_and_relayd_runs(make_relay):
    relay = make_relay()
    assert "NOTIFY_SOCKET" not in relay.env
    assert sftp_batch(relay, ["ls"]).returncode == 0
    relay.stop()
    assert relay.proc.returncode == 0
    assert os.environ.get("NOTIFY_SOCKET") is None


def test_sighup_adds_a_commune_whose_inbox_and_return_folder_work_at_once(make_relay, tmp_path: Path):
    relay = make_relay()
    samples = tmp_path / "samples"
    made = subprocess.run([sys.executable, "-m", "relayd", "testkit", "sample", "--insee", "2B033", "--demarche", "ILE",
                           "--seed", "7", "--out", str(samples)], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    (package,) = samples.glob("*.zip")
    # Not served yet: refused with its reason.
    assert sftp_batch(relay, [f'put "{package}" "{package.name}"']).returncode != 0
    assert relay.quarantined()[-1]["code"] == "insee_unknown"

    relay.config["communes"].append({"insee": "2B033", "name": "Test 2B033", "inbox": "inbox/2B033",
                                     "demarches": ["ILE"], "returns": "returns/2B033/retours",
                                     "rejected": "returns/2B033/rejected"})
    relay.config["accounts"][0]["communes"].append("2B033")
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "reload.done" for e in relay.events()), what="reload.done")

    assert sftp_batch(relay, [f'put "{package}" "{package.name}"']).returncode == 0
    (delivered,) = relay.inbox("2B033").iterdir()
    numero = delivered.name.split("-ILE")[0]
    # Its return folder is watched from now on: a status drop there is taken and queued for the platform.
    assert relay.cli("return", numero, "--state", "recu").returncode == 0
    wait_for(lambda: any(e["kind"] == "Retour" and e["numero"] == numero for e in relay.outbox()),
             what="the Retour queued from the new commune's return folder")


def test_the_first_status_shows_what_waits_in_the_outbox(make_relay, notify: NotifySocket):
    relay = make_relay()  # no return server: the AVL waits
    assert sftp_batch(relay, [f'put "{REAL_PACKAGE}" "{REAL_PACKAGE.name}"']).returncode == 0
    relay.stop()
    relay.env = {"NOTIFY_SOCKET": str(notify.path)}
    relay.start()
    ready = notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
    assert "outbox 1 pending" in ready["STATUS"]

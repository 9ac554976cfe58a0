"""The defences at login: bans that grow, the allowlist, per-account addresses, and per-address session limits."""

from __future__ import annotations

import signal
import subprocess
from ipaddress import ip_network
from pathlib import Path

import paramiko
import pytest
from structlog.testing import capture_logs

from conftest import PASSWORD, paramiko_client, require_program, sftp_batch, wait_for, write_key_pair
from relayd.config import Defender as DefenderSettings
from relayd.events import AddressBanned, AuthFailed, Events
from relayd.inbound.defender import Defender

# -- the Defender alone, on a clock the test moves -------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _defender(**settings) -> tuple[Defender, FakeClock, list]:
    heard: list = []
    events = Events()
    events.subscribe(heard.append)
    clock = FakeClock()
    current = DefenderSettings(**settings)
    return Defender(lambda: current, events, clock=clock), clock, heard


def test_each_later_ban_lasts_longer_up_to_the_cap():
    defender, clock, heard = _defender(max_failures=3, window_seconds=60, ban_seconds=10, ban_factor=3,
                                       max_ban_seconds=50)
    lengths = []
    for _ in range(4):
        for _ in range(3):
            defender.failed("203.0.113.7", "plateforme", "password")
        lengths.append(defender.ban_remaining("203.0.113.7"))
        clock.now += lengths[-1]  # the ban runs out
        assert not defender.refuses("203.0.113.7")
    assert lengths == [10, 30, 50, 50]
    assert [e.seconds for e in heard if isinstance(e, AddressBanned)] == [10, 30, 50, 50]
    assert sum(isinstance(e, AuthFailed) for e in heard) == 12


def test_failures_outside_the_window_do_not_add_up():
    defender, clock, _ = _defender(max_failures=3, window_seconds=60, ban_seconds=10)
    for _ in range(5):
        defender.failed("203.0.113.7", "x", "password")
        clock.now += 31  # never three within a minute
    assert not defender.refuses("203.0.113.7")
    defender.failed("203.0.113.7", "x", "password")
    defender.failed("203.0.113.7", "x", "password")
    assert defender.refuses("203.0.113.7")
    assert not defender.refuses("203.0.113.8")  # an address, not everyone


def test_allowlisted_networks_and_a_disabled_defender_never_ban():
    defender, _, heard = _defender(max_failures=1, allowlist=["192.0.2.0/24", "2001:db8::/32"])
    for ip in ("192.0.2.9", "2001:db8::1", "::ffff:192.0.2.9"):
        for _ in range(10):
            defender.failed(ip, "x", "publickey")
        assert not defender.refuses(ip)
    assert not any(isinstance(e, AddressBanned) for e in heard)
    assert sum(isinstance(e, AuthFailed) for e in heard) == 30  # still counted for metrics
    off, _, _ = _defender(enabled=False, max_failures=1)
    off.failed("198.51.100.1", "x", "password")
    assert not off.refuses("198.51.100.1")


def test_settings_are_read_at_each_use():
    clock = FakeClock()
    settings = {"now": DefenderSettings(max_failures=2)}
    defender = Defender(lambda: settings["now"], clock=clock)
    defender.failed("198.51.100.1", "x", "password")
    defender.failed("198.51.100.1", "x", "password")
    assert defender.refuses("198.51.100.1")
    settings["now"] = DefenderSettings(max_failures=2, allowlist=[ip_network("198.51.100.0/24")])
    assert not defender.refuses("198.51.100.1")  # a reload that allowlists the address lifts its ban at once


def test_a_refused_connection_is_logged_once_per_ban():
    defender, clock, _ = _defender(max_failures=1, ban_seconds=10)
    with capture_logs() as logs:
        defender.failed("198.51.100.1", "x", "password")
        assert all(defender.refuses("198.51.100.1") for _ in range(50))
        clock.now += 11
        defender.failed("198.51.100.1", "x", "password")  # the second ban
        assert defender.refuses("198.51.100.1")
    assert [e["event"] for e in logs] == ["defender.banned", "defender.refused", "defender.banned", "defender.refused"]
    assert logs[0]["ip"] == "198.51.100.1" and logs[0]["seconds"] == 10 and logs[0]["failures"] == 1


def test_memory_is_bounded_and_bans_survive_a_flood():
    clock = FakeClock()
    settings = DefenderSettings(max_failures=2, ban_seconds=100)
    defender = Defender(lambda: settings, clock=clock, max_addresses=100)
    defender.failed("198.51.100.1", "x", "password")
    defender.failed("198.51.100.1", "x", "password")
    for i in range(5000):  # one failure each from many addresses: none reaches a ban
        defender.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "x", "password")
    assert len(defender) <= 100
    assert defender.refuses("198.51.100.1")


# -- a real relay, real clients ----------------------------------------------------------


def _openssh_login(relay, *keys: Path, user: str = "plateforme") -> subprocess.CompletedProcess:
    """An OpenSSH sftp login offering exactly ``keys`` (no agent, no password), listing the folder."""
    sftp = require_program("sftp")
    batch = relay.root / "ls.batch"
    batch.write_text("ls\n")
    args = [sftp, "-b", str(batch), "-P", str(relay.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
    for key in keys:
        args += ["-i", str(key)]
    return subprocess.run([*args, f"{user}@127.0.0.1"], capture_output=True, text=True, timeout=60)


def _events(relay, name: str) -> list[dict]:
    return [e for e in relay.events() if e.get("event") == name]


def _defender_config(**overrides) -> dict:
    return {"max_failures": 3, "window_seconds": 120, "ban_seconds": 3, "ban_factor": 2, "max_ban_seconds": 60,
            **overrides}


def test_failed_openssh_logins_ban_the_address_until_the_ban_runs_out(make_relay, tmp_path):
    relay = make_relay(defender=_defender_config())
    stranger = write_key_pair(tmp_path, "unknown_key")
    for attempt in range(3):
        assert _openssh_login(relay, stranger).returncode != 0
        # Counted as the connection ends: wait for it, so that the next attempt is surely the next failure.
        wait_for(lambda n=attempt + 1: len(_events(relay, "sftp.auth_failed")) >= n, timeout=20, what="failure logged")
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")
    (ban,) = _events(relay, "defender.banned")
    assert ban["ip"] == "127.0.0.1" and ban["failures"] == 3 and ban["seconds"] == 3

    # Banned: even the right key is turned away, before any authentication.
    refused = _openssh_login(relay, relay.key)
    assert refused.returncode != 0
    assert "ls" not in refused.stdout
    wait_for(lambda: _events(relay, "defender.refused"), timeout=20, what="defender.refused")
    assert _events(relay, "defender.refused")[0]["ip"] == "127.0.0.1"
    assert not _events(relay, "sftp.authenticated")

    # Once the ban runs out, the right key logs in again.
    wait_for(lambda: _openssh_login(relay, relay.key).returncode == 0, timeout=30, what="login after the ban")
    assert len(_events(relay, "defender.refused")) == 1  # once per ban, however many connections it turned away

    # The next ban of the same address lasts twice as long.
    for attempt in range(3):
        assert _openssh_login(relay, stranger).returncode != 0
        wait_for(lambda n=attempt + 4: len(_events(relay, "sftp.auth_failed")) >= n, timeout=20, what="failure")
    wait_for(lambda: len(_events(relay, "defender.banned")) == 2, timeout=20, what="second ban")
    assert [b["seconds"] for b in _events(relay, "defender.banned")] == [3, 6]


def test_wrong_passwords_bring_a_ban(make_relay):
    relay = make_relay(defender=_defender_config(ban_seconds=60))
    for _ in range(3):
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_client(relay, password="not the password")
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")
    (ban,) = _events(relay, "defender.banned")
    assert ban["failures"] == 3
    with pytest.raises((paramiko.SSHException, EOFError, ConnectionError)):
        paramiko_client(relay, password=PASSWORD)  # even the right password
    assert not _events(relay, "sftp.login")


def test_one_misconfigured_login_offering_several_keys_counts_once(make_relay, tmp_path):
    relay = make_relay(defender=_defender_config(max_failures=2, ban_seconds=60))
    strangers = [write_key_pair(tmp_path, f"unknown_{i}") for i in range(3)]
    assert _openssh_login(relay, *strangers).returncode != 0
    wait_for(lambda: _events(relay, "sftp.auth_failed"), timeout=20, what="sftp.auth_failed")
    (failure,) = _events(relay, "sftp.auth_failed")
    assert failure["keys_refused"] == 3
    # A wrong key offered before the right one costs nothing.
    assert _openssh_login(relay, strangers[0], relay.key).returncode == 0
    assert not _events(relay, "defender.banned")
    # A second failed login within the window does bring the ban (max_failures: 2).
    assert _openssh_login(relay, *strangers).returncode != 0
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")


def test_an_allowlisted_network_is_never_banned(make_relay, tmp_path):
    relay = make_relay(defender=_defender_config(max_failures=2, allowlist=["127.0.0.0/8"]))
    stranger = write_key_pair(tmp_path, "unknown_key")
    for attempt in range(4):
        assert _openssh_login(relay, stranger).returncode != 0
        wait_for(lambda n=attempt + 1: len(_events(relay, "sftp.auth_failed")) >= n, timeout=20, what="failure")
    assert _openssh_login(relay, relay.key).returncode == 0
    assert not _events(relay, "defender.banned")


def test_an_account_logs_in_only_from_its_allowed_addresses(make_relay):
    relay = make_relay()
    relay.config["accounts"][0]["allowed_ips"] = ["10.0.0.0/8"]
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _events(relay, "reload.done"), timeout=20, what="reload.done")

    # The right key and the right password, from 127.0.0.1: refused like a wrong password.
    result = _openssh_login(relay, relay.key)
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, password=PASSWORD)
    wait_for(lambda: len(_events(relay, "sftp.auth_failed")) >= 2, timeout=20, what="both failures logged")
    assert {e["why"] for e in _events(relay, "sftp.auth_failed")} == {"address not in the account's allowed_ips"}
    assert not _events(relay, "sftp.authenticated")

    relay.config["accounts"][0]["allowed_ips"] = ["127.0.0.1/32"]
    relay.write_config()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(_events(relay, "reload.done")) == 2, timeout=20, what="second reload.done")
    assert _openssh_login(relay, relay.key).returncode == 0
    client = paramiko_client(relay, password=PASSWORD)
    try:
        assert client.listdir("/") == []
    finally:
        client.close()
        client.get_channel().get_transport().close()


def test_a_third_connection_from_one_address_is_refused_and_the_two_go_on(make_relay):
    relay = make_relay(limits={"max_package_bytes": 64 * 1024 * 1024, "max_sessions_per_ip": 2})
    first = paramiko_client(relay, password=PASSWORD)
    second = paramiko_client(relay)
    try:
        third = sftp_batch(relay, ["ls"])
        assert third.returncode != 0
        assert "too many connections from your address" in third.stderr
        assert _events(relay, "sftp.too_many_sessions_per_ip")
        assert first.listdir("/") == [] and second.listdir("/") == []
    finally:
        for client in (first, second):
            client.close()
            client.get_channel().get_transport().close()
    # Freed slots are usable again.
    wait_for(lambda: sftp_batch(relay, ["ls"]).returncode == 0, timeout=20, what="a login once the two closed")

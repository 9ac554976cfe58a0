"""The defences at login: bans by prefix kept in the ledger, the allowlist, the global budget, per-account
addresses, the pre-authentication budget, and the per-address session limits."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
from ipaddress import ip_network
from pathlib import Path

import paramiko
import pytest
from structlog.testing import capture_logs

from conftest import (
    PASSWORD,
    REAL_PACKAGE,
    paramiko_client,
    require_program,
    sftp_batch,
    sftp_put,
    wait_for,
    write_key_pair,
)
from relayd.config import Defender as DefenderSettings
from relayd.config import Limits
from relayd.events import AddressBanned, AuthFailed, Events
from relayd.inbound.banbook import BanBook
from relayd.inbound.defender import Defender
from relayd.inbound.startups import StartupBudget
from relayd.ledger import Ledger

# -- the Defender alone, on a clock the test moves -------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_780_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


@pytest.fixture
def make_defender(ledger):
    def make(**settings) -> tuple[Defender, FakeClock, list]:
        heard: list = []
        events = Events()
        events.subscribe(heard.append)
        clock = FakeClock()
        current = DefenderSettings(**settings)
        return Defender(lambda: current, BanBook(ledger), events, clock=clock), clock, heard
    return make


def test_each_later_ban_lasts_longer_up_to_the_cap(make_defender):
    defender, clock, heard = make_defender(max_failures=3, window_seconds=60, ban_seconds=10, ban_factor=3,
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


def test_failures_outside_the_window_do_not_add_up(make_defender):
    defender, clock, _ = make_defender(max_failures=3, window_seconds=60, ban_seconds=10)
    for _ in range(5):
        defender.failed("203.0.113.7", "x", "password")
        clock.now += 31  # never three within a minute
    assert not defender.refuses("203.0.113.7")
    defender.failed("203.0.113.7", "x", "password")
    defender.failed("203.0.113.7", "x", "password")
    assert defender.refuses("203.0.113.7")
    assert not defender.refuses("203.0.113.8")  # an address (/32 by default), not everyone


def test_failures_count_per_prefix_ipv4_and_ipv6(make_defender):
    defender, _, heard = make_defender(max_failures=2, ipv4_prefix=24)
    defender.failed("198.51.100.1", "x", "password")
    defender.failed("198.51.100.200", "x", "password")  # another address of the same /24
    assert "198.51.100.0/24" in defender.refuses("198.51.100.77")
    assert not defender.refuses("198.51.101.1")
    assert [e.prefix for e in heard if isinstance(e, AddressBanned)] == ["198.51.100.0/24"]
    # IPv6: one /64 by default, however many addresses a host takes in it.
    defender.failed("2001:db8:1:2::1", "x", "password")
    defender.failed("2001:db8:1:2:ffff:ffff:ffff:fffe", "x", "password")
    assert defender.refuses("2001:db8:1:2::abcd")
    assert not defender.refuses("2001:db8:1:3::1")


def test_connections_that_never_log_in_weigh_less(make_defender):
    defender, _, _ = make_defender(max_failures=2, unauthenticated_weight=0.25)
    for _ in range(7):
        defender.failed("203.0.113.7", "?", "none", 0.25)
    assert not defender.refuses("203.0.113.7")
    defender.failed("203.0.113.7", "?", "none", 0.25)  # the eighth: 2 failures' worth
    assert defender.refuses("203.0.113.7")


def test_allowlisted_networks_and_a_disabled_defender_never_ban(make_defender):
    defender, _, heard = make_defender(max_failures=1, allowlist=["192.0.2.0/24", "2001:db8::/32"])
    for ip in ("192.0.2.9", "2001:db8::1", "::ffff:192.0.2.9"):
        for _ in range(10):
            defender.failed(ip, "x", "publickey")
        assert not defender.refuses(ip)
    assert not any(isinstance(e, AddressBanned) for e in heard)
    assert sum(isinstance(e, AuthFailed) for e in heard) == 30  # still counted for metrics
    off, _, _ = make_defender(enabled=False, max_failures=1)
    off.failed("198.51.100.1", "x", "password")
    assert not off.refuses("198.51.100.1")


def test_settings_are_read_at_each_use(ledger):
    clock = FakeClock()
    settings = {"now": DefenderSettings(max_failures=2)}
    defender = Defender(lambda: settings["now"], BanBook(ledger), clock=clock)
    defender.failed("198.51.100.1", "x", "password")
    defender.failed("198.51.100.1", "x", "password")
    assert defender.refuses("198.51.100.1")
    settings["now"] = DefenderSettings(max_failures=2, allowlist=[ip_network("198.51.100.0/24")])
    assert not defender.refuses("198.51.100.1")  # a reload that allowlists the address lifts its ban at once


def test_a_refused_connection_is_logged_once_per_ban(make_defender):
    defender, clock, _ = make_defender(max_failures=1, ban_seconds=10)
    with capture_logs() as logs:
        defender.failed("198.51.100.1", "x", "password")
        assert all(defender.refuses("198.51.100.1") for _ in range(50))
        clock.now += 11
        defender.failed("198.51.100.1", "x", "password")  # the second ban
        assert defender.refuses("198.51.100.1")
    assert [e["event"] for e in logs] == ["defender.banned", "defender.refused", "defender.banned", "defender.refused"]
    assert logs[0]["ip"] == "198.51.100.1" and logs[0]["seconds"] == 10 and logs[0]["failures"] == 1


def test_bans_live_in_the_ledger_and_an_unban_reaches_every_reader(make_defender, ledger):
    defender, clock, _ = make_defender(max_failures=1, ban_seconds=600, ipv4_prefix=24)
    defender.failed("198.51.100.1", "x", "password")
    defender.failed("203.0.113.9", "x", "password")
    # Another process on the same ledger (a restart, `relayd defender`, another node) sees the bans.
    other = Defender(lambda: DefenderSettings(ipv4_prefix=24), BanBook(ledger), clock=clock)
    assert {b.prefix for b in other.bans()} == {"198.51.100.0/24", "203.0.113.0/24"}
    assert "until" in other.refuses("198.51.100.50")
    assert [b.prefix for b in other.unban("198.51.100.50")] == ["198.51.100.0/24"]  # an address: its ban
    assert not defender.refuses("198.51.100.1")
    assert [b.prefix for b in other.unban("203.0.0.0/16")] == ["203.0.113.0/24"]  # a network: the bans inside
    assert not defender.bans()
    with pytest.raises(ValueError):
        other.unban("not-an-address")


def test_the_global_budget_keeps_out_unknown_addresses_only(make_defender):
    defender, clock, _ = make_defender(max_failures=100, global_failures_per_minute=3, allowlist=["192.0.2.0/24"])
    defender.logged_in("198.51.100.10")  # the platform, which logs in every day
    for i in range(4):  # a spread-out attack: no address comes near its own ban
        defender.failed(f"203.0.113.{i}", "x", "password")
    assert "only known addresses" in defender.refuses("203.0.113.200")
    assert not defender.refuses("198.51.100.10")  # known-good
    assert not defender.refuses("192.0.2.1")  # allowlisted
    clock.now += 61  # the last minute is quiet again
    assert not defender.refuses("203.0.113.200")


def test_the_startup_budget_drops_early_but_never_the_trusted(make_defender):
    defender, _, _ = make_defender(allowlist=["192.0.2.1/32"])
    limits = Limits(max_startups="2:50:4", max_startups_per_ip=2)
    dice = iter([0.9, 0.1, 0.9, 0.1])
    budget = StartupBudget(lambda: limits, defender, chance=lambda: next(dice))

    class Conn:
        def __init__(self, ip: str):
            self.prefix = defender.prefix(ip)

    def admit(ip: str) -> str | None:
        why = budget.refusal(ip, defender.prefix(ip))
        if why is None:
            budget.pending.add(Conn(ip))
        return why

    assert admit("203.0.113.1") is None and admit("203.0.113.1") is None
    assert "from your address" in admit("203.0.113.1")  # max_startups_per_ip
    assert admit("203.0.113.2") is None  # 2 pending: 50 % chance of a drop, the dice say 0.9: kept
    assert "waiting to log in" in admit("203.0.113.3")  # 3 pending: 75 %, the dice say 0.1: dropped
    assert admit("192.0.2.1") is None  # allowlisted: never dropped early
    assert "waiting to log in" in admit("203.0.113.4")  # 4 pending = full: dropped whatever the dice
    assert admit("192.0.2.1") is None  # ...but never the allowlisted


# -- a real relay, real clients ----------------------------------------------------------


def _openssh_login(relay, *keys: Path, user: str = "plateforme", bind: str = "127.0.0.1",
                   log_level: str = "ERROR") -> subprocess.CompletedProcess:
    """An OpenSSH sftp login from ``bind`` offering exactly ``keys`` (no agent, no password), listing the folder."""
    sftp = require_program("sftp")
    batch = relay.root / "ls.batch"
    batch.write_text("ls\n")
    args = [sftp, "-b", str(batch), "-P", str(relay.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none", "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", f"LogLevel={log_level}", "-o", "ConnectTimeout=10",
            "-o", f"BindAddress={bind}"]
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


# -- bans in the ledger, by prefix, told to the client, lifted from the command line ----------

BAN_TEXT = r"Received disconnect from 127\.0\.0\.1 port \d+:\d+: banned for too many failed logins from {} until \d\d:\d\d UTC"


def _defender_cli(relay, action: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", "defender", action, "-c", str(relay.config_path), *args],
                          capture_output=True, text=True, timeout=60, cwd=relay.root)


def test_a_ban_survives_a_restart_and_the_banned_client_is_told_why(make_relay, caplog):
    relay = make_relay(defender=_defender_config(ban_seconds=600, max_ban_seconds=3600))
    for _ in range(3):
        with pytest.raises(paramiko.AuthenticationException):
            paramiko_client(relay, password="not the password")
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")
    relay.restart()

    listed = _defender_cli(relay, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (ban,) = json.loads(listed.stdout)
    assert ban["prefix"] == "127.0.0.1/32" and ban["bans"] == 1 and ban["failures"] == 3
    assert 300 < ban["seconds_left"] <= 600  # the ban of 600 s, not a new one
    assert "127.0.0.1/32" in _defender_cli(relay, "list").stdout

    # OpenSSH prints the disconnect text at its default log level (INFO).
    refused = _openssh_login(relay, relay.key, log_level="INFO")
    assert refused.returncode != 0
    assert re.search(BAN_TEXT.format(r"127\.0\.0\.1/32"), refused.stderr), refused.stderr
    # paramiko logs it ("Disconnect (code 1): banned ..."), instead of "Error reading SSH protocol banner".
    with caplog.at_level(logging.INFO, logger="paramiko"):
        with pytest.raises((paramiko.SSHException, EOFError, ConnectionError)):
            paramiko_client(relay, password=PASSWORD)
    assert any("banned for too many failed logins" in r.getMessage() for r in caplog.records)
    assert not _events(relay, "sftp.authenticated")


def test_a_ban_holds_its_whole_prefix_and_an_unban_lifts_it_while_the_relay_runs(make_relay, tmp_path):
    relay = make_relay(defender=_defender_config(ipv4_prefix=24, ban_seconds=600, max_ban_seconds=3600))
    stranger = write_key_pair(tmp_path, "unknown_key")
    for attempt in range(3):
        assert _openssh_login(relay, stranger, bind="127.0.0.1").returncode != 0
        wait_for(lambda n=attempt + 1: len(_events(relay, "sftp.auth_failed")) >= n, timeout=20, what="failure")
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")
    assert _events(relay, "defender.banned")[0]["prefix"] == "127.0.0.0/24"

    # Another address of the /24, with the right key: turned away, and told so.
    refused = _openssh_login(relay, relay.key, bind="127.0.0.2", log_level="INFO")
    assert refused.returncode != 0
    assert re.search(BAN_TEXT.format(r"127\.0\.0\.0/24"), refused.stderr), refused.stderr
    # Another /24 is not held.
    assert _openssh_login(relay, relay.key, bind="127.0.1.1").returncode == 0

    unban = _defender_cli(relay, "unban", "127.0.0.2")
    assert unban.returncode == 0, unban.stderr
    assert "lifted the ban on 127.0.0.0/24" in unban.stdout
    # No reload, no restart: the running relay reads the ledger at the next connection.
    assert _openssh_login(relay, relay.key, bind="127.0.0.2").returncode == 0
    assert json.loads(_defender_cli(relay, "list", "--json").stdout) == []
    assert _defender_cli(relay, "unban", "127.0.0.2").returncode == 1  # nothing left to lift


# -- the pre-authentication budget ---------------------------------------------------------


@pytest.mark.parametrize("trust", ["allowlisted", "known-good"])
def test_idle_sockets_from_many_addresses_do_not_keep_the_platform_out(make_relay, trust):
    defender = _defender_config(allowlist=["127.0.0.1/32"] if trust == "allowlisted" else [])
    relay = make_relay(defender=defender)  # limits: the defaults (max_startups 10:30:100, 8 per address)
    if trust == "known-good":
        assert sftp_batch(relay, ["ls"]).returncode == 0  # the platform has logged in before
    idle: list[socket.socket] = []
    try:
        for i in range(200):  # plain TCP that never says a word, from 20 addresses
            sock = socket.socket()
            idle.append(sock)
            sock.settimeout(20)
            sock.bind((f"127.0.9.{i % 20 + 1}", 0))
            sock.connect(("127.0.0.1", relay.port))
        for sock in idle:  # every one accepted: the relay has sent its version line to each
            assert sock.recv(8, socket.MSG_PEEK).startswith(b"SSH-2.0")

        pushed = sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name)  # at once: no waiting for the idle ones to time out
        assert pushed.returncode == 0, pushed.stderr
        wait_for(lambda: list(relay.inbox("90017").glob("*.zip")), timeout=30, what="the package in the inbox")

        still_open: dict[str, int] = {}

        def within_budget() -> bool:
            # A refused socket gets its disconnect after a short linger, later still on a loaded machine.
            still_open.clear()
            for sock in idle:
                if not _closed_by_relay(sock):
                    still_open[sock.getsockname()[0]] = still_open.get(sock.getsockname()[0], 0) + 1
            return not still_open or (sum(still_open.values()) <= 100 and max(still_open.values()) <= 8)

        wait_for(within_budget, timeout=8, what="the refused idle sockets to be disconnected")
        assert still_open, "the idle sockets timed out first: the push did not go through at once"
        assert sum(still_open.values()) <= 100 and max(still_open.values()) <= 8  # full, and per address
    finally:
        for sock in idle:
            sock.close()
    refused = _events(relay, "sftp.startup_refused")
    assert refused and "waiting to log in" in refused[0]["why"]
    assert not _events(relay, "sftp.too_many_sessions")


def _closed_by_relay(sock: socket.socket) -> bool:
    """Whether the relay has closed this socket (refused: its version line, a disconnect, then EOF)."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_connections_that_never_log_in_count_softly_and_time_out(make_relay):
    relay = make_relay(limits={"max_package_bytes": 64 * 1024 * 1024, "login_timeout_seconds": 1},
                       defender=_defender_config(max_failures=1, unauthenticated_weight=0.5, ban_seconds=600,
                                                 max_ban_seconds=3600))
    # One that closes before logging in (a port check): half a failure, no ban yet.
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        assert sock.recv(8).startswith(b"SSH-2.0")
    wait_for(lambda: _events(relay, "sftp.unauthenticated_closed"), timeout=20, what="the early close counted")
    assert _events(relay, "sftp.unauthenticated_closed")[0]["why"] == "closed before logging in"
    assert sftp_batch(relay, ["ls"]).returncode == 0  # half a failure is not a ban
    # One that says nothing: cut at the login timeout, and the second half brings the ban.
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.settimeout(20)
        assert sock.recv(8).startswith(b"SSH-2.0")
        while sock.recv(4096):
            pass  # until the relay closes it
    wait_for(lambda: _events(relay, "defender.banned"), timeout=20, what="defender.banned")
    assert [e["why"] for e in _events(relay, "sftp.unauthenticated_closed")] == ["closed before logging in",
                                                                                 "login timeout"]
    assert _events(relay, "defender.banned")[0]["failures"] == 1


def test_old_failures_leave_the_ledger(make_defender, ledger):
    defender, clock, _ = make_defender(max_failures=10, window_seconds=60)
    for i in range(5):
        defender.failed(f"203.0.113.{i}", "x", "password")
    clock.now += 120  # past the window and the prune interval
    defender.failed("198.51.100.1", "x", "password")
    assert [r["prefix"] for r in ledger.query("SELECT prefix FROM defender_failures")] == ["198.51.100.1/32"]

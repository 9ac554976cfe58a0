"""The Prometheus endpoint: a real relayd, scraped over HTTP, before and after real pushes."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import paramiko
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import PASSWORD, REAL_PACKAGE, paramiko_client, sftp_put, wait_for
from platform_sshd import (  # noqa: F401 - platform_sshd_fixture registers the fixture
    PlatformSshd,
    fingerprint,
    make_client_key,
    platform_sshd_fixture,
)
from relayd.clock import Clock
from relayd.config import Config, Metrics
from relayd.ledger import Ledger, PackageRecord
from relayd.metrics import Metrics as MetricsPart
from relayd.rejections import Reason

METRICS_ON = {"enabled": True, "listen": {"host": "127.0.0.1", "port": 0}}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(relay, path: str = "/metrics") -> str:
    """The endpoint's URL, from the bound port the relay logged (port 0 in the configuration)."""
    wait_for(lambda: any(e.get("event") == "metrics.listening" for e in relay.events()), timeout=30,
             what="metrics.listening")
    [event] = [e for e in relay.events() if e.get("event") == "metrics.listening"]
    assert event["host"] == "127.0.0.1"
    return f"http://127.0.0.1:{event['port']}{path}"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode("utf-8")


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(relay) -> Samples:
    return parse(fetch(metrics_url(relay)))


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing series fails the test with the names that are there."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exposed; have {sorted({n for n, _ in samples})}"
    return samples[key]


def broken_package(tmp_path: Path, kind: str) -> Path:
    """A package wrong in one way, written by the integration testers' command."""
    out = tmp_path / f"broken-{kind}"
    subprocess.run([sys.executable, "-m", "relayd", "testkit", "sample", "--broken", kind, "--seed", "5",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=60)
    [path] = sorted(out.glob("*.zip"))
    return path


def test_endpoint_is_off_and_on_loopback_by_default():
    default = Metrics()
    assert default.enabled is False
    assert (default.listen.host, default.listen.port) == ("127.0.0.1", 9464)


def test_counters_and_gauges_move_after_a_good_and_a_broken_push(make_relay, tmp_path):
    relay = make_relay(metrics=METRICS_ON)
    before = scrape(relay)
    assert value(before, "relayd_packages_received_total") == 0
    assert value(before, "relayd_packages_accepted_total", insee="90017", demarche="DAUA") == 0
    assert value(before, "relayd_dossiers", state="transmis") == 0
    assert value(before, "relayd_outbox_entries", status="pending") == 0
    assert value(before, "relayd_sessions_open") == 0

    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    broken = broken_package(tmp_path, "xxe")
    assert sftp_put(relay, broken, broken.name).returncode != 0

    after = scrape(relay)
    assert value(after, "relayd_packages_received_total") == 2
    assert value(after, "relayd_packages_received_bytes_total") == REAL_PACKAGE.stat().st_size + broken.stat().st_size
    assert value(after, "relayd_packages_accepted_total", insee="90017", demarche="DAUA") == 1
    assert value(after, "relayd_packages_rejected_total", reason=Reason.XML_FORBIDDEN.value) == 1
    assert value(after, "relayd_dossiers", state="transmis") == 1
    assert value(after, "relayd_dossiers", state="clos") == 0
    assert value(after, "relayd_dossiers_late", level="late") == 0
    # No platform is configured: the AVL waits in the outbox, and the gauge says so.
    pending = relay.ledger_rows("SELECT kind FROM outbox WHERE status = 'pending'")
    assert "AVL" in [row["kind"] for row in pending]
    assert value(after, "relayd_outbox_entries", status="pending") == len(pending)
    assert value(after, "relayd_outbox_entries", status="dead") == 0
    assert value(after, "relayd_replies_delivered_total", kind="AVL") == 0
    # Label values are codes and configured communes only: nothing of the refused package's content.
    labels = {v for _, pairs in after for _, v in pairs}
    assert "A-9-X3UGO4V7" not in labels and not any("DOCTYPE" in v for v in labels)


def test_sessions_open_counts_a_live_connection(make_relay):
    relay = make_relay(metrics=METRICS_ON)
    client = paramiko_client(relay, password=PASSWORD)
    try:
        assert value(scrape(relay), "relayd_sessions_open") == 1
        assert value(scrape(relay), "relayd_uploads_in_flight") == 0
    finally:
        client.close()
        client.get_channel().get_transport().close()
    wait_for(lambda: value(scrape(relay), "relayd_sessions_open") == 0, timeout=30, what="the session to close")


def test_only_metrics_is_served(make_relay):
    relay = make_relay(metrics=METRICS_ON)
    for path in ("/", "/other", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            fetch(metrics_url(relay, path))
        assert answer.value.code == 404, path
    url = metrics_url(relay)
    assert "relayd_packages_received_total" in fetch(url)
    # A stop closes the endpoint with the rest.
    relay.stop()
    assert any(e.get("event") == "metrics.stopped" for e in relay.events())
    with pytest.raises(urllib.error.URLError):
        fetch(url)


def test_wrong_passwords_count_as_auth_failures_then_a_ban(make_relay):
    relay = make_relay(metrics=METRICS_ON, defender={"max_failures": 2})
    before = scrape(relay)
    assert value(before, "relayd_auth_failures_total", method="password") == 0
    assert value(before, "relayd_bans_total") == 0
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, password="not the password")
    wait_for(lambda: value(scrape(relay), "relayd_auth_failures_total", method="password") == 1, timeout=30,
             what="the failed login to be counted")
    assert value(scrape(relay), "relayd_bans_total") == 0
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, password="still not the password")
    wait_for(lambda: value(scrape(relay), "relayd_bans_total") == 1, timeout=30, what="the ban to be counted")
    assert value(scrape(relay), "relayd_auth_failures_total", method="password") == 2


def test_low_disk_shows_in_its_gauge(make_relay, tmp_path):
    relay = make_relay(metrics=METRICS_ON, limits={"max_package_bytes": 64 * 1024 * 1024, "min_free_bytes": 2**60})
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode != 0  # refused: the disk is "full"
    wait_for(lambda: value(scrape(relay), "relayd_disk_low") == 1, timeout=30, what="the low disk in the gauge")


def test_deliveries_move_the_counter_and_the_latency_histogram(make_relay, platform_sshd):
    platform: PlatformSshd = platform_sshd()
    relay = make_relay(metrics=METRICS_ON, platform=platform.relay_config(platform.client_key))
    before = scrape(relay)
    assert value(before, "relayd_reply_delivery_seconds_count") == 0
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: value(scrape(relay), "relayd_replies_delivered_total", kind="AVL") == 1, timeout=60,
             what="the AVL to be delivered and counted")
    after = scrape(relay)
    assert value(after, "relayd_reply_delivery_seconds_count") == 1
    assert value(after, "relayd_reply_delivery_seconds_bucket", le="+Inf") == 1
    assert value(after, "relayd_reply_delivery_seconds_bucket", le="86400.0") == 1
    assert value(after, "relayd_outbox_entries", status="pending") == 0
    assert any(name.endswith(".zip") for name in platform.files())


def test_a_host_key_mismatch_is_counted_and_holds_the_queue_without_dead_letter(make_relay, platform_sshd):
    platform: PlatformSshd = platform_sshd()
    stranger = make_client_key(platform.work, "not_the_server")  # any key that is not the server's
    wrong = fingerprint(stranger.with_name(stranger.name + ".pub"))
    retry = {"initial_seconds": 0.3, "max_seconds": 1.0, "max_attempts": 1}
    relay = make_relay(metrics=METRICS_ON, platform=platform.relay_config(
        platform.client_key, host_key_fingerprints=[wrong], retry=retry))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    # Well past max_attempts: a key that is not pinned holds the queue; it never dead-letters.
    wait_for(lambda: relay.outbox() and relay.outbox()[0]["attempts"] >= 3, timeout=60, what="three attempts")
    samples = scrape(relay)
    assert value(samples, "relayd_host_key_mismatches_total") >= 3
    assert value(samples, "relayd_dead_letters_total", kind="AVL") == 0
    assert value(samples, "relayd_outbox_entries", status="dead") == 0
    assert value(samples, "relayd_outbox_entries", status="pending") == 1
    assert platform.files() == []


def test_reload_keeps_the_address_and_says_a_new_one_needs_a_restart(make_relay):
    relay = make_relay(metrics=METRICS_ON)
    url = metrics_url(relay)
    config = yaml.safe_load(relay.config_path.read_text())
    config["metrics"]["listen"]["port"] = 9
    relay.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e.get("event") == "metrics.needs_restart" for e in relay.events()), timeout=30,
             what="metrics.needs_restart")
    [event] = [e for e in relay.events() if e.get("event") == "metrics.needs_restart"]
    assert event["configured"] == "127.0.0.1:9"
    assert "relayd_dossiers" in fetch(url)  # still served where it was


def test_late_and_overdue_dossiers_follow_the_clock_and_stop_when_closed(tmp_path, password_hashes):
    config = Config.model_validate({
        "storage": {"root": str(tmp_path / "var")},
        "accounts": [{"username": "plateforme", "password_hash": password_hashes["plateforme"], "communes": ["90017"]}],
        "communes": [{"insee": "90017", "name": "T", "inbox": str(tmp_path / "inbox"), "demarches": ["ILE"]}],
        "deadlines": {"warn_days": 20, "overdue_days": 30},
        "metrics": METRICS_ON,
    })
    ledger = Ledger(config.storage.ledger)
    for numero in ("A-1-LATE0001", "A-1-LATE0002"):
        ledger.record_accepted(PackageRecord(sha256=numero, size=1, message_id=numero, numero=numero, demarche="ILE",
                                             insee="90017"), deposited_at=None, inbox_path="x", archive_path="y")

    async def levels(days: float) -> dict[str, float]:
        """Run the part on its own port with the clock ``days`` on, scrape it, and stop it."""
        part = MetricsPart(config, ledger, clock=Clock(timedelta(days=days)))
        task = asyncio.create_task(part.run())
        for _ in range(200):
            if part.port is not None:
                break
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{part.port}/metrics"
        samples = parse(await asyncio.to_thread(fetch, url))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Stopped means the port is closed, not just forgotten.
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(fetch, url)
        return {level: value(samples, "relayd_dossiers_late", level=level) for level in ("late", "overdue")}

    assert asyncio.run(levels(0)) == {"late": 0, "overdue": 0}
    assert asyncio.run(levels(21)) == {"late": 2, "overdue": 0}
    assert asyncio.run(levels(31)) == {"late": 0, "overdue": 2}
    with ledger.transaction() as db:
        db.execute("UPDATE dossiers SET state = 'clos' WHERE numero = 'A-1-LATE0001'")
    assert asyncio.run(levels(31)) == {"late": 0, "overdue": 1}
    ledger.close()


def test_connections_not_logged_in_and_bans_in_force_have_their_gauges(make_relay):
    """Idle sockets count as pending connections, not sessions; a ban shows while it is in force."""
    relay = make_relay(metrics=METRICS_ON, defender={"max_failures": 1})
    before = scrape(relay)
    assert (value(before, "relayd_connections_pending"), value(before, "relayd_bans_active")) == (0, 0)
    idle = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(3)]
    client = paramiko_client(relay, password=PASSWORD)
    try:
        wait_for(lambda: value(scrape(relay), "relayd_connections_pending") == 3, timeout=30,
                 what="the idle sockets to count as pending")
        assert value(scrape(relay), "relayd_sessions_open") == 1
    finally:
        for sock in idle:
            sock.close()
        client.close()
        client.get_channel().get_transport().close()
    wait_for(lambda: value(scrape(relay), "relayd_connections_pending") == 0, timeout=30, what="the sockets to go")
    transport = paramiko.Transport(socket.create_connection(("127.0.0.1", relay.port), source_address=("127.0.0.7", 0)))
    with pytest.raises(paramiko.AuthenticationException):
        transport.connect(username="plateforme", password="not the password")
    transport.close()
    wait_for(lambda: value(scrape(relay), "relayd_bans_active") == 1, timeout=30, what="the ban to show")
    unban = subprocess.run([sys.executable, "-m", "relayd", "defender", "unban", "127.0.0.7", "-c", str(relay.config_path)],
                           capture_output=True, text=True, timeout=60)
    assert unban.returncode == 0, unban.stderr
    assert value(scrape(relay), "relayd_bans_active") == 0

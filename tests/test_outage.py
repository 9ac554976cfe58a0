"""Outages wait, they don't die: a return server (real sshd) stopped for longer than max_attempts x the backoff cap."""

from __future__ import annotations

import random
import urllib.request
from pathlib import Path

from conftest import free_port, paramiko_client, wait_for
from platform_sshd import PlatformSshd, platform_sshd_fixture  # noqa: F401 - registers the fixture

from relayd.pec.replies import read_reply
from relayd.pec.status import StatusFile, write_status_file
from relayd.testkit.samples import SampleSpec, build_package, package_filename, random_numero

#: three attempts of at most 0.3 s each would dead-letter an entry in about a second under the old policy
TINY_RETRY = {"initial_seconds": 0.1, "factor": 2, "max_seconds": 0.3, "jitter": 0.1, "max_attempts": 3,
              "max_age_hours": 0.0005}
ALERT_AFTER_HOURS = 0.0005  # 1.8 s


def push(relay, numeros: list[str], folder: Path) -> None:
    client = paramiko_client(relay)
    try:
        for numero in numeros:
            spec = SampleSpec(numero=numero, demarche="recensementCitoyen", insee="90017")
            local = folder / package_filename(spec)
            local.write_bytes(build_package(spec))
            client.put(str(local), local.name + ".part")
            client.posix_rename(local.name + ".part", local.name)
    finally:
        client.close()
        client.get_channel().get_transport().close()


def drop(relay, numero: str, state: str) -> None:
    folder = relay.returns("90017")
    tmp = folder / f".{numero}-{state}.tmp"
    tmp.write_bytes(write_status_file(StatusFile(numero=numero, state=state)))
    tmp.rename(folder / f"{numero}-{state}.xml")


def metric(relay, name: str) -> float:
    port = relay.config["metrics"]["listen"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_long_outage_keeps_every_entry_pending_then_delivers_all_in_order(make_relay, platform_sshd, tmp_path):
    platform: PlatformSshd = platform_sshd()
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=TINY_RETRY,
                                                      alert_after_hours=ALERT_AFTER_HOURS),
                       metrics={"enabled": True, "listen": {"host": "127.0.0.1", "port": free_port()}})
    platform.stop()
    numeros = [random_numero(random.Random(seed)) for seed in range(4)]
    push(relay, numeros, tmp_path)
    wait_for(lambda: len(relay.ledger_rows("SELECT * FROM dossiers")) == 4, what="four dossiers")
    for numero in numeros:
        drop(relay, numero, "recu")
        drop(relay, numero, "clos")
    wait_for(lambda: len(relay.outbox()) == 12, what="4 AVL and 8 Retour queued")
    # Well past max_attempts x the cap, and past max_age_hours: every entry still waits.
    wait_for(lambda: min(r["attempts"] for r in relay.outbox() if r["kind"] == "AVL") >= 2 * TINY_RETRY["max_attempts"],
             what="twice max_attempts")
    wait_for(lambda: any(e.get("event") == "delivery.return_server_down" for e in relay.events()),
             what="the outage alert")
    rows = relay.outbox()
    assert {r["status"] for r in rows} == {"pending"}
    assert {r["last_error_code"] for r in rows if r["attempts"]} == {"connect_failed"}
    assert metric(relay, "relayd_return_server_down") == 1
    assert metric(relay, 'relayd_outbox_entries{status="dead"}') == 0

    platform.start()
    wait_for(lambda: {r["status"] for r in relay.outbox()} == {"delivered"}, timeout=60, what="everything delivered")
    wait_for(lambda: any(e.get("event") == "delivery.return_server_back" for e in relay.events()), what="the all-clear")
    assert metric(relay, "relayd_return_server_down") == 0
    landed = sorted(platform.incoming.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
    assert not [p for p in landed if p.name.endswith(".part")]
    replies = [read_reply(p.read_bytes()) for p in landed]
    # Replies keep the answered MessageId (reply_style: mirror): each is told apart by its dossier and what it says.
    said = {((r.ack or r.retour).numero, r.kind, r.retour.state if r.retour else None) for r in replies}
    assert len(replies) == 12 and len(said) == 12
    # Order per dossier, as the ledger recorded each delivery (one at a time, so ids of delivery = order).
    delivered = relay.ledger_rows("SELECT numero, kind, target_state FROM outbox ORDER BY delivered_at, id")
    for numero in numeros:
        mine = [(r["kind"], r["target_state"]) for r in delivered if r["numero"] == numero]
        assert mine == [("AVL", None), ("Retour", "recu"), ("Retour", "clos")], numero
    assert {r["state"] for r in relay.ledger_rows("SELECT state FROM dossiers")} == {"clos"}


def test_a_host_key_mismatch_holds_the_queue_and_never_dead_letters(make_relay, platform_sshd, tmp_path):
    from platform_sshd import fingerprint, make_client_key

    platform: PlatformSshd = platform_sshd()
    stranger = make_client_key(tmp_path, "not_the_server")
    wrong = fingerprint(stranger.with_name(stranger.name + ".pub"))
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=TINY_RETRY,
                                                      host_key_fingerprints=[wrong]))
    numero = random_numero(random.Random(99))
    push(relay, [numero], tmp_path)
    wait_for(lambda: relay.outbox() and relay.outbox()[0]["attempts"] >= 2 * TINY_RETRY["max_attempts"],
             what="twice max_attempts")
    (row,) = relay.outbox()
    assert row["status"] == "pending" and row["last_error_code"] == "host_key_mismatch"
    assert platform.logins() == 0 and platform.files() == []
    # The admin pins the right key and reloads: the held ack goes.
    relay.config["platform"]["host_key_fingerprints"] = [platform.host_key_fingerprint]
    relay.write_config()
    import signal

    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: relay.outbox()[0]["status"] == "delivered", timeout=30, what="the ack delivered")
    assert len([n for n in platform.files() if not n.endswith(".part")]) == 1


def test_attempts_an_outage_took_do_not_count_towards_dead_letter(tmp_path):
    """In-process, with a clock the test moves: three days of outage, then the server refuses with its disk full."""
    from relayd.config import Retry
    from relayd.ledger import Ledger
    from relayd.outbound.outbox import Outbox, Queued
    from relayd.pec.replies import ReplyPackage

    now = [1_800_000_000.0]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    retry = Retry(initial_seconds=10, factor=2, max_seconds=60, jitter=0, max_attempts=3, max_age_hours=24)
    outbox = Outbox(ledger, tmp_path / "outbox", tmp_path / "archive", retry, clock=lambda: now[0])
    try:
        entry = outbox.enqueue(ReplyPackage(message_id="M1", name="r1.zip", kind="AVL", data=b"ack"),
                               Queued(kind="AVL", numero="A-1-AAAAAAAA"))
        for _ in range(50):  # 72 h of a server out of reach
            now[0] += 72 * 3600 / 50
            entry = outbox.failed(outbox.get(entry.id), "connect_failed", "refused", outage=True)
            assert entry.status == "pending"
        assert entry.attempts == 50
        # Back, but refusing: the whole budget of max_attempts, not a dead-letter at the first refusal.
        for n in range(1, 4):
            now[0] += 120
            entry = outbox.failed(outbox.get(entry.id), "remote_error", "No space left on device")
            assert entry.status == ("dead" if n == 3 else "pending"), n
    finally:
        ledger.close()


def test_a_name_that_does_not_resolve_is_an_outage_not_a_dead_letter(tmp_path):
    """DNS failure: the entry waits like any unreachable server."""
    import asyncio

    import pytest

    from relayd.config import ReturnServer
    from relayd.outbound.delivery import OUTAGE_FAILURES
    from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient
    from platform_sshd import make_client_key

    key = make_client_key(tmp_path)
    server = ReturnServer(host="relayd-return-server.invalid", username="commune", private_key=key,
                          host_key_fingerprints=["SHA256:" + "A" * 43], connect_timeout_seconds=5)
    payload = tmp_path / "ack.zip"
    payload.write_bytes(b"ack")

    async def deliver() -> None:
        async with ReturnServerClient(server) as client:
            await client.deliver(payload, "ack.zip", remote_dir=".")

    with pytest.raises(DeliveryError) as caught:
        asyncio.run(deliver())
    assert caught.value.code in OUTAGE_FAILURES

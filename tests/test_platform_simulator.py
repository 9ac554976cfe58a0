"""The platform simulator, against a real demo relay, and its report's judgement on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for
from relayd.pec.envelope import Routing
from relayd.pec.replies import build_ack, build_retour
from relayd.rejections import Reason, Rejection
from relayd.testkit.platform import Sent, check_received, generate


def platform_cmd(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", "testkit", "platform", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_platform_against_the_demo_reports_every_ack_and_return(demo):
    folder, info = demo.folder, demo.info
    result = platform_cmd("--demo", str(folder), "--count", "10", "--seed", "5", "--broken", "document-missing",
                          "--broken", "unknown-demarche", "--broken", "not-a-zip", "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["sent"] == 13 and report["accepted"] == 10 and report["refused"] == 3
    assert report["avl"] == report["expected_avl"] == 10
    # document-missing and unknown-demarche can be addressed; not-a-zip cannot.
    assert report["anl"] == report["expected_anl"] == 2
    # 75056 sends "reçu" by itself in the demo: half of the packages went there.
    assert report["retours"] == {"recu": 5} and report["expected_retours"] == 5
    assert report["invalid"] == [] and report["unexpected"] == [] and report["missing"] == []
    assert Path(info["platform"]["received"]).is_dir()


def test_a_status_file_written_by_hand_reaches_the_simulator(demo):
    folder, info = demo.folder, demo.info
    pushed = platform_cmd("--demo", str(folder), "--count", "1", "--insee", "90017", "--seed", "9", "--json")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    inbox = Path(info["communes"]["90017"]["inbox"])
    (package,) = list(inbox.iterdir())
    numero = package.name.split("-recensementCitoyen")[0].split("-ILE")[0]
    # What docs/formats.md tells an editor to write, by hand, then rename into the return folder.
    status = f"""<?xml version="1.0" encoding="UTF-8"?>
<Statut xmlns="urn:relayd:statut:1" version="1">
  <NumeroTeledemarche>{numero}</NumeroTeledemarche>
  <Etat>recu</Etat>
  <Commentaire>Votre demande est en cours d'instruction.</Commentaire>
</Statut>
"""
    returns = Path(info["communes"]["90017"]["returns"])
    (returns / ".statut.xml.tmp").write_text(status, encoding="utf-8")
    os.rename(returns / ".statut.xml.tmp", returns / "statut.xml")
    received = Path(info["platform"]["received"])
    wait_for(lambda: any(".Retour." in p.name for p in received.iterdir()), what="the Retour on the simulator")
    report = platform_cmd("--demo", str(folder), "--count", "0", "--json")
    assert report.returncode == 0, report.stdout
    data = json.loads(report.stdout)
    assert data["retours"] == {"recu": 1} and data["invalid"] == []


# --------------------------------------------------------------------------- the report's judgement


@pytest.fixture
def sent_two(tmp_path: Path) -> list[Sent]:
    plan = generate(tmp_path / "sent", count=2, demarches=["recensementCitoyen"], insees=["90017"], seed=1)
    for _, sent in plan:
        sent.pushed = "accepted"
    return [s for _, s in plan]


def _routing(sent: Sent, tmp_path: Path) -> Routing:
    import zipfile

    from relayd.pec.envelope import read_envelope
    from relayd.pec.xml import parse_xml

    with zipfile.ZipFile(tmp_path / "sent" / sent.file) as zf:
        return read_envelope(parse_xml(zf.read("message.xml"), name="message.xml")).header.routing


def test_report_flags_missing_invalid_and_unexpected(tmp_path, sent_two):
    received = tmp_path / "received"
    received.mkdir()
    first, second = sent_two
    routing = _routing(first, tmp_path)
    avl = build_ack(routing, kind="AVL", numero=first.numero, demarche=first.demarche)
    (received / avl.name).write_bytes(avl.data)
    good = check_received(received, sent_two)
    assert good.avl == 1 and good.missing == [f"AVL for {second.numero} ({second.file})"]
    assert not good.ok

    # An ANL for a package that was accepted, a garbage file, and clos before reçu.
    anl = build_ack(routing, kind="ANL", numero=first.numero, demarche=first.demarche,
                    rejection=Rejection(Reason.MEMBER_MISSING, "x"))
    (received / anl.name).write_bytes(anl.data)
    (received / "garbage.zip").write_bytes(b"not a zip")
    clos = build_retour(routing, numero=first.numero, demarche=first.demarche, state="clos", comment=None, attachments=[])
    (received / clos.name).write_bytes(clos.data)
    time.sleep(0.01)
    recu = build_retour(routing, numero=first.numero, demarche=first.demarche, state="recu", comment=None, attachments=[])
    (received / recu.name).write_bytes(recu.data)
    os.utime(received / recu.name, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    bad = check_received(received, sent_two, expect_retours={first.numero: ["recu", "clos"]})
    assert [i.split(":")[0] for i in bad.invalid] == ["garbage.zip"]
    assert any("an ANL" in u and "expected AVL" in u for u in bad.unexpected)
    assert any("out of order" in u for u in bad.unexpected)
    assert any("Retour recu then clos" in m for m in bad.missing)


def test_a_relay_that_cannot_be_reached_is_exit_2(tmp_path):
    from conftest import free_port, write_key_pair

    key = write_key_pair(tmp_path, "key")
    result = platform_cmd("--relay", f"127.0.0.1:{free_port()}", "--user", "plateforme", "--key", str(key),
                          "--received", str(tmp_path), "--dir", str(tmp_path / "work"), "--count", "1", "--insee", "90017")
    assert result.returncode == 2
    assert "could not push" in result.stderr and "refused" in result.stderr.lower()


def test_the_relay_logs_in_to_a_return_server_with_a_password_file(tmp_path):
    """The return server's account may have a password instead of a key (platform.password_file)."""
    import asyncio

    from relayd.config import ReturnServer as ReturnServerSettings
    from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient
    from relayd.testkit.platform import ReturnServer

    secret = tmp_path / "platform.password"
    secret.write_text("s3cret du relais\n")
    package = tmp_path / "a.zip"
    package.write_bytes(b"PK" + b"x" * 100)

    async def scenario() -> tuple[list[str], str]:
        server = ReturnServer(tmp_path / "platform", password="s3cret du relais")
        await server.start()
        try:
            settings = {"host": "127.0.0.1", "port": server.port, "username": server.username,
                        "password_file": str(secret), "host_key_fingerprints": [server.fingerprint]}
            async with ReturnServerClient(ReturnServerSettings.model_validate(settings)) as client:
                await client.deliver(package, "a.zip", remote_dir=".")
            secret.write_text("wrong\n")
            async with ReturnServerClient(ReturnServerSettings.model_validate(settings)) as client:
                try:
                    await client.deliver(package, "b.zip", remote_dir=".")
                except DeliveryError as exc:
                    refused = exc.code
                else:
                    refused = "delivered"
            return sorted(p.name for p in server.received.iterdir()), refused
        finally:
            await server.close()

    names, refused = asyncio.run(scenario())
    assert names == ["a.zip"] and refused == "auth_failed"


def test_serve_runs_just_the_return_server(tmp_path):
    """``--serve``: a return server for a relay configured by hand, until interrupted."""
    import asyncio
    import signal
    import socket

    from conftest import free_port, wait_for
    from relayd.config import ReturnServer as ReturnServerSettings
    from relayd.outbound.sftp_client import ReturnServerClient

    port = free_port()
    secret = tmp_path / "password"
    secret.write_text("mot de passe de la plateforme\n")
    log = open(tmp_path / "serve.log", "wb")
    # Started as a background job is: with SIGINT ignored.
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "testkit", "platform", "--serve", "--listen", f"127.0.0.1:{port}",
                             "--dir", str(tmp_path / "platform"), "--accept-password-file", str(secret)],
                            stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, timeout=30, what="the return server")
        fingerprint = (tmp_path / "platform" / "host_key.pub").read_text()
        from asyncssh import import_public_key

        settings = ReturnServerSettings.model_validate({
            "host": "127.0.0.1", "port": port, "username": "relayd", "password_file": str(secret),
            "host_key_fingerprints": [import_public_key(fingerprint).get_fingerprint("sha256")]})
        package = tmp_path / "retour.zip"
        package.write_bytes(b"PK" + bytes(200))

        async def deliver() -> None:
            async with ReturnServerClient(settings) as client:
                await client.deliver(package, package.name, remote_dir=".")

        asyncio.run(deliver())
        assert (tmp_path / "platform" / "received" / "retour.zip").read_bytes() == package.read_bytes()
        assert (tmp_path / "platform" / "arrivals.log").read_text().split() == ["retour.zip"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0  # stopped by its own handler, cleanly
    finally:
        if proc.poll() is None:  # never leave the child behind a failed assertion
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    assert "return server stopped" in (tmp_path / "serve.log").read_text()
    assert "mot de passe de la plateforme" not in (tmp_path / "serve.log").read_text()


def test_serve_stops_on_sigterm(tmp_path):
    import signal
    import socket

    from conftest import free_port, wait_for

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "testkit", "platform", "--serve", "--listen", f"127.0.0.1:{port}",
                             "--dir", str(tmp_path / "platform")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, timeout=30, what="the return server")
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert b"return server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

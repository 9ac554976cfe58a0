"""The return path end to end: a real relayd process, and a real OpenSSH sshd as the platform's return server.

Packages go in with paramiko or OpenSSH sftp; the business software's side is played by
writing status files into the commune's return directory (or by ``relayd return``); what
reaches the platform is read back from sshd's folder with relayd's own reader and checked
against the XSDs in ``schemas/``.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lxml import etree
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from conftest import REAL_MOTDEPASSE, REAL_PACKAGE, paramiko_client, paramiko_put, sftp_put, wait_for
from platform_sshd import PlatformSshd, make_client_key, platform_sshd_fixture  # noqa: F401 - registers the fixture
from relayd.dossiers import LABELS as STATE_LABELS
from relayd.pec.envelope import read_envelope
from relayd.pec.replies import Reply, read_reply
from relayd.pec.status import StatusAttachment, StatusFile, write_status_file
from relayd.pec.xml import load_schema, parse_xml
from relayd.rejections import Reason
from relayd.testkit.broken import build_broken
from relayd.testkit.samples import (
    SampleSpec,
    build_members,
    build_package,
    package_filename,
    pdf_bytes,
    random_numero,
    write_zip,
)

REAL_NUMERO = "A-9-X3UGO4V7"
REAL_MESSAGE_ID = "A-9-X3UGO4V7 5808773 Principal 2019-04-03T16:26:40"

#: quick retries, so that "two retry rounds" take a second or two
FAST_RETRY = {"initial_seconds": 0.3, "factor": 2, "max_seconds": 1.0, "jitter": 0.1}


# --------------------------------------------------------------------------- helpers


class Arrivals(FileSystemEventHandler):
    """The order in which names are published on the server, from the kernel's rename events.

    File times are too coarse for this (a few milliseconds apart, two files can share one).
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def on_moved(self, event) -> None:
        with self._lock:
            self.names.append(os.path.basename(os.fsdecode(event.dest_path)))

    def order(self, name: str) -> int:
        with self._lock:
            return self.names.index(name) if name in self.names else len(self.names)


@pytest.fixture
def platform(platform_sshd) -> Iterator[PlatformSshd]:
    sshd = platform_sshd()
    sshd.arrivals = Arrivals()
    observer = Observer()
    observer.schedule(sshd.arrivals, str(sshd.incoming), recursive=False)
    observer.start()
    yield sshd
    observer.stop()
    observer.join(timeout=10)


@pytest.fixture
def linked(make_relay, platform):
    """A relay whose return server is the test's sshd."""
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    return relay, platform


def published(platform: PlatformSshd) -> list[str]:
    """The names the relay has published on the server (an upload in flight is still a .part)."""
    return [name for name in platform.files() if not name.endswith(".part")]


def received(platform: PlatformSshd) -> list[Reply]:
    """Every reply on the platform's side, in the order the server published them."""
    paths = [platform.incoming / name for name in published(platform)]
    paths.sort(key=lambda p: (platform.arrivals.order(p.name), p.stat().st_mtime_ns, p.name))
    return [read_reply(p.read_bytes()) for p in paths]


def wait_received(platform: PlatformSshd, count: int, *, timeout: float = 60) -> list[Reply]:
    wait_for(lambda: len(published(platform)) >= count, timeout=timeout, what=f"{count} files on the platform")
    return received(platform)


def push(relay, specs: list[SampleSpec], folder: Path) -> None:
    """Push generated packages in one paramiko session, each by temporary name then rename."""
    client = paramiko_client(relay)
    try:
        for spec in specs:
            local = folder / package_filename(spec)
            local.write_bytes(build_package(spec))
            client.put(str(local), local.name + ".part")
            client.posix_rename(local.name + ".part", local.name)
    finally:
        client.close()
        client.get_channel().get_transport().close()


def drop(relay, numero: str, state: str, *, comment: str | None = None, attachments: dict[str, bytes] | None = None,
         insee: str = "90017", name: str | None = None, raw: bytes | None = None) -> Path:
    """Play the business software: attachments first, then the status file, each renamed into place."""
    folder = relay.returns(insee)
    for att_name, data in (attachments or {}).items():
        tmp = folder / f".{att_name}.tmp"
        tmp.write_bytes(data)
        tmp.rename(folder / att_name)
    document = raw if raw is not None else write_status_file(StatusFile(
        numero=numero, state=state, comment=comment,
        attachments=[StatusAttachment(file=n) for n in (attachments or {})],
    ))
    final = folder / (name or f"{numero}-{state}.xml")
    tmp = folder / f".{final.name}.tmp"
    tmp.write_bytes(document)
    tmp.rename(final)
    return final


def assert_valid_against_schemas(reply_bytes: bytes) -> None:
    """The envelope validates against pec-envelope.xsd, and so does its body against our XSD."""
    with zipfile.ZipFile(io.BytesIO(reply_bytes)) as zf:
        root = parse_xml(zf.read("message.xml"), name="message.xml")
    load_schema("pec-envelope.xsd").assertValid(root)
    body = root.find(".//{*}Content")[0]
    schema = {"Accuse": "relayd-accuse.xsd", "Retour": "relayd-retour.xsd"}[etree.QName(body).localname]
    load_schema(schema).assertValid(etree.fromstring(etree.tostring(body)))


def specs(count: int, seed: int, *, insee: str = "90017", demarche: str = "recensementCitoyen") -> list[SampleSpec]:
    rng = random.Random(seed)
    return [SampleSpec(numero=random_numero(rng), demarche=demarche, insee=insee) for _ in range(count)]


def one_dossier(linked, tmp_path: Path, *, seed: int):
    """A relay linked to the platform, with one generated dossier handed over and acknowledged."""
    relay, platform = linked
    (spec,) = specs(1, seed=seed)
    push(relay, [spec], tmp_path)
    wait_received(platform, 1)
    return relay, platform, spec


# --------------------------------------------------------------------------- acks


def test_real_package_gets_an_avl_with_routing_swapped(linked, tmp_path):
    relay, platform = linked
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    (ack,) = wait_received(platform, 1)
    assert ack.kind == "AVL"
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        original = read_envelope(parse_xml(zf.read("message.xml"), name="message.xml")).header.routing
    # Swapped: we speak as the original recipient, to the address the platform gave for acks.
    assert ack.routing.sender == original.recipients.recipients[0]
    assert ack.routing.recipients.recipients == [original.ack_to]
    assert ack.routing.flow_type == "DAUA"
    # As the real replier: the answered MessageId is kept, and the body names it too.
    assert ack.message_id == REAL_MESSAGE_ID
    assert ack.ack.message_id_origine == REAL_MESSAGE_ID
    assert ack.ack.numero == REAL_NUMERO
    raw = (platform.incoming / published(platform)[0]).read_bytes()
    assert_valid_against_schemas(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert REAL_MOTDEPASSE.encode() not in zf.read("message.xml")
    assert not [n for n in platform.files() if n.endswith(".part")]
    (row,) = relay.outbox()
    assert row["status"] == "delivered" and row["kind"] == "AVL"


def test_readable_rejected_envelope_gets_an_anl_with_the_reason(linked, tmp_path):
    relay, platform = linked
    # Unreadable envelope first: nobody to address, so no ack; then a readable one refused for its démarche.
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(build_broken("not-a-zip", SampleSpec(numero="A-1-GARBAGE01")))
    sftp_put(relay, garbage, garbage.name)
    refused = tmp_path / "refused.zip"
    refused.write_bytes(build_broken("document-missing", SampleSpec(numero="A-1-MISSING01")))
    sftp_put(relay, refused, refused.name)
    (anl,) = wait_received(platform, 1)
    assert anl.kind == "ANL"
    assert anl.ack.code == "member_missing"
    assert "not in the package" in anl.ack.motif
    assert anl.ack.numero == "A-1-MISSING01"
    assert_valid_against_schemas((platform.incoming / published(platform)[0]).read_bytes())
    assert [r["kind"] for r in relay.outbox()] == ["ANL"]


def _routing_edited(spec: SampleSpec, old: str, new: str, *, in_ack_to: bool) -> bytes:
    """``spec``'s package with one edit to message.xml's Routing (in ``AckTo`` when ``in_ack_to``)."""
    members = build_members(spec)
    xml = members["message.xml"].decode("utf-8")
    start = xml.index("<ns2:AckTo>") if in_ack_to else xml.index("<ns2:Routing>")
    edited = xml[:start] + xml[start:].replace(old, new, 1)
    assert edited != xml
    members["message.xml"] = edited.encode("utf-8")
    return write_zip(members, date_time=spec.zip_date_time)


@pytest.mark.parametrize("old, new, in_ack_to", [
    # Each is well-formed, passes every check on values, and is copied into the reply's Routing,
    # where the schema every reply must pass refuses it: no AVL, ANL or Retour could ever be built.
    ("<ns2:Service>", '<ns2:Service role="x">', True),                      # an attribute
    ("</ns2:Country>", '</ns2:Country><Note xmlns="">x</Note>', True),        # an element of no namespace
    ("<ns2:Guichet>", '<ns2:Guichet xsi:nil="true">', True),                 # xsi:nil where it is not nillable
    ('xsi:type="ns2:Location_FR"', 'xsi:type="ns2:Elsewhere"', True),        # a type the schema does not know
    ("<ns2:MessageId>", '<ns2:MessageId lang="fr">', False),                 # outside AckTo too
], ids=["attribute", "no-namespace-element", "xsi-nil", "unknown-xsi-type", "message-id-attribute"])
def test_a_routing_no_reply_can_carry_is_refused_not_retried_for_ever(make_relay, tmp_path, old, new, in_ack_to):
    relay = make_relay(intake={"initial_seconds": 0.2, "max_seconds": 0.5, "max_attempts": 2})
    spec = SampleSpec(numero="A-9-NOREPLY1", demarche="recensementCitoyen", insee="90017")
    local = tmp_path / "p.zip"
    local.write_bytes(_routing_edited(spec, old, new, in_ack_to=in_ack_to))
    # Before: the AVL failed to build after the hand-over was decided, intake took it for its own
    # fault ("internal error ... kept"), and the ANL of the internal_error failed the same way:
    # the package stayed in staging, retried for ever, neither delivered nor refused.
    with pytest.raises(OSError, match=Reason.ENVELOPE_INVALID.value):
        paramiko_put(relay, local, "p.zip", style="rename")
    (entry,) = relay.quarantined()
    assert entry["code"] == Reason.ENVELOPE_INVALID.value and "Routing" in entry["message"]
    assert entry["numero"] == spec.numero
    assert not any(relay.inbox("90017").iterdir())
    assert not list((relay.root / "var" / "staging").glob("*.zip"))
    assert relay.outbox() == []  # no ANL: no reply could carry this Routing


def test_no_ack_when_the_envelope_does_not_ask(linked, tmp_path):
    relay, platform = linked
    quiet, loud = specs(2, seed=7)
    quiet = SampleSpec(numero=quiet.numero, ack_required=False)
    push(relay, [quiet, loud], tmp_path)
    (ack,) = wait_received(platform, 1)
    assert ack.ack.numero == loud.numero
    assert [r["numero"] for r in relay.outbox()] == [loud.numero]


def test_a_resend_is_acked_again(linked, tmp_path):
    relay, platform = linked
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_received(platform, 1)
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    acks = wait_received(platform, 2)
    assert [a.kind for a in acks] == ["AVL", "AVL"]
    # Two acks, two files: what is unique is the name (the envelope keeps the answered MessageId).
    assert len(set(published(platform))) == 2 and acks[0].message_id == acks[1].message_id == REAL_MESSAGE_ID
    assert len(list(relay.inbox("90017").iterdir())) == 1


# --------------------------------------------------------------------------- returns


def test_recu_then_clos_with_attestation_arrive_in_order(linked, tmp_path):
    relay, platform = linked
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_received(platform, 1)
    # "reçu" through the CLI, as a commune without capable business software would.
    result = relay.cli("return", REAL_NUMERO, "--state", "recu", "--comment", "Dossier pris en charge.")
    assert result.returncode == 0, result.stderr
    attestation = pdf_bytes(["Attestation de recensement"], padding=os.urandom(300 * 1024))
    assert 300 * 1024 < len(attestation) < 1024 * 1024
    drop(relay, REAL_NUMERO, "clos", comment="Attestation jointe.", attachments={"attestation.pdf": attestation})
    replies = wait_received(platform, 3)
    assert [r.kind for r in replies] == ["AVL", "Retour", "Retour"]
    recu, clos = replies[1].retour, replies[2].retour
    assert (recu.state, recu.label) == ("recu", STATE_LABELS["recu"])
    assert recu.comment == "Dossier pris en charge."
    assert (clos.state, clos.label) == ("clos", STATE_LABELS["clos"])
    assert clos.message_id_origine == REAL_MESSAGE_ID
    assert list(replies[2].members.values()) == [attestation]
    for name in published(platform):
        assert_valid_against_schemas((platform.incoming / name).read_bytes())
    wait_for(lambda: relay.ledger_rows("SELECT state FROM dossiers WHERE numero = ?", (REAL_NUMERO,))[0]["state"] == "clos",
             what="the ledger to say clos")
    history = [e["kind"] for e in relay.ledger_rows("SELECT kind FROM events WHERE numero = ? ORDER BY id", (REAL_NUMERO,))]
    assert history.index("state_recu") < history.index("state_clos")
    # The drop and its attachment left the return directory for the archive.
    assert list(relay.returns().iterdir()) == []
    # No secret of the envelope went anywhere on the way back.
    assert REAL_MOTDEPASSE not in relay.log_text()
    for name in published(platform):
        with zipfile.ZipFile(platform.incoming / name) as zf:
            assert all(REAL_MOTDEPASSE.encode() not in zf.read(m) for m in zf.namelist())


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("clos_before_recu", "transition_invalid"),
        ("unknown_dossier", "dossier_unknown"),
        ("attachment_2mb", "attachment_too_large"),
        ("malformed_xml", "xml_malformed"),
    ],
)
def test_refused_drops_get_a_reason_and_nothing_is_sent(linked, tmp_path, case, code):
    relay, platform, spec = one_dossier(linked, tmp_path, seed=11)
    if case == "clos_before_recu":
        dropped = drop(relay, spec.numero, "clos")
    elif case == "unknown_dossier":
        dropped = drop(relay, "A-1-NEVERSEEN", "recu")
    elif case == "attachment_2mb":
        big = pdf_bytes(["trop gros"], padding=os.urandom(2 * 1024 * 1024))
        dropped = drop(relay, spec.numero, "recu", attachments={"gros.pdf": big})
    else:
        dropped = drop(relay, spec.numero, "recu", raw=b"<Statut><NumeroTeledemarche>oops</Statut")
    wait_for(lambda: relay.rejected(), what="a reason file in rejected/")
    (reason,) = relay.rejected()
    assert reason["code"] == code
    assert reason["message"] and reason["sent"] is False
    assert reason["_file"].exists() and reason["_file"].name.endswith(dropped.name)
    assert not dropped.exists()
    assert [r["kind"] for r in relay.outbox()] == ["AVL"]
    assert len(platform.files()) == 1
    # The relay keeps serving: a correct "reçu" for the same dossier goes through.
    drop(relay, spec.numero, "recu", name="next.xml")
    assert [r.kind for r in wait_received(platform, 2)] == ["AVL", "Retour"]


def test_a_redropped_status_file_is_sent_once(linked, tmp_path):
    relay, platform, spec = one_dossier(linked, tmp_path, seed=12)
    document = write_status_file(StatusFile(numero=spec.numero, state="recu"))
    drop(relay, spec.numero, "recu", raw=document)
    wait_received(platform, 2)
    drop(relay, spec.numero, "recu", raw=document, name="again.xml")
    wait_for(lambda: not (relay.returns() / "again.xml").exists(), what="the re-drop to be taken")
    assert len([r for r in relay.outbox() if r["kind"] == "Retour"]) == 1
    assert relay.rejected() == []
    kinds = [e["kind"] for e in relay.ledger_rows("SELECT kind FROM events WHERE numero = ?", (spec.numero,))]
    assert "return_redropped" in kinds


def test_auto_receipt_sends_recu_by_itself(make_relay, platform, tmp_path):
    relay = make_relay(start=False, platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    relay.config["communes"][1]["auto_receipt"] = True
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.start()
    (spec,) = specs(1, seed=13, insee="75056")
    push(relay, [spec], tmp_path)
    replies = wait_received(platform, 2)
    assert [r.kind for r in replies] == ["AVL", "Retour"]
    assert replies[1].retour.state == "recu"
    # A "reçu" from the business software now comes too late: the dossier is already there.
    drop(relay, spec.numero, "recu", insee="75056")
    wait_for(lambda: relay.rejected("75056"), what="the late reçu to be refused")
    assert relay.rejected("75056")[0]["code"] == "transition_invalid"


# --------------------------------------------------------------------------- outages and crashes


def test_outage_twenty_drops_delivered_once_in_order(linked, tmp_path):
    relay, platform = linked
    dossiers = specs(10, seed=21)
    push(relay, dossiers, tmp_path)
    wait_received(platform, 10)
    platform.stop()
    for spec in dossiers:
        drop(relay, spec.numero, "recu")
        drop(relay, spec.numero, "clos", comment="fin")
    wait_for(lambda: len([r for r in relay.outbox() if r["kind"] == "Retour"]) == 20, what="20 returns queued")
    # At least two retry rounds: the first entries have failed twice, and nothing was delivered.
    wait_for(lambda: min(r["attempts"] for r in relay.outbox() if r["status"] == "pending" and r["target_state"] == "recu") >= 2,
             what="two retry rounds")
    assert all(r["status"] == "pending" for r in relay.outbox() if r["kind"] == "Retour")
    platform.start()
    wait_for(lambda: all(r["status"] == "delivered" for r in relay.outbox()), timeout=90, what="everything delivered")
    replies = received(platform)
    retours = [r for r in replies if r.kind == "Retour"]
    assert len(retours) == 20
    assert len({(r.retour.numero, r.retour.state) for r in retours}) == 20
    assert len({row["message_id"] for row in relay.outbox() if row["kind"] == "Retour"}) == 20  # relayd's own ids
    for spec in dossiers:
        mine = [r.retour.state for r in retours if r.retour.numero == spec.numero]
        assert mine == ["recu", "clos"], spec.numero
    assert not [n for n in platform.files() if n.endswith(".part")]
    assert {r["state"] for r in relay.ledger_rows("SELECT state FROM dossiers")} == {"clos"}


def test_sigkill_during_deliveries_loses_and_duplicates_nothing(linked, tmp_path):
    relay, platform = linked
    dossiers = specs(12, seed=31)
    push(relay, dossiers, tmp_path)
    wait_received(platform, 12)
    for i, spec in enumerate(dossiers):
        attestation = pdf_bytes([f"Attestation {i}"], padding=os.urandom(900 * 1024))
        drop(relay, spec.numero, "recu", attachments={f"piece{i}.pdf": attestation})
    # Three kills at different points of the run, each while deliveries are under way.
    for threshold in (14, 17, 20):
        wait_for(lambda: len(platform.files()) >= threshold, what="deliveries under way")
        relay.kill()
        relay.start()
    wait_for(lambda: len(relay.outbox()) == 24 and all(r["status"] == "delivered" for r in relay.outbox()),
             timeout=90, what="everything delivered after the restart")
    names = platform.files()
    assert not [n for n in names if n.endswith(".part")]
    assert sorted(names) == sorted(r["remote_name"] for r in relay.outbox())
    retours = [r for r in received(platform) if r.kind == "Retour"]
    assert sorted(r.retour.numero for r in retours) == sorted(s.numero for s in dossiers)


def test_wrong_host_key_sends_nothing_and_says_so(make_relay, platform, tmp_path):
    other = make_client_key(tmp_path, "not_the_server")  # any key that is not the server's
    from platform_sshd import fingerprint

    wrong = fingerprint(other.with_name(other.name + ".pub"))
    relay = make_relay(platform=platform.relay_config(platform.client_key, host_key_fingerprints=[wrong], retry=FAST_RETRY))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: any(e.get("code") == "host_key_mismatch" for e in relay.events()), what="the mismatch in the log")
    event = next(e for e in relay.events() if e.get("code") == "host_key_mismatch")
    assert platform.host_key_fingerprint in event["error"]
    listing = relay.cli("outbox", "list")
    assert listing.returncode == 0
    assert "host_key_mismatch" in listing.stdout and platform.host_key_fingerprint in listing.stdout
    assert platform.files() == []
    assert platform.logins() == 0


def test_hundred_status_files_at_once_are_all_picked_up(linked, tmp_path):
    relay, platform = linked
    dossiers = specs(100, seed=41)
    push(relay, dossiers, tmp_path)
    wait_for(lambda: len(relay.ledger_rows("SELECT numero FROM dossiers")) == 100, timeout=120, what="100 dossiers")
    staging = tmp_path / "staging"
    staging.mkdir()
    for spec in dossiers:
        (staging / f"{spec.numero}.xml").write_bytes(write_status_file(StatusFile(numero=spec.numero, state="recu")))
    for spec in dossiers:  # as fast as a rename goes
        os.rename(staging / f"{spec.numero}.xml", relay.returns() / f"{spec.numero}.xml")
    wait_for(lambda: len([r for r in relay.outbox() if r["kind"] == "Retour"]) == 100, timeout=120,
             what="100 returns queued")
    wait_for(lambda: len(published(platform)) == 200, timeout=120, what="100 AVL and 100 Retour on the platform")
    assert list(relay.returns().iterdir()) == []
    assert relay.rejected() == []


def test_dead_letter_then_operator_retry(make_relay, platform, tmp_path):
    # A remote directory that does not exist: no retry can mend that, so the ack goes to dead-letter at once.
    later = platform.remote_dir.rstrip("/") + "/later"
    relay = make_relay(platform=platform.relay_config(platform.client_key, retry=FAST_RETRY, remote_dir=later))
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: [r["status"] for r in relay.outbox()] == ["dead"], what="dead-letter")
    # A return for the same dossier waits behind the dead ack, and the listing says so.
    drop(relay, REAL_NUMERO, "recu")
    wait_for(lambda: len(relay.outbox()) == 2, what="the return queued")
    listing = relay.cli("outbox", "list")
    assert "dead" in listing.stdout and "remote_dir_missing" in listing.stdout
    assert "waits for #1" in listing.stdout
    (platform.incoming / "later").mkdir()
    result = relay.cli("outbox", "retry", "--dead")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: [r["status"] for r in relay.outbox()] == ["delivered", "delivered"], what="delivery after the retry")
    landed = sorted((platform.incoming / "later").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert [read_reply(p.read_bytes()).kind for p in landed] == ["AVL", "Retour"]


def test_cli_return_with_an_attachment_drops_one_zip(linked, tmp_path):
    relay, platform, spec = one_dossier(linked, tmp_path, seed=51)
    assert relay.cli("return", spec.numero, "--state", "recu").returncode == 0
    attestation = tmp_path / "Attestation de recensement.pdf"
    attestation.write_bytes(pdf_bytes(["Attestation"]))
    result = relay.cli("return", spec.numero, "--state", "clos", "--attach", str(attestation))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(".zip")
    replies = wait_received(platform, 3)
    clos = replies[2]
    assert clos.retour.state == "clos"
    assert list(clos.members.values()) == [attestation.read_bytes()]
    assert clos.retour.attachments[0].file in clos.members


def test_cli_return_for_an_unknown_dossier_says_so(relay):
    result = relay.cli("return", "A-1-NEVERSEEN", "--state", "recu")
    assert result.returncode == 2
    assert "A-1-NEVERSEEN" in result.stderr and "not in the ledger" in result.stderr
    assert list(relay.returns().iterdir()) == []


def test_a_complete_pec_return_package_is_forwarded_as_it_is(linked, tmp_path):
    from relayd.pec.envelope import Routing
    from relayd.pec.replies import Attachment, build_retour

    relay, platform, spec = one_dossier(linked, tmp_path, seed=52)
    assert relay.cli("return", spec.numero, "--state", "recu").returncode == 0
    wait_received(platform, 2)
    # The business software builds its own Retour package from the dossier's routing.
    routing = Routing.from_xml(relay.ledger_rows("SELECT routing FROM dossiers WHERE numero = ?", (spec.numero,))[0]["routing"])
    package = build_retour(routing, numero=spec.numero, demarche=spec.demarche, state="clos", comment="Terminé",
                           attachments=[Attachment(name="attestation.pdf", data=pdf_bytes(["A"]), media_type="application/pdf")])
    target = relay.returns() / "retour-editeur.zip"
    (relay.returns() / ".retour-editeur.zip.tmp").write_bytes(package.data)
    os.rename(relay.returns() / ".retour-editeur.zip.tmp", target)
    replies = wait_received(platform, 3)
    assert replies[2].message_id == package.envelope_message_id == routing.message_id
    newest = platform.incoming / platform.arrivals.names[-1]
    assert newest.read_bytes() == package.data
    wait_for(lambda: relay.ledger_rows("SELECT state FROM dossiers WHERE numero = ?", (spec.numero,))[0]["state"] == "clos",
             what="the ledger to say clos")


def test_a_return_package_that_skips_a_state_is_refused(linked, tmp_path):
    from relayd.pec.envelope import Routing
    from relayd.pec.replies import build_retour

    relay, platform, spec = one_dossier(linked, tmp_path, seed=53)
    routing = Routing.from_xml(relay.ledger_rows("SELECT routing FROM dossiers WHERE numero = ?", (spec.numero,))[0]["routing"])
    package = build_retour(routing, numero=spec.numero, demarche=spec.demarche, state="clos", comment=None, attachments=[])
    (relay.returns() / "skip.zip").write_bytes(package.data)
    wait_for(lambda: relay.rejected(), what="the refusal")
    assert relay.rejected()[0]["code"] == "transition_invalid"
    assert len(platform.files()) == 1


def test_a_linked_attachment_is_refused(linked, tmp_path):
    relay, platform, spec = one_dossier(linked, tmp_path, seed=54)
    secret = tmp_path / "not-for-the-platform.pdf"
    secret.write_bytes(pdf_bytes(["private"]))
    (relay.returns() / "attestation.pdf").symlink_to(secret)
    drop(relay, spec.numero, "recu", raw=write_status_file(StatusFile(
        numero=spec.numero, state="recu", attachments=[StatusAttachment(file="attestation.pdf")])))
    wait_for(lambda: relay.rejected(), what="the refusal")
    assert relay.rejected()[0]["code"] == "drop_not_regular"
    assert len(platform.files()) == 1
    assert secret.read_bytes() == pdf_bytes(["private"])


def test_a_dossier_from_before_routing_was_recorded_still_gets_its_return(linked, tmp_path):
    relay, platform = linked
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_received(platform, 1)
    relay.stop()
    import sqlite3

    db = sqlite3.connect(relay.ledger_path)
    db.execute("UPDATE dossiers SET routing = NULL")  # as a ledger written by the first release
    db.commit()
    db.close()
    relay.start()
    drop(relay, REAL_NUMERO, "recu")
    replies = wait_received(platform, 2)
    assert replies[1].kind == "Retour" and replies[1].retour.message_id_origine == REAL_MESSAGE_ID


def test_with_a_group_the_folders_are_shared_with_the_business_software(make_relay, tmp_path):
    import grp
    import stat

    gid = grp.getgrnam("users").gr_gid
    relay = make_relay(start=False)
    relay.config["communes"][0]["group"] = "users"
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.start()
    for folder in (relay.inbox("90017"), relay.returns("90017"), relay.returns("90017").parent / "rejected"):
        st = folder.stat()
        assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o2770, folder
    drop(relay, "A-1-NEVERSEEN", "recu")
    wait_for(lambda: relay.rejected(), what="the refusal")
    (reason,) = relay.rejected()
    for path in (reason["_file"], reason["_file"].with_name(reason["_file"].name + ".reason.json")):
        assert path.stat().st_gid == gid and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_cli_return_refuses_at_once_what_relayd_would_refuse(relay, tmp_path):
    (spec,) = specs(1, seed=55)
    push(relay, [spec], tmp_path)
    wait_for(lambda: relay.ledger_rows("SELECT numero FROM dossiers"), what="the dossier")
    skipped = relay.cli("return", spec.numero, "--state", "clos")
    assert skipped.returncode == 2 and "transition_invalid" in skipped.stderr and "Dossier reçu" in skipped.stderr
    big = tmp_path / "gros.pdf"
    big.write_bytes(pdf_bytes(["x"], padding=os.urandom(2 * 1024 * 1024)))
    too_big = relay.cli("return", spec.numero, "--state", "recu", "--attach", str(big))
    assert too_big.returncode == 2 and "attachment_too_large" in too_big.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not a PDF")
    wrong = relay.cli("return", spec.numero, "--state", "recu", "--attach", str(text))
    assert wrong.returncode == 2 and "attachment_type" in wrong.stderr
    assert list(relay.returns().iterdir()) == []


def test_returns_for_unknown_dossiers_when_the_commune_allows_them(make_relay, platform, tmp_path):
    relay = make_relay(start=False, platform=platform.relay_config(platform.client_key, retry=FAST_RETRY))
    relay.config["communes"][0]["allow_unknown_dossiers"] = True
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.start()
    # Without its démarche, relayd cannot address a return for a dossier it never saw.
    drop(relay, "A-1-UNKNOWN1", "recu")
    wait_for(lambda: relay.rejected(), what="the refusal")
    assert relay.rejected()[0]["code"] == "status_invalid" and "NumeroDemarche" in relay.rejected()[0]["message"]
    drop(relay, "A-1-UNKNOWN1", "recu", name="with-demarche.xml", raw=write_status_file(
        StatusFile(numero="A-1-UNKNOWN1", state="recu", demarche="recensementCitoyen")))
    (retour,) = wait_received(platform, 1)
    assert retour.kind == "Retour" and retour.retour.numero == "A-1-UNKNOWN1" and retour.retour.demarche == "recensementCitoyen"
    assert_valid_against_schemas((platform.incoming / published(platform)[0]).read_bytes())
    # From then on the relay follows its states like any other dossier's.
    drop(relay, "A-1-UNKNOWN1", "recu", name="again.xml", raw=write_status_file(
        StatusFile(numero="A-1-UNKNOWN1", state="recu", demarche="recensementCitoyen", comment="encore")))
    wait_for(lambda: len(relay.rejected()) == 2, what="the second refusal")
    assert relay.rejected()[1]["code"] == "transition_invalid"


def test_a_drop_that_cannot_be_set_aside_holds_back_no_other(linked, tmp_path):
    """The rejected folder is unusable: the refused drop waits in place and is tried again; the others go on."""
    relay, platform = linked
    dossiers = specs(2, seed=47)
    push(relay, dossiers, tmp_path)
    wait_received(platform, 2)
    rejected = relay.returns().parent / "rejected"
    shutil.rmtree(rejected)
    rejected.write_text("a file where the rejected folder should be")  # nothing can be set aside
    staging = tmp_path / "staging-batch"
    staging.mkdir()
    unknown = staging / "A-1-NOSUCHONE-recu.xml"  # refused: relayd never saw this dossier
    unknown.write_bytes(write_status_file(StatusFile(numero="A-1-NOSUCHONE", state="recu")))
    os.utime(unknown, (1_000_000_000, 1_000_000_000))  # the oldest, so the first of its batch
    for spec in dossiers:
        (staging / f"{spec.numero}-recu.xml").write_bytes(write_status_file(StatusFile(numero=spec.numero, state="recu")))
    for path in sorted(staging.iterdir()):
        os.rename(path, relay.returns() / path.name)
    retours = [r for r in wait_received(platform, 4) if r.kind == "Retour"]
    assert sorted(r.retour.numero for r in retours) == sorted(s.numero for s in dossiers)
    assert [p.name for p in relay.returns().iterdir()] == [unknown.name]
    assert '"returns.drop_failed"' in relay.log_text()
    rejected.unlink()
    rejected.mkdir()
    wait_for(lambda: relay.rejected(), timeout=60, what="the refused drop set aside once the folder is back")
    assert relay.rejected()[0]["code"] == "dossier_unknown"
    assert list(relay.returns().iterdir()) == []

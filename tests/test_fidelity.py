"""Real-world fidelity (issue 13): the platform's real codes, envelopes and layouts, and replies
a real peer would recognise. Packages are built the way the real ones are, pushed to a real relay.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
import structlog
import yaml
from conftest import paramiko_put, sftp_put, wait_for
from lxml import etree

from relayd.pec.envelope import NS_PEC, read_envelope
from relayd.pec.replies import build_ack, read_reply
from relayd.pec.xml import load_schema, parse_xml
from relayd.rejections import Reason, Rejection
from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.platform import check_received, generate
from relayd.testkit.samples import (
    CENSUS,
    SampleSpec,
    build_members,
    build_package,
    dia_conversation_id,
    dia_envelope,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real"
REAL_PACKAGE = REAL / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
SIRET_90017 = "21900017000014"


def _push(relay, tmp_path: Path, spec: SampleSpec, name: str | None = None, *, data: bytes | None = None) -> Path:
    local = tmp_path / (name or f"{spec.numero}.zip")
    local.write_bytes(data if data is not None else build_package(spec))
    result = sftp_put(relay, local, local.name)
    assert result.returncode == 0, result.stderr
    return local


def _acks(relay, kind: str) -> list:
    """The acks of this kind waiting in the outbox, read back as the platform would.

    An ack's row is committed with its package and its file written just after (see
    test_intake_faults): a row whose file is not there yet does not count yet.
    """
    files = [Path(row["payload"]) for row in relay.outbox() if row["kind"] == kind]
    return [read_reply(path.read_bytes()) for path in files if path.is_file()]


# --------------------------------------------------------------------------- the four cases of the issue


def test_real_census_code_is_accepted_and_matched_exactly(make_relay, tmp_path):
    # 1. A commune configured as the docs now show takes the real census code...
    relay = make_relay()
    spec = SampleSpec(numero="A-1-N8F602RR", demarche=CENSUS, layout="plain")
    _push(relay, tmp_path, spec)
    wait_for(lambda: (relay.inbox("90017") / f"{spec.numero}-{CENSUS}.zip").exists(), what="the census dossier")
    # ...and matching is exact: the spelling of the follow-up tool is another code.
    other = SampleSpec(numero="A-1-N8F602RS", demarche="RecensementCitoyen")
    local = tmp_path / "other.zip"
    local.write_bytes(build_package(other))
    with pytest.raises(OSError, match=Reason.DEMARCHE_NOT_ACCEPTED.value):
        paramiko_put(relay, local, "other.zip")


def _restart_with(relay, edit) -> None:
    """Change the relay's configuration file before its first start."""
    edit(relay.config)
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.start()


def test_a_commune_may_list_aliases(make_relay, tmp_path):
    relay = make_relay(start=False)
    _restart_with(relay, lambda c: c["communes"][0].update(demarches=[CENSUS, "RecensementCitoyen"]))
    for numero, code in (("A-1-ALIAS001", CENSUS), ("A-1-ALIAS002", "RecensementCitoyen")):
        _push(relay, tmp_path, SampleSpec(numero=numero, demarche=code))
        wait_for(lambda n=numero, c=code: (relay.inbox("90017") / f"{n}-{c}.zip").exists(), what=f"the {code} dossier")


def test_census_with_plain_pdf_attachments_in_both_delivery_modes_has_identical_bytes(make_relay, tmp_path):
    # 2. The real layout: the data XML is the Document coded flux, attachments are plain PDF files.
    spec = SampleSpec(numero="A-1-N8F602RR", demarche=CENSUS, layout="plain")
    members = build_members(spec)
    plain = [f"{spec.prefix}-ji-0.pdf", f"{spec.prefix}-jf-1.pdf"]
    assert all(members[name].startswith(b"%PDF-") for name in plain)
    assert f"{spec.prefix}-doc-flux-1-2.xml" in members and not any("-pj-" in n for n in members)
    zipped = make_relay()
    extracted = make_relay(start=False)
    _restart_with(extracted, lambda c: c["communes"][0].update(delivery="extracted"))
    local = _push(zipped, tmp_path, spec)
    sftp_put(extracted, local, local.name)
    delivered = zipped.inbox("90017") / f"{spec.prefix}.zip"
    folder = extracted.inbox("90017") / spec.prefix
    wait_for(lambda: delivered.exists() and (folder / "relayd.json").exists(), what="both deliveries")

    assert delivered.read_bytes() == local.read_bytes()
    with zipfile.ZipFile(delivered) as zf:
        in_zip = {n: zf.read(n) for n in zf.namelist()}
    assert in_zip == members
    for name, data in members.items():
        assert (folder / name).read_bytes() == data  # byte for byte, in the folder as in the zip
    summary = json.loads((folder / "relayd.json").read_text())
    roles = {f["path"]: f["role"] for f in summary["files"]}
    assert {roles[name] for name in plain} == {"attachment"}
    assert roles[f"{spec.prefix}-doc-flux-1-2.xml"] == "document"
    assert {f["path"]: f["sha256"] for f in summary["files"]}[plain[0]] == hashlib.sha256(members[plain[0]]).hexdigest()


def test_six_character_dossier_number_of_the_guide_is_accepted(make_relay, tmp_path):
    # 3. The guide's A-1-BEKJED.
    relay = make_relay()
    spec = SampleSpec(numero="A-1-BEKJED", demarche=CENSUS)
    _push(relay, tmp_path, spec)
    wait_for(lambda: (relay.inbox("90017") / f"A-1-BEKJED-{CENSUS}.zip").exists(), what="the 6-character dossier")
    [avl] = _wait_acks(relay, "AVL", 1)
    assert avl.ack.numero == "A-1-BEKJED"


def test_dossier_number_pattern_is_a_setting(make_relay, tmp_path):
    relay = make_relay(validation={"dossier_number": r"^A-[0-9]-[A-Z0-9]{8,9}$"})
    local = tmp_path / "short.zip"
    local.write_bytes(build_package(SampleSpec(numero="A-1-BEKJED", demarche=CENSUS)))
    with pytest.raises(OSError, match=Reason.DOSSIER_NUMBER_INVALID.value):
        paramiko_put(relay, local, "short.zip")


def _wait_acks(relay, kind: str, count: int) -> list:
    wait_for(lambda: len(_acks(relay, kind)) >= count, what=f"{count} {kind} in the outbox")
    return _acks(relay, kind)


def test_envelope_with_every_dia_routing_element_is_accepted_and_acked_in_the_same_conversation(make_relay, tmp_path):
    # 4. pec: prefix, Sender/Attention, ConversationId, WriteMode, AckType AND/ANL/AVL, no AckTo,
    # empty Security and Extras.
    relay = make_relay()
    spec = SampleSpec(numero="A-0-12SVIZTIW", demarche=CENSUS, envelope="dia", layout="plain")
    message = build_members(spec)["message.xml"]
    assert b"<pec:ConversationId>" in message and b"<pec:AckTo>" not in message and b"<pec:Security/>" in message
    _push(relay, tmp_path, spec)
    wait_for(lambda: (relay.inbox("90017") / f"{spec.numero}-{CENSUS}.zip").exists(), what="the DIA-shaped dossier")
    [avl] = _wait_acks(relay, "AVL", 1)
    routing = avl.routing
    assert routing.conversation_id == dia_conversation_id(spec)
    assert routing.write_mode == "CREATE" and routing.flow_type == CENSUS
    # Sender and Recipient swapped; the platform's Attention goes back with it.
    assert routing.recipients.recipients[0].attention == "Service instructeur"
    assert routing.recipients.recipients[0].location.siret == spec.sender_siret
    assert routing.sender.location.siret == spec.recipient_siret
    # The real replier keeps the MessageId; the body names it too.
    assert avl.message_id == spec.effective_message_id == avl.ack.message_id_origine


def test_siret_routed_envelope_lands_in_its_commune(make_relay, tmp_path):
    relay = make_relay(start=False)
    _restart_with(relay, lambda c: c["communes"][0].update(siret=SIRET_90017))
    spec = SampleSpec(numero="A-9-SIRET001", demarche=CENSUS, envelope="dia", code_insee=False, recipient_siret=SIRET_90017)
    assert b"CodeINSEE" not in build_members(spec)["message.xml"]
    _push(relay, tmp_path, spec)
    wait_for(lambda: (relay.inbox("90017") / f"{spec.numero}-{CENSUS}.zip").exists(), what="the SIRET-routed dossier")
    [row] = relay.ledger_rows("SELECT insee FROM dossiers WHERE numero = ?", (spec.numero,))
    assert row["insee"] == "90017"

    # CodeINSEE and SIRET that disagree: refused with a reason, not routed by either.
    clash = SampleSpec(numero="A-9-SIRET002", demarche=CENSUS, insee="75056", recipient_siret=SIRET_90017)
    local = tmp_path / "clash.zip"
    local.write_bytes(build_package(clash))
    with pytest.raises(OSError, match=Reason.ROUTING_CONFLICT.value):
        paramiko_put(relay, local, "clash.zip")
    # A SIRET nobody declares, and no CodeINSEE.
    stray = SampleSpec(numero="A-9-SIRET003", demarche=CENSUS, code_insee=False, recipient_siret="99999999999999")
    local.write_bytes(build_package(stray))
    with pytest.raises(OSError, match=Reason.SIRET_UNKNOWN.value):
        paramiko_put(relay, local, "clash.zip")
    # Quarantine names start with the second, then a random part: two refusals in one second come in any order.
    codes = sorted(q["code"] for q in relay.quarantined())
    assert codes == sorted([Reason.ROUTING_CONFLICT.value, Reason.SIRET_UNKNOWN.value])


# --------------------------------------------------------------------------- what must appear once, and be safe


@pytest.mark.parametrize("kind", ["duplicate-codeinsee", "duplicate-message-id", "xinclude", "path-ackto", "subject-injection",
                                  "siret-unknown", "not-a-dossier"])
def test_envelope_broken_kinds_are_refused_with_their_reason(make_relay, tmp_path, kind):
    relay = make_relay()
    spec = SampleSpec(numero="A-1-ENVBAD01", demarche=CENSUS)
    local = tmp_path / f"{kind}.zip"
    local.write_bytes(build_broken(kind, spec))
    expected = BROKEN_KINDS[kind].reason
    with pytest.raises(OSError, match=expected.value):
        paramiko_put(relay, local, local.name)
    [entry] = relay.quarantined()
    assert entry["code"] == expected.value
    assert not any(relay.inbox("90017").glob("*")) if relay.inbox("90017").exists() else True
    # The daemon keeps serving: the same dossier, sound, is accepted next.
    _push(relay, tmp_path, spec, "good.zip")
    wait_for(lambda: (relay.inbox("90017") / f"{spec.numero}-{CENSUS}.zip").exists(), what="the sound package")
    if kind == "xinclude":
        assert "root:x:0" not in relay.log_text()


# --------------------------------------------------------------------------- settings of the replies


def _platform(tmp_path: Path, **extra) -> dict:
    secret = tmp_path / "platform-password"
    secret.write_text("not-used\n")
    # Nothing listens there: replies wait in the outbox, which is what these tests read.
    return {"host": "127.0.0.1", "port": 9, "username": "commune", "password_file": str(secret),
            "host_key_fingerprints": ["SHA256:" + "A" * 43], "retry": {"initial_seconds": 3600}, **extra}


def test_acks_setting_anl_only_sends_no_avl(make_relay, tmp_path):
    relay = make_relay(platform=_platform(tmp_path, acks="ANL"))
    _push(relay, tmp_path, SampleSpec(numero="A-1-ACKSET01", demarche=CENSUS), "good.zip")
    local = tmp_path / "bad.zip"
    local.write_bytes(build_package(SampleSpec(numero="A-1-ACKSET02", demarche="ZZZ")))
    with pytest.raises(OSError, match=Reason.DEMARCHE_NOT_ACCEPTED.value):
        paramiko_put(relay, local, "bad.zip")
    wait_for(lambda: (relay.inbox("90017") / f"A-1-ACKSET01-{CENSUS}.zip").exists(), what="the accepted dossier")
    [anl] = _wait_acks(relay, "ANL", 1)
    assert anl.ack.code == Reason.DEMARCHE_NOT_ACCEPTED.value
    assert [row["kind"] for row in relay.outbox()] == ["ANL"]


def test_reply_style_relayd_gives_the_reply_its_own_message_id(make_relay, tmp_path):
    relay = make_relay(platform=_platform(tmp_path, reply_style="relayd"))
    spec = SampleSpec(numero="A-1-STYLE001", demarche=CENSUS, envelope="dia")
    _push(relay, tmp_path, spec)
    [avl] = _wait_acks(relay, "AVL", 1)
    assert avl.message_id != spec.effective_message_id == avl.ack.message_id_origine
    assert avl.routing.conversation_id == dia_conversation_id(spec)  # the conversation is kept in both styles


# --------------------------------------------------------------------------- the schema and the simulator


def test_envelope_xsd_validates_both_real_shapes():
    schema = load_schema("pec-envelope.xsd")
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        daua = etree.fromstring(zf.read("message.xml"))
    assert schema.validate(daua), schema.error_log
    dia = etree.fromstring(dia_envelope(SampleSpec()))
    assert etree.QName(dia).namespace == NS_PEC and dia.prefix == "pec"
    assert dia.find(f"{{{NS_PEC}}}Body/{{{NS_PEC}}}Content").get("{http://www.w3.org/2001/XMLSchema-instance}type") == "xs:string"
    assert schema.validate(dia), schema.error_log
    # relayd reads the DIA shape tolerantly, and says plainly why it delivers no dossier from it.
    with pytest.raises(Rejection) as info:
        read_envelope(parse_xml(dia_envelope(SampleSpec()), name="message.xml"))
    assert info.value.reason == Reason.ENVELOPE_NOT_A_DOSSIER
    # A dossier in a DIA-shaped envelope validates and reads, every routing element kept.
    shaped = parse_xml(build_members(SampleSpec(envelope="dia", code_insee=False))["message.xml"], name="message.xml")
    assert schema.validate(shaped), schema.error_log
    routing = read_envelope(shaped).header.routing
    assert routing.ack_types == ["AND", "AVL", "ANL"] and routing.ack_to is None and routing.write_mode == "CREATE"


def test_unknown_platform_element_is_tolerated_and_logged():
    data = build_members(SampleSpec(envelope="dia"))["message.xml"].replace(
        b"<pec:WriteMode>", b"<pec:Priorite>haute</pec:Priorite><pec:WriteMode>")
    with structlog.testing.capture_logs() as logs:
        message = read_envelope(parse_xml(data, name="message.xml"))
    assert {"event": "envelope.unknown_elements", "elements": ["Priorite"], "log_level": "info"} in logs
    avl = build_ack(message.header.routing, kind="AVL", numero=message.numero, demarche=message.demarche)
    # The ack still leaves, valid, in the same conversation; the unknown element stays out of it
    # (the envelope schema every reply passes cannot admit an unknown element of its own namespace).
    with zipfile.ZipFile(io.BytesIO(avl.data)) as zf:
        reply = zf.read("message.xml")
    assert b"Priorite" not in reply and b"<pec:WriteMode>CREATE</pec:WriteMode>" in reply
    assert read_reply(avl.data).routing.conversation_id == message.header.routing.conversation_id


def test_platform_simulator_fails_a_reply_that_dropped_the_conversation(tmp_path):
    plan = generate(tmp_path / "sent", count=2, demarches=[CENSUS], insees=["90017"], seed=3)
    sent = [s for _, s in plan]
    for s in sent:
        s.pushed = "accepted"
    dia = next(s for s in sent if s.conversation_id)
    path = next(p for p, s in plan if s is dia)
    with zipfile.ZipFile(path) as zf:
        routing = read_envelope(parse_xml(zf.read("message.xml"), name="message.xml")).header.routing
    received = tmp_path / "received"
    received.mkdir()
    good = build_ack(routing, kind="AVL", numero=dia.numero, demarche=dia.demarche)
    (received / good.name).write_bytes(good.data)
    assert check_received(received, sent).invalid == []
    # The same ack from a replier that forgets the conversation.
    forgetful = routing.model_copy(update={"conversation_id": None})
    forgetful._source = None
    bad = build_ack(forgetful, kind="AVL", numero=dia.numero, demarche=dia.demarche, style="relayd")
    (received / good.name).unlink()
    (received / bad.name).write_bytes(bad.data)
    report = check_received(received, sent)
    assert any("dropped the ConversationId" in line for line in report.invalid), report.invalid
    assert not report.ok

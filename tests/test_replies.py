"""What goes back to the platform (acks, return flows) and what the business software drops (status files).

The envelope of every reply comes from the real package's envelope, read with relayd's own
reader; every built package is checked against the XSDs in ``schemas/`` and read back with
``read_reply``, and each way of tampering with one is refused with a reason.
"""

from __future__ import annotations

import copy
import io
import random
import re
import threading
import zipfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from lxml import etree
from pydantic import ValidationError

import relayd.pec.xml as pec_xml
from relayd.dossiers import LABELS as STATE_LABELS
from relayd.pec.envelope import NS_PEC, Location, Party, Routing
from relayd.pec.package import Package, inspect_package
from relayd.pec.replies import (
    ACK_NS,
    RETOUR_NS,
    Attachment,
    ReplyPackage,
    build_ack,
    build_retour,
    new_message_id,
    read_reply,
    reply_routing,
    retour_member_name,
)
from relayd.pec.status import STATUT_NS, StatusAttachment, StatusFile, read_status_file, write_status_file
from relayd.pec.xml import load_schema
from relayd.pec.zipcheck import PackageLimits
from relayd.rejections import Reason, Rejection

REPO = Path(__file__).resolve().parents[1]
REAL_PACKAGE = REPO.parent / "shared" / "fixtures" / "real" / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
NOW = datetime(2026, 11, 26, 14, 3, 5, tzinfo=timezone(timedelta(hours=1)))
NS = {"ns2": NS_PEC, "a": ACK_NS, "r": RETOUR_NS}
XSI = "http://www.w3.org/2001/XMLSchema-instance"
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+\.zip")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def package() -> Package:
    return inspect_package(REAL_PACKAGE, PackageLimits())


@pytest.fixture(scope="module")
def routing(package: Package) -> Routing:
    return package.message.header.routing


@pytest.fixture(scope="module")
def real_password() -> bytes:
    """The real package's MotDePasse, to prove it never leaves. Never printed: tests compare it only."""
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        root = etree.fromstring(zf.read("message.xml"))
    (value,) = root.xpath("//*[local-name()='MotDePasse']/text()")
    assert len(value) >= 6
    return value.encode("utf-8")


@pytest.fixture(scope="module")
def pdf() -> bytes:
    # 300 KB of incompressible bytes behind a PDF header: a realistic attachment for the zip.
    return b"%PDF-1.4\n" + random.Random(42).randbytes(300 * 1024)


def members_of(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def message_of(reply: ReplyPackage) -> etree._Element:
    return etree.fromstring(members_of(reply.data)["message.xml"])


def rezip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def schema_errors(schema: etree.XMLSchema, doc: etree._Element) -> str:
    schema.validate(doc)
    return "\n".join(f"line {e.line}: {e.message}" for e in schema.error_log)


def body_alone(message: etree._Element) -> etree._Element:
    """The body as a document of its own, to validate it with its own XSD."""
    (content,) = message.findall("ns2:Body/ns2:Content", NS)
    (body,) = list(content)
    return etree.fromstring(etree.tostring(body))


def refused(data: bytes) -> Rejection:
    with pytest.raises(Rejection) as info:
        read_reply(data)
    return info.value


# --------------------------------------------------------------------------- acks


def test_avl_from_the_real_envelope(routing: Routing, package: Package, real_password: bytes) -> None:
    avl = build_ack(routing, kind="AVL", numero=package.numero, demarche=package.demarche, now=NOW)
    members = members_of(avl.data)
    assert list(members) == ["message.xml"]
    message = etree.fromstring(members["message.xml"])

    # The envelope and the body are valid, each against its schema.
    envelope_xsd = load_schema("pec-envelope.xsd")
    assert envelope_xsd.validate(message), schema_errors(envelope_xsd, message)
    assert load_schema("relayd-accuse.xsd").validate(body_alone(message))
    assert message.tag == f"{{{NS_PEC}}}Message"
    assert members["message.xml"].startswith(b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<ns2:Message ')

    # Sender and Recipient are swapped against the original; the reply goes to AckTo.
    built = read_reply(avl.data).routing
    original_recipient = routing.recipients.recipients[0]  # type: ignore[union-attr]
    assert built.sender == original_recipient
    assert built.recipients is not None and built.recipients.recipients == [routing.ack_to]
    assert built.sender != routing.sender  # the real file's two parties do differ
    assert built.flow_type == routing.flow_type == "DAUA"
    assert built.ack_required is False and built.ack_types == [] and built.ack_to is None
    assert message.xpath("//ns2:Location/@xsi:type", namespaces={**NS, "xsi": XSI}) == ["ns2:Location_FR"] * 2

    # The envelope keeps the original MessageId, as the real replier does (platform.reply_style
    # mirror); relayd's own unique id is in the file name and the outbox, and the body names the original.
    assert avl.envelope_message_id == built.message_id == routing.message_id
    assert built.message_id == message.findtext("ns2:Header/ns2:Routing/ns2:MessageId", namespaces=NS)
    assert re.fullmatch(r"A-9-X3UGO4V7 relayd-[0-9a-f]{12} AVL 2026-11-26T14:03:05", avl.message_id)
    assert avl.message_id.split()[1].removeprefix("relayd-") in avl.name
    own = build_ack(routing, kind="AVL", numero=package.numero, demarche=package.demarche, now=NOW, style="relayd")
    assert read_reply(own.data).message_id == own.message_id == own.envelope_message_id != routing.message_id
    body = message.find("ns2:Body/ns2:Content/a:Accuse", NS)
    assert body is not None and body.get("version") == "1"
    assert body.findtext("a:MessageIdOrigine", namespaces=NS) == routing.message_id == "A-9-X3UGO4V7 5808773 Principal 2019-04-03T16:26:40"
    assert [(child.tag.split("}")[1], child.text) for child in body] == [
        ("Type", "AVL"),
        ("MessageIdOrigine", routing.message_id),
        ("NumeroTeledemarche", "A-9-X3UGO4V7"),
        ("NumeroDemarche", "DAUA"),
        ("DateAccuse", "2026-11-26T14:03:05+01:00"),
    ]
    assert message.findtext("ns2:Header/ns2:Security/ns2:DateTime", namespaces=NS) == "2026-11-26T14:03:05.000+01:00"

    # Nothing of the Aller travels back: no password, no agents' e-mail.
    leaked = real_password in avl.data or real_password in members["message.xml"]
    assert not leaked, "the real MotDePasse is in the ack"
    assert b"MotDePasse" not in members["message.xml"]
    assert message.find(".//ns2:Extras", NS) is None and message.find(".//ns2:Aller", NS) is None

    assert avl.kind == "AVL"
    assert avl.name == f"relayd.2026-11-26T14_03_05.A-9-X3UGO4V7-DAUA.AVL.{avl.message_id.split()[1][7:]}.zip"
    assert SAFE_NAME.fullmatch(avl.name)


def test_reply_routing_goes_to_ack_to_else_to_the_sender(routing: Routing) -> None:
    elsewhere = Party(country="FR", location=Location(siret="11111111111111", service="flux_acks"))
    with_ack_to = routing.model_copy(update={"ack_to": elsewhere})
    assert reply_routing(with_ack_to, message_id="m").recipients.recipients == [elsewhere]  # type: ignore[union-attr]
    without_ack_to = routing.model_copy(update={"ack_to": None})
    assert reply_routing(without_ack_to, message_id="m").recipients.recipients == [routing.sender]  # type: ignore[union-attr]
    # The original is not changed by the swap.
    assert routing.ack_to is not None and routing.ack_required is True

    with pytest.raises(Rejection) as info:
        reply_routing(routing.model_copy(update={"recipients": None}), message_id="m")
    assert info.value.reason == Reason.ENVELOPE_INVALID
    with pytest.raises(Rejection) as info:
        reply_routing(routing.model_copy(update={"ack_to": None, "sender": None}), message_id="m")
    assert info.value.reason == Reason.ENVELOPE_INVALID


def test_replies_are_deterministic_and_distinct(routing: Routing) -> None:
    first = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    again = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    assert first == again  # same inputs, same reply: a resend is recognisably the same one
    later = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW + timedelta(seconds=1))
    anl = build_ack(routing, kind="ANL", numero="A-9-X3UGO4V7", demarche="DAUA", rejection=Rejection(Reason.DEMARCHE_NOT_ACCEPTED), now=NOW)
    other = build_ack(
        routing.model_copy(update={"message_id": "A-9-X3UGO4V7 5808774 Principal 2019-04-03T16:26:41"}),
        kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW,
    )
    replies = [first, later, anl, other]
    assert len({r.name for r in replies}) == len({r.message_id for r in replies}) == 4
    assert all(SAFE_NAME.fullmatch(r.name) for r in replies)
    # Without a token, a MessageId is fresh each time.
    assert new_message_id("A-9-X3UGO4V7", "AVL", NOW) != new_message_id("A-9-X3UGO4V7", "AVL", NOW)
    assert re.fullmatch(r"relayd-[0-9a-f]{12} ANL 2026-11-26T14:03:05", new_message_id(None, "ANL", NOW))


def test_anl_carries_the_code_and_the_sentence(routing: Routing) -> None:
    rejection = Rejection(Reason.XML_FORBIDDEN, "A-9-X3UGO4V7-DAUA-ent-2.xml declares a DOCTYPE or an entity.")
    anl = build_ack(routing, kind="ANL", numero="A-9-X3UGO4V7", demarche="DAUA", rejection=rejection, now=NOW)
    message = message_of(anl)
    assert load_schema("pec-envelope.xsd").validate(message)
    assert load_schema("relayd-accuse.xsd").validate(body_alone(message))
    body = message.find("ns2:Body/ns2:Content/a:Accuse", NS)
    assert body is not None
    assert body.findtext("a:Type", namespaces=NS) == "ANL"
    assert body.findtext("a:Code", namespaces=NS) == "xml_forbidden"
    assert body.findtext("a:Motif", namespaces=NS) == rejection.detail
    ack = read_reply(anl.data).ack
    assert ack is not None
    assert (ack.kind, ack.code, ack.motif, ack.message_id_origine) == ("ANL", "xml_forbidden", rejection.detail, routing.message_id)
    assert anl.kind == "ANL" and ".ANL." in anl.name


def test_anl_for_a_bad_number_leaves_the_number_out(routing: Routing) -> None:
    rejection = Rejection(Reason.DOSSIER_NUMBER_INVALID, "dossier number 'B-12-xyz' is not of the form A-<digit>-<8 or 9 letters...>.")
    anl = build_ack(routing, kind="ANL", numero="B-12-xyz", demarche="recensementCitoyen", rejection=rejection, now=NOW)
    ack = read_reply(anl.data).ack
    assert ack is not None and ack.numero is None and ack.demarche == "recensementCitoyen"
    assert ack.code == "dossier_number_invalid" and "B-12-xyz" in (ack.motif or "")
    assert anl.name.startswith("relayd.2026-11-26T14_03_05.sans-numero-recensementCitoyen.ANL.")
    assert not anl.message_id.startswith("B-12")


def test_ack_kind_and_rejection_go_together(routing: Routing) -> None:
    with pytest.raises(ValueError):
        build_ack(routing, kind="ANL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    with pytest.raises(ValueError):
        build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", rejection=Rejection(Reason.ZIP_INVALID), now=NOW)


# --------------------------------------------------------------------------- return flows


@pytest.mark.parametrize("state", ["recu", "clos"])
def test_retour_with_a_300k_pdf_round_trips(state: str, routing: Routing, pdf: bytes, real_password: bytes) -> None:
    note = Attachment(name="note.txt", data="Pièce complémentaire\n".encode(), media_type="text/plain")
    retour = build_retour(
        routing,
        numero="A-9-X3UGO4V7",
        demarche="DAUA",
        state=state,  # type: ignore[arg-type]
        comment="Votre dossier est traité.\nMerci.",
        attachments=[Attachment(name="Attestation de recensement.pdf", data=pdf, media_type="application/pdf", title="Attestation"), note],
        now=NOW,
    )
    message = message_of(retour)
    envelope_xsd = load_schema("pec-envelope.xsd")
    assert envelope_xsd.validate(message), schema_errors(envelope_xsd, message)
    assert load_schema("relayd-retour.xsd").validate(body_alone(message))

    member = "A-9-X3UGO4V7-DAUA-retour-1-Attestation_de_recensement.pdf"
    assert list(members_of(retour.data)) == ["message.xml", member, "A-9-X3UGO4V7-DAUA-retour-2-note.txt"]
    # The exact label, as the platform spells it, in the bytes that leave.
    etat = message.find("ns2:Body/ns2:Content/r:Retour/r:Etat", NS)
    assert etat is not None and etat.get("code") == state and etat.text == STATE_LABELS[state]
    assert f'<Etat code="{state}">{STATE_LABELS[state]}</Etat>'.encode() in members_of(retour.data)["message.xml"]

    reply = read_reply(retour.data)
    assert reply.kind == "Retour" and reply.ack is None and reply.retour is not None
    assert reply.members[member] == pdf  # identical bytes
    assert reply.members["A-9-X3UGO4V7-DAUA-retour-2-note.txt"] == note.data
    body = reply.retour
    assert (body.numero, body.demarche, body.message_id_origine) == ("A-9-X3UGO4V7", "DAUA", routing.message_id)
    assert (body.state, body.label, body.etat.code) == (state, STATE_LABELS[state], state)
    assert body.comment == "Votre dossier est traité.\nMerci."
    assert body.date == NOW
    first = body.attachments[0]
    assert (first.file, first.title, first.media_type, first.size) == (member, "Attestation", "application/pdf", len(pdf))
    assert body.attachments[1].title is None
    assert reply.routing.sender == routing.recipients.recipients[0]  # type: ignore[union-attr]
    assert reply.routing.recipients.recipients == [routing.ack_to]  # type: ignore[union-attr]
    assert reply.message_id == retour.envelope_message_id == routing.message_id != retour.message_id
    assert retour.kind == "Retour" and retour.name.startswith("relayd.2026-11-26T14_03_05.A-9-X3UGO4V7-DAUA.Retour.")
    leaked = real_password in retour.data
    assert not leaked, "the real MotDePasse is in the Retour"


def test_retour_without_attachments_or_comment(routing: Routing) -> None:
    retour = build_retour(routing, numero="A-9-X3UGO4V7", demarche="DAUA", state="recu", comment=None, attachments=[], now=NOW)
    reply = read_reply(retour.data)
    assert reply.members == {} and reply.retour is not None
    assert reply.retour.comment is None and reply.retour.attachments == []
    assert message_of(retour).find(".//r:Commentaire", NS) is None


def test_retour_refuses_what_its_format_cannot_carry(routing: Routing) -> None:
    ok = {"numero": "A-9-X3UGO4V7", "demarche": "DAUA", "state": "clos", "comment": None, "attachments": [], "now": NOW}
    for change in (
        {"numero": "B-12-xyz"},
        {"demarche": "DA/UA"},
        {"state": "transmis"},
        {"comment": "x" * 4001},
        {"attachments": [Attachment(name="a.pdf", data=b"x", media_type="not a type")]},
    ):
        with pytest.raises(ValueError):
            build_retour(routing, **{**ok, **change})  # type: ignore[arg-type]


def test_member_names_are_safe() -> None:
    assert retour_member_name("A-9-X3UGO4V7", "DAUA", 1, "Attestation é (1).pdf") == "A-9-X3UGO4V7-DAUA-retour-1-Attestation_e_1.pdf"
    assert retour_member_name("A-9-X3UGO4V7", "DAUA", 2, "../../etc/passwd") == "A-9-X3UGO4V7-DAUA-retour-2-passwd"
    assert retour_member_name("A-9-X3UGO4V7", "DAUA", 3, "...") == "A-9-X3UGO4V7-DAUA-retour-3-piece"
    long = retour_member_name("A-9-X3UGO4V7", "DAUA", 4, "a" * 300 + ".pdf")
    assert long.endswith(".pdf") and len(long) < 200


# --------------------------------------------------------------------------- tampering


def _swap_message(edit: Callable[[bytes], bytes]) -> Callable[[dict[str, bytes]], None]:
    def apply(members: dict[str, bytes]) -> None:
        members["message.xml"] = edit(members["message.xml"])

    return apply


def _drop_attachment(members: dict[str, bytes]) -> None:
    del members[next(n for n in members if "-retour-1-" in n)]


def _extra_member(members: dict[str, bytes]) -> None:
    members["A-9-X3UGO4V7-DAUA-retour-9-extra.pdf"] = b"%PDF-1.4 not listed"


def _flip_a_byte(members: dict[str, bytes]) -> None:
    name = next(n for n in members if "-retour-1-" in n)
    data = bytearray(members[name])
    data[-1] ^= 0xFF
    members[name] = bytes(data)


def _grow(members: dict[str, bytes]) -> None:
    name = next(n for n in members if "-retour-1-" in n)
    members[name] += b"\n"


def _no_message(members: dict[str, bytes]) -> None:
    del members["message.xml"]


def _traversal(members: dict[str, bytes]) -> None:
    members["../evil.pdf"] = b"x"


TAMPERING = [
    pytest.param(_drop_attachment, Reason.RETURN_PACKAGE_INVALID, "not in the package", id="missing-member"),
    pytest.param(_extra_member, Reason.RETURN_PACKAGE_INVALID, "does not list", id="extra-member"),
    pytest.param(_flip_a_byte, Reason.RETURN_PACKAGE_INVALID, "Sha256", id="sha-mismatch"),
    pytest.param(_grow, Reason.RETURN_PACKAGE_INVALID, "Taille", id="size-mismatch"),
    pytest.param(_no_message, Reason.RETURN_PACKAGE_INVALID, "no message.xml", id="no-message"),
    pytest.param(_traversal, Reason.RETURN_PACKAGE_INVALID, "..", id="path-traversal"),
    pytest.param(
        _swap_message(lambda m: m.replace(b"urn:relayd:pec:retour:1", b"urn:relayd:pec:retour:2")),
        Reason.RETURN_PACKAGE_INVALID, "does not know", id="unknown-body-version",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b"<Retour ", b"<Facture ").replace(b"</Retour>", b"</Facture>")),
        Reason.RETURN_PACKAGE_INVALID, "does not know", id="unknown-body",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b'<Etat code="clos">', b'<Etat code="recu">')),
        Reason.RETURN_PACKAGE_INVALID, "label", id="label-of-another-state",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b"<Etat code=\"clos\">Dossier clos", b"<Etat code=\"clos\">Dossier fini")),
        Reason.RETURN_PACKAGE_INVALID, "Etat must be", id="unknown-label",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b"</Commentaire>", b"</Commentaire><Priorite>haute</Priorite>")),
        Reason.RETURN_PACKAGE_INVALID, "Priorite", id="unknown-element",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b' version="1"', b' version="2"')),
        Reason.RETURN_PACKAGE_INVALID, "version", id="unknown-version",
    ),
    pytest.param(
        _swap_message(lambda m: re.sub(rb"<ns2:Sender>.*?</ns2:Sender>", b"", m, flags=re.S)),
        Reason.RETURN_PACKAGE_INVALID, "Sender", id="no-sender",
    ),
    pytest.param(
        _swap_message(lambda m: m.replace(b"<ns2:Message ", b'<!DOCTYPE x [<!ENTITY e "e">]>\n<ns2:Message ')),
        Reason.XML_FORBIDDEN, "DOCTYPE", id="doctype",
    ),
    pytest.param(_swap_message(lambda m: m[:-40]), Reason.XML_MALFORMED, "well-formed", id="malformed"),
    pytest.param(
        _swap_message(lambda m: m.replace(b"ns2:Message", b"ns2:Messages")),
        Reason.RETURN_PACKAGE_INVALID, "root", id="wrong-root",
    ),
]


@pytest.mark.parametrize(("tamper", "reason", "words"), TAMPERING)
def test_tampered_retour_is_refused(
    tamper: Callable[[dict[str, bytes]], None], reason: Reason, words: str, routing: Routing, pdf: bytes
) -> None:
    retour = build_retour(
        routing, numero="A-9-X3UGO4V7", demarche="DAUA", state="clos", comment="Voici.",
        attachments=[Attachment(name="attestation.pdf", data=pdf, media_type="application/pdf")], now=NOW,
    )
    members = members_of(retour.data)
    assert read_reply(rezip(members)).kind == "Retour"  # the untouched copy passes: the edit is what is refused
    tamper(members)
    rejection = refused(rezip(members))
    assert rejection.reason == reason, rejection.detail
    assert words in rejection.detail


def test_ack_packages_hold_nothing_but_the_envelope(routing: Routing) -> None:
    avl = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    members = members_of(avl.data)
    members["attestation.pdf"] = b"%PDF"
    assert "does not list" in refused(rezip(members)).detail


def test_ack_with_a_bad_body_is_refused(routing: Routing) -> None:
    avl = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    message = members_of(avl.data)["message.xml"]
    # An ANL that does not say why, and an AVL that carries a reason code.
    anl = message.replace(b"<Type>AVL</Type>", b"<Type>ANL</Type>")
    assert "Code and Motif" in refused(rezip({"message.xml": anl})).detail
    coded = message.replace(b"</DateAccuse>", b"</DateAccuse><Code>zip_invalid</Code>")
    assert refused(rezip({"message.xml": coded})).reason == Reason.RETURN_PACKAGE_INVALID
    naive = re.sub(rb"(<DateAccuse>[^<+]*)\+01:00", rb"\1", message)
    assert "DateAccuse" in refused(rezip({"message.xml": naive})).detail


def test_incoming_dossier_is_not_a_reply() -> None:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        aller = zf.read("message.xml")
    rejection = refused(rezip({"message.xml": aller}))
    assert rejection.reason == Reason.RETURN_PACKAGE_INVALID and "Aller" in rejection.detail


def test_two_bodies_are_refused(routing: Routing) -> None:
    # The envelope schema's trailing wildcard lets a second body through; read_reply does not.
    avl = build_ack(routing, kind="AVL", numero="A-9-X3UGO4V7", demarche="DAUA", now=NOW)
    root = etree.fromstring(members_of(avl.data)["message.xml"])
    content = root.find("ns2:Body/ns2:Content", NS)
    assert content is not None
    content.append(copy.deepcopy(content[0]))
    data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    assert "holds 2 elements" in refused(rezip({"message.xml": data})).detail


def test_not_a_zip_is_refused() -> None:
    rejection = refused(b"PK\x03\x04 this is not a zip")
    assert rejection.reason == Reason.RETURN_PACKAGE_INVALID and rejection.cause == Reason.ZIP_INVALID


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    ("name", "namespace", "root"),
    [
        ("relayd-accuse.xsd", ACK_NS, "Accuse"),
        ("relayd-retour.xsd", RETOUR_NS, "Retour"),
        ("relayd-statut.xsd", STATUT_NS, "Statut"),
    ],
)
def test_our_schemas_are_strict_and_versioned(name: str, namespace: str, root: str) -> None:
    xsd = etree.parse(str(REPO / "schemas" / name)).getroot()
    assert xsd.get("targetNamespace") == namespace and xsd.get("elementFormDefault") == "qualified"
    assert xsd.xpath("//xs:any", namespaces={"xs": "http://www.w3.org/2001/XMLSchema"}) == []  # nothing unknown slips in
    schema = load_schema(name)
    assert schema is load_schema(name.removesuffix(".xsd"))  # cached
    # The version attribute is required.
    assert not schema.validate(etree.fromstring(f'<{root} xmlns="{namespace}"/>'))
    assert "version" in schema_errors(schema, etree.fromstring(f'<{root} xmlns="{namespace}"/>'))


def test_retour_schema_labels_are_the_ledger_labels() -> None:
    xsd = etree.parse(str(REPO / "schemas" / "relayd-retour.xsd"))
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    labels = xsd.xpath("//xs:simpleType[@name='EtatLibelle']//xs:enumeration/@value", namespaces=ns)
    codes = xsd.xpath("//xs:simpleType[@name='EtatCode']//xs:enumeration/@value", namespaces=ns)
    assert codes == ["recu", "clos"]
    assert labels == [STATE_LABELS["recu"], STATE_LABELS["clos"]]


def test_envelope_schema_still_reads_the_real_aller() -> None:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        assert load_schema("pec-envelope.xsd").validate(etree.fromstring(zf.read("message.xml")))


def test_load_schema_is_per_thread_and_finds_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = load_schema("relayd-statut.xsd")
    there: list[etree.XMLSchema] = []
    thread = threading.Thread(target=lambda: there.append(load_schema("relayd-statut.xsd")))
    thread.start()
    thread.join()
    assert there and there[0] is not here  # each thread has its own error log

    fallback = tmp_path / "share" / "relayd" / "schemas"
    fallback.mkdir(parents=True)
    (fallback / "t-fallback.xsd").write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"><xs:element name="T"/></xs:schema>', encoding="utf-8"
    )
    (fallback / "t-remote.xsd").write_text(
        '<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema">'
        '<xs:import namespace="urn:x" schemaLocation="http://example.invalid/x.xsd"/></xs:schema>',
        encoding="utf-8",
    )
    monkeypatch.setattr(pec_xml, "SCHEMA_DIRS", (tmp_path / "missing", fallback))
    assert load_schema("t-fallback.xsd").validate(etree.fromstring("<T/>"))
    with pytest.raises(ValueError, match="beside it"):
        load_schema("t-remote.xsd")
    with pytest.raises(FileNotFoundError):
        load_schema("t-nowhere.xsd")
    with pytest.raises(ValueError):
        load_schema("../schemas/relayd-statut.xsd")


# --------------------------------------------------------------------------- status files

MAX = 64 * 1024


def statut(*children: str, attrs: str = 'version="1"', ns: str = STATUT_NS) -> bytes:
    inner = "\n  ".join(children)
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<Statut xmlns="{ns}" {attrs}>\n  {inner}\n</Statut>\n'.encode()


NUM = "<NumeroTeledemarche>A-9-X3UGO4V7</NumeroTeledemarche>"


def test_minimal_status_file() -> None:
    status = read_status_file(statut(NUM, "<Etat>recu</Etat>"), max_bytes=MAX)
    assert (status.numero, status.state, status.comment, status.attachments, status.demarche, status.insee) == (
        "A-9-X3UGO4V7", "recu", None, [], None, None,
    )


def test_full_status_file() -> None:
    data = statut(
        NUM,
        "<Etat> clos </Etat>",
        "<Commentaire>Votre attestation est jointe.\nCordialement.</Commentaire>",
        "<PieceJointe><Fichier>attestation recensement.pdf</Fichier><Intitule>Attestation</Intitule></PieceJointe>",
        "<PieceJointe><Fichier>courrier.pdf</Fichier></PieceJointe>",
        "<NumeroDemarche>recensementCitoyen</NumeroDemarche>",
        "<CodeINSEE>2A004</CodeINSEE>",
    )
    status = read_status_file(data, max_bytes=MAX)
    assert status.state == "clos"
    assert status.comment == "Votre attestation est jointe.\nCordialement."
    assert status.attachments == [
        StatusAttachment(file="attestation recensement.pdf", title="Attestation"),
        StatusAttachment(file="courrier.pdf", title=None),
    ]
    assert (status.demarche, status.insee) == ("recensementCitoyen", "2A004")


@pytest.mark.parametrize(
    "status",
    [
        StatusFile(numero="A-9-X3UGO4V7", state="recu"),
        StatusFile(
            numero="A-1-BEKJED123",
            state="clos",
            comment="Ligne 1\r\nLigne <2> & « 3 »\ttab",
            attachments=[StatusAttachment(file="attestation.pdf", title="Attestation de recensement"), StatusAttachment(file="b.jpg")],
            demarche="ILE",
            insee="75056",
        ),
    ],
    ids=["minimal", "full"],
)
def test_write_status_file_round_trips(status: StatusFile) -> None:
    data = write_status_file(status)
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<Statut xmlns="urn:relayd:statut:1" version="1">')
    assert load_schema("relayd-statut.xsd").validate(etree.fromstring(data))
    assert read_status_file(data, max_bytes=MAX) == status


RECU = "<Etat>recu</Etat>"
PLAIN = "Fichier must be the plain name of a file"


def pj(name: str) -> str:
    return f"<PieceJointe><Fichier>{name}</Fichier></PieceJointe>"


def case(data: bytes, reason: Reason, words: str, id: str) -> object:
    return pytest.param(data, reason, words, id=id)


STATUS_CASES = [
    case(statut(NUM, RECU)[:-12], Reason.XML_MALFORMED, "well-formed", "malformed"),
    case(
        statut(NUM, "<Etat>&e;</Etat>").replace(b"<Statut", b'<!DOCTYPE Statut [<!ENTITY e "recu">]>\n<Statut'),
        Reason.XML_FORBIDDEN, "DOCTYPE", "doctype",
    ),
    case(statut(NUM, "<Etat>fini</Etat>"), Reason.STATUS_INVALID, "line 4: Etat must be 'recu' or 'clos', not 'fini'", "wrong-etat"),
    case(statut(NUM, "<Etat>transmis</Etat>"), Reason.STATUS_INVALID, "not 'transmis'", "transmis-is-not-a-return"),
    case(statut(RECU), Reason.STATUS_INVALID, "line 3: found <Etat> where <NumeroTeledemarche>", "missing-numero"),
    case(statut(NUM, RECU, "<Priorite>haute</Priorite>"), Reason.STATUS_INVALID, "line 5: found <Priorite>", "unknown-element"),
    case(statut(NUM, RECU, pj("../../etc/passwd")), Reason.STATUS_INVALID, f"line 5: {PLAIN}", "path-in-fichier"),
    case(statut(NUM, RECU, pj("sous-dossier/a.pdf")), Reason.STATUS_INVALID, PLAIN, "folder-in-fichier"),
    case(statut(NUM, RECU, pj("..")), Reason.STATUS_INVALID, PLAIN, "dotdot-fichier"),
    case(statut(NUM, RECU, pj("a.pdf"), pj("a.pdf")), Reason.STATUS_INVALID, "same file 'a.pdf'", "same-file-twice"),
    case(
        statut(NUM, RECU, f"<Commentaire>{'x' * 4001}</Commentaire>"),
        Reason.STATUS_INVALID, "Commentaire is 4001 characters long; the limit is 4000", "comment-too-long",
    ),
    case(statut(NUM, RECU, attrs=""), Reason.STATUS_INVALID, "lacks the attribute version", "no-version"),
    case(statut(NUM, RECU, ns="urn:relayd:statut:2"), Reason.STATUS_INVALID, "the root element", "other-namespace"),
    case(
        statut("<NumeroTeledemarche>B-12-xyz</NumeroTeledemarche>", RECU),
        Reason.DOSSIER_NUMBER_INVALID, "line 3: NumeroTeledemarche 'B-12-xyz'", "bad-numero",
    ),
    case(statut(NUM, RECU, "<CodeINSEE>2C004</CodeINSEE>"), Reason.STATUS_INVALID, "CodeINSEE must be", "bad-insee"),
    case(statut(NUM, RECU, f"<Commentaire>{'x' * MAX}</Commentaire>"), Reason.XML_TOO_LARGE, str(MAX), "too-large"),
]


@pytest.mark.parametrize(("data", "reason", "words"), STATUS_CASES)
def test_bad_status_files(data: bytes, reason: Reason, words: str) -> None:
    with pytest.raises(Rejection) as info:
        read_status_file(data, max_bytes=MAX)
    assert info.value.reason == reason, info.value.detail
    assert words in info.value.detail, info.value.detail


def test_status_model_refuses_what_the_file_cannot_say() -> None:
    # The CLI builds StatusFile in Python: it must not be able to write what read_status_file refuses.
    for bad in (
        {"numero": "B-12-xyz", "state": "recu"},
        {"numero": "A-9-X3UGO4V7", "state": "fini"},
        {"numero": "A-9-X3UGO4V7", "state": "recu", "comment": "x" * 4001},
        {"numero": "A-9-X3UGO4V7", "state": "recu", "attachments": [{"file": "../a.pdf"}]},
        {"numero": "A-9-X3UGO4V7", "state": "recu", "insee": "7505"},
    ):
        with pytest.raises(ValidationError):
            StatusFile.model_validate(bad)

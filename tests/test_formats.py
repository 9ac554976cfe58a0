"""Every format relayd deals in, against its XSD in ``schemas/``, and ``docs/formats.md`` against relayd.

- The démarche data schemas (``rco-data.xsd``, ``ile-data.xsd``): the real RCO file and the testkit's
  data XML validate, plausible variants of them too, and the faults the schemas type do not.
- Every sample kind validates against its XSD: the envelope and ``-ent-`` header of generated packages
  and of the real package, the démarche data, AVL/ANL/Retour as ``relayd.pec.replies`` builds them
  (envelope and body), and status files as ``write_status_file`` writes them. Every XSD of
  ``schemas/`` is exercised by at least one kind, and each kind fails under a wrong root.
- ``docs/formats.md`` stays true: every reason code with its sentence, every XSD named, every XML
  example valid against its XSD (status files also read by ``read_status_file``), every JSON example
  well-formed, the platform's state labels word for word, and no real credential or address.
"""

from __future__ import annotations

import copy
import html
import io
import json
import re
import zipfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import pytest
from lxml import etree

from relayd.dossiers import LABELS as STATE_LABELS
from relayd.pec.envelope import NS_METIER, NS_PEC, Routing, read_envelope
from relayd.pec.replies import ACK_NS, RETOUR_NS, Attachment, build_ack, build_retour
from relayd.pec.status import STATUT_NS, StatusAttachment, StatusFile, read_status_file, write_status_file
from relayd.pec.xml import load_schema, parse_xml
from relayd.rejections import Reason, Rejection
from relayd.testkit.samples import SampleSpec, build_members, data_xml, ent_member_name, pdf_bytes, png_bytes

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
DOC = REPO / "docs" / "formats.md"
REAL = REPO.parent / "shared" / "fixtures" / "real"
REAL_PACKAGE = REAL / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
REAL_RCO = REAL / "rco-10870-XML.xml"
REAL_ENT = "A-9-X3UGO4V7-DAUA-ent-2.xml"

NOW = datetime(2026, 3, 10, 10, 2, 33, tzinfo=timezone(timedelta(hours=1)))
MAX_STATUS = 1024 * 1024

#: The XSD of each root element: what an XML document must be validated with.
XSD_OF_ROOT: dict[str, str] = {
    f"{{{NS_PEC}}}Message": "pec-envelope.xsd",
    f"{{{NS_METIER}}}EnteteMetierEnveloppe": "pec-metier.xsd",
    "RecensementCitoyen": "rco-data.xsd",
    "InscriptionListeElectorale": "ile-data.xsd",
    f"{{{ACK_NS}}}Accuse": "relayd-accuse.xsd",
    f"{{{RETOUR_NS}}}Retour": "relayd-retour.xsd",
    f"{{{STATUT_NS}}}Statut": "relayd-statut.xsd",
}


# --------------------------------------------------------------------------- helpers


def _parse(data: bytes) -> etree._Element:
    # relayd's hardened parser: no DOCTYPE, no entities, no network.
    return parse_xml(data, name="test document")


def _errors(schema: etree.XMLSchema) -> str:
    return "\n".join(f"line {e.line}: {e.message}" for e in schema.error_log)


def _assert_valid(xsd: str, root: etree._Element) -> None:
    schema = load_schema(xsd)
    assert schema.validate(root), f"{xsd}:\n{_errors(schema)}"


def _assert_invalid(xsd: str, root: etree._Element, words: str = "") -> None:
    schema = load_schema(xsd)
    assert not schema.validate(root), f"{xsd} accepted what it should refuse"
    assert words in _errors(schema), _errors(schema)


def _alone(element: etree._Element) -> etree._Element:
    """``element`` as the root of its own document (a body checked with its own XSD)."""
    return etree.fromstring(etree.tostring(element))


def _real_member(name: str) -> bytes:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        return zf.read(name)


def _zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _data_member(spec: SampleSpec, seed: int = 0) -> bytes:
    """The démarche data XML as it travels in a generated package (a listed Document)."""
    members = build_members(spec, seed=seed)
    (name,) = [n for n in members if "-doc-" in n and n.endswith(".xml")]
    return members[name]


def _routing_of(message: bytes) -> Routing:
    return read_envelope(_parse(message)).header.routing


def _real_password() -> bytes:
    """The real package's MotDePasse, only to prove it is nowhere it should not be. Never printed."""
    (value,) = _parse(_real_member("message.xml")).xpath("//*[local-name()='MotDePasse']/text()")
    assert len(value) >= 6
    return value.encode("utf-8")


# --------------------------------------------------------------------------- démarche data: RCO

RCO_SPECS = {
    "default": SampleSpec(),
    "paris": SampleSpec(numero="A-1-PARIS0001", insee="75056", email="jeune@example.org"),
    "corse": SampleSpec(numero="A-3-CORSE2A04", insee="2A004"),
    "winter": SampleSpec(numero="A-5-HIVER0001", deposit=datetime(2025, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=1)))),
}
ILE_SPECS = {
    "default": SampleSpec(numero="A-1-BEKJED12", demarche="ILE", insee="75056"),
    "belfort": SampleSpec(numero="A-9-ILE000001", demarche="ILE", insee="90017", email="electeur@example.org"),
    "corse": SampleSpec(numero="A-2-ILECORSE", demarche="ILE", insee="2B033"),
}
SEEDS = (0, 1, 2, 7, 42)


def test_real_rco_data_validates() -> None:
    root = _parse(REAL_RCO.read_bytes())
    # Guard: the real file is what the schema says it describes.
    assert root.tag == "RecensementCitoyen" and etree.QName(root).namespace is None
    assert [c.tag for c in root if isinstance(c.tag, str)] == ["Convention", "Formalite", "Personne", "FiliationPere", "FiliationMere"]
    _assert_valid("rco-data.xsd", root)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spec", RCO_SPECS.values(), ids=RCO_SPECS.keys())
def test_generated_rco_data_validates(spec: SampleSpec, seed: int) -> None:
    data = data_xml(spec, seed=seed)
    assert data is not None
    _assert_valid("rco-data.xsd", _parse(data))
    # The same bytes travel in the package as a listed Document.
    assert _data_member(spec, seed) == data


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spec", ILE_SPECS.values(), ids=ILE_SPECS.keys())
def test_generated_ile_data_validates(spec: SampleSpec, seed: int) -> None:
    data = data_xml(spec, seed=seed)
    assert data is not None
    _assert_valid("ile-data.xsd", _parse(data))
    assert _data_member(spec, seed) == data


def test_other_demarches_have_no_data_xml() -> None:
    # Guard for the kinds below: only RCO and ILE carry a démarche data XML in the testkit.
    assert data_xml(SampleSpec(numero="A-9-X3UGO4V7", demarche="DAUA")) is None


def _edit(data: bytes, edit: Callable[[etree._Element], None]) -> etree._Element:
    root = copy.deepcopy(_parse(data))
    edit(root)
    return _parse(etree.tostring(root, encoding="UTF-8"))


def _set(path: str, text: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        found = root.xpath(path)
        assert found, path
        for el in found:
            el.text = text

    return edit


def _remove(path: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        found = root.xpath(path)
        assert found, path
        for el in found:
            el.getparent().remove(el)

    return edit


def _append(path: str, tag: str, text: str | None = "x", **children: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        found = root.xpath(path)
        assert found, path
        for el in found:
            new = etree.SubElement(el, tag)
            new.text = text
            for child, value in children.items():
                etree.SubElement(new, child).text = value

    return edit


def _insert_after(path: str, tag: str, text: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        (el,) = root.xpath(path)
        new = etree.Element(tag)
        new.text = text
        el.addnext(new)

    return edit


def _empty_every_leaf(root: etree._Element) -> None:
    for el in root.iter():
        if isinstance(el.tag, str) and len(el) == 0:
            el.text = None


def _empty_every_block(root: etree._Element) -> None:
    for block in list(root):
        for child in list(block):
            block.remove(child)


def _only_root(root: etree._Element) -> None:
    for child in list(root):
        root.remove(child)


def _swap(first: str, second: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        (a,) = root.xpath(first)
        (b,) = root.xpath(second)
        b.addnext(a)

    return edit


def _rename_root(name: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        root.tag = name

    return edit


EXT = "{urn:example:commune}Extension"

# Plausible variants of the real RCO file: the schema must not refuse them.
RCO_VARIANTS = [
    pytest.param(_empty_every_leaf, id="every-leaf-empty"),
    pytest.param(_empty_every_block, id="every-block-empty"),
    pytest.param(_only_root, id="bare-root"),
    pytest.param(_remove("//FiliationPere|//FiliationMere|//Convention"), id="no-parents-no-convention"),
    pytest.param(_remove("//AdresseResidence|//SituationFamille|//MethodeContact"), id="fewer-personne-blocks"),
    pytest.param(_remove("//FormaliteMotifCode[2]|//LieuNaissance[2]"), id="single-motif-single-birthplace"),
    pytest.param(_set("/RecensementCitoyen/Personne/Civilite", "MME"), id="other-civilite"),
    pytest.param(_set("/RecensementCitoyen/Personne/Sexe", "2"), id="other-sexe"),
    pytest.param(_set("//MethodeContact[1]/CanalCode", "SMS"), id="other-canal"),
    pytest.param(_set("//LieuNaissance[1]/Code", "PAYS"), id="other-birthplace-code"),
    pytest.param(_set("//Personne/DateNaissance", "  29/02/2008\n  "), id="date-with-blanks"),
    pytest.param(_set("//FiliationMere/DateNaissance", "31/12/1975"), id="parent-birth-date"),
    pytest.param(_set("//DateSoumission", "2021-08-04T11:42:48.123+02:00"), id="submission-with-offset"),
    pytest.param(_set("//DateSoumission", ""), id="submission-empty"),
    pytest.param(_set("//NombreEnfants", ""), id="count-empty"),
    pytest.param(_set("/RecensementCitoyen/Personne/NomUsage", "DURAND-MARTIN"), id="usage-name"),
    pytest.param(_insert_after("/RecensementCitoyen/Personne/Prenom", "Prenom", "PIERRE"), id="two-prenoms"),
    pytest.param(_append("/RecensementCitoyen/Personne", "MethodeContact", None, URI="https://example.org/me", CanalCode="WEB"),
                 id="third-contact"),
    pytest.param(_append("//AdresseResidence", "CodeINSEE", "75056"), id="residence-with-insee"),
    pytest.param(_append("/RecensementCitoyen/Convention", "Reference", "C-12"), id="convention-with-content"),
    pytest.param(_append("/RecensementCitoyen/Personne", EXT), id="namespaced-extension-in-personne"),
    pytest.param(_append("/RecensementCitoyen", EXT), id="namespaced-extension-at-root"),
    pytest.param(lambda root: root.set("version", "2"), id="attribute-on-root"),
]


@pytest.mark.parametrize("edit", RCO_VARIANTS)
def test_plausible_rco_variants_validate(edit: Callable[[etree._Element], None]) -> None:
    _assert_valid("rco-data.xsd", _edit(REAL_RCO.read_bytes(), edit))


def test_self_closing_and_crlf_rco_validates() -> None:
    data = REAL_RCO.read_bytes()
    data = re.sub(rb"<(\w+)></\1>", rb"<\1/>", data).replace(b"\n", b"\r\n")
    assert b"<NomUsage/>" in data
    _assert_valid("rco-data.xsd", _parse(data))


# What the RCO schema refuses: a wrong root, the faults of the fields it types, and (XSD 1.0's
# limit, documented in the XSD) an unknown element without a namespace or a block out of order.
RCO_REFUSED = [
    pytest.param(_rename_root("InscriptionListeElectorale"), "No matching global declaration", id="wrong-root"),
    pytest.param(_rename_root("{urn:example}RecensementCitoyen"), "No matching global declaration", id="root-in-a-namespace"),
    pytest.param(_set("//Personne/DateNaissance", "2003-04-04"), "DateNaissance", id="iso-birth-date"),
    pytest.param(_set("//Personne/DateNaissance", "4/4/2003"), "DateNaissance", id="short-birth-date"),
    pytest.param(_set("//Personne/DateNaissance", "31/13/2003"), "DateNaissance", id="month-13"),
    pytest.param(_set("//FiliationPere/DateNaissance", "inconnue"), "DateNaissance", id="text-in-parent-date"),
    pytest.param(_set("//DateSoumission", "04/08/2021"), "DateSoumission", id="submission-not-iso"),
    pytest.param(_set("//NombreFrereSoeur", "deux"), "NombreFrereSoeur", id="count-not-a-number"),
    pytest.param(_swap("/RecensementCitoyen/Formalite", "/RecensementCitoyen/Personne"),
                 "Element 'Formalite': This element is not expected", id="blocks-out-of-order"),
    pytest.param(_append("/RecensementCitoyen/Personne", "Telephone"), "Telephone", id="unknown-plain-element"),
    pytest.param(_append("/RecensementCitoyen/Personne/NomFamille", "Nom"), "NomFamille", id="element-in-a-text-field"),
]


@pytest.mark.parametrize(("edit", "words"), RCO_REFUSED)
def test_rco_schema_refuses(edit: Callable[[etree._Element], None], words: str) -> None:
    root = _edit(REAL_RCO.read_bytes(), edit)
    _assert_invalid("rco-data.xsd", root, words)


def test_each_data_schema_refuses_the_other_demarche() -> None:
    rco = _parse(data_xml(RCO_SPECS["default"]) or b"")
    ile = _parse(data_xml(ILE_SPECS["default"]) or b"")
    _assert_invalid("rco-data.xsd", ile, "No matching global declaration")
    _assert_invalid("ile-data.xsd", rco, "No matching global declaration")
    _assert_invalid("ile-data.xsd", _parse(REAL_RCO.read_bytes()), "No matching global declaration")


ILE_VARIANTS = [
    pytest.param(_empty_every_leaf, id="every-leaf-empty"),
    pytest.param(_empty_every_block, id="every-block-empty"),
    pytest.param(_only_root, id="bare-root"),
    pytest.param(_set("//TypeListe", "LCE"), id="complementary-list"),
    pytest.param(_set("//JustificatifDomicile/Date", "02/01/2026"), id="proof-date"),
    pytest.param(_set("//CommunePrecedente/Consulat", "Consulat général de France à Genève"), id="consulate"),
    pytest.param(_append("/InscriptionListeElectorale/Justificatifs", "JustificatifDomicile", None, Type="QUITTANCE", Date="05/02/2026"),
                 id="two-address-proofs"),
    pytest.param(_append("/InscriptionListeElectorale/Identite", EXT), id="namespaced-extension"),
]


@pytest.mark.parametrize("edit", ILE_VARIANTS)
def test_plausible_ile_variants_validate(edit: Callable[[etree._Element], None]) -> None:
    _assert_valid("ile-data.xsd", _edit(data_xml(ILE_SPECS["default"]) or b"", edit))


ILE_REFUSED = [
    pytest.param(_rename_root("InscriptionListesElectorales"), "No matching global declaration", id="wrong-root"),
    pytest.param(_set("//Naissance/DateNaissance", "1975-12-21"), "DateNaissance", id="iso-birth-date"),
    pytest.param(_set("//JustificatifDomicile/Date", "hier"), "Date", id="text-in-proof-date"),
    pytest.param(_set("//DateSoumission", "10/03/2026 10:02"), "DateSoumission", id="submission-not-iso"),
    pytest.param(_swap("/InscriptionListeElectorale/TypeListe", "/InscriptionListeElectorale/Identite"),
                 "Element 'TypeListe': This element is not expected", id="blocks-out-of-order"),
]


@pytest.mark.parametrize(("edit", "words"), ILE_REFUSED)
def test_ile_schema_refuses(edit: Callable[[etree._Element], None], words: str) -> None:
    _assert_invalid("ile-data.xsd", _edit(data_xml(ILE_SPECS["default"]) or b"", edit), words)


@pytest.mark.parametrize("name", ["rco-data.xsd", "ile-data.xsd"])
def test_data_schemas_describe_a_structure(name: str) -> None:
    # Tolerant, but not a bare xs:any: no namespace, named blocks, every element optional, and the
    # only wildcards are for other namespaces (or inside Convention, whose content is unknown).
    xsd = etree.parse(str(SCHEMAS / name)).getroot()
    ns = {"xs": "http://www.w3.org/2001/XMLSchema"}
    assert xsd.get("targetNamespace") is None
    assert len(xsd.xpath("//xs:complexType[@name]", namespaces=ns)) >= 6
    local = xsd.xpath("//xs:complexType//xs:element", namespaces=ns)
    assert len(local) >= 30
    assert all(el.get("minOccurs") == "0" for el in local), [el.get("name") for el in local if el.get("minOccurs") != "0"]
    wildcards = xsd.xpath("//xs:any", namespaces=ns)
    assert all(w.get("namespace") == "##other" or w.getparent().getparent().get("name") == "Inconnu" for w in wildcards)
    if name == "ile-data.xsd":
        assert "NO REAL ILE DATA FILE IS PUBLIC" in (SCHEMAS / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- every sample kind

PACKAGE_SPECS = {
    "RCO": SampleSpec(numero="A-9-K7Q2M4XT"),
    "ILE": SampleSpec(numero="A-1-BEKJED12", demarche="ILE", insee="75056"),
    "DAUA": SampleSpec(numero="A-9-X3UGO4V7", demarche="DAUA"),
    "RCO-no-scans-no-ack": SampleSpec(numero="A-2-NOSCANS0", scans=0, ack_required=False, ack_types=()),
    "ILE-annex": SampleSpec(numero="A-6-MANYSCAN9", demarche="ILE", scans=5, annex_bytes=100),
}

#: A check: the XSD, and the element (a document's root) it must validate.
Check = tuple[str, etree._Element]


def _package_kind(spec: SampleSpec, seed: int) -> Callable[[], list[Check]]:
    def build() -> list[Check]:
        members = build_members(spec, seed=seed)
        checks = [("pec-envelope.xsd", _parse(members["message.xml"])), ("pec-metier.xsd", _parse(members[ent_member_name(spec)]))]
        data = data_xml(spec, seed=seed)
        if data is not None:
            checks.append(({"recensementCitoyen": "rco-data.xsd", "ILE": "ile-data.xsd"}[spec.demarche], _parse(_data_member(spec, seed))))
        return checks

    return build


def _real_package() -> list[Check]:
    return [("pec-envelope.xsd", _parse(_real_member("message.xml"))), ("pec-metier.xsd", _parse(_real_member(REAL_ENT)))]


def _real_rco() -> list[Check]:
    return [("rco-data.xsd", _parse(REAL_RCO.read_bytes()))]


def _origins() -> dict[str, Routing]:
    return {
        "real": _routing_of(_real_member("message.xml")),
        "sample": _routing_of(build_members(PACKAGE_SPECS["RCO"])["message.xml"]),
    }


def _reply_checks(data: bytes, body_xsd: str) -> list[Check]:
    """A reply package: its envelope with the envelope XSD, its one body with its own XSD."""
    members = _zip_members(data)
    message = _parse(members["message.xml"])
    (body,) = message.xpath("/ns2:Message/ns2:Body/ns2:Content/*", namespaces={"ns2": NS_PEC})
    return [("pec-envelope.xsd", message), (body_xsd, _alone(body))]


def _avl(origin: str) -> Callable[[], list[Check]]:
    def build() -> list[Check]:
        ack = build_ack(_origins()[origin], kind="AVL", numero="A-9-K7Q2M4XT", demarche="recensementCitoyen", now=NOW)
        return _reply_checks(ack.data, "relayd-accuse.xsd")

    return build


def _anl(origin: str, numero: str | None) -> Callable[[], list[Check]]:
    def build() -> list[Check]:
        rejection = Rejection(Reason.MEMBER_MISSING, "message.xml lists a document that is not in the package.")
        ack = build_ack(_origins()[origin], kind="ANL", numero=numero, demarche="recensementCitoyen", rejection=rejection, now=NOW)
        return _reply_checks(ack.data, "relayd-accuse.xsd")

    return build


def _retour(origin: str, state: Literal["recu", "clos"], attachments: int) -> Callable[[], list[Check]]:
    def build() -> list[Check]:
        files = [
            Attachment(name="attestation recensement.pdf", data=pdf_bytes(["Attestation"]), media_type="application/pdf",
                       title="Attestation de recensement"),
            Attachment(name="courrier.png", data=png_bytes(), media_type="image/png"),
        ][:attachments]
        retour = build_retour(_origins()[origin], numero="A-9-K7Q2M4XT", demarche="recensementCitoyen", state=state,
                              comment="Votre attestation est jointe." if attachments else None, attachments=files, now=NOW)
        return _reply_checks(retour.data, "relayd-retour.xsd")

    return build


def _status(status: StatusFile) -> Callable[[], list[Check]]:
    def build() -> list[Check]:
        data = write_status_file(status)
        assert read_status_file(data, max_bytes=MAX_STATUS) == status
        return [("relayd-statut.xsd", _parse(data))]

    return build


SAMPLE_KINDS: dict[str, Callable[[], list[Check]]] = {
    **{f"package-{name}-seed{seed}": _package_kind(spec, seed) for name, spec in PACKAGE_SPECS.items() for seed in (0, 3)},
    "real-package": _real_package,
    "real-rco-data": _real_rco,
    "avl-to-real": _avl("real"),
    "avl-to-sample": _avl("sample"),
    "anl-to-real": _anl("real", "A-9-X3UGO4V7"),
    "anl-without-number": _anl("sample", None),
    "retour-recu": _retour("sample", "recu", 0),
    "retour-clos-attachments": _retour("sample", "clos", 2),
    "retour-clos-to-real": _retour("real", "clos", 1),
    "statut-minimal": _status(StatusFile(numero="A-9-K7Q2M4XT", state="recu")),
    "statut-full": _status(StatusFile(
        numero="A-1-BEKJED123", state="clos", comment="Votre attestation est jointe.\nCordialement.",
        attachments=[StatusAttachment(file="attestation.pdf", title="Attestation de recensement"), StatusAttachment(file="scan 2.jpg")],
        demarche="ILE", insee="2A004",
    )),
}


@pytest.mark.parametrize("kind", SAMPLE_KINDS.keys())
def test_every_sample_kind_validates_against_its_xsd(kind: str) -> None:
    checks = SAMPLE_KINDS[kind]()
    assert checks
    for xsd, root in checks:
        # Each document's root is the one its XSD is for (an XSD alone cannot pin the root).
        assert XSD_OF_ROOT.get(root.tag) == xsd, (kind, root.tag, xsd)
        _assert_valid(xsd, root)


@pytest.mark.parametrize("kind", SAMPLE_KINDS.keys())
def test_every_sample_kind_fails_under_a_wrong_root(kind: str) -> None:
    for xsd, root in SAMPLE_KINDS[kind]():
        wrong = copy.deepcopy(root)
        wrong.tag = etree.QName(etree.QName(root).namespace, "Facture").text
        _assert_invalid(xsd, wrong, "No matching global declaration")


def test_every_xsd_is_exercised_by_a_sample_kind() -> None:
    used = {xsd for build in SAMPLE_KINDS.values() for xsd, _ in build()}
    assert used == {p.name for p in SCHEMAS.glob("*.xsd")} == set(XSD_OF_ROOT.values())


def test_reply_bodies_fail_against_their_schema_when_tampered() -> None:
    # Negative cases for the reply kinds: what the body XSDs type is checked.
    (_, accuse), = [c for c in _avl("sample")() if c[0] == "relayd-accuse.xsd"]
    accuse.find(f"{{{ACK_NS}}}Type").text = "ACK"  # type: ignore[union-attr]
    _assert_invalid("relayd-accuse.xsd", accuse, "Type")
    (_, retour), = [c for c in _retour("sample", "clos", 1)() if c[0] == "relayd-retour.xsd"]
    retour.find(f"{{{RETOUR_NS}}}Etat").text = "Dossier transmis au service traitant"  # type: ignore[union-attr]
    _assert_invalid("relayd-retour.xsd", retour, "Etat")
    (_, statut), = _status(StatusFile(numero="A-9-K7Q2M4XT", state="recu"))()
    statut.find(f"{{{STATUT_NS}}}Etat").text = "transmis"  # type: ignore[union-attr]
    _assert_invalid("relayd-statut.xsd", statut, "Etat")


# --------------------------------------------------------------------------- docs/formats.md


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def test_doc_lists_every_reason_code_with_its_sentence(doc: str) -> None:
    plain = html.unescape(doc)
    for reason in Reason:
        assert f"`{reason.value}`" in doc, reason.value
        assert reason.summary in plain, (reason.value, reason.summary)


def test_doc_mentions_every_schema(doc: str) -> None:
    for xsd in sorted(p.name for p in SCHEMAS.glob("*.xsd")):
        assert f"schemas/{xsd}" in doc, xsd


def test_schemas_readme_has_a_line_for_every_schema() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    for xsd in sorted(p.name for p in SCHEMAS.glob("*.xsd")):
        (line,) = [line for line in readme.splitlines() if line.startswith(f"| `{xsd}`")]
        assert "found in real material" in line or "relayd's own" in line, line


def test_doc_status_file_examples_are_read_by_relayd(doc: str) -> None:
    examples = [b for b in _blocks(doc, "xml") if "<Statut" in b]
    assert len(examples) >= 3
    for example in examples:
        status = read_status_file(example.encode("utf-8"), max_bytes=MAX_STATUS)
        assert status.state in ("recu", "clos")


def test_doc_xml_examples_are_valid(doc: str) -> None:
    examples = _blocks(doc, "xml")
    roots = set()
    for example in examples:
        root = _parse(example.encode("utf-8"))
        xsd = XSD_OF_ROOT.get(root.tag)
        assert xsd is not None, f"an XML example of docs/formats.md has an unknown root {root.tag}"
        _assert_valid(xsd, root)
        roots.add(root.tag)
    # Every format has an example.
    assert roots == set(XSD_OF_ROOT)


def test_doc_json_examples_are_json(doc: str) -> None:
    examples = [json.loads(block) for block in _blocks(doc, "json")]
    codes = [e["code"] for e in examples if "code" in e]
    assert len(codes) >= 2 and all(code in {r.value for r in Reason} for code in codes)
    assert any("files" in e for e in examples)  # relayd.json


def test_doc_marks_the_source_of_every_section(doc: str) -> None:
    sections = re.split(r"^## ", doc, flags=re.M)[1:]
    assert len(sections) >= 10
    for section in sections:
        title = section.splitlines()[0]
        if title.startswith(("Contents", "Walkthrough")):
            continue
        lowered = section.lower()
        assert "found in real material" in lowered or "relayd's own" in lowered, title


def test_doc_states_the_platform_rules_word_for_word(doc: str) -> None:
    for label in STATE_LABELS.values():
        assert label in doc
    assert "1024 Ko" in doc
    assert "../shared/seed/" in doc and "rco-10870-XML.xml" in doc


def test_no_real_secret_or_address_in_the_doc_or_the_schemas(doc: str) -> None:
    texts = {"docs/formats.md": doc.encode("utf-8")} | {f"schemas/{p.name}": p.read_bytes() for p in SCHEMAS.iterdir()}
    password = _real_password()
    addresses = _parse(_real_member("message.xml")).xpath("//*[local-name()='Email']/text()")
    addresses += _parse(REAL_RCO.read_bytes()).xpath("//URI/text()")
    assert addresses
    for name, text in texts.items():
        # Booleans first, so that a failure names the file and never prints the value.
        leaked = password in text
        assert not leaked, f"{name} holds the real package's MotDePasse"
        found = [i for i, value in enumerate(addresses) if value.encode("utf-8") in text]
        assert not found, f"{name} holds {len(found)} contact value(s) of the real files"

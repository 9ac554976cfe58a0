"""The XSDs in ``schemas/`` against the real package, the generated samples and relayd's own reader.

``schemas/pec-envelope.xsd`` (importing ``schemas/pec-metier.xsd``) describes the envelope *as
relayd reads it*. These tests hold the two together: the real files and every sample validate,
the broken envelopes do not, and over a set of envelopes ``read_envelope`` accepts exactly what
the schema accepts, except where XSD 1.0 cannot say what relayd checks (each such case is named
below, with the direction of the difference).
"""

from __future__ import annotations

import copy
import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from relayd.pec.envelope import read_envelope
from relayd.pec.xml import parse_xml
from relayd.rejections import Reason, Rejection
from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.samples import METIER_NS, PEC_NS, SampleSpec, build_members, ent_member_name

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
REAL = REPO.parent / "shared" / "fixtures" / "real"
REAL_PACKAGE = REAL / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
REAL_ENT = "A-9-X3UGO4V7-DAUA-ent-2.xml"

XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS = {"ns2": PEC_NS, "m": METIER_NS}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def envelope_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "pec-envelope.xsd")))


@pytest.fixture(scope="module")
def metier_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "pec-metier.xsd")))


def _real(name: str) -> bytes:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        return zf.read(name)


def _parse(data: bytes) -> etree._Element:
    # The schema side uses plain lxml (safe options); relayd's side uses parse_xml.
    return etree.fromstring(data, etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True))


def _valid(schema: etree.XMLSchema, doc: etree._Element) -> bool:
    return bool(schema.validate(doc))


def _errors(schema: etree.XMLSchema) -> str:
    return "\n".join(f"line {e.line}: {e.message}" for e in schema.error_log)


def _relayd_reason(data: bytes) -> Reason | None:
    """None when relayd reads the envelope, else the reason it refuses it with."""
    try:
        read_envelope(parse_xml(data, name="message.xml"))
    except Rejection as exc:
        return exc.reason
    return None


def _message_of(package: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        return zf.read("message.xml")


# Sample specs: the three démarches, a spec with no attachments, one with no data document,
# and a few other shapes the builder allows.
SPECS: dict[str, SampleSpec] = {
    "RCO": SampleSpec(),
    "ILE": SampleSpec(numero="A-1-BEKJED12", demarche="ILE", insee="75056"),
    "DAUA": SampleSpec(numero="A-9-X3UGO4V7", demarche="DAUA"),
    "RCO-scans0": SampleSpec(numero="A-2-NOSCANS0", scans=0),
    "ILE-scans0": SampleSpec(numero="A-3-NOSCANS1", demarche="ILE", scans=0),
    "DAUA-scans0": SampleSpec(numero="A-4-NOSCANS2", demarche="DAUA", scans=0),
    "RCO-no-data-doc": SampleSpec(numero="A-5-NODATA00", data_document=False),
    "ILE-many-scans-annex": SampleSpec(numero="A-6-MANYSCAN9", demarche="ILE", scans=5, annex_bytes=100),
    "RCO-no-ack": SampleSpec(numero="A-7-NOACK000", ack_required=False, ack_types=()),
}
SEEDS = (0, 1, 7)

SAMPLE_CASES = [pytest.param(spec, seed, id=f"{name}-seed{seed}") for name, spec in SPECS.items() for seed in SEEDS]


# --------------------------------------------------------------------------- the schemas themselves


def test_schemas_load_and_envelope_imports_metier() -> None:
    envelope = etree.parse(str(SCHEMAS / "pec-envelope.xsd")).getroot()
    assert envelope.get("targetNamespace") == PEC_NS
    imports = envelope.findall("{http://www.w3.org/2001/XMLSchema}import")
    assert [(i.get("namespace"), i.get("schemaLocation")) for i in imports] == [
        (METIER_NS, "pec-metier.xsd"),
        # relayd's own reply bodies, which Content holds instead of Aller (tests/test_replies.py).
        ("urn:relayd:pec:accuse:1", "relayd-accuse.xsd"),
        ("urn:relayd:pec:retour:1", "relayd-retour.xsd"),
    ]
    metier = etree.parse(str(SCHEMAS / "pec-metier.xsd")).getroot()
    assert metier.get("targetNamespace") == METIER_NS
    # Loading compiles them (libxml2 also checks the content models are deterministic).
    etree.XMLSchema(envelope.getroottree())
    etree.XMLSchema(metier.getroottree())


def test_schemas_readme_describes_each_file() -> None:
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    for name in ("pec-envelope.xsd", "pec-metier.xsd"):
        assert name in readme
    assert "no XSD" in readme or "publishes no" in readme


# --------------------------------------------------------------------------- real material


def test_real_message_validates(envelope_schema: etree.XMLSchema) -> None:
    doc = _parse(_real("message.xml"))
    assert _valid(envelope_schema, doc), _errors(envelope_schema)


def test_real_message_uses_the_xsi_types_the_schema_must_accept(envelope_schema: etree.XMLSchema) -> None:
    # Guard: the real file does carry both xsi:type attributes, so the validation above covers them.
    doc = _parse(_real("message.xml"))
    locations = doc.findall(".//ns2:Location", NS)
    assert len(locations) == 3
    assert {loc.get(f"{{{XSI}}}type") for loc in locations} == {"ns2:Location_FR"}
    body = doc.find("ns2:Header/ns2:Extras/ns2:EmailConfiguration/ns2:Body", NS)
    assert body is not None and body.get(f"{{{XSI}}}type") == "xs:string"


def test_real_ent_validates(metier_schema: etree.XMLSchema, envelope_schema: etree.XMLSchema) -> None:
    doc = _parse(_real(REAL_ENT))
    assert etree.QName(doc) == etree.QName(METIER_NS, "EnteteMetierEnveloppe")
    assert _valid(metier_schema, doc), _errors(metier_schema)
    # The envelope schema imports the metier one, so its schema set knows that root too.
    assert _valid(envelope_schema, doc), _errors(envelope_schema)


def test_real_message_is_not_a_metier_document(metier_schema: etree.XMLSchema) -> None:
    # The metier schema alone has no Message: the two files are not interchangeable.
    assert not _valid(metier_schema, _parse(_real("message.xml")))


def test_unknown_xsi_type_on_location_is_refused(envelope_schema: etree.XMLSchema) -> None:
    # Location_FR validates because it is declared; an undeclared type must not slip through.
    data = _real("message.xml").replace(b'xsi:type="ns2:Location_FR"', b'xsi:type="ns2:Location_XX"', 1)
    assert not _valid(envelope_schema, _parse(data))


# --------------------------------------------------------------------------- generated samples


@pytest.mark.parametrize(("spec", "seed"), SAMPLE_CASES)
def test_sample_validates(
    spec: SampleSpec, seed: int, envelope_schema: etree.XMLSchema, metier_schema: etree.XMLSchema
) -> None:
    members = build_members(spec, seed=seed)
    message = _parse(members["message.xml"])
    assert _valid(envelope_schema, message), _errors(envelope_schema)
    ent = _parse(members[ent_member_name(spec)])
    assert _valid(metier_schema, ent), _errors(metier_schema)


def test_sample_without_scans_has_no_piece_jointe(envelope_schema: etree.XMLSchema) -> None:
    # Guard for the scans=0 case above: PieceJointe really is absent, and that is valid.
    message = _parse(build_members(SPECS["RCO-scans0"])["message.xml"])
    assert message.find(".//m:PieceJointe", NS) is None
    assert _valid(envelope_schema, message), _errors(envelope_schema)


@pytest.mark.parametrize(
    ("kind", "expected_error"),
    [("wrong-root", "Facture")],
)
def test_broken_envelope_does_not_validate(kind: str, expected_error: str, envelope_schema: etree.XMLSchema) -> None:
    data = _message_of(build_broken(kind, SPECS["RCO"]))
    assert not _valid(envelope_schema, _parse(data))
    # ...and for the defect the kind is about, not for some other reason.
    assert expected_error in _errors(envelope_schema), _errors(envelope_schema)


# --------------------------------------------------------------------------- schema vs read_envelope

# Envelope-level broken kinds whose message.xml is still well-formed and DOCTYPE-free.
ENVELOPE_KINDS = ("wrong-root", "envelope-incomplete", "bad-numero", "unknown-demarche", "foreign-insee")

# bad-numero's number, "B-12-xyz", is well placed: the envelope is structurally fine, so the
# schema (which describes structure, not relayd's policy on values) accepts it, while
# read_envelope refuses the number's format. This is the one expected disagreement here, and it
# goes one way only: relayd is stricter.
# Likewise what routes a dossier (a CodeINSEE, or else the recipient's Siret, as in the DIA flow)
# is relayd's policy: the schema admits an envelope with neither.
SCHEMA_VALID_BUT_REFUSED = {"bad-numero": Reason.DOSSIER_NUMBER_INVALID, "envelope-incomplete": Reason.ENVELOPE_INVALID}


def _cross_cases() -> list:
    cases = [pytest.param(None, spec, seed, id=f"sample-{name}-seed{seed}") for name, spec in SPECS.items() for seed in SEEDS]
    for kind in ENVELOPE_KINDS:
        for name in ("RCO", "ILE", "DAUA"):
            cases.append(pytest.param(kind, SPECS[name], 0, id=f"{kind}-{name}"))
    return cases


@pytest.mark.parametrize(("kind", "spec", "seed"), _cross_cases())
def test_read_envelope_accepts_exactly_what_the_schema_accepts(
    kind: str | None, spec: SampleSpec, seed: int, envelope_schema: etree.XMLSchema
) -> None:
    if kind is None:
        data = build_members(spec, seed=seed)["message.xml"]
    else:
        assert BROKEN_KINDS[kind]  # a known kind
        data = _message_of(build_broken(kind, spec))
    schema_ok = _valid(envelope_schema, _parse(data))
    refused = _relayd_reason(data)
    if kind in SCHEMA_VALID_BUT_REFUSED:
        assert schema_ok, _errors(envelope_schema)
        assert refused == SCHEMA_VALID_BUT_REFUSED[kind]
    else:
        assert schema_ok == (refused is None), (schema_ok, refused, _errors(envelope_schema))
    # Whatever the case, relayd never reads an envelope that the schema refuses.
    if refused is None:
        assert schema_ok


def test_cross_check_covers_both_outcomes(envelope_schema: etree.XMLSchema) -> None:
    # Guard: the equivalence above is not vacuous (some refused by both, some accepted by both).
    outcomes = set()
    for kind in ("wrong-root", "envelope-incomplete", None):
        data = build_members(SPECS["RCO"])["message.xml"] if kind is None else _message_of(build_broken(kind, SPECS["RCO"]))
        outcomes.add((_valid(envelope_schema, _parse(data)), _relayd_reason(data)))
    assert outcomes == {(True, None), (False, Reason.ENVELOPE_WRONG_ROOT), (True, Reason.ENVELOPE_INVALID)}


# Edits of the real message.xml: what relayd tolerates, the schema must tolerate, and what relayd
# needs, the schema must require. Each entry: (edit, schema accepts?, relayd's reason or None).


def _both(*edits: Callable[[etree._Element], None]) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        for one in edits:
            one(root)

    return edit


def _drop(*paths: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        for path in paths:
            found = root.xpath(path, namespaces=NS)
            assert found, path
            for el in found:
                el.getparent().remove(el)

    return edit


def _empty_optional_texts(root: etree._Element) -> None:
    for path in (
        "//ns2:FlowType", "//ns2:Country", "//ns2:Siret", "//ns2:Service", "//ns2:AckRequired", "//ns2:AckType",
        "//ns2:Horodatage", "//ns2:DateTime", "//ns2:NbRejeu", "//ns2:Delais", "//ns2:From", "//ns2:Subject",
        "//ns2:EmailConfiguration/ns2:Body", "//m:MotDePasse", "//m:Date", "//m:IdentifiantPlateforme",
        "//m:Email", "//m:Intitule", "//m:Code", "//m:Nom",
    ):
        found = root.xpath(path, namespaces=NS)
        assert found, path
        for el in found:
            el.text = None


def _drop_xsi_types(root: etree._Element) -> None:
    for el in root.xpath("//ns2:Location", namespaces=NS):
        del el.attrib[f"{{{XSI}}}type"]


def _append(path: str, tag: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        found = root.xpath(path, namespaces=NS)
        assert found, path
        for el in found:
            etree.SubElement(el, tag).text = "extra"

    return edit


def _set_text(path: str, text: str) -> Callable[[etree._Element], None]:
    def edit(root: etree._Element) -> None:
        found = root.xpath(path, namespaces=NS)
        assert found, path
        for el in found:
            el.text = text

    return edit


FOREIGN = "{urn:example:extension}Extra"

EDITS = [
    # Optional blocks and elements may go: both still read the envelope.
    pytest.param(_drop("//ns2:Security", "//ns2:Extras"), True, None, id="no-security-no-extras"),
    pytest.param(
        _drop("//ns2:FlowType", "//ns2:Sender", "//ns2:Recipients", "//ns2:AckRequired", "//ns2:AckType", "//ns2:AckTo"),
        True, None, id="bare-routing",
    ),
    pytest.param(_drop("//m:PieceJointe"), True, None, id="no-piece-jointe"),
    pytest.param(_drop("//m:Teledemarche/*[not(self::m:NumeroTeledemarche)]"), True, None, id="bare-teledemarche"),
    pytest.param(_drop("//m:Document/m:Code", "//m:Document/m:Nom", "//m:PieceJointe/m:Intitule"), True, None,
                 id="no-codes-no-names"),
    pytest.param(_empty_optional_texts, True, None, id="empty-optional-texts"),
    pytest.param(_drop_xsi_types, True, None, id="location-without-xsi-type"),
    # Elements of other namespaces at the end of a block are tolerated by both.
    pytest.param(_append("//ns2:Routing", FOREIGN), True, None, id="foreign-in-routing"),
    pytest.param(_append("//ns2:Location", FOREIGN), True, None, id="foreign-in-location"),
    pytest.param(_append("//m:Teledemarche", FOREIGN), True, None, id="foreign-in-teledemarche"),
    pytest.param(_append("//ns2:Aller", FOREIGN), True, None, id="foreign-in-aller"),
    pytest.param(_append("//m:Document", FOREIGN), True, None, id="foreign-in-document"),
    # What relayd needs, the schema requires.
    pytest.param(_drop("//ns2:MessageId"), False, Reason.ENVELOPE_INVALID, id="no-message-id"),
    pytest.param(_drop("//ns2:Routing"), False, Reason.ENVELOPE_INVALID, id="no-routing"),
    pytest.param(_drop("//m:NumeroDemarche"), False, Reason.ENVELOPE_INVALID, id="no-numero-demarche"),
    pytest.param(_drop("//m:NumeroTeledemarche"), False, Reason.ENVELOPE_INVALID, id="no-numero-teledemarche"),
    pytest.param(_drop("//m:Teledemarche"), False, Reason.ENVELOPE_INVALID, id="no-teledemarche"),
    # Without CodeINSEE, relayd routes by the recipient's Siret, as the DIA flow is routed.
    pytest.param(_drop("//m:Routage"), True, None, id="no-routage-routes-by-siret"),
    pytest.param(_drop("//m:Donnee/m:Valeur"), False, Reason.ENVELOPE_INVALID, id="no-valeur"),
    pytest.param(_drop("//m:Donnee/m:Id"), False, Reason.ENVELOPE_INVALID, id="no-id"),
    pytest.param(_drop("//m:Document"), False, Reason.ENVELOPE_INVALID, id="no-document"),
    pytest.param(_drop("(//m:FichierDonnees)[1]"), False, Reason.ENVELOPE_INVALID, id="no-fichier-donnees"),
    pytest.param(_drop("(//m:FichierFormulaire)[1]"), False, Reason.ENVELOPE_INVALID, id="no-fichier-formulaire"),
    pytest.param(_drop("//m:PieceJointe/m:Fichier"), False, Reason.ENVELOPE_INVALID, id="no-fichier"),
    pytest.param(_drop("//ns2:Content"), False, Reason.ENVELOPE_INVALID, id="no-content"),
    # Known differences, each one way. XSD 1.0 cannot say "some Donnee has Id CodeINSEE and a
    # non-empty Valeur, or else the Recipient has a Siret": relayd is stricter.
    pytest.param(_both(_set_text("//m:Donnee/m:Id", "CodePostal"), _drop("//ns2:Recipient//ns2:Siret")), True,
                 Reason.ENVELOPE_INVALID, id="gap-no-codeinsee"),
    pytest.param(_both(_set_text("//m:Donnee/m:Valeur", ""), _drop("//ns2:Recipient//ns2:Siret")), True,
                 Reason.ENVELOPE_INVALID, id="gap-empty-insee"),
    pytest.param(_drop("//m:Routage/m:Donnee", "//ns2:Recipient//ns2:Siret"), True, Reason.ENVELOPE_INVALID,
                 id="gap-nothing-to-route-by"),
    # The number's format is relayd's check (see bad-numero above): relayd is stricter.
    pytest.param(_set_text("//m:NumeroTeledemarche", "B-12-xyz"), True, Reason.DOSSIER_NUMBER_INVALID,
                 id="gap-numero-format"),
    # An unknown element of the envelope's own namespace: relayd ignores it, but a same-namespace
    # wildcard after optional elements breaks XSD 1.0's determinism rule: the schema is stricter.
    pytest.param(_append("//ns2:Routing", f"{{{PEC_NS}}}Priority"), False, None, id="gap-unknown-pec-element"),
]


@pytest.mark.parametrize(("edit", "schema_ok", "reason"), EDITS)
def test_edits_of_the_real_envelope(
    edit: Callable[[etree._Element], None], schema_ok: bool, reason: Reason | None, envelope_schema: etree.XMLSchema
) -> None:
    root = copy.deepcopy(_parse(_real("message.xml")))
    edit(root)
    data = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    assert _valid(envelope_schema, _parse(data)) == schema_ok, _errors(envelope_schema)
    assert _relayd_reason(data) == reason


def test_schema_set_accepts_the_ent_root_so_the_root_name_must_be_checked(envelope_schema: etree.XMLSchema) -> None:
    # XSD cannot pin the root element: every global element of the schema set may be one, and the
    # envelope schema's set includes the metier schema's EnteteMetierEnveloppe. A message.xml that
    # is really an -ent- header therefore validates, and relayd refuses it for its root. Anyone
    # validating message.xml with this schema must also check the root is ns2:Message.
    data = _real(REAL_ENT)
    assert _valid(envelope_schema, _parse(data))
    assert _relayd_reason(data) == Reason.ENVELOPE_WRONG_ROOT


def test_ent_member_of_every_spec_matches_its_aller(metier_schema: etree.XMLSchema) -> None:
    # The -ent- header has "the same children as Aller": the same schema group validates both.
    spec = SPECS["ILE"]
    members = build_members(spec)
    aller = _parse(members["message.xml"]).find(".//ns2:Aller", NS)
    ent = _parse(members[ent_member_name(spec)])
    assert [c.tag for c in aller] == [c.tag for c in ent]
    wrapped = etree.Element(f"{{{METIER_NS}}}EnteteMetierEnveloppe", nsmap={None: METIER_NS})
    wrapped.extend(copy.deepcopy(list(aller)))
    assert _valid(metier_schema, wrapped), _errors(metier_schema)


def test_seeds_change_the_samples() -> None:
    # Guard: the seeds above really produce different envelopes (the password differs).
    spec = SPECS["RCO"]
    assert build_members(spec, seed=0)["message.xml"] != build_members(spec, seed=1)["message.xml"]

"""The testkit's sample and broken packages, checked against the real fixtures.

Only zipfile, lxml and the standard library are used here, on purpose: these packages are what
relayd's validator is tested with, so they must not be judged by that validator. ``_issues``
below is a small independent reference check, strict enough to show that each broken kind is
wrong in the one claimed way (and otherwise valid).
"""

from __future__ import annotations

import io
import random
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from relayd.rejections import Reason
from relayd.testkit.broken import BROKEN_KINDS, BrokenKind, build_broken
from relayd.testkit.samples import (
    METIER_NS,
    PEC_NS,
    SampleSpec,
    build_members,
    build_package,
    doc_member_name,
    ent_member_name,
    listed_members,
    package_filename,
    pdf_bytes,
    pj_member_name,
    png_bytes,
    random_numero,
    scan_files,
    write_zip,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real"
REAL_PACKAGE = REAL / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
REAL_RCO_XML = REAL / "rco-10870-XML.xml"

NUMERO_RE = re.compile(r"^A-\d-[A-Z0-9]{8,9}$")
FILENAME_RE = re.compile(
    r"^RitaGS\.\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d\.\d{9}\.(A-\d-[A-Z0-9]{8,9})-([A-Za-z0-9_.-]+?)-2\.ADER\.ftp\.zip$"
)
ENT_RE = re.compile(r"^.+-ent-\d+\.xml$")

# The configuration the reference check plays (the relay tests use the same limits).
MAX_PACKAGE = 2 * 1024 * 1024
ACCEPTED_DEMARCHES = {"recensementCitoyen", "ILE", "DAUA"}
KNOWN_INSEE = {"90017", "75056"}

SPECS = {
    "recensementCitoyen": SampleSpec(),
    "ILE": SampleSpec(numero="A-1-BEKJED12", demarche="ILE", insee="75056"),
    "DAUA": SampleSpec(numero="A-9-X3UGO4V7", demarche="DAUA"),
}


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True, huge_tree=False)


def _parse(data: bytes) -> etree._Element:
    return etree.fromstring(data, _safe_parser())


def _local(el: etree._Element) -> str:
    return str(etree.QName(el).localname)


def _paths(root: etree._Element) -> list[str]:
    """Local-name paths of every element, in document order, first occurrence only."""
    seen: dict[str, None] = {}
    for el in root.iter(etree.Element):
        parts = [_local(a) for a in reversed(list(el.iterancestors()))] + [_local(el)]
        seen.setdefault("/".join(parts), None)
    return list(seen)


def _flat(root: etree._Element) -> list[tuple[str, str]]:
    """Every descendant's qualified tag and text, in document order."""
    return [(el.tag, (el.text or "")) for el in root.iterdescendants(etree.Element)]


def _zip(data: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(data))


def _real_members() -> dict[str, bytes]:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        return {n: zf.read(n) for n in zf.namelist() if n.endswith(".xml")}


def _listed(root: etree._Element) -> list[str]:
    return [
        (el.text or "").strip()
        for el in root.iter(etree.Element)
        if _local(el) in ("Fichier", "FichierDonnees")
    ]


# --------------------------------------------------------------------------- reference check


def _zip_name_issues(infos: list[zipfile.ZipInfo]) -> set[Reason]:
    issues: set[Reason] = set()
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        issues.add(Reason.ZIP_DUPLICATE_MEMBER)
    for info in infos:
        name = info.filename
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            issues.add(Reason.ZIP_ABSOLUTE_PATH)
        if ".." in re.split(r"[/\\]", name):
            issues.add(Reason.ZIP_PATH_TRAVERSAL)
        if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
            issues.add(Reason.ZIP_SYMLINK)
        if info.flag_bits & 0x1:
            issues.add(Reason.ZIP_ENCRYPTED)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            issues.add(Reason.ZIP_UNSUPPORTED)
        if info.file_size >= 64 * 1024 and info.file_size > 100 * max(info.compress_size, 1):
            issues.add(Reason.ZIP_BOMB_RATIO)
    return issues


def _readable(info: zipfile.ZipInfo) -> bool:
    # Flag bit 5 ("patched data"): zipfile will not read the member at all.
    return not info.flag_bits & 0x21 and info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def _pj_ok(data: bytes) -> bool:
    try:
        zf = _zip(data)
    except zipfile.BadZipFile:
        return False
    with zf:
        infos = zf.infolist()
        if _zip_name_issues(infos):
            return False
        return zf.testzip() is None


def _issues(data: bytes, *, max_package: int | None = MAX_PACKAGE) -> set[Reason]:
    """Everything wrong with a package, as far as an independent reading can tell."""
    issues: set[Reason] = set()
    if max_package is not None and len(data) > max_package:
        issues.add(Reason.PACKAGE_TOO_LARGE)
    try:
        zf = _zip(data)
    except zipfile.BadZipFile:
        return issues | {Reason.ZIP_INVALID}
    with zf:
        infos = zf.infolist()
        issues |= _zip_name_issues(infos)
        contents: dict[str, bytes] = {}
        for info in infos:
            if not _readable(info):
                continue
            try:
                contents[info.filename] = zf.read(info)
            except zipfile.BadZipFile:
                issues.add(Reason.ZIP_CRC_MISMATCH)

    if "message.xml" not in contents:
        if "message.xml" not in {i.filename for i in infos}:
            issues.add(Reason.ENVELOPE_MISSING)
        return issues
    raw = contents["message.xml"]
    # Look before parsing: libxml2 fails on entity amplification even when not resolving.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        return issues | {Reason.XML_FORBIDDEN}
    try:
        tree = etree.parse(io.BytesIO(raw), _safe_parser())
    except etree.XMLSyntaxError:
        return issues | {Reason.XML_MALFORMED}
    root = tree.getroot()
    if root.tag != f"{{{PEC_NS}}}Message":
        return issues | {Reason.ENVELOPE_WRONG_ROOT}

    aller = root.find(f"{{{PEC_NS}}}Body/{{{PEC_NS}}}Content/{{{PEC_NS}}}Aller")
    m = f"{{{METIER_NS}}}"
    message_id = root.findtext(f"{{{PEC_NS}}}Header/{{{PEC_NS}}}Routing/{{{PEC_NS}}}MessageId")
    demarche = aller.findtext(f"{m}NumeroDemarche") if aller is not None else None
    numero = aller.findtext(f"{m}Teledemarche/{m}NumeroTeledemarche") if aller is not None else None
    insee = None
    codes = 0
    if aller is not None:
        for donnee in aller.iterfind(f"{m}Routage/{m}Donnee"):
            if donnee.findtext(f"{m}Id") == "CodeINSEE":
                insee = donnee.findtext(f"{m}Valeur")
    # As a reader that searches the whole document would count them: anywhere, in any namespace.
    codes = int(root.xpath("count(//*[local-name()='Donnee'][*[local-name()='Id']='CodeINSEE'])"))
    numeros = int(root.xpath("count(//*[local-name()='NumeroTeledemarche'])"))
    p = f"{{{PEC_NS}}}"
    if codes > 1 or numeros > 1 or len(root.findall(f"{p}Header/{p}Routing/{p}MessageId")) > 1:
        issues.add(Reason.ENVELOPE_DUPLICATE_ELEMENT)
    if any(b"http://www.w3.org/2001/XInclude" in body for name, body in contents.items() if name.endswith(".xml")):
        issues.add(Reason.XML_XINCLUDE)
    # The whole text content, as a DOM reader's textContent gives it (comments split nothing there).
    services = ["".join(s.itertext()) for s in root.iterfind(f".//{p}AckTo//{p}Service")]
    subjects = ["".join(s.itertext()) for s in root.iterfind(f".//{p}Subject")]
    if any("/" in v or ".." in v for v in services) or any("\n" in v or "\r" in v for v in subjects):
        issues.add(Reason.ENVELOPE_UNSAFE_VALUE)
    if aller is None and root.find(f"{{{PEC_NS}}}Body/{{{PEC_NS}}}Content") is not None:
        return issues | {Reason.ENVELOPE_NOT_A_DOSSIER}
    siret = root.findtext(f"{{{PEC_NS}}}Header/{{{PEC_NS}}}Routing/{{{PEC_NS}}}Recipients/{{{PEC_NS}}}Recipient/"
                          f"{{{PEC_NS}}}Location/{{{PEC_NS}}}Siret")
    if insee is None and siret and all((message_id, demarche, numero)):
        insee = "via-siret"
        issues.add(Reason.SIRET_UNKNOWN)  # no commune of the reference configuration declares a SIRET
    if not all((message_id, demarche, numero, insee)):
        return issues | {Reason.ENVELOPE_INVALID}
    assert numero is not None and demarche is not None and insee is not None
    if not NUMERO_RE.match(numero):
        issues.add(Reason.DOSSIER_NUMBER_INVALID)
    if demarche not in ACCEPTED_DEMARCHES:
        issues.add(Reason.DEMARCHE_NOT_ACCEPTED)
    if insee not in KNOWN_INSEE and insee != "via-siret":
        issues.add(Reason.INSEE_UNKNOWN)

    listed = set(_listed(root))
    present = {i.filename for i in infos}
    if listed - present:
        issues.add(Reason.MEMBER_MISSING)
    if {n for n in present - listed if n != "message.xml" and not ENT_RE.match(n)}:
        issues.add(Reason.MEMBER_UNEXPECTED)
    for pj in aller.iterfind(f"{m}PieceJointe/{m}Fichier"):
        name = (pj.text or "").strip()
        if name in contents and not _pj_ok(contents[name]):
            issues.add(Reason.PJ_ZIP_UNSAFE)
    return issues


# --------------------------------------------------------------------------- file-level helpers


def _check_pdf(data: bytes) -> None:
    assert data.startswith(b"%PDF-1.4\n")
    assert data.rstrip().endswith(b"%%EOF")
    tail = re.search(rb"startxref\n(\d+)\n%%EOF", data)
    assert tail is not None
    startxref = int(tail.group(1))
    assert data[startxref:].startswith(b"xref\n")
    head = re.match(rb"xref\n0 (\d+)\n", data[startxref:])
    assert head is not None
    count = int(head.group(1))
    table = data[startxref + head.end() :].split(b"trailer")[0]
    entries = [table[i : i + 20] for i in range(0, 20 * count, 20)]
    assert entries[0] == b"0000000000 65535 f \n"
    for number, entry in enumerate(entries[1:], start=1):
        assert entry.endswith(b" 00000 n \n"), entry
        offset = int(entry[:10])
        assert data[offset:].startswith(b"%d 0 obj\n" % number)
    # Every stream's declared /Length must be exact, or readers fall back to repair mode.
    for match in re.finditer(rb"<< /Length (\d+) >>\nstream\n", data):
        end = match.end() + int(match.group(1))
        assert data[end : end + len(b"\nendstream")] == b"\nendstream"


def _check_png(data: bytes) -> None:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"


# --------------------------------------------------------------------------- valid samples


def test_real_package_passes_the_reference_check() -> None:
    # The reference check is only worth something if the real package goes through it cleanly.
    assert _issues(REAL_PACKAGE.read_bytes(), max_package=None) == set()


@pytest.mark.parametrize("demarche", sorted(SPECS))
def test_sample_package_is_a_sound_zip(demarche: str) -> None:
    spec = SPECS[demarche]
    data = build_package(spec)
    with _zip(data) as zf:
        assert zf.testzip() is None
        assert zf.namelist() == list(build_members(spec))
        for info in zf.infolist():
            assert info.date_time == spec.zip_date_time
            assert info.compress_type == zipfile.ZIP_DEFLATED
            assert stat.S_ISREG(info.external_attr >> 16)
    assert _issues(data) == set()


@pytest.mark.parametrize("demarche", sorted(SPECS))
def test_member_names_follow_the_real_pattern(demarche: str) -> None:
    spec = SPECS[demarche]
    names = list(build_members(spec))
    assert names[0] == "message.xml"
    assert ent_member_name(spec) == f"{spec.numero}-{demarche}-ent-2.xml"
    kinds = r"(doc-[^/]+-1-2\.(pdf|xml)|pj-[^/]+-1-2\.zip|ent-2\.xml)"
    pattern = re.compile(rf"^{re.escape(spec.numero)}-{demarche}-{kinds}$")
    for name in names[1:]:
        assert pattern.match(name), name


def test_message_xml_has_the_real_structure() -> None:
    real = _parse(_real_members()["message.xml"])
    real_paths = _paths(real)
    for demarche, spec in SPECS.items():
        sample = _parse(build_members(spec)["message.xml"])
        assert sample.tag == f"{{{PEC_NS}}}Message"
        assert sample.prefix == "ns2"
        assert sample.nsmap[None] == METIER_NS
        sample_paths = _paths(sample)
        wanted = [p for p in real_paths if p.startswith(("Message/Header/Routing", "Message/Body/Content/Aller"))]
        missing = [p for p in wanted if p not in sample_paths]
        assert not missing, (demarche, missing)
    # For the real package's own démarche, every element and its order are the same.
    assert _paths(_parse(build_members(SPECS["DAUA"])["message.xml"])) == real_paths


def test_message_xml_namespaces_and_values() -> None:
    spec = SPECS["recensementCitoyen"]
    root = _parse(build_members(spec)["message.xml"])
    p, m = f"{{{PEC_NS}}}", f"{{{METIER_NS}}}"
    routing = root.find(f"{p}Header/{p}Routing")
    assert routing.findtext(f"{p}MessageId") == spec.effective_message_id
    assert re.match(r"^A-9-ABCD1234 \d+ Principal 2019-04-03T16:26:40$", spec.effective_message_id)
    assert routing.findtext(f"{p}FlowType") == "recensementCitoyen"
    assert [e.text for e in routing.iterfind(f"{p}AckType")] == ["AVL", "ANL"]
    assert routing.findtext(f"{p}AckRequired") == "true"
    subject = root.findtext(f"{p}Header/{p}Extras/{p}EmailConfiguration/{p}Subject")
    assert subject == "recensementCitoyen - A-9-ABCD1234 : dossier à traiter"
    aller = root.find(f"{p}Body/{p}Content/{p}Aller")
    assert all(child.tag.startswith(m) for child in aller.iterdescendants(etree.Element))
    assert aller.findtext(f"{m}Teledemarche/{m}NumeroTeledemarche") == spec.numero
    assert aller.findtext(f"{m}Routage/{m}Donnee/{m}Valeur") == spec.insee
    assert len(aller.findtext(f"{m}Teledemarche/{m}MotDePasse")) == 10
    no_ack = _parse(build_members(replace(spec, ack_required=False, ack_types=()))["message.xml"])
    assert no_ack.findtext(f"{p}Header/{p}Routing/{p}AckRequired") == "false"
    assert no_ack.find(f"{p}Header/{p}Routing/{p}AckType") is None


def test_ent_header_repeats_aller_and_is_not_listed() -> None:
    real = _real_members()
    real_ent = next(v for k, v in real.items() if "-ent-" in k)
    for spec in SPECS.values():
        members = build_members(spec)
        ent = _parse(members[ent_member_name(spec)])
        assert ent.tag == f"{{{METIER_NS}}}EnteteMetierEnveloppe"
        aller = _parse(members["message.xml"]).find(f"{{{PEC_NS}}}Body/{{{PEC_NS}}}Content/{{{PEC_NS}}}Aller")
        assert _flat(ent) == _flat(aller)
        assert ent_member_name(spec) not in _listed(_parse(members["message.xml"]))
    assert _paths(_parse(build_members(SPECS["DAUA"])[ent_member_name(SPECS["DAUA"])])) == _paths(_parse(real_ent))


@pytest.mark.parametrize("demarche", sorted(SPECS))
def test_every_listed_file_is_a_member(demarche: str) -> None:
    spec = SPECS[demarche]
    members = build_members(spec)
    listed = _listed(_parse(members["message.xml"]))
    assert sorted(listed) == sorted(listed_members(spec))
    assert set(listed) == set(members) - {"message.xml", ent_member_name(spec)}


@pytest.mark.parametrize("demarche", sorted(SPECS))
def test_documents_are_valid_pdfs_and_scans(demarche: str) -> None:
    spec = SPECS[demarche]
    members = build_members(spec)
    pdfs = [n for n in members if n.endswith(".pdf")]
    assert len(pdfs) >= 2
    for name in pdfs:
        _check_pdf(members[name])
    with _zip(members[pj_member_name(spec)]) as pj:
        assert pj.testzip() is None
        assert pj.namelist() == list(scan_files(spec))
        assert 1 <= len(pj.namelist()) <= 2
        for name in pj.namelist():
            data = pj.read(name)
            _check_pdf(data) if name.endswith(".pdf") else _check_png(data)


def test_pdf_and_png_helpers() -> None:
    _check_pdf(pdf_bytes(["Parenthèses (et) \\ barre"]))
    _check_pdf(pdf_bytes(["avec remplissage"], padding=bytes(1000)))
    _check_png(png_bytes(3, 5))


def test_no_scans_means_no_piece_jointe() -> None:
    spec = replace(SPECS["recensementCitoyen"], scans=0)
    members = build_members(spec)
    assert not any("-pj-" in n for n in members)
    assert b"PieceJointe" not in members["message.xml"]
    assert _issues(build_package(spec)) == set()


def test_rco_data_xml_is_shaped_like_the_real_one() -> None:
    spec = SPECS["recensementCitoyen"]
    data = build_members(spec)[doc_member_name(spec, "flux", "xml")]
    sample = _parse(data)
    real = etree.parse(str(REAL_RCO_XML), _safe_parser()).getroot()
    assert sample.tag == real.tag == "RecensementCitoyen"
    assert [c.tag for c in sample] == [c.tag for c in real]
    assert {"Formalite", "Personne", "FiliationPere", "FiliationMere"} <= {c.tag for c in sample}
    missing = set(_paths(real)) - set(_paths(sample))
    assert not missing
    assert re.match(r"^\d\d/\d\d/\d{4}$", sample.findtext("Personne/DateNaissance"))
    assert sample.findtext("Personne/AdresseDomicile/CodeINSEE") == spec.insee


def test_ile_data_xml() -> None:
    spec = SPECS["ILE"]
    sample = _parse(build_members(spec)[doc_member_name(spec, "flux", "xml")])
    assert sample.tag == "InscriptionListeElectorale"
    assert sample.nsmap == {}
    blocks = {c.tag for c in sample}
    cerfa_12669 = {"TypeListe", "Identite", "Naissance", "Nationalite", "Adresse", "CommunePrecedente", "Justificatifs"}
    assert cerfa_12669 <= blocks
    assert re.match(r"^\d\d/\d\d/\d{4}$", sample.findtext("Naissance/DateNaissance"))


def test_other_demarches_have_no_data_xml() -> None:
    assert not any(n.endswith(".xml") and "-doc-" in n for n in build_members(SPECS["DAUA"]))


def test_determinism() -> None:
    spec = SPECS["recensementCitoyen"]
    assert build_package(spec) == build_package(spec)
    assert build_package(spec, seed=3) == build_package(spec, seed=3)
    assert build_package(spec, seed=3) != build_package(spec)
    assert build_package(replace(spec, numero="A-9-ZZZZ9999")) != build_package(spec)
    for kind in BROKEN_KINDS:
        assert build_broken(kind, spec) == build_broken(kind, spec), kind


def test_password_depends_on_seed() -> None:
    def password(seed: int) -> str:
        root = _parse(build_members(SPECS["recensementCitoyen"], seed=seed)["message.xml"])
        return next(str(e.text) for e in root.iter(f"{{{METIER_NS}}}MotDePasse"))

    assert password(0) == password(0)
    assert password(0) != password(1)


def test_derived_fields_follow_replace() -> None:
    spec = replace(SPECS["recensementCitoyen"], numero="A-2-QWERTY12")
    assert spec.effective_message_id.startswith("A-2-QWERTY12 ")
    assert SampleSpec(message_id="fixed").effective_message_id == "fixed"


def test_package_filename() -> None:
    assert FILENAME_RE.match(REAL_PACKAGE.name)
    for demarche, spec in SPECS.items():
        match = FILENAME_RE.match(package_filename(spec))
        assert match, package_filename(spec)
        assert match.groups() == (spec.numero, demarche)
    assert package_filename(SPECS["recensementCitoyen"]).startswith("RitaGS.2019-04-03T16_26_40.175")


def test_random_numero() -> None:
    rng = random.Random(42)
    numeros = [random_numero(rng) for _ in range(200)]
    assert all(NUMERO_RE.match(n) and len(n) == 12 for n in numeros)
    assert len(set(numeros)) == 200
    assert random_numero(random.Random(1)) == random_numero(random.Random(1))


def test_write_zip_allows_duplicates_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    data = write_zip([("a", b"1"), ("a", b"2")], stored={"a"})
    assert not recwarn.list
    with _zip(data) as zf:
        assert zf.namelist() == ["a", "a"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


# --------------------------------------------------------------------------- broken packages

REQUIRED_KINDS = {
    "zip-slip": Reason.ZIP_PATH_TRAVERSAL,
    "absolute-path": Reason.ZIP_ABSOLUTE_PATH,
    "symlink-member": Reason.ZIP_SYMLINK,
    "duplicate-member": Reason.ZIP_DUPLICATE_MEMBER,
    "zip-bomb": Reason.ZIP_BOMB_RATIO,
    "nested-bomb": Reason.PJ_ZIP_UNSAFE,
    "truncated": Reason.ZIP_INVALID,
    "not-a-zip": Reason.ZIP_INVALID,
    "crc-mismatch": Reason.ZIP_CRC_MISMATCH,
    "document-missing": Reason.MEMBER_MISSING,
    "unlisted-member": Reason.MEMBER_UNEXPECTED,
    "no-envelope": Reason.ENVELOPE_MISSING,
    "doctype": Reason.XML_FORBIDDEN,
    "xxe": Reason.XML_FORBIDDEN,
    "billion-laughs": Reason.XML_FORBIDDEN,
    "malformed-xml": Reason.XML_MALFORMED,
    "wrong-root": Reason.ENVELOPE_WRONG_ROOT,
    "bad-numero": Reason.DOSSIER_NUMBER_INVALID,
    "unknown-demarche": Reason.DEMARCHE_NOT_ACCEPTED,
    "foreign-insee": Reason.INSEE_UNKNOWN,
    "encrypted-member": Reason.ZIP_ENCRYPTED,
    "envelope-incomplete": Reason.ENVELOPE_INVALID,
    "oversized": Reason.PACKAGE_TOO_LARGE,
}

# An extra member with a hostile name is necessarily also unlisted; the validator checks names first.
ALSO_WRONG = {
    "zip-slip": {Reason.MEMBER_UNEXPECTED},
    "absolute-path": {Reason.MEMBER_UNEXPECTED},
}


# Kinds that a zipfile-only reading cannot tell apart from a good package, or takes for another fault: that is
# their point (two readers disagree). What zipfile sees is pinned here; relayd's own codes for them are checked
# against a real relay in test_broken_packages.py and test_canonical_zip.py.
_U = Reason.MEMBER_UNEXPECTED
ZIPFILE_SEES: dict[str, set[Reason]] = {
    "backslash-name": {_U}, "case-collision": {_U}, "control-char-name": {_U}, "file-and-folder": {_U},
    "overlapping-members": {_U}, "undeclared-name-encoding": {_U}, "unicode-collision": {_U},
    "member-in-pj-folder": {_U}, "file-marked-folder": set(), "stored-data-descriptor": set(),
    "descriptor-mismatch": set(),
    "central-offset-lie": {Reason.ZIP_CRC_MISMATCH}, "local-name-mismatch": {Reason.ZIP_CRC_MISMATCH},
    "comment-end-record": {Reason.ENVELOPE_MISSING},
    **{kind: set() for kind in (
        "deflate-slack", "hidden-gap", "leading-junk", "local-crc-mismatch", "pj-disguised-zip", "pj-dot-member",
        "pj-file-and-folder", "pj-nested-zip", "pj-trailing-data", "pj-unicode-path-extra", "prepended-package",
        "summary-name-member", "trailing-data", "unicode-comment-extra", "unicode-path-extra", "zip64-member",
        "mode-extra-xl", "mode-extra-asi", "short-timestamp-extra", "reserved-flag", "setuid-member",
        "pj-version-collision", "pj-device-name")},
}


def _expected_issues(kind: str) -> set[Reason]:
    if kind in ZIPFILE_SEES:
        return ZIPFILE_SEES[kind]
    return {BROKEN_KINDS[kind].reason} | ALSO_WRONG.get(kind, set())


def test_required_kinds_are_present_with_their_reasons() -> None:
    for name, reason in REQUIRED_KINDS.items():
        assert BROKEN_KINDS[name].reason is reason, name


def test_kinds_are_well_formed() -> None:
    for name, kind in BROKEN_KINDS.items():
        assert isinstance(kind, BrokenKind)
        assert kind.name == name
        assert re.match(r"^[a-z0-9]+(-[a-z0-9]+)*$", name)
        assert kind.description.endswith(".") and "\n" not in kind.description
    with pytest.raises(KeyError, match="unknown broken kind"):
        build_broken("no-such-kind", SampleSpec())


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_broken_kind_is_wrong_in_exactly_the_claimed_way(kind: str) -> None:
    data = build_broken(kind, SPECS["recensementCitoyen"])
    assert _issues(data) == _expected_issues(kind)


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_broken_kinds_work_for_other_demarches(kind: str) -> None:
    # The same defect, built from an ILE spec without attachments (nested kinds add them back).
    data = build_broken(kind, replace(SPECS["ILE"], scans=0))
    assert _issues(data) == _expected_issues(kind)


def _broken_zip(kind: str) -> zipfile.ZipFile:
    return _zip(build_broken(kind, SPECS["recensementCitoyen"]))


def test_zip_level_kinds_in_detail() -> None:
    spec = SPECS["recensementCitoyen"]
    recap = doc_member_name(spec, "recapPDF", "pdf")
    assert "../../evil.txt" in _broken_zip("zip-slip").namelist()
    assert "/etc/evil" in _broken_zip("absolute-path").namelist()

    link = _broken_zip("symlink-member").getinfo(recap)
    assert link.create_system == 3 and stat.S_ISLNK(link.external_attr >> 16)

    names = _broken_zip("duplicate-member").namelist()
    assert names.count(recap) == 2

    with pytest.raises(zipfile.BadZipFile):
        _broken_zip("truncated")
    with pytest.raises(zipfile.BadZipFile):
        _broken_zip("not-a-zip")
    assert not zipfile.is_zipfile(io.BytesIO(build_broken("not-a-zip", spec)))

    crc = _broken_zip("crc-mismatch")
    bad = crc.testzip()
    assert bad is not None and "-doc-" in bad
    assert crc.getinfo(bad).compress_type == zipfile.ZIP_STORED

    enc = build_broken("encrypted-member", spec)
    info = _zip(enc).getinfo(recap)
    assert info.flag_bits & 0x1
    (local_flags,) = struct.unpack_from("<H", enc, info.header_offset + 6)
    assert local_flags & 0x1
    with pytest.raises(RuntimeError, match="encrypted"):
        _zip(enc).read(recap)

    with pytest.raises(NotImplementedError):
        _broken_zip("unsupported-compression").read(recap)


def test_bombs_in_detail() -> None:
    bomb = max(_broken_zip("zip-bomb").infolist(), key=lambda i: i.file_size)
    assert bomb.file_size >= 20 * 1024 * 1024
    assert bomb.file_size / bomb.compress_size > 500

    spec = SPECS["recensementCitoyen"]
    outer = _broken_zip("nested-bomb")
    pj = outer.getinfo(pj_member_name(spec))
    assert pj.compress_type == zipfile.ZIP_STORED
    assert all(i.file_size <= 10 * max(i.compress_size, 1) for i in outer.infolist())
    inner = _zip(outer.read(pj)).infolist()
    assert max(i.file_size / max(i.compress_size, 1) for i in inner) > 500


def test_envelope_kinds_in_detail() -> None:
    def envelope(kind: str) -> bytes:
        return _broken_zip(kind).read("message.xml")

    assert "message.xml" not in _broken_zip("no-envelope").namelist()
    assert b"<!DOCTYPE" in envelope("doctype") and b"<!ENTITY" in envelope("doctype")
    assert b'SYSTEM "file:///etc/passwd"' in envelope("xxe") and b"&xxe;" in envelope("xxe")
    laughs = envelope("billion-laughs")
    assert b"<!ENTITY lol9" in laughs and b"&lol9;" in laughs
    with pytest.raises(etree.XMLSyntaxError):
        _parse(envelope("malformed-xml"))
    assert _local(_parse(envelope("wrong-root"))) == "Facture"
    incomplete = _parse(envelope("envelope-incomplete"))
    assert not any(_local(e) == "Routage" for e in incomplete.iter(etree.Element))
    # The rest of the envelope is untouched by the XML kinds.
    valid = build_members(SPECS["recensementCitoyen"])["message.xml"]
    assert envelope("doctype").replace(b'<!DOCTYPE ns2:Message [<!ENTITY plateforme "PSL_PART">]>', b"") == valid


def test_routing_kinds_in_detail() -> None:
    bad = _broken_zip("bad-numero")
    assert all(n == "message.xml" or n.startswith("B-12-xyz-") for n in bad.namelist())
    root = _parse(bad.read("message.xml"))
    assert next(e.text for e in root.iter(f"{{{METIER_NS}}}NumeroTeledemarche")) == "B-12-xyz"
    assert next(e.text for e in root.iter(f"{{{PEC_NS}}}MessageId")).startswith("B-12-xyz ")

    zzz = _parse(_broken_zip("unknown-demarche").read("message.xml"))
    assert next(e.text for e in zzz.iter(f"{{{METIER_NS}}}NumeroDemarche")) == "ZZZ"
    assert next(e.text for e in zzz.iter(f"{{{PEC_NS}}}FlowType")) == "ZZZ"

    foreign = _parse(_broken_zip("foreign-insee").read("message.xml"))
    assert next(e.text for e in foreign.iter(f"{{{METIER_NS}}}Valeur")) == "99999"

    missing = _broken_zip("document-missing")
    assert set(_listed(_parse(missing.read("message.xml")))) - set(missing.namelist())
    assert "notes.txt" in _broken_zip("unlisted-member").namelist()


def test_oversized_is_a_valid_package_of_about_3_mib() -> None:
    data = build_broken("oversized", SPECS["recensementCitoyen"])
    assert 3 * 1024 * 1024 - 4096 <= len(data) <= 3 * 1024 * 1024 + 4096
    assert _issues(data, max_package=None) == set()
    with _zip(data) as zf:
        assert zf.testzip() is None

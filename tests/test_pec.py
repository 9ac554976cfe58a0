"""Unit tests of relayd's hardened XML parser, its envelope reader and the package inspector.

Everything runs in-process on the real package (``../shared/fixtures/real/``) and on packages built
here from the testkit samples, changed in one way each. Expected digests are computed
independently, with ``zipfile`` and ``hashlib``.
"""

from __future__ import annotations

import gc
import hashlib
import io
import stat
import tracemalloc
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from relayd.pec.envelope import Message, read_envelope
from relayd.pec.package import Package, inspect_package
from relayd.pec.xml import parse_xml
from relayd.pec.zipcheck import PackageLimits
from relayd.rejections import Reason, Rejection
from relayd.testkit.samples import (
    SampleSpec,
    build_members,
    build_package,
    doc_member_name,
    ent_member_name,
    pj_member_name,
    scan_files,
    write_zip,
    zip_entry,
)

from conftest import REAL_MOTDEPASSE, REAL_PACKAGE

REAL_SHA256 = "48d680fb66aeea601c127737dcf3ef225161660f28a04269cfb501ae4ffcc748"
REAL_PJ = "A-9-X3UGO4V7-DAUA-pj-Pieces_Jointes_DAUA-1-2.zip"
REAL_ENT = "A-9-X3UGO4V7-DAUA-ent-2.xml"

MiB = 1024 * 1024

SPEC = SampleSpec(numero="A-1-PECTEST01", demarche="recensementCitoyen", insee="90017")


# --------------------------------------------------------------------------- helpers


def _real_member(name: str) -> bytes:
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        return zf.read(name)


def _real_message() -> Message:
    return read_envelope(parse_xml(_real_member("message.xml"), name="message.xml"))


def _write(tmp_path: Path, data: bytes, name: str = "package.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refusal(path: Path, limits: PackageLimits | None = None) -> Rejection:
    with pytest.raises(Rejection) as refused:
        inspect_package(path, limits or PackageLimits())
    return refused.value


def _with_doctype(xml: bytes, doctype: bytes = b'<!DOCTYPE r [<!ENTITY e "x">]>') -> bytes:
    """The same XML with a DOCTYPE right after its declaration."""
    end = xml.index(b"?>") + 2
    return xml[:end] + doctype + xml[end:]


def _passwd_lines() -> list[str]:
    """Distinctive lines of /etc/passwd, to prove no XXE ever leaks them into an error."""
    try:
        text = Path("/etc/passwd").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ["root:x:0:0:"]
    return [line for line in text.splitlines() if line.count(":") >= 5] or ["root:x:0:0:"]


def _assert_no_passwd(exc: Rejection) -> None:
    shown = f"{exc.detail}\n{exc}\n{exc.as_dict()}"
    for line in _passwd_lines():
        assert line not in shown
    assert "root:x:0:0" not in shown


# --------------------------------------------------------------------------- the real envelope


def test_real_envelope_is_read() -> None:
    message = _real_message()
    assert message.numero == "A-9-X3UGO4V7"
    assert message.demarche == "DAUA"
    assert message.insee == "90017"
    assert message.message_id == "A-9-X3UGO4V7 5808773 Principal 2019-04-03T16:26:40"
    routing = message.header.routing
    assert routing.ack_required is True
    assert routing.ack_types == ["AVL", "ANL"]
    assert routing.ack_to is not None and routing.ack_to.location is not None
    assert routing.ack_to.location.siret == "13000210800012"
    assert routing.ack_to.location.service == "flux_GS_PEC_AVL"
    assert routing.recipients is not None
    assert [r.location.siret for r in routing.recipients.recipients if r.location] == ["00000000012011"]
    assert message.header.extras is not None and message.header.extras.email is not None
    email = message.header.extras.email
    assert email.subject == "DAUA - A-9-X3UGO4V7 : dossier à traiter"
    assert email.body is not None and "suiviNoLogin.do" in email.body
    assert message.listed_files() == [
        "A-9-X3UGO4V7-DAUA-doc-cerfa_13703_DPMI-1-2.pdf",
        "A-9-X3UGO4V7-DAUA-doc-Liste des pieces jointes-1-2.pdf",
        "A-9-X3UGO4V7-DAUA-doc-recapPDF-1-2.pdf",
        "A-9-X3UGO4V7-DAUA-doc-Note_a_l_administration-1-2.pdf",
        REAL_PJ,
    ]


def test_real_envelope_never_shows_the_password() -> None:
    message = _real_message()
    # The password is read (so the checks below are not vacuous)...
    password = message.aller.teledemarche.password
    assert password is not None and password.get_secret_value() == REAL_MOTDEPASSE
    # ...and never shown.
    dumped = message.model_dump()
    for shown in (
        repr(message), str(message), repr(dumped), str(dumped),
        repr(message.aller), str(message.aller.teledemarche), message.model_dump_json(),
        repr(message.model_dump(mode="json")),
    ):
        assert REAL_MOTDEPASSE not in shown
    # The raw member does hold it: the model is what hides it.
    assert REAL_MOTDEPASSE.encode() in _real_member("message.xml")


# --------------------------------------------------------------------------- parse_xml

_XXE = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><r>&xxe;</r>'


def _laughs(encoding: str = "utf-8") -> bytes:
    entities = ['<!ENTITY lol "lol">']
    for i in range(1, 10):
        previous = f"lol{i - 1}" if i > 1 else "lol"
        entities.append(f'<!ENTITY lol{i} "{f"&{previous};" * 10}">')
    text = f'<?xml version="1.0" encoding="{encoding.upper()}"?><!DOCTYPE r [{"".join(entities)}]><r>&lol9;</r>'
    return text.encode(encoding)


def _parse_refused(data: bytes, **kw) -> Rejection:
    with pytest.raises(Rejection) as refused:
        parse_xml(data, name="test.xml", **kw)
    _assert_no_passwd(refused.value)
    return refused.value


def test_parse_xml_reads_a_plain_document() -> None:
    root = parse_xml(b'<?xml version="1.0"?><r a="1"><c>t</c></r>', name="ok.xml")
    assert root.tag == "r" and root.findtext("c") == "t"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'<?xml version="1.0"?><!DOCTYPE r><r/>', id="bare"),
        pytest.param(b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e "x">]><r/>', id="internal-subset"),
        pytest.param(b'<!DOCTYPE r SYSTEM "http://example.invalid/r.dtd"><r/>', id="external-dtd"),
        pytest.param(b'\xef\xbb\xbf<!-- hidden --><?pi x?>\n<!doctype r><r/>', id="after-bom-comment-pi"),
    ],
)
def test_parse_xml_refuses_a_doctype(data: bytes) -> None:
    assert _parse_refused(data).reason == Reason.XML_FORBIDDEN


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param('<!DOCTYPE r><r/>', id="bare"),
        pytest.param('<!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>', id="entity"),
        pytest.param('<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><r>&xxe;</r>', id="xxe"),
        pytest.param('<!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>', id="external-dtd"),
    ],
)
def test_parse_xml_refuses_a_doctype_in_utf16(encoding: str, body: str) -> None:
    label = {"utf-16": "UTF-16", "utf-16-le": "UTF-16LE", "utf-16-be": "UTF-16BE", "utf-32": "UTF-32"}[encoding]
    data = f'<?xml version="1.0" encoding="{label}"?>{body}'.encode(encoding)
    # The byte scan cannot see it: this exercises the check on the parsed tree.
    assert b"DOCTYPE" not in data
    assert _parse_refused(data).reason == Reason.XML_FORBIDDEN


def test_parse_xml_refuses_an_external_entity() -> None:
    refusal = _parse_refused(_XXE)
    assert refusal.reason == Reason.XML_FORBIDDEN


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><r/>',
                     id="parameter-entity"),
        pytest.param(b'<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><r a="&xxe;"/>', id="in-attribute"),
        pytest.param(b'<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><r>&xxe;<broken></r>', id="then-malformed"),
    ],
)
def test_parse_xml_refuses_external_entity_variants(data: bytes) -> None:
    assert _parse_refused(data).reason == Reason.XML_FORBIDDEN


def test_parse_xml_refuses_billion_laughs() -> None:
    assert _parse_refused(_laughs()).reason == Reason.XML_FORBIDDEN


def test_parse_xml_refuses_billion_laughs_in_utf16_as_forbidden() -> None:
    data = _laughs("utf-16")
    assert b"DOCTYPE" not in data
    assert _parse_refused(data).reason == Reason.XML_FORBIDDEN


def test_parse_xml_refuses_billion_laughs_in_utf16_somehow() -> None:
    # Whatever the code, the document is refused, and nothing was expanded into the detail.
    refusal = _parse_refused(_laughs("utf-16"))
    assert refusal.reason in (Reason.XML_FORBIDDEN, Reason.XML_MALFORMED)
    assert "lollol" not in refusal.detail


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'<?xml version="1.0"?><r><a></r>', id="mismatched-tag"),
        pytest.param(b'<?xml version="1.0"?><r>', id="unclosed"),
        pytest.param(b"", id="empty"),
        pytest.param(b"not xml at all", id="text"),
        pytest.param(b"<r>&undefined;</r>", id="undefined-entity"),
        pytest.param(b"<r/><r/>", id="two-roots"),
    ],
)
def test_parse_xml_refuses_malformed(data: bytes) -> None:
    assert _parse_refused(data).reason == Reason.XML_MALFORMED


def test_parse_xml_refuses_too_large() -> None:
    data = b"<r>" + b"x" * 1000 + b"</r>"
    assert _parse_refused(data, max_bytes=len(data) - 1).reason == Reason.XML_TOO_LARGE
    # The bound is inclusive.
    assert parse_xml(data, name="test.xml", max_bytes=len(data)).tag == "r"


def test_parse_xml_size_is_checked_before_anything_else() -> None:
    # An oversized hostile document is refused for its size, without being scanned or parsed.
    assert _parse_refused(_XXE, max_bytes=10).reason == Reason.XML_TOO_LARGE


# --------------------------------------------------------------------------- the real package


@pytest.fixture(scope="module")
def real_package() -> Package:
    return inspect_package(REAL_PACKAGE, PackageLimits())


def test_real_package_is_inspected(real_package: Package) -> None:
    assert real_package.sha256 == REAL_SHA256
    assert real_package.size == REAL_PACKAGE.stat().st_size
    assert real_package.numero == "A-9-X3UGO4V7"
    assert real_package.demarche == "DAUA"
    assert real_package.insee == "90017"
    assert len(real_package.members) == 7
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        expected = [(i.filename, i.file_size, hashlib.sha256(zf.read(i)).hexdigest()) for i in zf.infolist()]
    assert [(m.name, m.size, m.sha256) for m in real_package.members] == expected


def test_real_package_nested_zip(real_package: Package) -> None:
    assert list(real_package.nested) == [REAL_PJ]
    with zipfile.ZipFile(io.BytesIO(_real_member(REAL_PJ))) as inner:
        expected = [
            (i.filename, i.file_size, hashlib.sha256(inner.read(i)).hexdigest())
            for i in inner.infolist()
            if not i.is_dir()
        ]
    assert len(expected) == 2
    assert all(name.lower().endswith(".pdf") for name, _, _ in expected)
    got = real_package.nested[REAL_PJ]
    assert [(m.name, m.size, m.sha256) for m in got] == expected
    assert all(data.startswith(b"%PDF") for data in _nested_pdfs())


def _nested_pdfs() -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(_real_member(REAL_PJ))) as inner:
        return [inner.read(i) for i in inner.infolist() if not i.is_dir()]


def _real_totals() -> tuple[int, int]:
    """Members and unpacked bytes of the whole package: nested zips count against the same budget."""
    with zipfile.ZipFile(REAL_PACKAGE) as zf:
        infos = zf.infolist()
        count, total = len(infos), sum(i.file_size for i in infos)
        for info in infos:
            if info.filename.endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(zf.read(info))) as nested:
                    count += len(nested.infolist())
                    total += sum(i.file_size for i in nested.infolist())
        return count, total


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        pytest.param(PackageLimits(max_members=3), Reason.ZIP_TOO_MANY_MEMBERS, id="max_members"),
        pytest.param(PackageLimits(max_total_uncompressed_bytes=1_000_000), Reason.ZIP_UNCOMPRESSED_TOO_LARGE,
                     id="max_total_uncompressed_bytes"),
        pytest.param(PackageLimits(max_package_bytes=1_000_000), Reason.PACKAGE_TOO_LARGE, id="max_package_bytes"),
        pytest.param(PackageLimits(max_xml_bytes=1000), Reason.XML_TOO_LARGE, id="max_xml_bytes"),
    ],
)
def test_real_package_with_tight_limits(limits: PackageLimits, reason: Reason) -> None:
    assert _refusal(REAL_PACKAGE, limits).reason == reason


def test_real_package_at_exactly_its_limits_passes() -> None:
    # Every bound is inclusive, and the tight-limit refusals above are not off by a mile.
    count, total = _real_totals()
    limits = PackageLimits(
        max_members=count,
        max_total_uncompressed_bytes=total,
        max_package_bytes=REAL_PACKAGE.stat().st_size,
        max_xml_bytes=len(_real_member("message.xml")),
    )
    assert inspect_package(REAL_PACKAGE, limits).sha256 == REAL_SHA256
    one_less = [
        limits.model_copy(update={"max_members": count - 1}),
        limits.model_copy(update={"max_total_uncompressed_bytes": total - 1}),
        limits.model_copy(update={"max_package_bytes": REAL_PACKAGE.stat().st_size - 1}),
        limits.model_copy(update={"max_xml_bytes": len(_real_member("message.xml")) - 1}),
    ]
    for tighter in one_less:
        _refusal(REAL_PACKAGE, tighter)


# --------------------------------------------------------------------------- member names and kinds


def test_sample_package_is_accepted(tmp_path: Path) -> None:
    # The base every test below changes in one way.
    package = inspect_package(_write(tmp_path, build_package(SPEC)), PackageLimits())
    assert package.numero == SPEC.numero
    assert set(package.nested) == {pj_member_name(SPEC)}


def test_directory_entry_is_unexpected(tmp_path: Path) -> None:
    members = build_members(SPEC)
    directory = zipfile.ZipInfo("sub/", date_time=SPEC.zip_date_time)
    directory.create_system = 3
    directory.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
    pairs: list[tuple[str | zipfile.ZipInfo, bytes]] = [*members.items(), (directory, b"")]
    data = write_zip(pairs, date_time=SPEC.zip_date_time)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.getinfo("sub/").is_dir()
    refusal = _refusal(_write(tmp_path, data))
    assert refusal.reason == Reason.MEMBER_UNEXPECTED
    assert "sub/" in refusal.detail


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("..\\evil", Reason.ZIP_PATH_TRAVERSAL, id="backslash-dotdot"),
        pytest.param("docs\\..\\..\\evil.txt", Reason.ZIP_PATH_TRAVERSAL, id="backslash-nested-dotdot"),
        pytest.param("docs/../../evil.txt", Reason.ZIP_PATH_TRAVERSAL, id="slash-nested-dotdot"),
        pytest.param("C:/x", Reason.ZIP_ABSOLUTE_PATH, id="drive-slash"),
        pytest.param("C:\\x", Reason.ZIP_ABSOLUTE_PATH, id="drive-backslash"),
        pytest.param("\\\\server\\share\\x", Reason.ZIP_ABSOLUTE_PATH, id="unc"),
        pytest.param("\\x", Reason.ZIP_ABSOLUTE_PATH, id="root-backslash"),
    ],
)
def test_hostile_member_names(tmp_path: Path, name: str, reason: Reason) -> None:
    members = build_members(SPEC)
    members[name] = b"outside\n"
    data = write_zip(members, date_time=SPEC.zip_date_time)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert name in zf.namelist()  # zipfile kept the name as written
    assert _refusal(_write(tmp_path, data)).reason == reason


def test_symlink_in_nested_zip(tmp_path: Path) -> None:
    members = build_members(SPEC)
    link = zip_entry("P5PZ1_lien.pdf", SPEC.zip_date_time)
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    pairs: list[tuple[str | zipfile.ZipInfo, bytes]] = [*scan_files(SPEC).items(), (link, b"/etc/passwd")]
    members[pj_member_name(SPEC)] = write_zip(pairs, date_time=SPEC.zip_date_time)
    refusal = _refusal(_write(tmp_path, write_zip(members, date_time=SPEC.zip_date_time)))
    assert refusal.reason == Reason.PJ_ZIP_UNSAFE
    assert refusal.cause == Reason.ZIP_SYMLINK
    assert refusal.as_dict()["cause"] == "zip_symlink"
    assert "P5PZ1_lien.pdf" in refusal.detail


@pytest.mark.parametrize(
    "victim",
    [
        pytest.param(ent_member_name(SPEC), id="ent-header"),
        pytest.param(doc_member_name(SPEC, "flux", "xml"), id="demarche-data-xml"),
    ],
)
@pytest.mark.parametrize(
    "doctype",
    [
        pytest.param(b'<!DOCTYPE r [<!ENTITY e "x">]>', id="internal"),
        pytest.param(b'<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>', id="xxe"),
    ],
)
def test_doctype_in_any_xml_member_refuses_the_package(tmp_path: Path, victim: str, doctype: bytes) -> None:
    members = build_members(SPEC)
    assert victim in members
    members[victim] = _with_doctype(members[victim], doctype)
    refusal = _refusal(_write(tmp_path, write_zip(members, date_time=SPEC.zip_date_time)))
    assert refusal.reason == Reason.XML_FORBIDDEN
    assert victim in refusal.detail
    # message.xml itself was fine: the refusal came after it was read, and carries it for the ack.
    assert isinstance(refusal.envelope, Message)
    assert refusal.envelope.numero == SPEC.numero
    _assert_no_passwd(refusal)


def test_doctype_in_utf16_data_xml_refuses_the_package(tmp_path: Path) -> None:
    members = build_members(SPEC)
    victim = doc_member_name(SPEC, "flux", "xml")
    text = _with_doctype(members[victim]).decode("utf-8").replace('encoding="UTF-8"', 'encoding="UTF-16"', 1)
    members[victim] = text.encode("utf-16")
    refusal = _refusal(_write(tmp_path, write_zip(members, date_time=SPEC.zip_date_time)))
    assert refusal.reason == Reason.XML_FORBIDDEN
    assert victim in refusal.detail


# --------------------------------------------------------------------------- memory


def _peak_growth(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - base


def test_large_member_is_never_read_whole(tmp_path: Path) -> None:
    # A listed Annexe PDF padded with 64 MiB of random bytes, stored: the package is ~64 MiB.
    spec = replace(SPEC, scans=0, annex_bytes=64 * MiB, annex_fill="random")
    path = _write(tmp_path, build_package(spec))
    annex = doc_member_name(spec, "Annexe", "pdf")
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(annex)
        assert info.compress_type == zipfile.ZIP_STORED and info.file_size > 64 * MiB

    result: list[Package] = []
    growth = _peak_growth(lambda: result.append(inspect_package(path, PackageLimits())))
    assert result[0].numero == spec.numero
    assert any(m.name == annex and m.size == info.file_size for m in result[0].members)
    assert growth < 16 * MiB, f"peak grew by {growth / MiB:.1f} MiB"

    # Control: reading the member whole is visible to tracemalloc, so the bound above means something.
    def read_whole() -> None:
        with zipfile.ZipFile(path) as zf:
            zf.read(annex)

    assert _peak_growth(read_whole) > 64 * MiB


def test_many_xml_members_are_not_held_at_once(tmp_path: Path) -> None:
    members = build_members(SPEC)
    filler = b"<r>" + b" " * (MiB - 16) + b"</r>"
    for i in range(64):
        members[f"extra-{i:02d}.xml"] = filler
    data = write_zip(members, date_time=SPEC.zip_date_time)
    assert len(data) < 1 * MiB
    path = _write(tmp_path, data)
    refusals: list[Rejection] = []

    def inspect() -> None:
        try:
            inspect_package(path, PackageLimits())
        except Rejection as exc:
            refusals.append(exc)

    growth = _peak_growth(inspect)
    assert refusals and refusals[0].reason == Reason.MEMBER_UNEXPECTED
    assert growth < 16 * MiB, f"peak grew by {growth / MiB:.1f} MiB"

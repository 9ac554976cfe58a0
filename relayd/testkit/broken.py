"""Broken PEC packages: every way a delivered package can be wrong, each with the Reason relayd must give.

Each broken package starts from the valid :func:`~relayd.testkit.samples.build_members` output
and changes one thing, so that it is wrong in exactly one way where the defect allows it (a
truncated zip is also missing its envelope, of course). Integration testers push these at a relay
and check the quarantine reason file and the negative ack.

Many kinds are about the zip itself rather than its content: a package that one reader (the
central directory: ``unzip``, Python) sees differently from another (the local headers, as
``bsdtar`` through a pipe or Java's ``ZipInputStream`` stream them). They are built by
cutting a valid zip into its records (:class:`_Zip`) and reassembling it with one lie. Kinds
about the nested attachments zip answer ``pj_zip_unsafe``, with the inner code as ``cause``.

Two kinds depend on the relay's limits:

- ``oversized`` builds a ~3 MiB package: the relay under test must be configured with a maximum
  package size below that (the test suite uses ``max_package_bytes = 2 MiB``).
- ``zip-bomb`` and ``nested-bomb`` hold a 20 MiB run of zeros (deflate ratio ~1000:1): the relay's
  ratio limit must be below that and its total-size limit above it, or it reports the size instead.
"""

from __future__ import annotations

import io
import random
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from relayd.rejections import Reason
from relayd.testkit.samples import (
    SampleSpec,
    build_members,
    build_package,
    doc_member_name,
    pdf_bytes,
    pj_member_name,
    scan_files,
    write_zip,
    zip_entry,
)

__all__ = ["BROKEN_KINDS", "BrokenKind", "build_broken", "build_oversized", "build_streamed"]

#: Size of the run of zeros in the bomb kinds; deflate tops out near 1032:1, so ~20 KiB on disk.
BOMB_BYTES = 20 * 1024 * 1024
#: Default size of the ``oversized`` package.
OVERSIZED_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class BrokenKind:
    """One way a package can be wrong, and the Reason a relay must answer with."""

    name: str
    reason: Reason
    description: str
    build: Callable[[SampleSpec], bytes]
    #: for a fault inside the nested attachments zip (reason ``pj_zip_unsafe``), the inner code
    cause: Reason | None = None


# --------------------------------------------------------------------------- helpers


def _victim(spec: SampleSpec) -> str:
    # The recap PDF exists for every démarche and is listed in message.xml: a safe member to damage.
    return doc_member_name(spec, "recapPDF", "pdf")


def _package(members: dict[str, bytes], spec: SampleSpec, *, stored: set[str] | None = None) -> bytes:
    return write_zip(members, date_time=spec.zip_date_time, stored=stored or set())


def _with_envelope(spec: SampleSpec, edit: Callable[[str], str]) -> bytes:
    """The valid package with ``message.xml`` passed through ``edit`` (text in, text out)."""
    members = build_members(spec)
    before = members["message.xml"].decode("utf-8")
    after = edit(before)
    if after == before:
        raise ValueError("the envelope edit changed nothing")
    members["message.xml"] = after.encode("utf-8")
    return _package(members, spec)


def _insert_doctype(xml: str, doctype: str) -> str:
    decl_end = xml.index("?>") + 2
    return xml[:decl_end] + doctype + xml[decl_end:]


def _use_entity(xml: str, entity: str) -> str:
    # <Suivi> is empty in real envelopes: the entity reference is the only change.
    return xml.replace("<Suivi></Suivi>", f"<Suivi>&{entity};</Suivi>", 1)


def _zip_layout(data: bytes) -> dict[str, tuple[int, int]]:
    """Member name -> (local header offset, central directory entry offset), read by hand."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    out: dict[str, tuple[int, int]] = {}
    pos = cd_offset
    for _ in range(count):
        if data[pos : pos + 4] != b"PK\x01\x02":
            raise ValueError("central directory entry expected")
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        (local,) = struct.unpack_from("<I", data, pos + 42)
        name = data[pos + 46 : pos + 46 + name_len].decode("utf-8")
        out[name] = (local, pos)
        pos += 46 + name_len + extra_len + comment_len
    return out


def _data_start(data: bytes | bytearray, local: int) -> int:
    name_len: int
    extra_len: int
    name_len, extra_len = struct.unpack_from("<HH", data, local + 26)
    return local + 30 + name_len + extra_len


def _patch_headers(data: bytes, name: str, *, flag_or: int = 0, method: int | None = None) -> bytes:
    """Change one member's flag bits and/or method in both its local header and central entry."""
    out = bytearray(data)
    local, central = _zip_layout(data)[name]
    # Local header: flags at +6, method at +8. Central entry: flags at +8, method at +10.
    for flags_at in (local + 6, central + 8):
        (flags,) = struct.unpack_from("<H", out, flags_at)
        struct.pack_into("<H", out, flags_at, flags | flag_or)
        if method is not None:
            struct.pack_into("<H", out, flags_at + 2, method)
    return bytes(out)


# --------------------------------------------------------------------------- raw zip surgery


@dataclass
class _Record:
    """One member as bytes: its local record (header, name, extra, data) and its central entry."""

    local: bytearray
    central: bytearray

    @property
    def name(self) -> str:
        (name_len,) = struct.unpack_from("<H", self.central, 28)
        return self.central[46 : 46 + name_len].decode("utf-8")


@dataclass
class _Zip:
    records: list[_Record]
    comment: bytes = b""
    #: bytes before the first member, counted in the offsets (like ``zip -A``) or not (like ``cat``)
    prefix: bytes = b""
    prefix_in_offsets: bool = True
    suffix: bytes = b""
    #: bytes hidden after the member at this index, offsets adjusted around them
    gaps: dict[int, bytes] = field(default_factory=dict)

    def record(self, name: str) -> _Record:
        return next(r for r in self.records if r.name == name)

    def assemble(self) -> bytes:
        out = bytearray(self.prefix)
        base = 0 if self.prefix_in_offsets else len(self.prefix)
        centrals = bytearray()
        for i, record in enumerate(self.records):
            central = bytearray(record.central)
            struct.pack_into("<I", central, 42, len(out) - base)
            out += record.local + self.gaps.get(i, b"")
            centrals += central
        cd_offset = len(out) - base
        out += centrals
        out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(self.records), len(self.records),
                           len(centrals), cd_offset, len(self.comment))
        return bytes(out + self.comment + self.suffix)


def _split(data: bytes) -> _Zip:
    """Cut a zip written by :func:`write_zip` (no data descriptors) into its records."""
    layout = _zip_layout(data)
    starts = sorted(local for local, _ in layout.values())
    eocd = data.rindex(b"PK\x05\x06")
    cd_offset = struct.unpack_from("<I", data, eocd + 16)[0]
    records = []
    for local, central in sorted(layout.values()):
        following = [s for s in starts if s > local]
        end = following[0] if following else cd_offset
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, central + 28)
        records.append(_Record(bytearray(data[local:end]),
                               bytearray(data[central : central + 46 + name_len + extra_len + comment_len])))
    return _Zip(records)


def _set(record: _Record, *, local: dict[int, int] | None = None, both: dict[str, int] | None = None) -> None:
    """Patch 4-byte fields: ``both`` by name (crc, csize, usize) in local header and central entry."""
    at_local = {"crc": 14, "csize": 18, "usize": 22}
    at_central = {"crc": 16, "csize": 20, "usize": 24}
    for name, value in (both or {}).items():
        struct.pack_into("<I", record.local, at_local[name], value)
        struct.pack_into("<I", record.central, at_central[name], value)
    for offset, value in (local or {}).items():
        struct.pack_into("<I", record.local, offset, value)


def _with_victim(spec: SampleSpec, tweak: Callable[[zipfile.ZipInfo], object], *, data: bytes | None = None) -> bytes:
    """The valid package with the recap PDF's zip entry changed by ``tweak`` (its mode, its extra fields).

    ``data`` replaces the recap PDF's content (a link target, for an entry made a link).
    """
    victim = _victim(spec)
    pairs: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    for name, content in build_members(spec).items():
        if name == victim:
            info = zip_entry(name, spec.zip_date_time)
            tweak(info)
            pairs.append((info, content if data is None else data))
        else:
            pairs.append((name, content))
    return write_zip(pairs, date_time=spec.zip_date_time)


def _with_mode(spec: SampleSpec, mode: int, *, data: bytes | None = None) -> bytes:
    """The valid package whose recap PDF has the Unix ``mode`` (zip_entry already says "made on Unix")."""
    return _with_victim(spec, lambda info: setattr(info, "external_attr", mode << 16), data=data)


def _with_extra(spec: SampleSpec, ident: int, payload: bytes, *, data: bytes | None = None) -> bytes:
    """The valid package with one extra field on the recap PDF, in both its headers (zipfile writes both)."""
    field = struct.pack("<HH", ident, len(payload)) + payload
    return _with_victim(spec, lambda info: setattr(info, "extra", field), data=data)


class _Unseekable(io.RawIOBase):
    """A sink zipfile cannot seek back in: it writes each member's CRC and sizes after its data."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def build_streamed(spec: SampleSpec, *, stored: Collection[str] = ()) -> bytes:
    """The valid package as a streaming writer makes it (data descriptors), like the platform's Java."""
    sink = _Unseekable()
    with zipfile.ZipFile(sink, "w") as zf:
        for name, data in build_members(spec).items():
            info = zip_entry(name, spec.zip_date_time, stored=name in stored)
            with zf.open(info, "w") as out:
                out.write(data)
    return bytes(sink.data)


def _unicode_path_field(real_name: str, shown: str) -> bytes:
    # Info-ZIP 0x7075: version 1, CRC-32 of the header's name, then the name readers should use instead.
    return b"\x01" + struct.pack("<I", zlib.crc32(real_name.encode())) + shown.encode()


def _with_pj(spec: SampleSpec, inner: list[tuple[str | zipfile.ZipInfo, bytes]] | bytes) -> bytes:
    """The valid package whose nested attachments zip is ``inner`` (members, or the zip's bytes)."""
    spec = _with_scans(spec)
    members = build_members(spec)
    data = inner if isinstance(inner, bytes) else write_zip(inner, date_time=spec.zip_date_time)
    pj = pj_member_name(spec)
    members[pj] = data
    return _package(members, spec, stored={pj})


def _scans(spec: SampleSpec) -> list[tuple[str | zipfile.ZipInfo, bytes]]:
    return list(scan_files(_with_scans(spec)).items())


# --------------------------------------------------------------------------- builders


def _zip_slip(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["../../evil.txt"] = b"written outside the extraction directory\n"
    return _package(members, spec)


def _absolute_path(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["/etc/evil"] = b"written to an absolute path\n"
    return _package(members, spec)


def _symlink_member(spec: SampleSpec) -> bytes:
    # A listed member turned into a link, so the listing still matches: only the link is wrong.
    return _with_mode(spec, stat.S_IFLNK | 0o777, data=b"/etc/passwd")


def _duplicate_member(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    victim = _victim(spec)
    pairs: list[tuple[str | zipfile.ZipInfo, bytes]] = list(members.items())
    pairs.append((victim, members[victim]))
    return write_zip(pairs, date_time=spec.zip_date_time)


def _zip_bomb(spec: SampleSpec) -> bytes:
    # The bomb is a listed "Annexe" PDF, so the ratio is the only fault.
    return build_package(replace(spec, annex_bytes=BOMB_BYTES, annex_fill="zeros"))


def _with_scans(spec: SampleSpec) -> SampleSpec:
    return spec if spec.scans > 0 else replace(spec, scans=1)


def _nested_bomb(spec: SampleSpec) -> bytes:
    spec = _with_scans(spec)
    members = build_members(spec)
    scans = scan_files(spec)
    scans["P5PZ1_Scan_vierge.pdf"] = pdf_bytes(["Scan vierge"], padding=bytes(BOMB_BYTES))
    pj = pj_member_name(spec)
    members[pj] = write_zip(scans, date_time=spec.zip_date_time)
    # Deflate output of zeros is itself repetitive: store the inner zip so the outer ratio stays ~1.
    return _package(members, spec, stored={pj})


def _pj_zip_slip(spec: SampleSpec) -> bytes:
    spec = _with_scans(spec)
    members = build_members(spec)
    scans = scan_files(spec)
    scans["../../evil.txt"] = b"written outside the attachments directory\n"
    members[pj_member_name(spec)] = write_zip(scans, date_time=spec.zip_date_time)
    return _package(members, spec)


def _pj_not_a_zip(spec: SampleSpec) -> bytes:
    spec = _with_scans(spec)
    members = build_members(spec)
    members[pj_member_name(spec)] = random.Random(f"pj-not-a-zip:{spec.numero}").randbytes(2048)
    return _package(members, spec)


def _truncated(spec: SampleSpec) -> bytes:
    data = build_package(spec)
    return data[: len(data) // 2]


def _not_a_zip(spec: SampleSpec) -> bytes:
    data = random.Random(f"not-a-zip:{spec.numero}").randbytes(4096)
    # Never start like a zip by chance.
    return b"NOTZIP" + data


def _crc_mismatch(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    victim = next(n for n in members if "-doc-" in n and n.endswith(".pdf"))
    data = bytearray(_package(members, spec, stored={victim}))
    start = _data_start(data, _zip_layout(bytes(data))[victim][0])
    # Flip the case of a letter in the page text: the PDF stays well-formed, only the CRC breaks.
    at = data.index(b"(", data.index(b"stream\n", start)) + 1
    data[at] ^= 0x20
    return bytes(data)


def _document_missing(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    del members[_victim(spec)]
    return _package(members, spec)


def _unlisted_member(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["notes.txt"] = b"Note interne : ce fichier n'est pas dans message.xml.\n"
    return _package(members, spec)


def _no_envelope(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    del members["message.xml"]
    return _package(members, spec)


def _doctype(spec: SampleSpec) -> bytes:
    return _with_envelope(
        spec, lambda x: _insert_doctype(x, '<!DOCTYPE ns2:Message [<!ENTITY plateforme "PSL_PART">]>')
    )


def _xxe(spec: SampleSpec) -> bytes:
    return _with_envelope(
        spec,
        lambda x: _use_entity(
            _insert_doctype(x, '<!DOCTYPE ns2:Message [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'), "xxe"
        ),
    )


def _laughs() -> str:
    entities = ['<!ENTITY lol "lol">']
    for i in range(1, 10):
        previous = f"lol{i - 1}" if i > 1 else "lol"
        entities.append(f'<!ENTITY lol{i} "{f"&{previous};" * 10}">')
    return f"<!DOCTYPE ns2:Message [{''.join(entities)}]>"


_LAUGHS = _laughs()


def _billion_laughs(spec: SampleSpec) -> bytes:
    return _with_envelope(spec, lambda x: _use_entity(_insert_doctype(x, _LAUGHS), "lol9"))


def _malformed_xml(spec: SampleSpec) -> bytes:
    # A mismatched end tag: not well-formed, while the rest of the document is intact.
    return _with_envelope(spec, lambda x: x.replace("</ns2:Header>", "</ns2:Headr>", 1))


def _wrong_root(spec: SampleSpec) -> bytes:
    # Root becomes {metier}Facture (default namespace): wrong local name and wrong namespace.
    return _with_envelope(
        spec, lambda x: x.replace("<ns2:Message ", "<Facture ", 1).replace("</ns2:Message>", "</Facture>", 1)
    )


def _bad_numero(spec: SampleSpec) -> bytes:
    return build_package(replace(spec, numero="B-12-xyz"))


def _unknown_demarche(spec: SampleSpec) -> bytes:
    return build_package(replace(spec, demarche="ZZZ"))


def _foreign_insee(spec: SampleSpec) -> bytes:
    return build_package(replace(spec, insee="99999"))


def _encrypted_member(spec: SampleSpec) -> bytes:
    return _patch_headers(build_package(spec), _victim(spec), flag_or=0x1)


def _unsupported_compression(spec: SampleSpec) -> bytes:
    # Method 9 (Deflate64): a real method that Python's zipfile, hence relayd, cannot read.
    members = build_members(spec)
    victim = _victim(spec)
    return _patch_headers(_package(members, spec, stored={victim}), victim, method=9)


def _envelope_incomplete(spec: SampleSpec) -> bytes:
    def drop_routage(xml: str) -> str:
        start = xml.index("<Routage>")
        end = xml.index("</Routage>") + len("</Routage>")
        # Without CodeINSEE relayd routes by the recipient's SIRET: drop that too, so nothing routes.
        return (xml[:start] + xml[end:]).replace(f"<ns2:Siret>{spec.recipient_siret}</ns2:Siret>", "")

    return _with_envelope(spec, drop_routage)


# -- one canonical zip: every reader must see the same members


def _prepended_package(spec: SampleSpec) -> bytes:
    # Another package, with its own message.xml, in front; the offsets count it (like `zip -A`), so
    # zipfile reads the real one from its central directory while a streaming reader meets the other first.
    decoy = build_package(replace(spec, numero=spec.numero[:-1] + "X"))
    package = _split(build_package(spec))
    package.prefix = decoy
    return package.assemble()


def _leading_junk(spec: SampleSpec) -> bytes:
    # As `cat junk package.zip` makes it: offsets not adjusted, zipfile quietly shifts them.
    junk = random.Random(f"leading:{spec.numero}").randbytes(1024)
    return b"MZ" + junk + build_package(spec)


def _trailing_data(spec: SampleSpec) -> bytes:
    return build_package(spec) + b"<html><body>appended after the end record</body></html>\n"


def _comment_end_record(spec: SampleSpec) -> bytes:
    # The archive comment holds a second, empty end record: readers that search backwards stop there.
    package = _split(build_package(spec))
    package.comment = b"PK\x05\x06" + bytes(18)
    return package.assemble()


def _zip64_member(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    victim = _victim(spec)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            info = zip_entry(name, spec.zip_date_time)
            with zf.open(info, "w", force_zip64=(name == victim)) as out:
                out.write(data)
    return buf.getvalue()


def _evil_record() -> _Record:
    return _split(write_zip({"evil.txt": b"seen only by some readers\n"})).records[0]


def _overlapping_members(spec: SampleSpec) -> bytes:
    # The stored recap PDF's data holds a whole member record; a second central entry points into it.
    victim = _victim(spec)
    members = build_members(spec)
    evil = _evil_record()
    members[victim] = bytes(evil.local) + members[victim]
    package = _split(_package(members, spec, stored={victim}))
    index = next(i for i, r in enumerate(package.records) if r.name == victim)
    data = package.assemble()
    # Point the extra entry at the record inside the PDF's data: a member overlapping another.
    name_len, extra_len = struct.unpack_from("<HH", package.records[index].local, 26)
    offset = sum(len(r.local) for r in package.records[:index]) + 30 + name_len + extra_len
    central = bytearray(evil.central)
    struct.pack_into("<I", central, 42, offset)
    eocd = data.rindex(b"PK\x05\x06")
    count, cd_size, cd_offset = struct.unpack_from("<HII", data, eocd + 10)
    out = bytearray(data[:eocd]) + central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count + 1, count + 1, cd_size + len(central), cd_offset, 0)
    return bytes(out)


def _hidden_gap(spec: SampleSpec) -> bytes:
    # A whole member record between two members that the central directory skips: a streaming reader lists it.
    package = _split(build_package(spec))
    package.gaps[0] = bytes(_evil_record().local)
    return package.assemble()


def _central_offset_lie(spec: SampleSpec) -> bytes:
    data = bytearray(build_package(spec))
    eocd = data.rindex(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", data, eocd + 16)
    struct.pack_into("<I", data, eocd + 16, cd_offset - 100)
    return bytes(data)


def _local_name_mismatch(spec: SampleSpec) -> bytes:
    # Same length, so every offset still holds: only the local header's name differs.
    package = _split(build_package(spec))
    record = package.record(_victim(spec))
    name = record.name.encode()
    fake = b"x" * (len(name) - 4) + b".exe"
    record.local[30 : 30 + len(name)] = fake
    return package.assemble()


def _local_crc_mismatch(spec: SampleSpec) -> bytes:
    package = _split(build_package(spec))
    record = package.record(_victim(spec))
    (crc,) = struct.unpack_from("<I", record.local, 14)
    _set(record, local={14: crc ^ 0xFFFF})
    return package.assemble()


def _deflate_slack(spec: SampleSpec) -> bytes:
    # Bytes after the deflate stream's end, inside the declared compressed size: zipfile never reads them.
    package = _split(build_package(spec))
    record = package.record(_victim(spec))
    hidden = b"hidden after the deflate stream"
    (csize,) = struct.unpack_from("<I", record.local, 18)
    record.local += hidden
    _set(record, both={"csize": csize + len(hidden)})
    return package.assemble()


def _unicode_path_extra(spec: SampleSpec) -> bytes:
    return _with_extra(spec, 0x7075, _unicode_path_field(_victim(spec), "message.xml"))


def _unicode_comment_extra(spec: SampleSpec) -> bytes:
    return _with_extra(spec, 0x6375, _unicode_path_field(_victim(spec), "PK\x05\x06 comment"))


def _case_collision(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    victim = _victim(spec)
    members[victim.upper()] = members[victim]
    return _package(members, spec)


def _unicode_collision(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members[unicodedata.normalize("NFC", "Pièce.pdf")] = pdf_bytes(["NFC"])
    members[unicodedata.normalize("NFD", "Pièce.pdf")] = pdf_bytes(["NFD"])
    return _package(members, spec)


def _control_char_name(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["notes\r\nX-Injected: yes.txt"] = b"a name with a line break\n"
    return _package(members, spec)


def _backslash_name(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["pieces\\evil.txt"] = b"a folder on Windows, a plain name on Linux\n"
    return _package(members, spec)


def _undeclared_name_encoding(spec: SampleSpec) -> bytes:
    # A non-ASCII name without the UTF-8 flag: cp437 for some readers, the locale's charset for others.
    members = build_members(spec)
    members["Pièce.pdf"] = pdf_bytes(["cp437 or latin-1"])
    package = _split(_package(members, spec))
    for record in package.records:
        if not record.name.isascii():
            for flags_at, part in ((6, record.local), (8, record.central)):
                (flags,) = struct.unpack_from("<H", part, flags_at)
                struct.pack_into("<H", part, flags_at, flags & ~0x800)
    return package.assemble()


def _summary_name_member(spec: SampleSpec) -> bytes:
    # The recap PDF renamed, in message.xml too, to the file relayd writes in an extracted delivery.
    members = build_members(spec)
    victim = _victim(spec)
    members["message.xml"] = members["message.xml"].replace(victim.encode(), b"relayd.json")
    members["relayd.json"] = members.pop(victim)
    return _package(members, spec)


def _file_and_folder(spec: SampleSpec) -> bytes:
    members = build_members(spec)
    members["notes"] = b"a file\n"
    members["notes/a.txt"] = b"that a folder of the same name needs\n"
    return _package(members, spec)


def _stored_data_descriptor(spec: SampleSpec) -> bytes:
    # Stored, with its size only after its data: a streaming reader must guess where the data ends.
    return build_streamed(spec, stored={_victim(spec)})


def _descriptor_mismatch(spec: SampleSpec) -> bytes:
    # The data descriptor after the recap PDF gives another CRC than the central directory.
    data = bytearray(build_streamed(spec))
    local, central = _zip_layout(bytes(data))[_victim(spec)]
    (csize,) = struct.unpack_from("<I", data, central + 20)
    descriptor = _data_start(data, local) + csize
    if data[descriptor : descriptor + 4] != b"PK\x07\x08":
        raise ValueError("a signed data descriptor was expected")
    (crc,) = struct.unpack_from("<I", data, descriptor + 4)
    struct.pack_into("<I", data, descriptor + 4, crc ^ 0xFFFF)
    return bytes(data)


def _file_marked_folder(spec: SampleSpec) -> bytes:
    # Named as a file, but its Unix mode says folder: libarchive skips its data, zipfile extracts it.
    return _with_mode(spec, stat.S_IFDIR | 0o755)


def _member_in_pj_folder(spec: SampleSpec) -> bytes:
    # A top-level member inside the folder that an extracted delivery unpacks the attachments zip into.
    spec = _with_scans(spec)
    members = build_members(spec)
    members[pj_member_name(spec).removesuffix(".zip") + "/P5PA1_Justificatif_identite.pdf"] = pdf_bytes(["intrus"])
    return _package(members, spec)


def _pj_nested_zip(spec: SampleSpec) -> bytes:
    # A bomb two levels deep: the attachments zip holds a zip that holds 20 MiB of zeros.
    deep = write_zip({"P5PZ1_Scan_vierge.pdf": pdf_bytes(["Scan vierge"], padding=bytes(BOMB_BYTES))})
    return _with_pj(spec, [*_scans(spec), ("P5PZ2_Archive.zip", deep)])


def _pj_disguised_zip(spec: SampleSpec) -> bytes:
    deep = write_zip({"P5PZ1_Scan_vierge.pdf": pdf_bytes(["Scan vierge"])})
    return _with_pj(spec, [*_scans(spec), ("P5PZ2_Scan.pdf", deep)])


def _pj_file_and_folder(spec: SampleSpec) -> bytes:
    return _with_pj(spec, [*_scans(spec), ("a", b"a file\n"), ("a/b.pdf", pdf_bytes(["b"]))])


def _pj_dot_member(spec: SampleSpec) -> bytes:
    return _with_pj(spec, [*_scans(spec), (".", b"the folder itself\n")])


def _pj_trailing_data(spec: SampleSpec) -> bytes:
    return _with_pj(spec, write_zip(_scans(spec)) + b"junk after the inner end record")


def _pj_unicode_path_extra(spec: SampleSpec) -> bytes:
    scans = _scans(spec)
    name, data = scans[0]
    info = zip_entry(str(name), spec.zip_date_time)
    payload = _unicode_path_field(str(name), "../../evil.pdf")
    info.extra = struct.pack("<HH", 0x7075, len(payload)) + payload
    return _with_pj(spec, [(info, data), *scans[1:]])


def build_oversized(spec: SampleSpec, size: int = OVERSIZED_BYTES) -> bytes:
    """A valid package of about ``size`` bytes: a listed ``Annexe`` PDF padded with random data.

    The relay under test must be configured with a maximum package size below ``size``.
    """
    # The padding is stored, so the package grows byte for byte with it: one correction suffices.
    padding = max(size - len(build_package(spec)), 1)
    first = build_package(replace(spec, annex_bytes=padding, annex_fill="random"))
    padding = max(padding - (len(first) - size), 1)
    return build_package(replace(spec, annex_bytes=padding, annex_fill="random"))


def _mode_extra_xl(spec: SampleSpec) -> bytes:
    # libarchive's own 0x6c78 ("xl"): a Unix mode that bsdtar takes over the central directory's.
    payload = bytes([5]) + struct.pack("<HI", 0x0314, (stat.S_IFLNK | 0o777) << 16)
    return _with_extra(spec, 0x6C78, payload, data=b"/etc/passwd")


def _mode_extra_asi(spec: SampleSpec) -> bytes:
    # ASi Unix (0x756e): the mode unzip uses when the central attributes say nothing.
    rest = struct.pack("<HIHH", stat.S_IFLNK | 0o777, 0, 0, 0)
    return _with_extra(spec, 0x756E, struct.pack("<I", zlib.crc32(rest)) + rest, data=b"/etc/passwd")


def _short_timestamp_extra(spec: SampleSpec) -> bytes:
    # An extended timestamp (0x5455) with no bytes at all: libarchive gives up on the whole archive.
    return _with_extra(spec, 0x5455, b"")


def _reserved_flag(spec: SampleSpec) -> bytes:
    # Bit 5, "compressed patched data": zipfile refuses to read the member, bsdtar and unzip read it.
    return _patch_headers(build_package(spec), _victim(spec), flag_or=0x20)


def _setuid_member(spec: SampleSpec) -> bytes:
    return _with_mode(spec, stat.S_IFREG | stat.S_ISUID | stat.S_ISGID | 0o777)


def _pj_version_collision(spec: SampleSpec) -> bytes:
    # unzip strips a VMS version suffix by default: both land on one file.
    name, data = _scans(spec)[0]
    return _with_pj(spec, [(name, data), (f"{name};1", pdf_bytes(["second"]))])


def _pj_device_name(spec: SampleSpec) -> bytes:
    return _with_pj(spec, [*_scans(spec), ("COM\u00b9.pdf", pdf_bytes(["device"]))])


def _kinds(*kinds: BrokenKind) -> dict[str, BrokenKind]:
    return {k.name: k for k in kinds}


BROKEN_KINDS: dict[str, BrokenKind] = _kinds(
    BrokenKind("zip-slip", Reason.ZIP_PATH_TRAVERSAL, "An extra member named '../../evil.txt'.", _zip_slip),
    BrokenKind("absolute-path", Reason.ZIP_ABSOLUTE_PATH, "An extra member named '/etc/evil'.", _absolute_path),
    BrokenKind(
        "symlink-member",
        Reason.ZIP_SYMLINK,
        "The recap PDF member is a Unix symbolic link to /etc/passwd.",
        _symlink_member,
    ),
    BrokenKind(
        "duplicate-member",
        Reason.ZIP_DUPLICATE_MEMBER,
        "The recap PDF member appears twice with the same name.",
        _duplicate_member,
    ),
    BrokenKind(
        "zip-bomb",
        Reason.ZIP_BOMB_RATIO,
        "A listed Annexe PDF holds 20 MiB of zeros deflated about 1000:1.",
        _zip_bomb,
    ),
    BrokenKind(
        "nested-bomb",
        Reason.PJ_ZIP_UNSAFE,
        "The nested attachments zip holds a 20 MiB run of zeros deflated about 1000:1.",
        _nested_bomb,
        cause=Reason.ZIP_BOMB_RATIO,
    ),
    BrokenKind(
        "pj-zip-slip",
        Reason.PJ_ZIP_UNSAFE,
        "The nested attachments zip holds a member named '../../evil.txt'.",
        _pj_zip_slip,
        cause=Reason.ZIP_PATH_TRAVERSAL,
    ),
    BrokenKind(
        "pj-not-a-zip",
        Reason.PJ_ZIP_UNSAFE,
        "The attachments member is random bytes, not a zip.",
        _pj_not_a_zip,
        cause=Reason.ZIP_INVALID,
    ),
    BrokenKind("truncated", Reason.ZIP_INVALID, "A valid package cut in half.", _truncated),
    BrokenKind("not-a-zip", Reason.ZIP_INVALID, "Random bytes under a zip name.", _not_a_zip),
    BrokenKind(
        "crc-mismatch",
        Reason.ZIP_CRC_MISMATCH,
        "One byte of a stored CERFA PDF is flipped, so its CRC no longer matches.",
        _crc_mismatch,
    ),
    BrokenKind(
        "encrypted-member",
        Reason.ZIP_ENCRYPTED,
        "The recap PDF member has the encryption flag set in both of its headers.",
        _encrypted_member,
    ),
    BrokenKind(
        "unsupported-compression",
        Reason.ZIP_UNSUPPORTED,
        "The recap PDF member claims compression method 9 (Deflate64).",
        _unsupported_compression,
    ),
    BrokenKind(
        "document-missing",
        Reason.MEMBER_MISSING,
        "message.xml lists the recap PDF, but the member is absent.",
        _document_missing,
    ),
    BrokenKind(
        "unlisted-member",
        Reason.MEMBER_UNEXPECTED,
        "An extra member 'notes.txt' that message.xml does not list.",
        _unlisted_member,
    ),
    BrokenKind("no-envelope", Reason.ENVELOPE_MISSING, "The package has no message.xml.", _no_envelope),
    BrokenKind(
        "doctype",
        Reason.XML_FORBIDDEN,
        "message.xml declares a DOCTYPE with an internal entity (unused).",
        _doctype,
    ),
    BrokenKind(
        "xxe",
        Reason.XML_FORBIDDEN,
        "message.xml declares an external entity on file:///etc/passwd and uses it in Suivi.",
        _xxe,
    ),
    BrokenKind(
        "billion-laughs",
        Reason.XML_FORBIDDEN,
        "message.xml declares nested entities expanding to 10^9 'lol' and uses the outermost one.",
        _billion_laughs,
    ),
    BrokenKind(
        "malformed-xml",
        Reason.XML_MALFORMED,
        "message.xml closes Header with a mismatched end tag.",
        _malformed_xml,
    ),
    BrokenKind(
        "wrong-root",
        Reason.ENVELOPE_WRONG_ROOT,
        "message.xml's root element is Facture instead of the PEC Message.",
        _wrong_root,
    ),
    BrokenKind(
        "envelope-incomplete",
        Reason.ENVELOPE_INVALID,
        "message.xml's Aller has no Routage (no INSEE code) and its Recipient no Siret: nothing to route by.",
        _envelope_incomplete,
    ),
    BrokenKind(
        "bad-numero",
        Reason.DOSSIER_NUMBER_INVALID,
        "The dossier number is 'B-12-xyz', in message.xml and in every member name.",
        _bad_numero,
    ),
    BrokenKind(
        "unknown-demarche",
        Reason.DEMARCHE_NOT_ACCEPTED,
        "The démarche is 'ZZZ', which no commune accepts.",
        _unknown_demarche,
    ),
    BrokenKind(
        "foreign-insee",
        Reason.INSEE_UNKNOWN,
        "The routing INSEE code is '99999', which no commune has.",
        _foreign_insee,
    ),
    BrokenKind(
        "oversized",
        Reason.PACKAGE_TOO_LARGE,
        "A valid package of about 3 MiB; the relay must be configured with a smaller maximum.",
        build_oversized,
    ),
    # One canonical zip.
    BrokenKind("prepended-package", Reason.ZIP_LEADING_DATA,
               "Another package, with its own message.xml, placed in front; offsets count it (zip -A).",
               _prepended_package),
    BrokenKind("leading-junk", Reason.ZIP_LEADING_DATA,
               "1 KiB of junk in front, offsets not adjusted (cat junk package.zip).", _leading_junk),
    BrokenKind("trailing-data", Reason.ZIP_TRAILING_DATA, "HTML appended after the end record.", _trailing_data),
    BrokenKind("comment-end-record", Reason.ZIP_MULTIPLE_END_RECORDS,
               "The archive comment holds a second end record.", _comment_end_record),
    BrokenKind("zip64-member", Reason.ZIP_ZIP64, "The recap PDF is written with zip64 extra fields.", _zip64_member),
    BrokenKind("overlapping-members", Reason.ZIP_LAYOUT,
               "A central entry points at a member record inside the stored recap PDF's data.",
               _overlapping_members),
    BrokenKind("hidden-gap", Reason.ZIP_LAYOUT,
               "A member record that the central directory skips sits between two members.", _hidden_gap),
    BrokenKind("central-offset-lie", Reason.ZIP_LAYOUT,
               "The end record puts the central directory 100 bytes before where it is.", _central_offset_lie),
    BrokenKind("local-name-mismatch", Reason.ZIP_HEADER_MISMATCH,
               "The recap PDF's local header names it 'xxx...exe'.", _local_name_mismatch),
    BrokenKind("local-crc-mismatch", Reason.ZIP_HEADER_MISMATCH,
               "The recap PDF's local header has another CRC than its central entry.", _local_crc_mismatch),
    BrokenKind("deflate-slack", Reason.ZIP_SIZE_MISMATCH,
               "Bytes hidden after the recap PDF's deflate stream, inside its declared compressed size.",
               _deflate_slack),
    BrokenKind("unicode-path-extra", Reason.ZIP_EXTRA_FIELD,
               "The recap PDF carries an Info-ZIP Unicode path field (0x7075) renaming it message.xml.",
               _unicode_path_extra),
    BrokenKind("unicode-comment-extra", Reason.ZIP_EXTRA_FIELD,
               "The recap PDF carries an Info-ZIP Unicode comment field (0x6375).", _unicode_comment_extra),
    BrokenKind("case-collision", Reason.ZIP_NAME_COLLISION,
               "The recap PDF appears again under its name in capitals.", _case_collision),
    BrokenKind("unicode-collision", Reason.ZIP_NAME_COLLISION,
               "Members 'Pièce.pdf' in NFC and in NFD form.", _unicode_collision),
    BrokenKind("control-char-name", Reason.ZIP_NAME_INVALID,
               "A member name holds CR LF (a header injection).", _control_char_name),
    BrokenKind("backslash-name", Reason.ZIP_NAME_INVALID, "A member named 'pieces\\evil.txt'.", _backslash_name),
    BrokenKind("undeclared-name-encoding", Reason.ZIP_NAME_INVALID,
               "A non-ASCII member name without the UTF-8 flag.", _undeclared_name_encoding),
    BrokenKind("summary-name-member", Reason.EXTRACT_COLLISION,
               "The recap PDF is listed and stored as 'relayd.json', the name relayd writes when it extracts.",
               _summary_name_member),
    BrokenKind("file-and-folder", Reason.EXTRACT_COLLISION,
               "Members 'notes' and 'notes/a.txt': a file and a folder of one name.", _file_and_folder),
    BrokenKind("stored-data-descriptor", Reason.ZIP_UNSUPPORTED,
               "The recap PDF is stored with its CRC and sizes only after its data.", _stored_data_descriptor),
    BrokenKind("descriptor-mismatch", Reason.ZIP_HEADER_MISMATCH,
               "The recap PDF's data descriptor gives another CRC than its central entry.", _descriptor_mismatch),
    BrokenKind("file-marked-folder", Reason.ZIP_ENTRY_TYPE,
               "The recap PDF's Unix mode says folder while its name says file.", _file_marked_folder),
    BrokenKind("member-in-pj-folder", Reason.EXTRACT_COLLISION,
               "A top-level member inside the folder the attachments zip unpacks into.", _member_in_pj_folder),
    BrokenKind("pj-nested-zip", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds a zip holding 20 MiB of zeros (a bomb two levels deep).",
               _pj_nested_zip, cause=Reason.ZIP_NESTED_TOO_DEEP),
    BrokenKind("pj-disguised-zip", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds a zip named .pdf.", _pj_disguised_zip, cause=Reason.ZIP_NESTED_TOO_DEEP),
    BrokenKind("pj-file-and-folder", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds 'a' and 'a/b.pdf'.", _pj_file_and_folder, cause=Reason.EXTRACT_COLLISION),
    BrokenKind("pj-dot-member", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds a member named '.'.", _pj_dot_member, cause=Reason.ZIP_NAME_INVALID),
    BrokenKind("pj-trailing-data", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip has junk after its end record.", _pj_trailing_data, cause=Reason.ZIP_TRAILING_DATA),
    BrokenKind("pj-unicode-path-extra", Reason.PJ_ZIP_UNSAFE,
               "An attachment carries a Unicode path field (0x7075) renaming it '../../evil.pdf'.",
               _pj_unicode_path_extra, cause=Reason.ZIP_EXTRA_FIELD),
    BrokenKind("mode-extra-xl", Reason.ZIP_EXTRA_FIELD,
               "The recap PDF carries libarchive's 0x6c78 field, which makes it a link to /etc/passwd for bsdtar.",
               _mode_extra_xl),
    BrokenKind("mode-extra-asi", Reason.ZIP_EXTRA_FIELD,
               "The recap PDF carries an ASi Unix field (0x756e) giving it a link's mode, which unzip can use.",
               _mode_extra_asi),
    BrokenKind("short-timestamp-extra", Reason.ZIP_EXTRA_FIELD,
               "The recap PDF's extended timestamp field (0x5455) is empty: libarchive refuses the archive.",
               _short_timestamp_extra),
    BrokenKind("reserved-flag", Reason.ZIP_UNSUPPORTED,
               "The recap PDF sets flag bit 5 (patched data), which zipfile refuses and other readers ignore.",
               _reserved_flag),
    BrokenKind("setuid-member", Reason.ZIP_ENTRY_TYPE,
               "The recap PDF's Unix mode asks for setuid and setgid, which bsdtar restores as root.", _setuid_member),
    BrokenKind("pj-version-collision", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds 'x.pdf' and 'x.pdf;1', one file once unzip strips the version.",
               _pj_version_collision, cause=Reason.ZIP_NAME_COLLISION),
    BrokenKind("pj-device-name", Reason.PJ_ZIP_UNSAFE,
               "The attachments zip holds 'COM\u00b9.pdf', a device for Windows.", _pj_device_name,
               cause=Reason.ZIP_NAME_INVALID),
)


def build_broken(kind: str, spec: SampleSpec) -> bytes:
    """The zip bytes of broken package ``kind`` (a key of :data:`BROKEN_KINDS`) built from ``spec``."""
    try:
        broken = BROKEN_KINDS[kind]
    except KeyError:
        raise KeyError(f"unknown broken kind {kind!r}; known: {', '.join(sorted(BROKEN_KINDS))}") from None
    return broken.build(spec)


# --------------------------------------------------------------------------- envelope meaning
# Kinds of relayd/testkit/broken_envelope.py (real-world fidelity): one thing said twice, an unsafe
# value, XInclude. Kept apart so that the zip-level kinds above and these evolve separately.

from relayd.testkit import broken_envelope as _env  # noqa: E402 - registered after the kinds above

for _kind in (
    BrokenKind("duplicate-codeinsee", Reason.ENVELOPE_DUPLICATE_ELEMENT,
               "Routage holds two Donnee CodeINSEE, for two communes.", _env.duplicate_codeinsee),
    BrokenKind("duplicate-message-id", Reason.ENVELOPE_DUPLICATE_ELEMENT,
               "Routing holds two MessageId.", _env.duplicate_message_id),
    BrokenKind("xinclude", Reason.XML_XINCLUDE,
               "The -ent- business header pulls /etc/passwd in through xi:include.", _env.xinclude_ent),
    BrokenKind("path-ackto", Reason.ENVELOPE_UNSAFE_VALUE,
               "AckTo's Service is the path ../../../etc/cron.d/x.", _env.path_ack_to),
    BrokenKind("subject-injection", Reason.ENVELOPE_UNSAFE_VALUE,
               "The notification Subject carries a line break and a Bcc: header.", _env.subject_header_injection),
    BrokenKind("siret-unknown", Reason.SIRET_UNKNOWN,
               f"No CodeINSEE, and the recipient's SIRET {_env.STRAY_SIRET} is no commune's.", _env.siret_unknown),
    BrokenKind("not-a-dossier", Reason.ENVELOPE_NOT_A_DOSSIER,
               "message.xml is shaped like the DIA flow's: an opaque Content, no Aller.", _env.not_a_dossier),
    BrokenKind("comment-split-subject", Reason.ENVELOPE_UNSAFE_VALUE,
               "A comment splits the Subject; after it, a line break and a Bcc: header.", _env.comment_split_subject),
    BrokenKind("nested-codeinsee", Reason.ENVELOPE_DUPLICATE_ELEMENT,
               "A second Donnee CodeINSEE, for another commune, hidden in Suivi.", _env.nested_codeinsee),
    BrokenKind("foreign-namespace-numero", Reason.ENVELOPE_DUPLICATE_ELEMENT,
               "A second NumeroTeledemarche in another namespace.", _env.foreign_namespace_numero),
):
    BROKEN_KINDS[_kind.name] = _kind

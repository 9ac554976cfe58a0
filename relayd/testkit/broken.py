"""Broken PEC packages: every way a delivered package can be wrong, each with the Reason relayd must give.

Each broken package starts from the valid :func:`~relayd.testkit.samples.build_members` output
and changes one thing, so that it is wrong in exactly one way where the defect allows it (a
truncated zip is also missing its envelope, of course). Integration testers push these at a relay
and check the quarantine reason file and the negative ack.

Two kinds depend on the relay's limits:

- ``oversized`` builds a ~3 MiB package: the relay under test must be configured with a maximum
  package size below that (the test suite uses ``max_package_bytes = 2 MiB``).
- ``zip-bomb`` and ``nested-bomb`` hold a 20 MiB run of zeros (deflate ratio ~1000:1): the relay's
  ratio limit must be below that and its total-size limit above it, or it reports the size instead.
"""

from __future__ import annotations

import random
import stat
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace

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

__all__ = ["BROKEN_KINDS", "BrokenKind", "build_broken", "build_oversized"]

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
    members = build_members(spec)
    victim = _victim(spec)
    pairs: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    for name, data in members.items():
        if name == victim:
            info = zip_entry(name, spec.zip_date_time)
            # zip_entry already says "made on Unix", the only origin whose mode bits mean anything.
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            pairs.append((info, b"/etc/passwd"))
        else:
            pairs.append((name, data))
    return write_zip(pairs, date_time=spec.zip_date_time)


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


def build_oversized(spec: SampleSpec, size: int = OVERSIZED_BYTES) -> bytes:
    """A valid package of about ``size`` bytes: a listed ``Annexe`` PDF padded with random data.

    The relay under test must be configured with a maximum package size below ``size``.
    """
    # The padding is stored, so the package grows byte for byte with it: one correction suffices.
    padding = max(size - len(build_package(spec)), 1)
    first = build_package(replace(spec, annex_bytes=padding, annex_fill="random"))
    padding = max(padding - (len(first) - size), 1)
    return build_package(replace(spec, annex_bytes=padding, annex_fill="random"))


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
    ),
    BrokenKind(
        "pj-zip-slip",
        Reason.PJ_ZIP_UNSAFE,
        "The nested attachments zip holds a member named '../../evil.txt'.",
        _pj_zip_slip,
    ),
    BrokenKind(
        "pj-not-a-zip",
        Reason.PJ_ZIP_UNSAFE,
        "The attachments member is random bytes, not a zip.",
        _pj_not_a_zip,
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
):
    BROKEN_KINDS[_kind.name] = _kind

"""Read and verify one uploaded PEC package: the zip, its envelope and its members.

:func:`inspect_package` is pure with respect to configuration: it knows nothing of
communes or accounts. It answers "is this a sound PEC package, and what does it say?";
routing decisions belong to intake.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from lxml import etree

from relayd.pec.envelope import Message, read_envelope
from relayd.pec.xml import parse_xml
from relayd.pec.zipcheck import (
    CHUNK,
    PackageLimits,
    check_directory,
    check_extraction_names,
    name_key,
    open_zip,
    stream_member,
)
from relayd.rejections import Reason, Rejection

ENVELOPE_NAME = "message.xml"
#: what relayd writes itself into an extracted delivery, which no member may take
SUMMARY_NAME = "relayd.json"
#: how every zip starts (a local header, an empty archive's end record, a split archive's marker)
ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08", b"PK\x06\x06")
#: documents that are zips by design; they are opened as documents, never unpacked
ZIP_BASED_DOCUMENTS = (".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp")


@dataclass(frozen=True)
class MemberInfo:
    """One file of the package (or of a nested attachments zip), with its digest."""

    name: str
    size: int
    sha256: str


@dataclass
class Package:
    """A verified package: what the envelope says, and every member with its digest."""

    path: Path
    size: int
    sha256: str
    message: Message
    members: list[MemberInfo]
    #: member name of each nested zip -> the files inside it
    nested: dict[str, list[MemberInfo]] = field(default_factory=dict)

    @property
    def numero(self) -> str:
        return self.message.numero

    @property
    def demarche(self) -> str:
        return self.message.demarche

    @property
    def insee(self) -> str:
        return self.message.insee or ""

    @property
    def message_id(self) -> str:
        return self.message.message_id


def file_sha256(path: Path) -> str:
    """Hash a file in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def inspect_package(path: Path, limits: PackageLimits) -> Package:
    """Verify the package at ``path`` and return what it holds.

    Order matters only for which reason is reported first: size, the zip's layout (one
    canonical zip) and central directory, the envelope, names that would collide once
    extracted, then every other member's CRC and XML (nested zips included, one level
    deep), then the member list against the envelope. Raises :class:`Rejection`; a refusal that comes
    after the envelope was read carries it in ``Rejection.envelope``.
    """
    size = path.stat().st_size
    if size > limits.max_package_bytes:
        raise Rejection(Reason.PACKAGE_TOO_LARGE, f"the package is {size} bytes; the limit is {limits.max_package_bytes}.")
    # Hashing the whole file is as long as reading the members; hashlib drops the GIL, so the
    # two passes run side by side on two cores.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
        whole = pool.submit(file_sha256, path)
        with open_zip(path) as zf:
            infos = check_directory(zf, limits)
            envelope = next((i for i in infos if i.filename == ENVELOPE_NAME), None)
            if envelope is None:
                raise Rejection(Reason.ENVELOPE_MISSING)
            reader = _MemberReader(zf, limits, infos)
            message = read_envelope(reader.read_xml(envelope))
            try:
                check_extraction_names((i.filename for i in infos), reserved=[SUMMARY_NAME])
                members = [reader.read(info) for info in infos]
                check_extracted_tree(infos, reader.nested)
                _check_member_list(message, [m.name for m in members])
            except Rejection as exc:
                exc.envelope = message
                raise
        sha256 = whole.result()
    return Package(path=path, size=size, sha256=sha256, message=message, members=members, nested=reader.nested)


class _MemberReader:
    """Streams each member once (CRC and digest), parses XML members, inspects nested zips.

    Nested zips count against the package's member and size budgets, so that a small upload
    cannot make relayd inflate without bound through many nested archives.
    """

    def __init__(self, zf: zipfile.ZipFile, limits: PackageLimits, infos: list[zipfile.ZipInfo]):
        self.zf = zf
        self.limits = limits
        self.nested: dict[str, list[MemberInfo]] = {}
        self.members_left = limits.max_members - len(infos)
        self.bytes_left = limits.max_total_uncompressed_bytes - sum(i.file_size for i in infos)
        self._done: dict[str, MemberInfo] = {}

    def read_xml(self, info: zipfile.ZipInfo) -> etree._Element:
        """Read, digest and parse one XML member; only the parsed tree is kept."""
        member, root = _read_xml(self.zf, info, self.limits, name=info.filename)
        self._done[info.filename] = member
        return root

    def read(self, info: zipfile.ZipInfo) -> MemberInfo:
        """Verify one member and return it with its digest."""
        if info.filename in self._done:
            return self._done[info.filename]
        if info.is_dir():
            return MemberInfo(info.filename, 0, "")
        lower = info.filename.lower()
        if lower.endswith(".xml"):
            self.read_xml(info)
            return self._done[info.filename]
        digest = hashlib.sha256()
        if lower.endswith(".zip"):
            # A ZipFile needs to seek: spool the nested zip to an anonymous temporary file.
            with tempfile.TemporaryFile() as spool:
                stream_member(self.zf, info, lambda c: (digest.update(c), spool.write(c)))
                spool.seek(0)
                self.nested[info.filename] = self._inspect_nested(spool, info.filename)
        else:
            stream_member(self.zf, info, digest.update)
        return MemberInfo(info.filename, info.file_size, digest.hexdigest())

    def _inspect_nested(self, spool: IO[bytes], name: str) -> list[MemberInfo]:
        """Apply every zip check to a nested attachments zip; any failure is ``pj_zip_unsafe``."""
        label = f"the attachments zip {name!r}"
        try:
            with open_zip(spool, label=label) as inner:
                infos = check_directory(inner, self.limits, label=label)
                check_extraction_names((i.filename for i in infos), label=label)
                self.members_left -= len(infos)
                self.bytes_left -= sum(i.file_size for i in infos)
                if self.members_left < 0:
                    raise Rejection(Reason.ZIP_TOO_MANY_MEMBERS, f"{label} takes the package over {self.limits.max_members} members.")
                if self.bytes_left < 0:
                    raise Rejection(
                        Reason.ZIP_UNCOMPRESSED_TOO_LARGE,
                        f"{label} takes the package over {self.limits.max_total_uncompressed_bytes} bytes unpacked.",
                    )
                out = []
                for info in infos:
                    if info.is_dir():
                        continue
                    if info.filename.lower().endswith(".xml"):
                        member, _ = _read_xml(inner, info, self.limits, name=f"{name}/{info.filename}", label=label)
                    else:
                        member = _read_leaf(inner, info, label)
                    out.append(member)
                return out
        except Rejection as exc:
            raise Rejection(Reason.PJ_ZIP_UNSAFE, exc.detail, cause=exc.reason) from None


def _read_leaf(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> MemberInfo:
    """Digest one member of a nested zip, which may not itself be a zip (one level of nesting only)."""
    if info.filename.lower().endswith(".zip"):
        raise Rejection(Reason.ZIP_NESTED_TOO_DEEP, f"{label} holds another zip, {info.filename!r}.")
    digest = hashlib.sha256()
    head = bytearray()

    def take(chunk: bytes) -> None:
        if len(head) < 4:
            head.extend(chunk[: 4 - len(head)])
        digest.update(chunk)

    stream_member(zf, info, take, label=label)
    if bytes(head).startswith(ZIP_SIGNATURES) and not info.filename.lower().endswith(ZIP_BASED_DOCUMENTS):
        raise Rejection(Reason.ZIP_NESTED_TOO_DEEP, f"{label}: member {info.filename!r} is a zip under another name.")
    return MemberInfo(info.filename, info.file_size, digest.hexdigest())


def nested_folder(name: str) -> str:
    """The folder an extracted delivery unpacks a nested zip into: its name without ``.zip``."""
    return PurePosixPath(name).stem


def check_extracted_tree(infos: list[zipfile.ZipInfo], nested: dict[str, list[MemberInfo]]) -> None:
    """Refuse a package whose extracted delivery would collide with itself, whatever the commune's mode.

    The tree is every member, each nested zip unpacked into its folder, and ``relayd.json``;
    so that whether a package is accepted never depends on the commune it is for.
    """
    names = [i.filename for i in infos if i.filename not in nested]
    folders = {name_key(nested_folder(zip_name)): zip_name for zip_name in nested}
    for name in names:
        # A nested zip's folder is its alone: relayd creates it, and nothing else may be in it.
        key = name_key(name)
        for depth in range(1, len(key) + 1):
            if key[:depth] in folders:
                raise Rejection(Reason.EXTRACT_COLLISION,
                                f"the package once extracted: {name!r} would land where {folders[key[:depth]]!r} unpacks.")
    for zip_name, inner in nested.items():
        folder = nested_folder(zip_name)
        names.append(f"{folder}/")
        names.extend(f"{folder}/{m.name}" for m in inner)
    check_extraction_names(names, label="the package once extracted", reserved=[SUMMARY_NAME])


def _read_xml(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: PackageLimits, *, name: str, label: str = "the package"
) -> tuple[MemberInfo, etree._Element]:
    """Read one XML member within its size limit, digest it, and parse it with the hardened parser.

    Every XML file goes to the business software: none may carry a DOCTYPE.
    """
    if info.file_size > limits.max_xml_bytes:
        raise Rejection(Reason.XML_TOO_LARGE, f"{name} is {info.file_size} bytes; the limit is {limits.max_xml_bytes}.")
    digest = hashlib.sha256()
    buf = bytearray()
    stream_member(zf, info, lambda c: (digest.update(c), buf.extend(c)), label=label)
    root = parse_xml(bytes(buf), name=name, max_bytes=limits.max_xml_bytes)
    return MemberInfo(info.filename, info.file_size, digest.hexdigest()), root


def header_pattern(message: Message) -> re.Pattern[str]:
    """The business header's name, ``<numero>-<demarche>-ent-<i>.xml``, which the envelope does not list."""
    return re.compile(re.escape(f"{message.numero}-{message.demarche}-ent-") + r"[0-9]+\.xml")


def _check_member_list(message: Message, names: list[str]) -> None:
    listed = message.listed_files()
    present = set(names)
    for wanted in listed:
        if wanted not in present:
            raise Rejection(Reason.MEMBER_MISSING, f"the envelope lists {wanted!r}, which is not in the package.")
    allowed = set(listed) | {ENVELOPE_NAME}
    header = header_pattern(message)
    for name in names:
        if name not in allowed and not header.fullmatch(name):
            raise Rejection(Reason.MEMBER_UNEXPECTED, f"the package holds {name!r}, which the envelope does not list.")

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
from pathlib import Path

from relayd.pec.envelope import Message, read_envelope
from relayd.pec.xml import parse_xml
from relayd.pec.zipcheck import CHUNK, PackageLimits, check_directory, open_zip, stream_member
from relayd.rejections import Reason, Rejection

ENVELOPE_NAME = "message.xml"


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

    Order matters only for which reason is reported first: size, central directory,
    every member's CRC (nested zips included), then the XML and the envelope, then the
    member list against the envelope. Raises :class:`Rejection`.
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
            members, xml_bytes, nested = _read_members(zf, infos, limits)
        sha256 = whole.result()
    envelope_xml = xml_bytes.pop(ENVELOPE_NAME, None)
    if envelope_xml is None:
        raise Rejection(Reason.ENVELOPE_MISSING)
    message = read_envelope(parse_xml(envelope_xml, name=ENVELOPE_NAME, max_bytes=limits.max_xml_bytes))
    try:
        # Every XML member goes to the business software: none may carry a DOCTYPE either.
        for name, data in xml_bytes.items():
            parse_xml(data, name=name, max_bytes=limits.max_xml_bytes)
        _check_member_list(message, [m.name for m in members])
    except Rejection as exc:
        exc.envelope = message
        raise
    return Package(path=path, size=size, sha256=sha256, message=message, members=members, nested=nested)


def _read_members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: PackageLimits
) -> tuple[list[MemberInfo], dict[str, bytes], dict[str, list[MemberInfo]]]:
    """Stream every member once: CRC, digest, XML kept for parsing, nested zips inspected."""
    members: list[MemberInfo] = []
    xml_bytes: dict[str, bytes] = {}
    nested: dict[str, list[MemberInfo]] = {}
    for info in infos:
        if info.is_dir():
            members.append(MemberInfo(info.filename, 0, ""))
            continue
        digest = hashlib.sha256()
        lower = info.filename.lower()
        if lower.endswith(".xml"):
            if info.file_size > limits.max_xml_bytes:
                raise Rejection(
                    Reason.XML_TOO_LARGE, f"{info.filename} is {info.file_size} bytes; the limit is {limits.max_xml_bytes}."
                )
            buf = bytearray()
            stream_member(zf, info, lambda c: (digest.update(c), buf.extend(c)))
            xml_bytes[info.filename] = bytes(buf)
        elif lower.endswith(".zip"):
            # Nested zips are spooled to a temporary file: a ZipFile needs to seek.
            with tempfile.TemporaryFile() as spool:
                stream_member(zf, info, lambda c: (digest.update(c), spool.write(c)))
                spool.seek(0)
                nested[info.filename] = _inspect_nested(spool, info.filename, limits)
        else:
            stream_member(zf, info, digest.update)
        members.append(MemberInfo(info.filename, info.file_size, digest.hexdigest()))
    return members, xml_bytes, nested


def _inspect_nested(spool, name: str, limits: PackageLimits) -> list[MemberInfo]:
    """Apply every zip check to a nested attachments zip; any failure is ``pj_zip_unsafe``."""
    label = f"the attachments zip {name!r}"
    try:
        with open_zip(spool, label=label) as inner:
            out = []
            for info in check_directory(inner, limits, label=label):
                if info.is_dir():
                    continue
                digest = hashlib.sha256()
                stream_member(inner, info, digest.update, label=label)
                out.append(MemberInfo(info.filename, info.file_size, digest.hexdigest()))
            return out
    except Rejection as exc:
        raise Rejection(Reason.PJ_ZIP_UNSAFE, exc.detail, cause=exc.reason) from None


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

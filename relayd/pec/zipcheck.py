"""Safe inspection of zip archives, without extracting anything blindly.

A zip has two descriptions of its members: the central directory at the end (what
``unzip`` and Python read) and the local headers in front of each member's data (what a
streaming reader such as ``bsdtar`` or Java's ``ZipInputStream`` reads). relayd accepts
only a *canonical* zip, where both say the same thing: :func:`check_layout` reads every
record by hand before ``zipfile`` is trusted with anything. Then the central directory
is checked (cheap, refuses hostile archives before any byte is inflated), then each
member is streamed once, inflated by hand so that its data ends exactly where its headers
say, with its CRC verified. No member is ever held whole in memory.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from relayd.rejections import Reason, Rejection

CHUNK = 1024 * 1024


class PackageLimits(BaseModel):
    """Bounds on what one package may be. Every bound refuses with its own reason code."""

    model_config = ConfigDict(extra="forbid")

    max_package_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="size of the uploaded file")
    max_members: int = Field(default=500, gt=0, description="members in a package, nested zips included")
    max_total_uncompressed_bytes: int = Field(default=2 * 1024 * 1024 * 1024, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1, description="uncompressed / compressed, per member")
    ratio_floor_bytes: int = Field(
        default=1024 * 1024, ge=0, description="members smaller than this are never judged by their ratio"
    )
    max_xml_bytes: int = Field(default=8 * 1024 * 1024, gt=0)


def open_zip(source: str | Path | IO[bytes], *, label: str = "the package") -> zipfile.ZipFile:
    """Open a canonical zip (:func:`check_layout`), turning every structural failure into a refusal."""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as fh:
                layout = check_layout(fh, label=label)
                checked = os.fstat(fh.fileno())
                zf = zipfile.ZipFile(source)
            read = os.fstat(zf.fp.fileno()) if zf.fp is not None else None
            if read is None or (read.st_dev, read.st_ino, read.st_size) != (checked.st_dev, checked.st_ino, checked.st_size):
                zf.close()
                raise Rejection(Reason.ZIP_INVALID, f"{label} changed while it was read.")
        else:
            source.seek(0)
            layout = check_layout(source, label=label)
            source.seek(0)
            zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise Rejection(Reason.ZIP_INVALID, f"{label} is not a readable zip ({exc}).") from None
    _same_as_zipfile(zf, layout, label)
    return zf


# --------------------------------------------------------------------------- canonical layout

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_END64 = b"PK\x06\x06"
_END64_LOCATOR = b"PK\x06\x07"
_DESCRIPTOR = b"PK\x07\x08"
_END_SIZE = 22
#: flag bits: 0 encrypted, 6 strong encryption, 13 central directory encrypted
_ENCRYPTION_FLAGS = 0x1 | 0x40 | 0x2000
_DATA_DESCRIPTOR_FLAG = 0x8
_UTF8_FLAG = 0x800
#: extra fields that give a member another name or comment than its header (Info-ZIP Unicode path, comment)
_RENAMING_EXTRAS = {0x7075: "Info-ZIP Unicode path", 0x6375: "Info-ZIP Unicode comment"}
_ZIP64_EXTRA = 0x0001
#: the only other extra fields accepted: ones that say nothing of a member's name, type or mode. Others
#: do: libarchive takes a member's type and mode from 0x6c78 ("xl"), unzip from 0x756e (ASi Unix), and
#: 0x000d (PKWARE Unix) carries a link target; one relayd cannot check is one it does not accept.
_TIMES_EXTRA = 0x5455
_UNIX_IDS_EXTRA = 0x7875
_KNOWN_EXTRAS = {0x000A: "NTFS times", _TIMES_EXTRA: "extended timestamp", _UNIX_IDS_EXTRA: "Unix owner",
                 0xCAFE: "JAR marker", 0xA220: "padding"}
#: flag bits a member may carry: deflate's level (1, 2), a data descriptor (3), UTF-8 names (11).
#: Others are reserved or mean "patched data" or enhanced deflate, which readers treat differently.
_ALLOWED_FLAGS = 0x2 | 0x4 | 0x8 | 0x800
#: extra fields that mean the data is encrypted (strong encryption header, WinZip AES)
_ENCRYPTION_EXTRAS = {0x0017, 0x9901}
_MAX_COMPONENT_BYTES = 255
_MAX_NAME_BYTES = 1024


@dataclass(frozen=True)
class Entry:
    """One member as its central directory entry and local header both describe it."""

    name: str
    raw_name: bytes
    offset: int
    end: int
    crc: int
    compress_size: int
    file_size: int


def check_layout(fh: IO[bytes], *, label: str = "the package") -> list[Entry]:
    """Refuse a zip that two readers could see differently; return its members in central directory order.

    The archive must be exactly: members back to back from byte 0, then the central
    directory, then one end record whose comment reaches the last byte. Every local header
    must agree with its central entry, no extra field may rename a member, and no zip64.
    """
    size = fh.seek(0, os.SEEK_END)
    tail_start = max(0, size - (_END_SIZE + 0xFFFF))
    fh.seek(tail_start)
    tail = fh.read()
    end_at = _find_end_record(tail, size - tail_start, label)
    end = tail[end_at : end_at + _END_SIZE]
    disk, cd_disk, disk_count, count, cd_size, cd_offset, _comment_len = struct.unpack("<4xHHHHIIH", end)
    comment = tail[end_at + _END_SIZE :]
    end_offset = tail_start + end_at
    if 0xFFFF in (disk, cd_disk, disk_count, count) or 0xFFFFFFFF in (cd_size, cd_offset) or (
        end_offset >= 20 and _read_at(fh, end_offset - 20, 4) == _END64_LOCATOR
    ):
        raise Rejection(Reason.ZIP_ZIP64, f"{label} uses zip64 end records.")
    for signature in (_END, _END64, _END64_LOCATOR, _CENTRAL, _LOCAL):
        if signature in comment:
            raise Rejection(Reason.ZIP_MULTIPLE_END_RECORDS, f"{label}: its comment hides zip records.")
    if disk or cd_disk or disk_count != count:
        raise Rejection(Reason.ZIP_LAYOUT, f"{label} claims to span several disks.")
    if cd_offset + cd_size != end_offset:
        shift = end_offset - cd_offset - cd_size
        if shift > 0 and _read_at(fh, shift, 4) == _LOCAL:
            # zipfile takes this for bytes prepended to the archive (`cat junk x.zip`) and quietly shifts every offset.
            raise Rejection(Reason.ZIP_LEADING_DATA, f"{label} has {shift} bytes in front of the archive.")
        raise Rejection(Reason.ZIP_LAYOUT, f"{label}: its central directory is not where its end record says.")
    central = _read_at(fh, cd_offset, cd_size)
    entries = _read_central(fh, central, count, label)
    _check_contiguous(entries, cd_offset, label)
    for entry in entries:
        check_member_name(entry.name, label=label)
    return entries


def _find_end_record(tail: bytes, tail_len: int, label: str) -> int:
    """The end record whose comment ends at the last byte; refuse junk after it and a second one."""
    candidates = []
    at = tail.rfind(_END)
    while at >= 0:
        if at + _END_SIZE <= tail_len:
            (comment_len,) = struct.unpack_from("<H", tail, at + 20)
            candidates.append((at, at + _END_SIZE + comment_len == tail_len))
        at = tail.rfind(_END, 0, at)
    exact = [at for at, fits in candidates if fits]
    if len(exact) > 1:
        raise Rejection(Reason.ZIP_MULTIPLE_END_RECORDS, f"{label} has {len(exact)} end records that each fit.")
    if not exact:
        if candidates:
            raise Rejection(Reason.ZIP_TRAILING_DATA, f"{label} has bytes after its end record.")
        raise Rejection(Reason.ZIP_INVALID, f"{label} is not a readable zip (no end record).")
    return exact[0]


def _read_at(fh: IO[bytes], offset: int, length: int) -> bytes:
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise Rejection(Reason.ZIP_LAYOUT, "a zip record points past the end of the file.")
    return data


def _extras(data: bytes, name: str, label: str) -> dict[int, bytes]:
    """Parse an extra-field block; refuse a malformed one, a renaming one, zip64 and encryption."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise Rejection(Reason.ZIP_EXTRA_FIELD, f"{label}: member {name!r} has a truncated extra field.")
        ident, length = struct.unpack_from("<HH", data, pos)
        if pos + 4 + length > len(data):
            raise Rejection(Reason.ZIP_EXTRA_FIELD, f"{label}: member {name!r} has a truncated extra field.")
        if ident in out:
            raise Rejection(Reason.ZIP_EXTRA_FIELD, f"{label}: member {name!r} repeats extra field 0x{ident:04x}.")
        if ident in _RENAMING_EXTRAS:
            raise Rejection(Reason.ZIP_EXTRA_FIELD,
                            f"{label}: member {name!r} carries an {_RENAMING_EXTRAS[ident]} field (0x{ident:04x}), "
                            "under which some readers give it another name.")
        if ident == _ZIP64_EXTRA:
            raise Rejection(Reason.ZIP_ZIP64, f"{label}: member {name!r} has a zip64 extra field.")
        if ident in _ENCRYPTION_EXTRAS:
            raise Rejection(Reason.ZIP_ENCRYPTED, f"{label}: member {name!r} is encrypted.")
        if ident not in _KNOWN_EXTRAS:
            raise Rejection(Reason.ZIP_EXTRA_FIELD,
                            f"{label}: member {name!r} carries extra field 0x{ident:04x}, which relayd does not "
                            "accept: some readers take a member's type, mode or name from such fields.")
        body = data[pos + 4 : pos + 4 + length]
        if not _well_formed_extra(ident, body):
            raise Rejection(Reason.ZIP_EXTRA_FIELD,
                            f"{label}: member {name!r} has a malformed {_KNOWN_EXTRAS[ident]} field (0x{ident:04x}), "
                            "which some readers refuse.")
        out[ident] = body
        pos += 4 + length
    return out


def _well_formed_extra(ident: int, body: bytes) -> bool:
    """Whether an accepted extra field holds what its kind says (libarchive refuses a short timestamp)."""
    if ident == _TIMES_EXTRA:
        # A flags byte, then 4 bytes per time present (the central copy holds the modification time only).
        if not body or body[0] & ~0x07 or (len(body) - 1) % 4:
            return False
        return len(body) - 1 <= 4 * bin(body[0]).count("1") and (len(body) >= 5 or not body[0] & 1)
    if ident == _UNIX_IDS_EXTRA:
        # Version 1, then the uid's size and the uid, then the gid's size and the gid.
        if len(body) < 3 or body[0] != 1:
            return False
        uid_size = body[1]
        if 2 + uid_size >= len(body):
            return False
        gid_size = body[2 + uid_size]
        return len(body) == 3 + uid_size + gid_size and uid_size <= 8 and gid_size <= 8
    return True


def _decode_name(raw: bytes, flags: int, label: str) -> str:
    if flags & _UTF8_FLAG:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: a member name is not valid UTF-8.") from None
    if not raw.isascii():
        # Without the UTF-8 flag, readers pick cp437 or their locale: each sees another name.
        raise Rejection(Reason.ZIP_NAME_INVALID,
                        f"{label}: member name {raw.decode('latin-1')!r} is not ASCII and not flagged UTF-8.")
    return raw.decode("ascii")


def _read_central(fh: IO[bytes], central: bytes, count: int, label: str) -> list[Entry]:
    entries: list[Entry] = []
    pos = 0
    for _ in range(count):
        if central[pos : pos + 4] != _CENTRAL or pos + 46 > len(central):
            raise Rejection(Reason.ZIP_LAYOUT, f"{label}: its central directory holds fewer entries than it claims.")
        (flags, method, _time, _date, crc, csize, usize, name_len, extra_len, comment_len, disk,
         _internal, _external, offset) = struct.unpack_from("<8xHHHHIIIHHHHHII", central, pos)
        raw_name = central[pos + 46 : pos + 46 + name_len]
        extra = central[pos + 46 + name_len : pos + 46 + name_len + extra_len]
        pos += 46 + name_len + extra_len + comment_len
        if pos > len(central):
            raise Rejection(Reason.ZIP_LAYOUT, f"{label}: a central directory entry runs past its end.")
        name = _decode_name(raw_name, flags, label)
        _extras(extra, name, label)
        if 0xFFFFFFFF in (csize, usize, offset) or disk == 0xFFFF:
            raise Rejection(Reason.ZIP_ZIP64, f"{label}: member {name!r} needs zip64 sizes.")
        if disk:
            raise Rejection(Reason.ZIP_LAYOUT, f"{label}: member {name!r} claims to be on another disk.")
        if flags & _ENCRYPTION_FLAGS or method == 99:
            raise Rejection(Reason.ZIP_ENCRYPTED, f"{label}: member {name!r} is encrypted.")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Rejection(Reason.ZIP_UNSUPPORTED, f"{label}: member {name!r} uses compression method {method}.")
        if method == zipfile.ZIP_STORED and flags & _DATA_DESCRIPTOR_FLAG:
            # A streaming reader cannot tell where stored data ends without its size up front.
            raise Rejection(Reason.ZIP_UNSUPPORTED, f"{label}: member {name!r} is stored with its size only after its data.")
        end = _check_local(fh, offset, raw_name, name, flags, method, crc, csize, usize, label)
        entries.append(Entry(name, raw_name, offset, end, crc, csize, usize))
    if pos != len(central):
        raise Rejection(Reason.ZIP_LAYOUT, f"{label}: its central directory holds more than the entries it counts.")
    return entries


def _check_local(fh: IO[bytes], offset: int, raw_name: bytes, name: str, flags: int, method: int,
                 crc: int, csize: int, usize: int, label: str) -> int:
    """Compare a member's local header (and data descriptor) with its central entry; return where it ends."""
    header = _read_at(fh, offset, 30)
    if header[:4] != _LOCAL:
        raise Rejection(Reason.ZIP_LAYOUT, f"{label}: member {name!r} has no local header where the directory says.")
    l_flags, l_method, _t, _d, l_crc, l_csize, l_usize, name_len, extra_len = struct.unpack_from("<6xHHHHIIIHH", header)
    l_name = _read_at(fh, offset + 30, name_len)
    l_extra = _read_at(fh, offset + 30 + name_len, extra_len)

    def mismatch(what: str) -> Rejection:
        return Rejection(Reason.ZIP_HEADER_MISMATCH,
                         f"{label}: member {name!r} has another {what} in its local header than in the directory.")

    if l_name != raw_name:
        raise mismatch("name")
    if l_flags != flags:
        raise mismatch("flag set")
    if l_method != method:
        raise mismatch("compression method")
    _extras(l_extra, name, label)
    data_end = offset + 30 + name_len + extra_len + csize
    if flags & _DATA_DESCRIPTOR_FLAG:
        if (l_crc, l_csize, l_usize) not in ((0, 0, 0), (crc, csize, usize)):
            raise mismatch("CRC or size")
        descriptor = _read_at(fh, data_end, 16)
        if descriptor[:4] == _DESCRIPTOR:
            d_crc, d_csize, d_usize = struct.unpack_from("<III", descriptor, 4)
            length = 16
        else:
            d_crc, d_csize, d_usize = struct.unpack_from("<III", descriptor, 0)
            length = 12
        if (d_crc, d_csize, d_usize) != (crc, csize, usize):
            raise Rejection(Reason.ZIP_HEADER_MISMATCH,
                            f"{label}: member {name!r} has another CRC or size in its data descriptor than in the directory.")
        return data_end + length
    if (l_crc, l_csize, l_usize) != (crc, csize, usize):
        raise mismatch("CRC or size")
    return data_end


def _check_contiguous(entries: list[Entry], cd_offset: int, label: str) -> None:
    """Members must sit back to back from byte 0 up to the central directory: no gap, no overlap."""
    position = 0
    for entry in sorted(entries, key=lambda e: e.offset):
        if entry.offset > position:
            if position == 0:
                raise Rejection(Reason.ZIP_LEADING_DATA, f"{label} has {entry.offset} bytes before its first member.")
            raise Rejection(Reason.ZIP_LAYOUT, f"{label} hides {entry.offset - position} bytes before member {entry.name!r}.")
        if entry.offset < position:
            raise Rejection(Reason.ZIP_LAYOUT, f"{label}: member {entry.name!r} overlaps the member before it.")
        position = entry.end
    if position != cd_offset:
        if not entries:
            raise Rejection(Reason.ZIP_LEADING_DATA, f"{label} has {cd_offset} bytes before its central directory.")
        if position < cd_offset:
            raise Rejection(Reason.ZIP_LAYOUT, f"{label} hides {cd_offset - position} bytes before its central directory.")
        raise Rejection(Reason.ZIP_LAYOUT, f"{label}: its last member runs into its central directory.")


def _same_as_zipfile(zf: zipfile.ZipFile, layout: list[Entry], label: str) -> None:
    """zipfile must have read the very records checked by hand (it tolerates shifted archives; relayd does not)."""
    infos = zf.infolist()
    same = len(infos) == len(layout) and all(
        (i.filename, i.header_offset, i.CRC, i.compress_size, i.file_size)
        == (e.name, e.offset, e.crc, e.compress_size, e.file_size)
        for i, e in zip(infos, layout)
    )
    if not same:
        zf.close()
        raise Rejection(Reason.ZIP_LAYOUT, f"{label} reads differently depending on the reader.")


def check_directory(zf: zipfile.ZipFile, limits: PackageLimits, *, label: str = "the package") -> list[zipfile.ZipInfo]:
    """Refuse a hostile central directory before reading any member data.

    Checks the member count, names (absolute, ``..``, control characters...), symlinks,
    duplicates, encryption, compression method, total uncompressed size and the per-member
    compression ratio. Names that collide once extracted are :func:`check_extraction_names`'s
    job, which callers run once they can address a negative ack.
    """
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise Rejection(Reason.ZIP_TOO_MANY_MEMBERS, f"{label} has {len(infos)} members; the limit is {limits.max_members}.")
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        check_member_name(name, label=label)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise Rejection(Reason.ZIP_SYMLINK, f"{label}: member {name!r} is a symbolic link.")
        _check_entry_type(info, label)
        if name in seen:
            raise Rejection(Reason.ZIP_DUPLICATE_MEMBER, f"{label}: member {name!r} appears twice.")
        seen.add(name)
        if info.flag_bits & _ENCRYPTION_FLAGS:
            raise Rejection(Reason.ZIP_ENCRYPTED, f"{label}: member {name!r} is encrypted.")
        if info.flag_bits & ~_ALLOWED_FLAGS:
            raise Rejection(Reason.ZIP_UNSUPPORTED,
                            f"{label}: member {name!r} sets flag bits 0x{info.flag_bits & ~_ALLOWED_FLAGS:04x}, "
                            "reserved or read differently by other readers.")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Rejection(
                Reason.ZIP_UNSUPPORTED, f"{label}: member {name!r} uses compression method {info.compress_type}."
            )
        if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_compression_ratio * max(
            info.compress_size, 1
        ):
            ratio = info.file_size / max(info.compress_size, 1)
            raise Rejection(
                Reason.ZIP_BOMB_RATIO,
                f"{label}: member {name!r} would inflate {ratio:.0f} times; the limit is {limits.max_compression_ratio:.0f}.",
            )
        total += info.file_size
    if total > limits.max_total_uncompressed_bytes:
        raise Rejection(
            Reason.ZIP_UNCOMPRESSED_TOO_LARGE,
            f"{label} unpacks to {total} bytes; the limit is {limits.max_total_uncompressed_bytes}.",
        )
    return infos


def _check_entry_type(info: zipfile.ZipInfo, label: str) -> None:
    """A member is a plain file or an empty folder, and its name and attributes agree on which.

    zipfile and unzip go by the trailing ``/``; libarchive also by the mode bits and the
    MS-DOS folder attribute: a file marked as a folder is a member that one reader skips.
    """
    name = info.filename
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise Rejection(Reason.ZIP_ENTRY_TYPE, f"{label}: member {name!r} is a device, a pipe or a socket.")
    if (info.external_attr >> 16) & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX):
        # bsdtar run as root restores them: a setuid file in the commune's hands.
        raise Rejection(Reason.ZIP_ENTRY_TYPE, f"{label}: member {name!r} asks for the setuid, setgid or sticky bit.")
    marked_folder = kind == stat.S_IFDIR or bool(info.external_attr & 0x10)
    if marked_folder != info.is_dir():
        shape = "a folder under a file's name" if marked_folder else "a file under a folder's name"
        raise Rejection(Reason.ZIP_ENTRY_TYPE, f"{label}: member {name!r} is {shape}.")
    if info.is_dir() and info.file_size:
        raise Rejection(Reason.ZIP_ENTRY_TYPE, f"{label}: folder {name!r} holds {info.file_size} bytes of data.")


#: Unicode categories that no member name and no single-line envelope value may hold: controls (Cc: NUL,
#: CR, LF, and C1 such as NEL, a line break to Unicode-aware readers, or CSI, a terminal escape), invisible
#: format characters (Cf: bidi overrides, zero-width spaces, BOM), and the line and paragraph separators.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def has_unsafe_character(text: str) -> bool:
    """Whether ``text`` holds a character of :data:`UNSAFE_CATEGORIES`."""
    return any(unicodedata.category(c) in UNSAFE_CATEGORIES for c in text)


def check_member_name(name: str, *, label: str = "the package") -> None:
    """Refuse a member name that readers or file systems could take differently.

    Absolute names and ``..`` have their own codes; control and invisible characters (NUL,
    CR, bidirectional overrides...), backslashes (a separator on Windows), empty or ``.``
    parts, characters and device names that Windows cannot store, and over-long names are
    ``zip_name_invalid``.
    """
    if not name:
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: a member has an empty name.")
    shown = name.encode("unicode_escape").decode("ascii")
    if has_unsafe_character(name):
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {shown!r} holds control characters.")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise Rejection(Reason.ZIP_ABSOLUTE_PATH, f"{label}: member {name!r} is an absolute path.")
    parts = posix.removesuffix("/").split("/")
    if ".." in parts:
        raise Rejection(Reason.ZIP_PATH_TRAVERSAL, f"{label}: member {name!r} climbs out with '..'.")
    if "\\" in name:
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} holds a backslash.")
    compatible = unicodedata.normalize("NFKC", name)
    if compatible.count("/") != name.count("/") or "\\" in compatible or ".." in compatible.split("/"):
        # Full-width solidus, reverse solidus or dots: a path once a reader normalises the name.
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} becomes a path once normalised.")
    if any(part in ("", ".") for part in parts):
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} has an empty or '.' part.")
    # The inbox may be read over SMB by Windows software, which cannot hold these names as they are.
    if any(c in _WINDOWS_FORBIDDEN for c in name):
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} holds one of {_WINDOWS_FORBIDDEN}.")
    if any(part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES for part in parts):
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} is a Windows device name.")
    if any(part != part.rstrip(". ") for part in parts):
        # Windows drops them, so the name it stores is another one than the envelope lists.
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name!r} ends a part with a space or a dot.")
    if len(name.encode()) > _MAX_NAME_BYTES or any(len(p.encode()) > _MAX_COMPONENT_BYTES for p in parts):
        raise Rejection(Reason.ZIP_NAME_INVALID, f"{label}: member name {name[:80]!r}... is too long to extract.")


_WINDOWS_FORBIDDEN = '<>:"|?*'
#: Windows takes superscript digits for device numbers too (COM¹ is COM1)
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                              *(f"{d}{i}" for d in ("COM", "LPT") for i in (*"0123456789", "¹", "²", "³"))})
#: a VMS version suffix, which unzip strips by default: "a.pdf;1" is extracted as "a.pdf"
_VMS_VERSION = re.compile(r";\d+$")


def name_key(name: str) -> tuple[str, ...]:
    """The name's parts as a case-insensitive, normalising file system would store them (to find collisions)."""
    return tuple(_part_key(part) for part in name.removesuffix("/").split("/"))


def _part_key(part: str) -> str:
    # upper() first: Windows upper-cases to compare, and some letters only meet there (dotless ı is I).
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", part).upper().casefold())
    # casefold can undo normalisation (hence twice); Windows also drops trailing dots and spaces.
    return _VMS_VERSION.sub("", folded).rstrip(". ")


def check_extraction_names(names: Iterable[str], *, label: str = "the package", reserved: Iterable[str] = ()) -> None:
    """Refuse names that would collide once written to a file system.

    Two names collide when they are equal once case and Unicode normalisation are ignored
    (``zip_name_collision``; a folder spelt two ways counts too), or when one is a file and
    another needs a folder of that name, or one is a name relayd writes itself
    (``extract_collision``). Folder entries end with ``/``.
    """
    files: dict[tuple[str, ...], str] = {name_key(r): f"relayd's own {r!r}" for r in reserved}
    folders: dict[tuple[str, ...], tuple[str, ...]] = {}  # key -> the spelling first seen
    for name in names:
        raw = tuple(name.removesuffix("/").split("/"))
        key = name_key(name)
        depth = len(key) if name.endswith("/") else len(key) - 1
        for i in range(1, depth + 1):
            spelt = folders.setdefault(key[:i], raw[:i])
            if key[:i] in files:
                raise Rejection(Reason.EXTRACT_COLLISION,
                                f"{label}: {name!r} needs a folder where {files[key[:i]]} is a file.")
            if spelt != raw[:i]:
                raise Rejection(Reason.ZIP_NAME_COLLISION,
                                f"{label}: folders {'/'.join(spelt)!r} and {'/'.join(raw[:i])!r} are one once extracted.")
        if name.endswith("/"):
            continue
        if key in files:
            reason = Reason.EXTRACT_COLLISION if files[key].startswith("relayd's") else Reason.ZIP_NAME_COLLISION
            raise Rejection(reason, f"{label}: {name!r} and {files[key]} are one name once extracted.")
        if key in folders:
            raise Rejection(Reason.EXTRACT_COLLISION,
                            f"{label}: {name!r} is a file where {'/'.join(folders[key])!r} is a folder.")
        files[key] = repr(name)


def stream_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    sink: Callable[[bytes], object] | None = None,
    *,
    label: str = "the package",
) -> None:
    """Read one member in chunks, verifying its CRC and sizes; pass each chunk to ``sink``.

    The data is inflated by hand rather than through ``zipfile``, which stops quietly at the
    declared size: here the deflate stream must end exactly at the last compressed byte and
    give exactly the declared size, so no bytes hide between members for a streaming reader.
    """
    name = info.filename
    fp = zf.fp
    if fp is None:
        raise ValueError("the zip is closed")
    try:
        header = _read_at(fp, info.header_offset, 30)
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        fp.seek(info.header_offset + 30 + name_len + extra_len)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS) if info.compress_type == zipfile.ZIP_DEFLATED else None
        left, produced, crc = info.compress_size, 0, 0
        while left > 0:
            raw = fp.read(min(CHUNK, left))
            if not raw:
                raise Rejection(Reason.ZIP_INVALID, f"{label}: member {name!r} is cut short.")
            left -= len(raw)
            while raw:
                if inflater is None:
                    out, raw = raw, b""
                else:
                    if inflater.eof:
                        raise Rejection(Reason.ZIP_SIZE_MISMATCH,
                                        f"{label}: member {name!r} has bytes after the end of its compressed data.")
                    out = inflater.decompress(raw, CHUNK)
                    raw = inflater.unconsumed_tail
                produced += len(out)
                if produced > info.file_size:
                    raise Rejection(Reason.ZIP_SIZE_MISMATCH,
                                    f"{label}: member {name!r} inflates to more than the {info.file_size} bytes it declares.")
                crc = zlib.crc32(out, crc)
                if sink is not None and out:
                    sink(out)
        if inflater is not None and (not inflater.eof or inflater.unused_data):
            raise Rejection(Reason.ZIP_SIZE_MISMATCH,
                            f"{label}: member {name!r}'s compressed data does not end where its headers say.")
        if produced != info.file_size:
            raise Rejection(Reason.ZIP_SIZE_MISMATCH,
                            f"{label}: member {name!r} holds {produced} bytes, not the {info.file_size} it declares.")
    except zlib.error as exc:
        raise Rejection(Reason.ZIP_INVALID, f"{label}: member {name!r} is damaged ({exc}).") from None
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise Rejection(Reason.ZIP_INVALID, f"{label}: member {name!r} cannot be read ({exc}).") from None
    if crc != info.CRC:
        raise Rejection(Reason.ZIP_CRC_MISMATCH, f"{label}: member {name!r} fails its CRC check.")

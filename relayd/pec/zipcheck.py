"""Safe inspection of zip archives, without extracting anything blindly.

Every check works on the central directory first (cheap, refuses hostile archives before
any byte is inflated), then streams each member once to verify its CRC. Members are read
in chunks; no member is ever held whole in memory.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Callable
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
    """Open a zip, turning every structural failure into ``zip_invalid``."""
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise Rejection(Reason.ZIP_INVALID, f"{label} is not a readable zip ({exc}).") from None


def check_directory(zf: zipfile.ZipFile, limits: PackageLimits, *, label: str = "the package") -> list[zipfile.ZipInfo]:
    """Refuse a hostile central directory before reading any member data.

    Checks the member count, names (absolute, ``..``), symlinks, duplicates, encryption,
    compression method, total uncompressed size and the per-member compression ratio.
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
        if name in seen:
            raise Rejection(Reason.ZIP_DUPLICATE_MEMBER, f"{label}: member {name!r} appears twice.")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise Rejection(Reason.ZIP_ENCRYPTED, f"{label}: member {name!r} is encrypted.")
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


def check_member_name(name: str, *, label: str = "the package") -> None:
    """Refuse absolute member names and names that climb out with ``..``."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise Rejection(Reason.ZIP_ABSOLUTE_PATH, f"{label}: member {name!r} is an absolute path.")
    if ".." in PurePosixPath(posix).parts:
        raise Rejection(Reason.ZIP_PATH_TRAVERSAL, f"{label}: member {name!r} climbs out with '..'.")
    if "\x00" in name:
        raise Rejection(Reason.ZIP_PATH_TRAVERSAL, f"{label}: member name holds a NUL byte.")


def stream_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    sink: Callable[[bytes], object] | None = None,
    *,
    label: str = "the package",
) -> None:
    """Read one member in chunks, verifying its CRC; pass each chunk to ``sink``.

    zipfile stops at the declared size, so a lying header cannot inflate without bound.
    """
    try:
        with zf.open(info) as member:
            while chunk := member.read(CHUNK):
                if sink is not None:
                    sink(chunk)
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            raise Rejection(Reason.ZIP_CRC_MISMATCH, f"{label}: member {info.filename!r} fails its CRC check.") from None
        raise Rejection(Reason.ZIP_INVALID, f"{label}: member {info.filename!r} is damaged ({exc}).") from None
    except (OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise Rejection(Reason.ZIP_INVALID, f"{label}: member {info.filename!r} cannot be read ({exc}).") from None

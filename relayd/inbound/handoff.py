"""Hand a verified package over to a commune's inbox, atomically (contract 2).

Two delivery modes, per commune:

* ``zip``: the original package as ``<numero>-<demarche>.zip``;
* ``extracted``: a folder ``<numero>-<demarche>/`` with every member, each nested
  attachments zip unpacked into a sub-folder, and ``relayd.json`` describing it all.

Either appears in one rename. The business software must ignore names starting with a dot.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from relayd.config import Commune
from relayd.fsutil import TEMP_PREFIX, apply_owner_mode, publish_dir, publish_file, resolve_gid
from relayd.pec.package import SUMMARY_NAME, Package, nested_folder
from relayd.pec.zipcheck import open_zip, stream_member
from relayd.rejections import Reason, Rejection



def inbox_name(package: Package, commune: Commune) -> str:
    """The name the dossier takes in the inbox."""
    base = f"{package.numero}-{package.demarche}"
    return f"{base}.zip" if commune.delivery == "zip" else base


def hand_over(package: Package, source: Path, commune: Commune, *, received_at: str, consume: bool = False) -> Path:
    """Deliver ``source`` (the verified package file) into the commune's inbox; return the final path.

    With ``consume``, a zip delivery moves ``source`` (a rename, no copy, on one file
    system); otherwise ``source`` is left in place. If the final name already exists (a
    crash after the hand-over but before the ledger was written), it is replaced by
    identical content.
    """
    commune.inbox.mkdir(parents=True, exist_ok=True)
    final = commune.inbox / inbox_name(package, commune)
    gid = resolve_gid(commune.group)
    if commune.delivery == "zip":
        publish_file(source, final, mode=commune.mode, gid=gid, move=consume)
    else:
        _hand_over_extracted(package, source, final, commune.mode, gid, received_at)
    return final


def _dir_mode(file_mode: int) -> int:
    # A folder needs x wherever its files have r, or nobody can open them.
    return file_mode | ((file_mode & 0o444) >> 2)


def _hand_over_extracted(package: Package, source: Path, final: Path, mode: int, gid: int, received_at: str) -> None:
    tmp = final.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{final.name}.tmp"
    tmp.mkdir(mode=0o700)
    try:
        files = _extract_guarded(package, source, tmp, mode, gid)
        summary = {
            "numero": package.numero,
            "demarche": package.demarche,
            "insee": package.insee,
            "message_id": package.message_id,
            "deposited_at": package.message.aller.teledemarche.date,
            "email": package.message.aller.teledemarche.email,
            "received_at": received_at,
            "package_sha256": package.sha256,
            "files": files,
        }
        _write_file(tmp / SUMMARY_NAME, json.dumps(summary, indent=2, ensure_ascii=False).encode(), mode, gid)
        for folder in sorted({p for p in tmp.rglob("*") if p.is_dir()} | {tmp}, key=lambda p: -len(p.parts)):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                apply_owner_mode(fd, _dir_mode(mode), gid)
                os.fsync(fd)
            finally:
                os.close(fd)
        if final.exists():
            # Only a crash between hand-over and ledger leaves this; the content is the same package.
            shutil.rmtree(final)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: what the inbox's file system says when a name cannot be written as it is
_COLLISION_ERRNOS = {errno.EEXIST, errno.EISDIR, errno.ENOTDIR}
_NAME_ERRNOS = {errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL}


def _extract_guarded(package: Package, source: Path, dest: Path, mode: int, gid: int) -> list[dict[str, object]]:
    """Extract, turning a name the inbox's file system cannot hold into a refusal rather than a stranded package.

    Verification refuses colliding names already (``check_extracted_tree``); this catches what
    only this file system knows (a case-insensitive mount, a shorter name limit). A refusal
    quarantines the package and answers the platform; other errors (disk full) stay retryable.
    """
    try:
        return _extract_all(package, source, dest, mode, gid)
    except OSError as exc:
        if exc.errno in _COLLISION_ERRNOS:
            raise Rejection(Reason.EXTRACT_COLLISION,
                            f"two members collide once extracted in the inbox ({errno.errorcode[exc.errno]}).") from None
        if exc.errno in _NAME_ERRNOS:
            raise Rejection(Reason.ZIP_NAME_INVALID,
                            f"the inbox cannot hold a member's name ({errno.errorcode[exc.errno]}).") from None
        raise


def _extract_all(package: Package, source: Path, dest: Path, mode: int, gid: int) -> list[dict[str, object]]:
    """Write every member (nested zips unpacked) under ``dest``; return the file list for relayd.json."""
    files: list[dict[str, object]] = []
    digests = {m.name: m for m in package.members}
    with open_zip(source) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if info.filename in package.nested:
                sub = dest / nested_folder(info.filename)
                sub.mkdir(mode=0o700)
                # A nested zip must be seekable: spool it, anonymously, on the inbox's own disk.
                with tempfile.TemporaryFile(dir=dest) as spool:
                    stream_member(zf, info, spool.write)
                    spool.seek(0)
                    with open_zip(spool) as inner:
                        for nested in package.nested[info.filename]:
                            target = _safe_join(sub, nested.name)
                            _stream_to(inner, inner.getinfo(nested.name), target, mode, gid)
                            files.append(_entry(target, dest, nested.size, nested.sha256, "attachment"))
                continue
            target = _safe_join(dest, info.filename)
            _stream_to(zf, info, target, mode, gid)
            member = digests[info.filename]
            files.append(_entry(target, dest, member.size, member.sha256, _role(package, info.filename)))
    return files


def _role(package: Package, name: str) -> str:
    if name == "message.xml":
        return "envelope"
    if name in {d.form.data_file for d in package.message.aller.documents}:
        return "document"
    if name in {p.file for p in package.message.aller.attachments}:
        return "attachment"
    return "header"


def _entry(target: Path, root: Path, size: int, sha256: str, role: str) -> dict[str, object]:
    return {"path": target.relative_to(root).as_posix(), "size": size, "sha256": sha256, "role": role}


def _safe_join(root: Path, member: str) -> Path:
    """Place a member under ``root``; names were checked already, this is the belt to those braces."""
    target = (root / PurePosixPath(member.replace("\\", "/"))).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ValueError(f"member {member!r} escapes its folder")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return target


def _stream_to(zf, info, target: Path, mode: int, gid: int) -> None:
    with _new_file(target, mode, gid) as out:
        stream_member(zf, info, out.write)


def _write_file(path: Path, data: bytes, mode: int, gid: int) -> None:
    with _new_file(path, mode, gid) as out:
        out.write(data)


@contextmanager
def _new_file(path: Path, mode: int, gid: int) -> Iterator[BinaryIO]:
    """A file that must not exist yet; on success it is flushed, given its mode and group, and fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        yield out
        out.flush()
        apply_owner_mode(out.fileno(), mode, gid)
        os.fsync(out.fileno())

"""Durable, atomic file operations: what "handed over" and "archived" mean on disk.

A reader of a destination folder never sees a half-written file or folder: everything is
written under a dot-prefixed temporary name in the destination itself, fsynced, renamed
into place, and the folder is fsynced. This works across mounts (copy, then rename inside
the destination), so staging, archive and inboxes may live on different file systems.
"""

from __future__ import annotations

import errno
import grp
import os
import shutil
import uuid
from pathlib import Path

TEMP_PREFIX = ".relayd-"


def temp_name(final_name: str) -> str:
    """A hidden temporary name beside ``final_name``; business software must ignore dotfiles."""
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{final_name}.tmp"


def shown_name(name: str) -> str:
    """A file name someone else chose, as text that JSON, the ledger and the log can hold.

    A name that is not UTF-8 (Latin-1 "reçu.xml") reaches Python with surrogates, which no
    UTF-8 encoder takes; its other bytes are shown as ``\\xNN``.
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def fsync_dir(path: Path) -> None:
    """Make a rename or a creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_gid(group: str | None) -> int:
    """The numeric id of ``group``, or -1 (leave unchanged) when none is configured."""
    if group is None:
        return -1
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def apply_owner_mode(fd: int, mode: int, gid: int) -> None:
    """Force mode and group on an open file: never what a client asked for."""
    if gid != -1:
        os.fchown(fd, -1, gid)
    os.fchmod(fd, mode)


def copy_durably(src: Path, dest: Path, *, mode: int = 0o600, gid: int = -1) -> None:
    """Copy ``src`` to a new file ``dest`` (which must not exist), fsynced, with mode and group forced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(dest, flags, 0o600)
    try:
        with open(src, "rb") as fsrc:
            _copy_fd(fsrc.fileno(), fd)
        apply_owner_mode(fd, mode, gid)
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_fd(src: int, dst: int) -> None:
    """Copy a whole file between descriptors, in the kernel where it can (no trip through Python)."""
    remaining = os.fstat(src).st_size
    try:
        while remaining > 0:
            done = os.copy_file_range(src, dst, min(remaining, 1 << 30))
            if done == 0:
                break
            remaining -= done
        if remaining == 0:
            return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    # A file system without copy_file_range: fall back to plain reads and writes from where it stopped.
    offset = os.lseek(dst, 0, os.SEEK_CUR)
    os.lseek(src, offset, os.SEEK_SET)
    with os.fdopen(os.dup(src), "rb") as fsrc, os.fdopen(os.dup(dst), "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 1024 * 1024)


#: ioctl FICLONE (linux/fs.h): share the source's blocks copy-on-write, on file systems that offer it
_FICLONE = 0x40049409


def _clone_or_copy(src: Path, dest: Path) -> None:
    """A new file ``dest`` with ``src``'s content on its own inode: a reflink where offered, else a kernel copy."""
    import fcntl

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    with open(src, "rb") as fsrc:
        fd = os.open(dest, flags, 0o600)
        try:
            try:
                fcntl.ioctl(fd, _FICLONE, fsrc.fileno())
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS,
                                     errno.EBADF, errno.EPERM):
                    raise
                _copy_fd(fsrc.fileno(), fd)
            os.fchmod(fd, 0o600)
            os.fsync(fd)
            # An archive copy is not read in the normal course: once on disk, its pages need not stay
            # cached, where they would push out what is read (the inboxes, the ledger).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def clone_or_copy(src: Path, dest: Path) -> None:
    """Write a new file ``dest`` (which must not exist) with ``src``'s content on an inode of its own, fsynced, uncached."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _clone_or_copy(src, dest)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def publish_file(src: Path, dest: Path, *, mode: int = 0o600, gid: int = -1, move: bool = False) -> None:
    """Make ``dest`` appear atomically with the content of ``src``.

    With ``move``, ``src`` is renamed when it sits on the same file system (no copy) and
    removed after a copy otherwise.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if move:
        try:
            fd = os.open(src, os.O_RDONLY)
            try:
                apply_owner_mode(fd, mode, gid)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(src, dest)
            fsync_dir(dest.parent)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    tmp = dest.parent / temp_name(dest.name)
    try:
        copy_durably(src, tmp, mode=mode, gid=gid)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    if move:
        src.unlink()


def publish_dir(tmp_dir: Path, dest: Path) -> None:
    """Rename a fully written (and fsynced) folder into place, then make that durable."""
    os.rename(tmp_dir, dest)
    fsync_dir(dest.parent)


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create a folder (and parents) if needed; return it."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


def share_dir(path: Path, gid: int) -> Path:
    """Create a folder that relayd and the business software's group both write: group-owned, setgid, 2770.

    setgid makes what either side creates inside belong to the group, so each can take the other's files.
    """
    ensure_dir(path, 0o2770)
    os.chown(path, -1, gid)
    os.chmod(path, 0o2770)
    return path


def write_durably(dest: Path, data: bytes, *, mode: int = 0o600, gid: int = -1) -> None:
    """Make ``dest`` appear atomically holding ``data``: hidden temp name, fsync, rename, fsync the folder."""
    tmp = dest.parent / temp_name(dest.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        apply_owner_mode(fd, mode, gid)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)

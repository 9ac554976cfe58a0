"""Read and take files from a return directory without trusting what the name points to.

The business software (or whoever can write its return directory) controls every name
there. relayd opens each file once, without following a link, and judges what it holds by
``fstat`` on that descriptor: only a regular file with a single link is read. A link would
send the platform a file of relayd's choosing, and a hard link's inode belongs to someone
else too. relayd never changes the mode or owner of a file it did not create: it copies
what it took into its own storage, then removes the name it took it from.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relayd.fsutil import fsync_dir, write_durably
from relayd.rejections import Reason, Rejection

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class TakenFile:
    """A regular, single-link file of a return directory, read through one descriptor."""

    path: Path
    data: bytes
    device: int
    inode: int


def read_regular(path: Path, *, limit: int, too_large: Callable[[int], Rejection], what: str = "the drop") -> TakenFile:
    """Read ``path`` whole (at most ``limit`` bytes) if it is a regular file with one link; refuse otherwise.

    Raises :class:`FileNotFoundError` when the name is gone, and ``too_large(size)`` when
    the file is larger than ``limit``.
    """
    # Not even opened unless the name is a plain file: opening a device or a pipe can have effects of its own.
    if not stat.S_ISREG(os.lstat(path).st_mode):
        kind = "a symbolic link" if path.is_symlink() else "not a regular file"
        raise Rejection(Reason.DROP_NOT_REGULAR, f"{what} {path.name!r} is {kind}.")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Rejection(Reason.DROP_NOT_REGULAR, f"{what} {path.name!r} is a symbolic link.") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Rejection(Reason.DROP_NOT_REGULAR, f"{what} {path.name!r} is not a regular file.")
        if st.st_nlink != 1:
            raise Rejection(Reason.DROP_HARD_LINK,
                            f"{what} {path.name!r} has {st.st_nlink} names (a hard link): its content is not the drop's own.")
        if st.st_size > limit:
            raise too_large(st.st_size)
        os.set_blocking(fd, True)
        chunks = []
        total = 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if total > limit:  # grew since fstat
                raise too_large(total)
            chunks.append(chunk)
        return TakenFile(path, b"".join(chunks), st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def take(taken: TakenFile, dest: Path, *, mode: int, gid: int = -1) -> None:
    """Store a copy of what was read at ``dest`` (relayd's own file, mode and group forced), then drop the name.

    The name is removed only if it still holds the inode that was read: a file put there
    since is left for the next scan.
    """
    write_durably(dest, taken.data, mode=mode, gid=gid)
    try:
        now = os.lstat(taken.path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (taken.device, taken.inode):
        taken.path.unlink()
        fsync_dir(taken.path.parent)


def set_aside_name(path: Path, dest: Path) -> bool:
    """Move a name relayd refused to read (a link, a hard link, a device) beside its reason, touching no inode.

    A rename moves the name only: the file it points to keeps its content, mode and owner.
    Across file systems the name is just removed, since it holds nothing of its own. Returns
    whether the name was moved.
    """
    try:
        os.rename(path, dest)  # the stamped name is new: nothing is replaced
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return False
    fsync_dir(dest.parent)
    fsync_dir(path.parent)
    return True

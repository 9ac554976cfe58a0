"""Where the bytes of an upload live while it is written: one private file per open handle.

Each open for writing creates a fresh file in a hidden folder of the account's drop folder
(:data:`AREA_NAME`, never reachable by a client path). No other handle, in this session or
any other, in this process or another, shares that inode. At the handle's close the file is
either committed (moved out of the area to intake) or, under a temporary name, given a
second link at the visible name in the drop folder, the private link staying in the area as
the closing session's own claim on it. A commit always first *claims* a file, by an atomic
rename into the area under a fresh name: of two sessions committing one inode, only one
claim succeeds, and no open descriptor can reach what is claimed.

What maps a visible name to a file lives on disk (the drop folder and this area), so that
several worker processes can serve one account.
"""

from __future__ import annotations

import bisect
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

import structlog

log = structlog.get_logger("relayd.sftp")

#: the hidden folder inside each drop folder; no client path may name it
AREA_NAME = ".relayd-uploads"


def is_reserved(name: str) -> bool:
    """Whether a client-visible name would collide with the hidden area."""
    return name.lower() == AREA_NAME


class UploadArea:
    """The private files of one drop folder."""

    def __init__(self, drop: Path):
        self.drop = drop
        self.path = drop / AREA_NAME

    def create(self) -> tuple[int, Path]:
        """A new, empty, private file (mode 0600), open for writing."""
        private = self.path / f"w-{uuid.uuid4().hex}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        fd = self._in_area(lambda: os.open(private, flags, 0o600))
        return fd, private

    def tidy(self) -> None:
        """Remove the area once it is empty, so that an idle drop folder holds nothing of relayd's."""
        try:
            self.path.rmdir()
        except OSError:
            pass  # another session's upload is in it, or it is gone already

    def _in_area(self, operation):
        """Run ``operation``, which creates a name in the area, making the area first (again, if a tidy raced)."""
        for _ in range(3):
            self.path.mkdir(mode=0o700, exist_ok=True)
            if not stat.S_ISDIR(os.lstat(self.path).st_mode):
                # Planted by someone on the host (a link out of the drop folder): never write through it.
                raise PermissionError(errno.EPERM, "the upload area is not a folder")
            try:
                return operation()
            except FileNotFoundError:
                if self.path.is_dir():
                    raise
        return operation()

    def publish(self, private: Path, visible: Path) -> None:
        """Give ``private`` the visible name too (replacing what held it), keeping the private link."""
        spare = self.path / f"l-{uuid.uuid4().hex}"
        os.link(private, spare)  # the private link lives in the area, so the area exists
        try:
            os.rename(spare, visible)
        except OSError:
            spare.unlink(missing_ok=True)
            raise

    def claim(self, source: Path) -> Path:
        """Take ``source`` (private or visible) for a commit, atomically; then drop its other links here.

        Raises FileNotFoundError when another session claimed it first.
        """
        claimed = self.path / f"c-{uuid.uuid4().hex}"
        self._in_area(lambda: os.rename(source, claimed))
        st = os.lstat(claimed)
        if st.st_nlink > 1:
            # The closing session's private link (or the visible one): a committed file keeps no other name.
            for other in (self.drop / n for n in os.listdir(self.drop)), self.path.iterdir():
                for entry in other:
                    if entry != claimed and same_file(entry, st):
                        entry.unlink(missing_ok=True)
        return claimed

    def discard_leftovers(self, account: str) -> None:
        """Remove what a previous run left in the area (start-up only: no session is open)."""
        if self.path.is_symlink():
            self.path.unlink()  # never followed: what it points to is not relayd's
            return
        if not self.path.is_dir():
            return
        for leftover in self.path.iterdir():
            log.warning("startup.partial_removed", account=account, upload=leftover.name, size=leftover.lstat().st_size)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def same_file(path: Path, st: os.stat_result) -> bool:
    """Whether ``path`` names the inode ``st`` describes (False when it is gone)."""
    try:
        other = os.lstat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def copy_into(src: Path, fd: int, limit: int) -> int:
    """Copy ``src`` into the empty file ``fd`` (a resumed upload starts from its own copy); return its size."""
    with open(src, "rb") as fsrc:
        size = os.fstat(fsrc.fileno()).st_size
        if size > limit:
            raise OSError(errno.EFBIG, "file too large")
        copied = 0
        while copied < size:
            try:
                n = os.copy_file_range(fsrc.fileno(), fd, size - copied, copied, copied)
            except OSError:
                n = os.pwrite(fd, os.pread(fsrc.fileno(), min(1 << 20, size - copied), copied), copied)
            if n == 0:
                break
            copied += n
    return copied


class Extents:
    """Which byte ranges of a file have been written, to refuse holes.

    Writes may arrive out of order within a window (pipelining clients keep many requests
    outstanding), so the ranges are merged as they come; the file is whole when one range
    runs from 0 to its end.
    """

    __slots__ = ("_starts", "_ends")

    def __init__(self, size: int = 0):
        self._starts: list[int] = [0] if size else []
        self._ends: list[int] = [size] if size else []

    @property
    def filled(self) -> int:
        """The end of the unbroken run of bytes from offset 0."""
        return self._ends[0] if self._starts and self._starts[0] == 0 else 0

    @property
    def size(self) -> int:
        """The file's size: the end of the last range."""
        return self._ends[-1] if self._ends else 0

    @property
    def pieces(self) -> int:
        """How many separate ranges there are (1 for a whole file)."""
        return len(self._starts)

    def whole(self) -> bool:
        """Whether every byte from 0 to the end was written."""
        return self.pieces <= 1 and self.filled == self.size

    def add(self, start: int, end: int) -> None:
        """Record that ``[start, end)`` was written."""
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)  # first range that ends at or after start
        j = bisect.bisect_right(self._starts, end)  # ranges before j start at or before end
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

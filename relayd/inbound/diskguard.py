"""The disk guard: refuse new uploads while any file system relayd writes to runs short.

relayd writes under the storage root (staging, the outbox, the archive, quarantine, the drop
folders) and into each commune's inbox, return and rejected folders, any of which may be a
file system of its own. Free space is measured per file system (``f_bavail * f_frsize`` of
``os.statvfs``). While any is below ``limits.min_free_bytes``, opening a file for upload is
refused, and an upload already open gets the same error on its next write, with the SFTP
message ``refused (disk_low): ...``. Files already committed are never touched: a package
whose upload is complete still goes through intake (which keeps it staged and tries again
if the hand-over finds no space).

The check on the upload path costs a clock read: the result is kept for about a second. As a
daemon part (``diskguard``), the guard also looks every 30 s, so that a disk running short
with nobody uploading is noticed; each change, from wherever it is seen, is logged
(``disk.low``, ``disk.ok``) and published once as :class:`relayd.events.DiskLow`, naming the
folders short of space (or those that recovered).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from relayd.config import Config
from relayd.events import NO_EVENTS, DiskLow, Events
from relayd.rejections import Reason, Rejection

log = structlog.get_logger("relayd.disk")

#: how long a statvfs result is trusted on the upload path
CACHE_SECONDS = 1.0
#: how often the part looks by itself
CHECK_SECONDS = 30.0


def free_bytes(path: Path) -> int:
    """Bytes free under ``path`` for an unprivileged writer."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def watched_folders(config: Config) -> list[Path]:
    """Every folder relayd writes to, storage first; each file system is measured once, through the first named."""
    storage = config.storage
    folders = [storage.root, storage.staging, storage.outbox, storage.archive, storage.quarantine, storage.drop]
    folders += [config.drop_dir(account) for account in config.accounts]
    for commune in config.communes:
        folders += [commune.inbox] + ([commune.returns, commune.rejected_dir] if commune.returns is not None else [])
    return folders


def _existing(path: Path) -> Path:
    # A folder not created yet lives, for now, on its nearest existing parent's file system.
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def measure(folders: list[Path]) -> dict[Path, int]:
    """Free bytes per file system, keyed by the first of ``folders`` on it. Raises OSError."""
    seen: dict[int, Path] = {}
    free: dict[Path, int] = {}
    for folder in folders:
        where = _existing(folder)
        device = os.stat(where).st_dev
        if device in seen:
            continue
        seen[device] = folder
        free[folder] = free_bytes(where)
    return free


class DiskGuard:
    """Watches free space on every file system relayd writes to; refuses uploads while one is short.

    ``config`` is called at each use, so a reload applies at once. ``refusal`` may be called
    on the event loop; ``check`` from any thread.
    """

    name = "diskguard"

    def __init__(self, config: Callable[[], Config], events: Events = NO_EVENTS, *,
                 clock: Callable[[], float] = time.monotonic, cache_seconds: float = CACHE_SECONDS,
                 check_seconds: float = CHECK_SECONDS):
        self._config = config
        self._events = events
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._check_seconds = check_seconds
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._short: tuple[Path, ...] = ()
        self._failed = False
        self._wake = asyncio.Event()

    @property
    def low(self) -> bool:
        """Whether some file system was below the threshold at the last check."""
        return bool(self._short)

    @property
    def short(self) -> tuple[Path, ...]:
        """The folders (one per file system) below the threshold at the last check."""
        return self._short

    def refusal(self) -> Rejection | None:
        """The refusal for a new upload or write now, or None; re-checks at most once per ``cache_seconds``."""
        checked = self._checked_at
        if checked is None or self._clock() - checked >= self._cache_seconds:
            self.check()
        short = self._short
        if not short:
            return None
        return Rejection(Reason.DISK_LOW, f"free space under {short[0]} is below limits.min_free_bytes.")

    def check(self) -> bool:
        """Look at the free space now; log and publish a change. Returns whether some file system is low."""
        config = self._config()
        threshold = config.limits.min_free_bytes
        try:
            free = measure(watched_folders(config))
        except OSError as exc:
            # Storage that cannot be looked at is an operator's matter; it is not taken for a full disk.
            with self._lock:
                self._checked_at = self._clock()
                first, self._failed = not self._failed, True
            if first:
                log.error("disk.check_failed", path=exc.filename, error=exc.strerror)
            return self.low
        short = tuple(folder for folder, left in free.items() if left < threshold)
        with self._lock:
            self._checked_at = self._clock()
            self._failed = False
            before, self._short = self._short, short
        if set(short) != set(before):
            if short:
                least = min(free[f] for f in short)
                log.error("disk.low", path=", ".join(map(str, short)), free_bytes=least, threshold_bytes=threshold,
                          effect="uploads are refused until space is freed")
                self._events.publish(DiskLow(low=True, free_bytes=least, threshold_bytes=threshold,
                                             path=", ".join(map(str, short))))
            else:
                cleared = ", ".join(map(str, before))
                now_free = min((free[f] for f in before if f in free), default=min(free.values(), default=0))
                log.info("disk.ok", path=cleared, free_bytes=now_free, threshold_bytes=threshold)
                self._events.publish(DiskLow(low=False, free_bytes=now_free, threshold_bytes=threshold, path=cleared))
        return bool(short)

    async def run(self) -> None:
        """Check every ``check_seconds`` (at once after a reload) until cancelled."""
        while True:
            await asyncio.to_thread(self.check)
            self._wake.clear()
            try:
                async with asyncio.timeout(self._check_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def reconfigure(self, config: Config) -> None:
        """The threshold may have changed: look again now (the configuration itself is read at each use)."""
        self._checked_at = None
        self._wake.set()

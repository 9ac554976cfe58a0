"""The disk guard: uploads are refused while free space under the storage root runs short.

Free space is what an unprivileged writer may use (``f_bavail * f_frsize`` of
``os.statvfs(storage.root)``). While it is below ``limits.min_free_bytes``, opening a file
for upload is refused, and an upload already open gets the same error on its next write,
with the SFTP message ``refused (disk_low): ...``. Files already committed are never
touched: a package whose upload is complete still goes through intake.

The check on the upload path costs a clock read: the ``statvfs`` result is kept for about a
second. As a daemon part (``diskguard``), the guard also looks every 30 s, so that a disk
running short with nobody uploading is noticed; each change, from wherever it is seen, is
logged (``disk.low``, ``disk.ok``) and published once as :class:`relayd.events.DiskLow`.
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


class DiskGuard:
    """Watches free space under the storage root; refuses uploads while it is short.

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
        self._low = False
        self._failed = False
        self._wake = asyncio.Event()

    @property
    def low(self) -> bool:
        """Whether free space was below the threshold at the last check."""
        return self._low

    def refusal(self) -> Rejection | None:
        """The refusal for a new upload or write now, or None; re-checks at most once per ``cache_seconds``."""
        checked = self._checked_at
        if checked is None or self._clock() - checked >= self._cache_seconds:
            self.check()
        if not self._low:
            return None
        return Rejection(Reason.DISK_LOW, "free space under the storage root is below limits.min_free_bytes.")

    def check(self) -> bool:
        """Look at the free space now; log and publish a change. Returns whether it is low."""
        config = self._config()
        root = config.storage.root
        threshold = config.limits.min_free_bytes
        try:
            free = free_bytes(root)
        except OSError as exc:
            # Storage that cannot be looked at is an operator's matter; it is not taken for a full disk.
            with self._lock:
                self._checked_at = self._clock()
                first, self._failed = not self._failed, True
            if first:
                log.error("disk.check_failed", path=str(root), error=exc.strerror)
            return self._low
        low = free < threshold
        with self._lock:
            self._checked_at = self._clock()
            self._failed = False
            changed, self._low = low != self._low, low
        if changed:
            event = DiskLow(low=low, free_bytes=free, threshold_bytes=threshold, path=str(root))
            if low:
                log.error("disk.low", path=str(root), free_bytes=free, threshold_bytes=threshold,
                          effect="uploads are refused until space is freed")
            else:
                log.info("disk.ok", path=str(root), free_bytes=free, threshold_bytes=threshold)
            self._events.publish(event)
        return low

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

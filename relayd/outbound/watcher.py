"""Find complete drops in the communes' return directories.

The drop contract: the business software writes a file under a hidden or temporary name
and renames it into the return directory. A file that appears by rename is complete at
once. A file written in place is taken once it has not changed (size, mtime, inode) for
``settle_seconds``. File-system events (watchdog) are only hints that wake the watcher
early: the truth is a scan of each directory, done at start-up, after each hint and every
``rescan_seconds``, so nothing is missed when the kernel's event queue overflows.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = structlog.get_logger("relayd.watcher")

#: names that are still being written, whatever the business software's habit
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".swp", "~")
#: what a drop is: a status file, or a zip (a status file with attachments, or a PEC return package)
DROP_SUFFIXES = (".xml", ".zip")


def is_drop_name(name: str) -> bool:
    """Whether a file name can be a drop (and not a temporary name or an attachment waiting beside one)."""
    lower = name.lower()
    return not name.startswith(".") and not lower.endswith(TEMPORARY_SUFFIXES) and lower.endswith(DROP_SUFFIXES)


@dataclass
class _Seen:
    signature: tuple[int, int, int]
    since: float
    complete: bool = False


class DropWatcher:
    """Hand out complete drops, oldest first, each once until it changes or is released."""

    def __init__(self, directories: Sequence[Path], *, settle_seconds: float, rescan_seconds: float,
                 stray_after_seconds: float = 3600.0):
        self.directories = [Path(d) for d in directories]
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        #: a file that is no drop and has sat this long is reported once (an orphan attachment, a typo)
        self.stray_after_seconds = stray_after_seconds
        self._strays: dict[Path, tuple[float, bool]] = {}
        self._seen: dict[Path, _Seen] = {}
        self._offered: dict[Path, tuple[int, int, int]] = {}
        self._renamed_in: set[Path] = set()
        self._not_before: dict[Path, float] = {}
        self._hint = asyncio.Event()
        self._observer: Observer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start watching. Call from the event loop; the directories must exist."""
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        handler = _Hints(self)
        for directory in self.directories:
            observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def set_directories(self, directories: Sequence[Path]) -> None:
        """Watch these directories from now on (a reload added or removed a commune); a scan follows at once."""
        self.stop()
        self.directories = [Path(d) for d in directories]
        watched = set(self.directories)
        # Forget files of directories no longer watched: they are the business software's again.
        for table in (self._seen, self._offered, self._not_before, self._strays):
            for path in [p for p in table if p.parent not in watched]:
                del table[path]
        self._renamed_in = {p for p in self._renamed_in if p.parent in watched}
        self.start()
        self._hint.set()

    def stop(self) -> None:
        """Stop watching."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # -- what the returns loop uses --------------------------------------------------

    async def next_batch(self) -> list[Path]:
        """Wait until at least one drop is complete; return every complete drop, oldest first."""
        while True:
            self._hint.clear()
            ready, wait = await asyncio.to_thread(self._scan)
            if ready:
                return ready
            try:
                async with asyncio.timeout(wait):  # not wait_for, which can swallow a cancellation on 3.11
                    await self._hint.wait()
            except TimeoutError:
                pass
            # Let a burst of events land before scanning again.
            await asyncio.sleep(0.05)

    def release(self, path: Path, *, after: float) -> None:
        """Offer ``path`` again, no sooner than ``after`` seconds from now (its processing was deferred)."""
        self._offered.pop(path, None)
        self._not_before[path] = time.monotonic() + after

    def waiting_in(self, directory: Path, besides: Path) -> bool:
        """Whether another drop in ``directory`` is seen but not yet handed out (still settling)."""
        return any(p.parent == directory and p != besides and p not in self._offered for p in self._seen)

    # -- internals -------------------------------------------------------------------

    def hint(self, path: Path | None, *, renamed_in: bool = False) -> None:
        """A file-system event (any thread): wake the scan, and remember a rename into place."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._on_hint, path, renamed_in)

    def _on_hint(self, path: Path | None, renamed_in: bool) -> None:
        if renamed_in and path is not None:
            self._renamed_in.add(path)
        self._hint.set()

    def _scan(self) -> tuple[list[Path], float]:
        """List every directory; return the complete drops and how long to wait for the rest."""
        now = time.monotonic()
        present: set[Path] = set()
        ready: list[tuple[int, str, Path]] = []
        wait = self.rescan_seconds
        for directory in self.directories:
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                log.error("watcher.scan_failed", directory=str(directory), error=exc.strerror)
                continue
            for item in entries:
                if not is_drop_name(item.name):
                    self._note_stray(Path(item.path), item.name, now, present)
                    continue
                try:
                    # Links and other non-regular files are drops too: returns refuses them with a reason,
                    # rather than leaving them unexplained. Only folders are not drops.
                    if item.is_dir(follow_symlinks=False):
                        continue
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                path = Path(item.path)
                present.add(path)
                signature = (st.st_size, st.st_mtime_ns, st.st_ino)
                seen = self._seen.get(path)
                if seen is None or seen.signature != signature:
                    seen = self._seen[path] = _Seen(signature, now)
                if path in self._renamed_in:
                    self._renamed_in.discard(path)
                    seen.complete = True
                if self._offered.get(path) == signature:
                    continue
                not_before = self._not_before.get(path, 0.0)
                if now < not_before:
                    wait = min(wait, not_before - now)
                    continue
                self._not_before.pop(path, None)
                settled = now - seen.since
                if seen.complete or settled >= self.settle_seconds:
                    ready.append((st.st_mtime_ns, item.name, path))
                else:
                    wait = min(wait, self.settle_seconds - settled)
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)
            self._offered.pop(gone, None)
            self._not_before.pop(gone, None)
        self._renamed_in &= present
        for gone in set(self._strays) - present:
            del self._strays[gone]
        ready.sort()
        for _, _, path in ready:
            self._offered[path] = self._seen[path].signature
        return [path for _, _, path in ready], max(wait, 0.05)


    def _note_stray(self, path: Path, name: str, now: float, present: set[Path]) -> None:
        """Say once, after a while, that a file in a return directory will never be taken."""
        if name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES):
            return  # still being written, by the contract
        present.add(path)
        first_seen, reported = self._strays.setdefault(path, (now, False))
        if not reported and now - first_seen >= self.stray_after_seconds:
            self._strays[path] = (first_seen, True)
            log.warning("watcher.stray_file", file=str(path),
                        hint="only *.xml and *.zip are drops; an attachment waits for the status file that names it")


class _Hints(FileSystemEventHandler):
    """Turn watchdog's events into hints; runs in watchdog's thread."""

    def __init__(self, watcher: DropWatcher):
        self.watcher = watcher

    def on_moved(self, event: FileSystemEvent) -> None:
        self.watcher.hint(Path(os.fsdecode(event.dest_path)), renamed_in=True)

    def on_created(self, event: FileSystemEvent) -> None:
        self.watcher.hint(None)

    def on_modified(self, event: FileSystemEvent) -> None:
        self.watcher.hint(None)

    def on_closed(self, event: FileSystemEvent) -> None:
        self.watcher.hint(None)

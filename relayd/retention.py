"""Retention: what holds personal data is kept for a configured period, then removed.

Files (their age is their modification time; a file and the ``.reason.json`` that explains
it go together, when the younger of the two has passed the period):

* ``retention.archive_days``: everything under ``storage.archive``, i.e. the archived packages
  (``archive/YYYY/MM/``), the replies sent to the platform (``archive/sent/YYYY/MM/``) and the
  return drops taken from the business software (``archive/returns/YYYY/MM/``);
* ``retention.quarantine_days``: refused packages and their reasons under ``storage.quarantine``,
  and refused return drops in each commune's ``rejected`` folder.

A file that an outbox entry still pending or in dead-letter names is never removed, wherever it
is; nor is the archived package of an open dossier whose routing the ledger lacks (its returns
are addressed from it). ``storage.outbox``, staging and the inboxes are never touched.

In the ledger, a dossier closed more than ``retention.scrub_after_close_days`` ago (counted
from ``dossiers.updated_at``, when its state became ``clos``) is scrubbed. The person's data (name, address, e-mail, the MotDePasse)
lives in the packages, never in the ledger; what the ledger holds that may still name or
describe someone is what others chose (file names given by the platform's sender or by the
business software), free text (refusal explanations, which may quote content; event details,
which may carry a refused drop's comment or the agents' addresses a mail went to) and the
copy of the envelope's routing. So, for each such dossier:

* ``dossiers``: ``routing`` goes (``clos`` is final: no return will be addressed from it again);
* ``packages`` of the dossier: ``upload_name`` and ``detail`` go, and a refused package's
  ``location`` (its quarantine name embeds the uploaded name);
* ``events`` of the dossier: ``detail`` goes; the kind and time of every step stay, so the
  history still reads received → recu → clos;
* ``outbox`` entries of the dossier that are settled (delivered or purged): ``source`` (the
  drop's file name) and ``last_error`` go.

What stays is the *reference*: number, démarche, INSEE code, state and dates (deposited,
received, updated), the MessageId and sha256 of the package, so that a late resend of the same
package is still recognised and not handed over twice, and the paths relayd built from that
reference alone (``inbox_path``, ``archive_path``, an accepted package's ``location``, outbox
``payload``): they say nothing the reference does not, intake reads ``location`` when a package
comes again, and the files they name follow ``archive_days``. The platform account and peer
address of a transfer (the platform's, not the citizen's) stay as the transfer record. The
dossier then gets ``scrubbed_at`` and is never scrubbed again.

A refused package's row, whatever its dossier, loses ``upload_name``, ``detail`` and
``location`` once ``quarantine_days`` have passed, as its quarantined file does, and its
"rejected" event loses its detail.

The mail spool (``mail`` table) is left alone: a mail's row goes once it is sent or given up.

What was removed is recorded as ledger events and log lines that carry counts, never names.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from relayd import dossiers
from relayd.clock import SYSTEM_CLOCK, Clock
from relayd.config import Config
from relayd.ledger import Ledger

log = structlog.get_logger("relayd.retention")

REASON_SUFFIX = ".reason.json"
#: refused drops and their companions share the stamp ``returns`` gives them: one group
_DROP_STAMP = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}-")
#: the first purge waits this long after start, so that it never competes with start-up recovery
FIRST_RUN_SECONDS = 10.0

#: the areas a file can be removed from, in the order they are reported
AREAS = ("packages", "sent", "returns", "quarantine", "rejected")


@dataclass
class RetentionResult:
    """What one purge removed (or, with ``dry_run``, would remove)."""

    now: datetime
    dry_run: bool
    #: removed files, by area (see :data:`AREAS`)
    removed: dict[str, list[Path]] = field(default_factory=lambda: {area: [] for area in AREAS})
    removed_bytes: int = 0
    #: old enough, but kept because an outbox entry or an open dossier still needs them
    kept: list[Path] = field(default_factory=list)
    #: closed dossiers whose personal data left the ledger
    scrubbed: list[str] = field(default_factory=list)
    #: refused package rows whose upload name, detail and location were cleared
    rejections_cleared: int = 0
    #: files that could not be removed, with why
    errors: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        """How many files were removed."""
        return sum(len(paths) for paths in self.removed.values())

    def counts(self) -> dict[str, int]:
        """Numbers only, for logs and ledger events: never a name."""
        return {**{area: len(paths) for area, paths in self.removed.items()}, "bytes": self.removed_bytes,
                "kept_in_use": len(self.kept), "scrubbed": len(self.scrubbed),
                "rejections_cleared": self.rejections_cleared, "errors": len(self.errors)}

    def as_dict(self) -> dict[str, Any]:
        """The result as ``relayd retention --json`` prints it."""
        return {
            "now": self.now.isoformat(timespec="seconds"),
            "dry_run": self.dry_run,
            "removed": {area: [str(p) for p in paths] for area, paths in self.removed.items()},
            "removed_bytes": self.removed_bytes,
            "kept_in_use": [str(p) for p in self.kept],
            "scrubbed": self.scrubbed,
            "rejections_cleared": self.rejections_cleared,
            "errors": self.errors,
        }


def purge(config: Config, ledger: Ledger, now: datetime, dry_run: bool = False) -> RetentionResult:
    """Remove what has outlived its retention period, as of ``now``; with ``dry_run``, only say what."""
    now = now.astimezone(UTC) if now.tzinfo is not None else now.replace(tzinfo=UTC)
    result = RetentionResult(now=now, dry_run=dry_run)
    retention = config.retention
    protected = _in_use(ledger)
    archive_cutoff = (now - timedelta(days=retention.archive_days)).timestamp()
    quarantine_cutoff = (now - timedelta(days=retention.quarantine_days)).timestamp()
    storage = config.storage
    _purge_tree(storage.archive, archive_cutoff, protected, result, area_of=lambda p: _archive_area(storage.archive, p))
    _purge_tree(storage.quarantine, quarantine_cutoff, protected, result, area_of=lambda p: "quarantine")
    for commune in config.communes:
        rejected = commune.rejected_dir
        if rejected is not None:
            # The business software shares this folder: only relayd's flat layout is purged, not its subfolders.
            _purge_tree(rejected, quarantine_cutoff, protected, result, area_of=lambda p: "rejected", recursive=False)
    _scrub_closed(ledger, now - timedelta(days=retention.scrub_after_close_days), result)
    _clear_old_rejections(ledger, now - timedelta(days=retention.quarantine_days), result)
    counts = result.counts()
    if dry_run:
        log.info("retention.dry_run", **counts)
    else:
        if result.files or result.scrubbed or result.rejections_cleared or result.errors:
            ledger.record_event(None, "retention", json.dumps(counts, sort_keys=True))
        log_method = log.warning if result.errors else log.info
        log_method("retention.done", **counts)
    return result


# -- files -------------------------------------------------------------------------------


def _in_use(ledger: Ledger) -> set[Path]:
    """Files something still needs: pending or dead outbox payloads, and the packages open dossiers route from."""
    rows = ledger.query("SELECT payload FROM outbox WHERE status IN ('pending', 'dead')")
    needed = {Path(r["payload"]) for r in rows}
    rows = ledger.query("SELECT archive_path FROM dossiers WHERE state != ? AND (routing IS NULL OR routing = '')"
                        " AND archive_path IS NOT NULL", (dossiers.CLOS,))
    needed |= {Path(r["archive_path"]) for r in rows}
    return {_real(p) for p in needed}


def _archive_area(archive: Path, path: Path) -> str:
    first = path.relative_to(archive).parts[0]
    return first if first in ("sent", "returns") else "packages"


def _purge_tree(root: Path, cutoff: float, protected: set[Path], result: RetentionResult, *,
                area_of: Callable[[Path], str], recursive: bool = True) -> None:
    """Remove the groups of files under ``root`` whose youngest member is older than ``cutoff``."""
    if not root.is_dir():
        return
    for folder, folder_mtime, files in _walk(root, recursive):
        # A folder changed since the cutoff may be one that intake or the outbox has just made for a new file.
        idle_folder = folder_mtime <= cutoff
        groups: dict[str, list[tuple[Path, os.stat_result]]] = {}
        for name in files:
            path = folder / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # taken meanwhile (by the business software, or a concurrent purge)
            groups.setdefault(_group_key(name), []).append((path, st))
        for members in groups.values():
            if max(st.st_mtime for _, st in members) > cutoff:
                continue
            if any(_real(path) in protected for path, _ in members):
                result.kept.extend(path for path, _ in members)
                continue
            for path, st in members:
                if not result.dry_run:
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        result.errors.append(f"{path}: {exc.strerror}")
                        continue
                result.removed[area_of(path)].append(path)
                result.removed_bytes += st.st_size
        if recursive and idle_folder and folder != root and not result.dry_run:
            _remove_if_empty(folder)


def _walk(root: Path, recursive: bool) -> list[tuple[Path, float, list[str]]]:
    """Each folder with its modification time and its regular files, deepest first; links are never followed.

    Every folder is looked at before anything is removed, so that emptying a month folder does
    not make its year folder look recently changed.
    """
    if recursive:
        walked = [(Path(f), names) for f, _dirs, names in os.walk(root, topdown=False, followlinks=False)]
    else:
        with os.scandir(root) as entries:
            walked = [(root, [e.name for e in entries if e.is_file(follow_symlinks=False)])]
    out = []
    for folder, names in walked:
        try:
            mtime = folder.stat().st_mtime
        except FileNotFoundError:
            continue
        out.append((folder, mtime, [n for n in names if (folder / n).is_file() and not (folder / n).is_symlink()]))
    return out


def _group_key(name: str) -> str:
    """Files that belong together: a file and its reason file; a refused drop and its attachments."""
    match = _DROP_STAMP.match(name)
    if match:
        return match.group(0)
    return name.removesuffix(REASON_SUFFIX)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or in use: left as it is


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


# -- the ledger --------------------------------------------------------------------------


def _scrub_closed(ledger: Ledger, cutoff: datetime, result: RetentionResult) -> None:
    """Remove the personal data of dossiers closed before ``cutoff``, keeping their reference."""
    # The ledger writes every time as the same UTC ISO 8601 form, so text order is time order.
    rows = ledger.query("SELECT numero FROM dossiers WHERE state = ? AND scrubbed_at IS NULL AND updated_at <= ?"
                        " ORDER BY updated_at", (dossiers.CLOS, _iso(cutoff)))
    for row in rows:
        numero = row["numero"]
        if not result.dry_run and not _scrub_one(ledger, numero, result.now):
            continue
        result.scrubbed.append(numero)


def _scrub_one(ledger: Ledger, numero: str, now: datetime) -> bool:
    with ledger.transaction() as db:
        cursor = db.execute("UPDATE dossiers SET routing = NULL, scrubbed_at = ?"
                            " WHERE numero = ? AND state = ? AND scrubbed_at IS NULL", (_iso(now), numero, dossiers.CLOS))
        if not cursor.rowcount:
            return False  # scrubbed meanwhile by another purge
        db.execute("UPDATE packages SET upload_name = NULL, detail = NULL,"
                   " location = CASE WHEN outcome = 'rejected' THEN NULL ELSE location END WHERE numero = ?", (numero,))
        db.execute("UPDATE events SET detail = NULL WHERE numero = ?", (numero,))
        db.execute("UPDATE outbox SET source = NULL, last_error = NULL WHERE numero = ?"
                   " AND status IN ('delivered', 'purged')", (numero,))
        Ledger.event(db, numero, "scrubbed", "personal data removed from the ledger; the reference is kept")
    return True


def _clear_old_rejections(ledger: Ledger, cutoff: datetime, result: RetentionResult) -> None:
    """A refused package's row keeps its reason code and hash, not what could describe a person."""
    where = ("outcome = 'rejected' AND received_at <= ?"
             " AND (upload_name IS NOT NULL OR detail IS NOT NULL OR location IS NOT NULL)")
    if result.dry_run:
        result.rejections_cleared = ledger.query(f"SELECT COUNT(*) AS n FROM packages WHERE {where}",
                                                 (_iso(cutoff),))[0]["n"]
        return
    with ledger.transaction() as db:
        cursor = db.execute(f"UPDATE packages SET upload_name = NULL, detail = NULL, location = NULL WHERE {where}",
                            (_iso(cutoff),))
        result.rejections_cleared = cursor.rowcount
        db.execute("UPDATE events SET detail = NULL WHERE kind = 'rejected' AND at <= ? AND detail IS NOT NULL",
                   (_iso(cutoff),))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


# -- the part ----------------------------------------------------------------------------


class Retention:
    """The daemon's part that purges every ``retention.check_hours``, the first time shortly after start."""

    name = "retention"

    def __init__(self, config: Config, ledger: Ledger, clock: Clock = SYSTEM_CLOCK,
                 *, first_run_seconds: float = FIRST_RUN_SECONDS):
        self.config = config
        self.ledger = ledger
        self.clock = clock
        self.first_run_seconds = first_run_seconds
        self._changed = asyncio.Event()

    def reconfigure(self, config: Config) -> None:
        """Take the new periods; a new ``check_hours`` counts from the last run."""
        self.config = config
        self._changed.set()

    async def run(self) -> None:
        """Purge, then wait ``check_hours``, until cancelled. A failed purge is logged and tried at the next turn."""
        await asyncio.sleep(self.first_run_seconds)
        while True:
            last = self.clock.now()
            try:
                await asyncio.to_thread(purge, self.config, self.ledger, last)
            except Exception as exc:  # noqa: BLE001 - retention must never stop the daemon
                log.exception("retention.failed", error=type(exc).__name__)
            await self._wait_from(last)

    async def _wait_from(self, last: datetime) -> None:
        # A reload wakes the wait so that a shorter period applies at once, measured from the last run.
        for _ in range(1000):  # bounded: each turn is a reload
            remaining = (last + timedelta(hours=self.config.retention.check_hours) - self.clock.now()).total_seconds()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return


# -- the command -------------------------------------------------------------------------


def run_command(ledger: Ledger, config: Config, now: datetime, *, dry_run: bool = False, as_json: bool = False) -> int:
    """``relayd retention``: purge once and print what was removed (or would be); 1 if a file could not be removed."""
    result = purge(config, ledger, now, dry_run=dry_run)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_result(result, config))
    return 1 if result.errors else 0


def format_result(result: RetentionResult, config: Config) -> str:
    """The result for people: one line per file, then a summary."""
    verb = "would remove" if result.dry_run else "removed"
    retention = config.retention
    periods = {"packages": retention.archive_days, "sent": retention.archive_days, "returns": retention.archive_days,
               "quarantine": retention.quarantine_days, "rejected": retention.quarantine_days}
    lines = []
    for area in AREAS:
        for path in result.removed[area]:
            lines.append(f"{verb}  {area:10}  {path}")
    for path in result.kept:
        lines.append(f"kept        in use      {path}")
    for numero in result.scrubbed:
        lines.append(f"{'would scrub' if result.dry_run else 'scrubbed'}  dossier  {numero}")
    for error in result.errors:
        lines.append(f"error  {error}")
    summary = ", ".join(f"{len(result.removed[a])} {a} (> {periods[a]:g} days)" for a in AREAS)
    lines.append(f"{'Dry run: nothing was changed. ' if result.dry_run else ''}"
                 f"{result.files} file(s) {'to remove' if result.dry_run else 'removed'} "
                 f"({_size(result.removed_bytes)}): {summary}; "
                 f"{len(result.scrubbed)} closed dossier(s) {'to scrub' if result.dry_run else 'scrubbed'} "
                 f"(closed > {retention.scrub_after_close_days:g} days); "
                 f"{result.rejections_cleared} refused package record(s) {'to clear' if result.dry_run else 'cleared'}"
                 + (f"; {len(result.kept)} file(s) kept because still needed" if result.kept else ""))
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

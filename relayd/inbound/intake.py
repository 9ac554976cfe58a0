"""Intake: from a committed upload to a dossier in a commune's inbox, or to quarantine.

The server hands intake a file it has just committed (renamed from a temporary name, or
closed explicitly). Intake moves it into staging, verifies it, routes it by INSEE code,
hands it over atomically, archives an independent copy, and records it in the ledger
together with the ack it owes, in one transaction, before the client is answered. A
refused package goes to quarantine with a reason file, its ANL recorded with it. Nothing is
deleted except a byte-identical resend, whose content the archive already holds.

A failure that is not the package's fault leaves it staged and is tried again while relayd
runs (:class:`IntakeRetries`), with a capped exponential backoff: a full or failing disk
(ENOSPC, EIO) until space is back, any other unexpected error ``intake.max_attempts`` times,
after which the package goes to quarantine as ``internal_error``.

Everything here blocks on disk and CPU: the server runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import structlog

from relayd.config import Config
from relayd.events import NO_EVENTS, Events, PackageAccepted, PackageRejected
from relayd.fsutil import clone_or_copy, ensure_dir, fsync_dir, publish_file, shown_name, write_durably
from relayd.inbound.handoff import hand_over
from relayd.inbound.routing import route_commune
from relayd.ledger import DuplicatePackage, Ledger, PackageRecord, utcnow
from relayd.pec.envelope import Message
from relayd.pec.package import Package, file_sha256, inspect_package
from relayd.pec.replies import check_answerable
from relayd.rejections import Reason, Rejection

log = structlog.get_logger("relayd.intake")

SIDECAR_SUFFIX = ".upload.json"

#: errors of the disk under a folder, not of the package: retried until they clear, never quarantined
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


@dataclass(frozen=True)
class Upload:
    """Who sent a file, from where, and under which name."""

    account: str
    peer: str
    #: the name as the client sent it (the drop folder's name for the file)
    name: str

    @property
    def shown(self) -> str:
        """The name for the ledger, the quarantine's reason file and the log: a client's odd bytes as ``\\xNN``."""
        return shown_name(self.name)


@dataclass(frozen=True)
class Outcome:
    """What became of one committed upload."""

    status: Literal["accepted", "duplicate", "rejected", "error"]
    numero: str | None = None
    location: Path | None = None
    rejection: Rejection | None = None
    #: for an error: "disk" (kept until space is back), "retry" (kept, tried again) or None (not kept)
    kept: Literal["disk", "retry"] | None = None

    def client_message(self) -> str:
        """What the SFTP client is told: the code and a generic sentence, never internal paths."""
        if self.rejection is not None:
            return self.rejection.client_message()
        if self.status == "error":
            if self.kept == "disk":
                return (f"kept ({Reason.DISK_LOW.value}): the relay is short of disk space; the package is kept and "
                        "will be handed over once space is back")
            if self.kept == "retry":
                return "internal error: the package is kept and will be processed again"
            return "internal error: the package was not kept; send it again"
        return "accepted"


class Owed(Protocol):
    """An ack built before an outcome's transaction; called with the transaction's connection to record it."""

    def __call__(self, db: sqlite3.Connection) -> None: ...


class AckSink(Protocol):
    """Where intake gets the acks its outcomes owe the platform (the return path)."""

    def owed(self, envelope: Message | None, kind: str, rejection: Rejection | None = None) -> Owed | None:
        """The ack (AVL, or ANL with ``rejection``) to record with the outcome, or None when none is owed."""

    def committed(self, owed: Owed | None, package: Package | None = None) -> None:
        """Called once the outcome and its ack are committed (``package`` for a dossier handed over or resent)."""


class NoAcks:
    """The ack sink until the return path exists: acknowledges nothing."""

    def owed(self, envelope: Message | None, kind: str, rejection: Rejection | None = None) -> Owed | None:
        return None

    def committed(self, owed: Owed | None, package: Package | None = None) -> None:
        return None


class DiskWatch(Protocol):
    """The disk guard, as intake sees it: told to look now when a write fails for lack of space."""

    def check(self) -> bool: ...


#: verifying and handing over the largest package allowed takes seconds; minutes mean a wedge (a hung disk)
PROCESS_BOUND_SECONDS = 300.0


@dataclass
class _Retry:
    """A staged package that failed for a reason of its own, not the package's, and when to try it again."""

    attempts: int
    due: float  # on the intake's monotonic clock
    disk: bool


class Intake:
    """Verify, route, hand over and record committed uploads."""

    def __init__(self, config: Config, ledger: Ledger, acks: AckSink | None = None, events: Events = NO_EVENTS,
                 disk: DiskWatch | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.ledger = ledger
        self.acks: AckSink = acks or NoAcks()
        self.events = events
        self.disk = disk
        self._clock = clock
        # Packages being processed now, and since when (monotonic): the watchdog's measure of "wedged".
        self._running: dict[int, tuple[str, float]] = {}
        self._running_lock = threading.Lock()
        # Staged packages waiting for another try, by staged path.
        self._retries: dict[Path, _Retry] = {}
        self._busy: set[Path] = set()
        #: wakes :class:`IntakeRetries` when a retry is scheduled (set by the daemon, called from any thread)
        self.on_retry: Callable[[], None] | None = None

    def stalled(self) -> str | None:
        """A package whose processing has overrun :data:`PROCESS_BOUND_SECONDS`, if any; None when intake is healthy."""
        now = time.monotonic()
        with self._running_lock:
            running = list(self._running.values())
        late = [(name, now - since) for name, since in running if now - since > PROCESS_BOUND_SECONDS]
        if not late:
            return None
        name, seconds = max(late, key=lambda item: item[1])
        return f"processing {name} for {seconds:.0f} s"

    # -- staging ---------------------------------------------------------------------

    def stage(self, uploaded: Path, upload: Upload) -> Path:
        """Take a committed upload out of the client's reach, with a note of who sent it."""
        staging = ensure_dir(self.config.storage.staging)
        staged = staging / f"{uuid.uuid4().hex}.zip"
        sidecar = staged.with_suffix(SIDECAR_SUFFIX)
        try:
            sidecar.write_text(json.dumps(asdict(upload)), encoding="utf-8")
            publish_file(uploaded, staged, mode=0o600, move=True)
        except BaseException:
            sidecar.unlink(missing_ok=True)  # a note without its package is an orphan
            raise
        return staged

    def take(self, uploaded: Path, upload: Upload) -> Outcome:
        """Stage a committed upload and run it to its end; what the client is answered.

        When even staging fails (the staging disk full or failing), the upload is removed from the
        drop folder, where nothing would ever pick it up, and the client is told to send it again.
        """
        try:
            staged = self.stage(uploaded, upload)
        except OSError as exc:
            disk = exc.errno in DISK_ERRNOS
            log.error("intake.stage_failed", account=upload.account, peer=upload.peer, upload=upload.shown,
                      error=exc.strerror or type(exc).__name__, effect="the client is told to send it again")
            uploaded.unlink(missing_ok=True)
            if disk:
                self._look_at_disk()
                return Outcome("rejected", rejection=Rejection(Reason.DISK_LOW, "staging is short of space."))
            return Outcome("error")
        return self.process(staged)

    def staged_files(self) -> list[Path]:
        """Committed uploads that were not finished (left by a crash, or waiting for a retry), oldest first."""
        staging = self.config.storage.staging
        if not staging.is_dir():
            return []
        return sorted(staging.glob("*.zip"), key=lambda p: p.stat().st_mtime)

    def recover(self) -> list[Outcome]:
        """Finish what a crash or a stop interrupted; a package that fails again is retried as any other."""
        outcomes = []
        for staged in self.staged_files():
            log.info("intake.recover", file=staged.name)
            outcomes.append(self.process(staged))
        self.tidy()
        return outcomes

    def tidy(self) -> None:
        """Remove notes whose package is gone (a crash between the note and the move); call at start and stop."""
        for copy in (self.config.storage.archive / ARCHIVE_INCOMING).glob("*.copying"):
            if not self._busy:  # a copy being written belongs to a package in process
                copy.unlink(missing_ok=True)
        staging = self.config.storage.staging
        if not staging.is_dir():
            return
        for note in staging.glob(f"*{SIDECAR_SUFFIX}"):
            if not note.with_suffix(".zip").exists():
                note.unlink(missing_ok=True)

    # -- retries ---------------------------------------------------------------------

    def retry_due(self) -> Outcome | None:
        """Try again the staged package whose wait ended first, if one is due; one at a time, so a stop waits little."""
        now = self._clock()
        with self._running_lock:
            due = sorted((retry.due, str(path)) for path, retry in self._retries.items()
                         if retry.due <= now and path not in self._busy)
        for _, name in due:
            staged = Path(name)
            if not staged.exists():  # finished meanwhile by another way (a resend, an operator)
                with self._running_lock:
                    self._retries.pop(staged, None)
                continue
            log.info("intake.retry", file=staged.name, attempt=self._retries[staged].attempts + 1)
            return self.process(staged)
        return None

    def next_retry_in(self) -> float | None:
        """Seconds until the next retry is due (0 if one is), None when none waits."""
        with self._running_lock:
            if not self._retries:
                return None
            return max(0.0, min(r.due for r in self._retries.values()) - self._clock())

    def waiting(self) -> int:
        """How many staged packages wait for another try."""
        with self._running_lock:
            return len(self._retries)

    # -- processing ------------------------------------------------------------------

    def process(self, staged: Path) -> Outcome:
        """Run one staged package to its end, or schedule another try. Never raises."""
        key = threading.get_ident()
        with self._running_lock:
            self._running[key] = (staged.name, time.monotonic())
            self._busy.add(staged)
        try:
            return self._process(staged)
        finally:
            with self._running_lock:
                self._running.pop(key, None)
                self._busy.discard(staged)

    def _process(self, staged: Path) -> Outcome:
        upload = self._upload_of(staged)
        bound = log.bind(account=upload.account, peer=upload.peer, upload=upload.shown)
        package: Package | None = None
        # The archive's own copy is written while the package is verified: the copy waits on the disk,
        # verification on the CPU, and a large package would otherwise pay for both in turn.
        copy = _ArchiveCopy.start(staged, self.config.storage.archive)
        try:
            try:
                package = inspect_package(staged, self.config.limits)
                bound = bound.bind(numero=package.numero, demarche=package.demarche, insee=package.insee)
                # Before anything is decided: a dossier relayd could never answer (AVL, ANL, Retour) is refused.
                check_answerable(package.message.header.routing)
                self._route(package, upload)
                outcome = self._accept(staged, package, upload, bound, copy)
            except Rejection as rejection:
                envelope = package.message if package is not None else rejection.envelope
                outcome = self._reject(staged, upload, rejection, envelope if isinstance(envelope, Message) else None,
                                       bound)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving whatever happens
            return self._failed(staged, upload, package, exc, bound)
        finally:
            copy.discard()  # a no-op once the copy became the archive
        with self._running_lock:
            self._retries.pop(staged, None)
        return outcome

    def _failed(self, staged: Path, upload: Upload, package: Package | None, exc: Exception, bound) -> Outcome:
        """A failure that is not the package's: schedule another try, or quarantine after too many."""
        disk = isinstance(exc, OSError) and exc.errno in DISK_ERRNOS
        settings = self.config.intake
        if not staged.exists():
            # The hand-over took the file and the record failed after it: only the platform's resend can finish it.
            bound.exception("intake.record_failed", error=type(exc).__name__, effect="the client is told to send it again")
            with self._running_lock:
                self._retries.pop(staged, None)
            self._drop_sidecar(staged)
            return Outcome("error")
        with self._running_lock:
            previous = self._retries.get(staged)
        attempts = (previous.attempts if previous else self._attempts_of(staged)) + 1
        error = f"{type(exc).__name__}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        if not disk and attempts >= settings.max_attempts:
            bound.error("intake.internal_error", error=error, attempts=attempts, effect="quarantined")
            rejection = Rejection(Reason.INTERNAL_ERROR,
                                  f"relayd failed on this package {attempts} times ({error}).")
            try:
                envelope = package.message if package is not None else None
                outcome = self._reject(staged, upload, rejection, envelope, bound)
            except Exception as again:  # noqa: BLE001 - even quarantine failed: keep it staged, try later
                exc, disk = again, isinstance(again, OSError) and again.errno in DISK_ERRNOS
                bound.exception("intake.quarantine_failed", error=type(again).__name__)
            else:
                with self._running_lock:
                    self._retries.pop(staged, None)
                return outcome
        wait = min(settings.max_seconds, settings.initial_seconds * 2 ** max(0, attempts - 1))
        with self._running_lock:
            self._retries[staged] = _Retry(attempts, self._clock() + wait, disk)
        self._note_attempts(staged, upload, attempts)
        if disk:
            bound.error("intake.disk_error", error=error, attempts=attempts, retry_in=round(wait, 1),
                        effect="the package stays staged and is handed over once the disk takes it")
            self._look_at_disk()
        else:
            bound.exception("intake.retry_later", error=error, attempts=attempts, retry_in=round(wait, 1),
                            max_attempts=settings.max_attempts)
        if self.on_retry is not None:
            self.on_retry()
        return Outcome("error", kept="disk" if disk else "retry")

    def _look_at_disk(self) -> None:
        if self.disk is not None:
            try:
                self.disk.check()
            except Exception:  # noqa: BLE001 - the guard's own trouble must not cost the package
                log.exception("intake.disk_check_failed")

    def _route(self, package: Package, upload: Upload) -> None:
        commune = route_commune(self.config, package.message)
        package.routed_insee = commune.insee
        account = self.config.account(upload.account)
        if account is None or package.insee not in account.communes:
            raise Rejection(
                Reason.INSEE_NOT_ALLOWED, f"account {upload.account} may not deliver for INSEE code {package.insee}."
            )
        if package.demarche not in commune.demarches:
            raise Rejection(
                Reason.DEMARCHE_NOT_ACCEPTED,
                f"commune {commune.insee} does not accept démarche {package.demarche[:40]!r}.",
            )

    def _accept(self, staged: Path, package: Package, upload: Upload, bound, copy: _ArchiveCopy) -> Outcome:
        record = _record(package, upload)
        if self.ledger.accepted_by_sha256(package.sha256) is not None:
            return self._duplicate(staged, package, record, bound)
        conflict = self.ledger.conflicting(package.message_id, package.numero, package.sha256)
        if conflict is not None:
            raise Rejection(
                Reason.DOSSIER_CONFLICT,
                f"dossier {package.numero} (or its MessageId) was accepted on {conflict['received_at']} with other content.",
            )
        commune = self.config.commune(package.insee)
        assert commune is not None  # _route checked it
        # Built before anything moves, so that a fault here leaves the package staged.
        owed = self.acks.owed(package.message, "AVL")
        received_at = utcnow()
        archived = self._archive_path(package)
        # Until both the inbox and the archive hold the package, staging does too, so a crash at
        # any point leaves a staged file that recovery finishes.
        # The archive first: once in the inbox, the file is the business software's to edit or delete.
        # The archive is its own copy (a reflink where the file system offers one), never a link to it.
        copy.publish(archived)
        if commune.delivery == "zip":
            final = hand_over(package, staged, commune, received_at=received_at, consume=True)
        else:
            final = hand_over(package, staged, commune, received_at=received_at)
        try:
            self.ledger.record_accepted(
                record,
                deposited_at=package.message.aller.teledemarche.date,
                inbox_path=str(final),
                archive_path=str(archived),
                # Returns are addressed from the Aller's routing long after the package is gone.
                routing=package.message.header.routing.to_xml(encoding="unicode"),
                also=owed,
            )
        except DuplicatePackage:
            # Another worker accepted the same bytes at the same moment: same name, same content.
            self.ledger.record_duplicate(record, location=str(final), also=owed)
        staged.unlink(missing_ok=True)  # extracted delivery copied it out; the zip delivery took it already
        self._drop_sidecar(staged)
        bound.info("intake.accepted", inbox=str(final), sha256=package.sha256, size=package.size)
        self.acks.committed(owed, package)
        extras = package.message.header.extras
        email = extras.email if extras is not None else None
        self.events.publish(PackageAccepted(
            numero=package.numero, demarche=package.demarche, insee=package.insee, message_id=package.message_id,
            size=package.size, email_subject=email.subject if email else None, email_body=email.body if email else None,
        ))
        return Outcome("accepted", package.numero, final)

    def _duplicate(self, staged: Path, package: Package, record: PackageRecord, bound) -> Outcome:
        previous = self.ledger.accepted_by_sha256(package.sha256)
        owed = self.acks.owed(package.message, "AVL")
        self.ledger.record_duplicate(record, location=previous["location"] if previous else None, also=owed)
        # The archive holds these very bytes already, so the resend itself can go.
        staged.unlink(missing_ok=True)
        self._drop_sidecar(staged)
        bound.info("intake.duplicate", sha256=package.sha256)
        self.acks.committed(owed, package)
        return Outcome("duplicate", package.numero, Path(previous["location"]) if previous else None)

    def _reject(self, staged: Path, upload: Upload, rejection: Rejection, envelope: Message | None, bound) -> Outcome:
        when = datetime.now(UTC)
        owed = self.acks.owed(envelope, "ANL", rejection)
        folder = ensure_dir(self.config.storage.quarantine / when.strftime("%Y-%m-%d"))
        base = f"{when.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}-{_safe_name(upload.name)}"
        target = folder / base
        sha256 = file_sha256(staged) if staged.exists() else ""
        size = staged.stat().st_size if staged.exists() else 0
        record = PackageRecord(
            sha256=sha256, size=size, account=upload.account, peer=upload.peer, upload_name=upload.shown,
            message_id=envelope.message_id if envelope else None,
            numero=envelope.numero if envelope else None,
            demarche=envelope.demarche if envelope else None,
            insee=envelope.insee if envelope else None,
        )
        reason_file = {
            **rejection.as_dict(),
            "received_at": when.isoformat(timespec="seconds"),
            "upload_name": upload.shown,
            "account": upload.account,
            "peer": upload.peer,
            "sha256": sha256,
            "size": size,
            "numero": record.numero,
            "message_id": record.message_id,
        }
        # The reason file lands first: an operator never finds a quarantined file without its reason.
        reason_path = folder / f"{base}.reason.json"
        write_durably(reason_path, (json.dumps(reason_file, indent=2, ensure_ascii=False) + "\n").encode())
        if staged.exists():
            publish_file(staged, target, mode=0o600, move=True)
        fsync_dir(folder)
        self.ledger.record_rejected(record, reason=rejection.reason.value, detail=rejection.detail, location=str(target),
                                    also=owed)
        self._drop_sidecar(staged)
        bound.warning("intake.rejected", code=rejection.reason.value, reason=rejection.detail, quarantine=str(target),
                      numero=record.numero)
        self.acks.committed(owed)
        self.events.publish(PackageRejected(reason=rejection.reason.value, detail=rejection.detail, account=upload.account,
                                            peer=upload.peer, insee=record.insee, numero=record.numero))
        return Outcome("rejected", record.numero, target, rejection)

    def quarantine_partial(self, uploaded: Path, upload: Upload, rejection: Rejection) -> Outcome:
        """Quarantine a file that never became a committed package (e.g. it outgrew the size limit)."""
        staged = self.stage(uploaded, upload)
        bound = log.bind(account=upload.account, peer=upload.peer, upload=upload.shown)
        return self._reject(staged, upload, rejection, None, bound)

    # -- helpers ---------------------------------------------------------------------

    def _archive_path(self, package: Package) -> Path:
        month = datetime.now(UTC).strftime("%Y/%m")
        return self.config.storage.archive / month / f"{package.numero}-{package.demarche}-{package.sha256[:12]}.zip"

    def _note(self, staged: Path) -> dict:
        try:
            note = json.loads(staged.with_suffix(SIDECAR_SUFFIX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    def _upload_of(self, staged: Path) -> Upload:
        note = self._note(staged)
        try:
            return Upload(**{f.name: note[f.name] for f in fields(Upload)})
        except (KeyError, TypeError):
            return Upload(account="?", peer="?", name=staged.name)

    def _attempts_of(self, staged: Path) -> int:
        """Tries already made before this process (so a crash loop does not retry for ever)."""
        attempts = self._note(staged).get("attempts", 0)
        return attempts if isinstance(attempts, int) and attempts >= 0 else 0

    def _note_attempts(self, staged: Path, upload: Upload, attempts: int) -> None:
        try:
            write_durably(staged.with_suffix(SIDECAR_SUFFIX),
                          json.dumps({**asdict(upload), "attempts": attempts}).encode())
        except OSError:
            pass  # staging itself is short: the count in memory serves until the next start

    @staticmethod
    def _drop_sidecar(staged: Path) -> None:
        staged.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)


class IntakeRetries:
    """The daemon part that tries staged packages again when their wait is over."""

    name = "intake-retries"

    #: the longest nap between two looks, so that a retry scheduled from another thread is never late by much
    LOOK_SECONDS = 1.0

    def __init__(self, intake: Intake):
        self.intake = intake
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Look now (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Retry what is due, then sleep until the next one, until cancelled."""
        self._loop = asyncio.get_running_loop()
        self.intake.on_retry = self.wake
        while True:
            # A package half handed over must not meet a closed ledger: a stop lets the current try finish.
            attempt = asyncio.ensure_future(asyncio.to_thread(self.intake.retry_due))
            try:
                await asyncio.shield(attempt)
            except asyncio.CancelledError:
                await attempt
                raise
            self._wake.clear()
            wait = self.intake.next_retry_in()
            try:
                async with asyncio.timeout(self.LOOK_SECONDS if wait is None else min(wait, self.LOOK_SECONDS) + 0.01):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def reconfigure(self, config: Config) -> None:
        """The retry settings are read at each failure."""
        return None


def _record(package: Package, upload: Upload) -> PackageRecord:
    return PackageRecord(
        sha256=package.sha256, size=package.size, account=upload.account, peer=upload.peer, upload_name=upload.shown,
        message_id=package.message_id, numero=package.numero, demarche=package.demarche, insee=package.insee,
    )


def _safe_name(name: str) -> str:
    """A client-chosen name, reduced to something safe to put in a file name."""
    base = os.path.basename(name.replace("\\", "/")) or "upload"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:120]


#: writes the archive's copies beside verification; each runs in one intake thread's shadow
_COPIER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="relayd-archive-copy")
#: where copies are written before they are named, in the archive (one file system: a rename names them)
ARCHIVE_INCOMING = ".incoming"


class _ArchiveCopy:
    """The archive's own copy of one staged package, written while it is verified."""

    def __init__(self, tmp: Path, future: Future[None]):
        self._tmp = tmp
        self._future = future
        self._published = False

    @classmethod
    def start(cls, staged: Path, archive: Path) -> _ArchiveCopy:
        """Begin copying ``staged`` to a temporary name in ``archive``."""
        tmp = archive / ARCHIVE_INCOMING / f"{staged.name}.{uuid.uuid4().hex[:8]}.copying"
        return cls(tmp, _COPIER.submit(clone_or_copy, staged, tmp))

    def publish(self, archived: Path) -> None:
        """Wait for the copy (raising its error, if any) and give it its archive name, durably."""
        self._future.result()
        archived.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._tmp, archived)
        self._published = True
        fsync_dir(archived.parent)

    def discard(self) -> None:
        """Remove the copy unless it was published (a refusal, a resend, a failure)."""
        if self._published:
            return
        try:
            self._future.result()
        except Exception:  # noqa: BLE001 - a copy that failed leaves nothing worth keeping
            pass
        self._tmp.unlink(missing_ok=True)

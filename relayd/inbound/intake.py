"""Intake: from a committed upload to a dossier in a commune's inbox, or to quarantine.

The server hands intake a file it has just committed (renamed from a temporary name, or
closed explicitly). Intake moves it into staging, verifies it, routes it by INSEE code,
hands it over atomically, archives it, records it in the ledger and, only then, tells the
ack sink. A refused package goes to quarantine with a reason file. Nothing is deleted
except a byte-identical resend, whose content the archive already holds.

Everything here blocks on disk and CPU: the server runs it in a worker thread.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

import structlog

from relayd.config import Config
from relayd.events import NO_EVENTS, Events, PackageAccepted, PackageRejected
from relayd.fsutil import ensure_dir, fsync_dir, link_or_copy, publish_file
from relayd.inbound.handoff import hand_over
from relayd.inbound.routing import route_commune
from relayd.ledger import DuplicatePackage, Ledger, PackageRecord, utcnow
from relayd.pec.envelope import Message
from relayd.pec.package import Package, file_sha256, inspect_package
from relayd.rejections import Reason, Rejection

log = structlog.get_logger("relayd.intake")

SIDECAR_SUFFIX = ".upload.json"


@dataclass(frozen=True)
class Upload:
    """Who sent a file, from where, and under which name."""

    account: str
    peer: str
    name: str


@dataclass(frozen=True)
class Outcome:
    """What became of one committed upload."""

    status: Literal["accepted", "duplicate", "rejected", "error"]
    numero: str | None = None
    location: Path | None = None
    rejection: Rejection | None = None

    def client_message(self) -> str:
        """What the SFTP client is told: the code and a generic sentence, never internal paths."""
        if self.rejection is not None:
            return self.rejection.client_message()
        if self.status == "error":
            return "internal error: the package is kept and will be processed again"
        return "accepted"


class AckSink(Protocol):
    """Where intake reports outcomes that the platform must hear about (the return path)."""

    def package_accepted(self, package: Package) -> None:
        """Called after the dossier is durably in the inbox and the ledger (and for resends)."""

    def package_rejected(self, envelope: Message | None, rejection: Rejection) -> None:
        """Called after a refused package is quarantined; ``envelope`` is None when unreadable."""


class NoAcks:
    """The ack sink until the return path exists: acknowledges nothing."""

    def package_accepted(self, package: Package) -> None:
        return None

    def package_rejected(self, envelope: Message | None, rejection: Rejection) -> None:
        return None


#: verifying and handing over the largest package allowed takes seconds; minutes mean a wedge (a hung disk)
PROCESS_BOUND_SECONDS = 300.0


class Intake:
    """Verify, route, hand over and record committed uploads."""

    def __init__(self, config: Config, ledger: Ledger, acks: AckSink | None = None, events: Events = NO_EVENTS):
        self.config = config
        self.ledger = ledger
        self.acks: AckSink = acks or NoAcks()
        self.events = events
        # Packages being processed now, and since when (monotonic): the watchdog's measure of "wedged".
        self._running: dict[int, tuple[str, float]] = {}
        self._running_lock = threading.Lock()

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
        sidecar.write_text(json.dumps(asdict(upload)), encoding="utf-8")
        publish_file(uploaded, staged, mode=0o600, move=True)
        return staged

    def staged_files(self) -> list[Path]:
        """Committed uploads that were not finished (left by a crash), oldest first."""
        staging = self.config.storage.staging
        if not staging.is_dir():
            return []
        return sorted(staging.glob("*.zip"), key=lambda p: p.stat().st_mtime)

    def recover(self) -> list[Outcome]:
        """Finish what a crash interrupted. A package that fails again goes to quarantine."""
        outcomes = []
        for staged in self.staged_files():
            log.info("intake.recover", file=staged.name)
            outcomes.append(self.process(staged, last_chance=True))
        # A crash between writing the note and moving the upload in leaves a note alone.
        for note in self.config.storage.staging.glob(f"*{SIDECAR_SUFFIX}"):
            note.unlink()
        return outcomes

    # -- processing ------------------------------------------------------------------

    def process(self, staged: Path, *, last_chance: bool = False) -> Outcome:
        """Run one staged package to its end. Never raises for bad input."""
        key = threading.get_ident()
        with self._running_lock:
            self._running[key] = (staged.name, time.monotonic())
        try:
            return self._process(staged, last_chance=last_chance)
        finally:
            with self._running_lock:
                self._running.pop(key, None)

    def _process(self, staged: Path, *, last_chance: bool) -> Outcome:
        upload = self._upload_of(staged)
        bound = log.bind(account=upload.account, peer=upload.peer, upload=upload.name)
        package: Package | None = None
        try:
            package = inspect_package(staged, self.config.limits)
            bound = bound.bind(numero=package.numero, demarche=package.demarche, insee=package.insee)
            self._route(package, upload)
            return self._accept(staged, package, upload, bound)
        except Rejection as rejection:
            envelope = package.message if package is not None else rejection.envelope
            return self._reject(staged, upload, rejection, envelope if isinstance(envelope, Message) else None, bound)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving whatever happens
            bound.exception("intake.internal_error", error=type(exc).__name__)
            if last_chance:
                rejection = Rejection(Reason.INTERNAL_ERROR, f"relayd failed on this package ({type(exc).__name__}).")
                return self._reject(staged, upload, rejection, None, bound)
            return Outcome("error")

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

    def _accept(self, staged: Path, package: Package, upload: Upload, bound) -> Outcome:
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
        received_at = utcnow()
        archived = self._archive_path(package)
        # Until both the inbox and the archive hold the package, staging does too, so a crash at
        # any point leaves a staged file that recovery finishes.
        if commune.delivery == "zip":
            # The archive first: once in the inbox, the file is the business software's to delete.
            # A hard link costs nothing, which keeps a 200 MB hand-over as fast as the upload.
            link_or_copy(staged, archived)
            final = hand_over(package, staged, commune, received_at=received_at, consume=True)
        else:
            final = hand_over(package, staged, commune, received_at=received_at)
            publish_file(staged, archived, mode=0o600, move=True)
        try:
            self.ledger.record_accepted(
                record,
                deposited_at=package.message.aller.teledemarche.date,
                inbox_path=str(final),
                archive_path=str(archived),
                # Returns are addressed from the Aller's routing long after the package is gone.
                routing=package.message.header.routing.to_xml(encoding="unicode"),
            )
        except DuplicatePackage:
            # Another worker accepted the same bytes at the same moment: same name, same content.
            self.ledger.record_duplicate(record, location=str(final))
        self._drop_sidecar(staged)
        bound.info("intake.accepted", inbox=str(final), sha256=package.sha256, size=package.size)
        self.acks.package_accepted(package)
        extras = package.message.header.extras
        email = extras.email if extras is not None else None
        self.events.publish(PackageAccepted(
            numero=package.numero, demarche=package.demarche, insee=package.insee, message_id=package.message_id,
            size=package.size, email_subject=email.subject if email else None, email_body=email.body if email else None,
        ))
        return Outcome("accepted", package.numero, final)

    def _duplicate(self, staged: Path, package: Package, record: PackageRecord, bound) -> Outcome:
        previous = self.ledger.accepted_by_sha256(package.sha256)
        self.ledger.record_duplicate(record, location=previous["location"] if previous else None)
        # The archive holds these very bytes already, so the resend itself can go.
        staged.unlink(missing_ok=True)
        self._drop_sidecar(staged)
        bound.info("intake.duplicate", sha256=package.sha256)
        self.acks.package_accepted(package)
        return Outcome("duplicate", package.numero, Path(previous["location"]) if previous else None)

    def _reject(self, staged: Path, upload: Upload, rejection: Rejection, envelope: Message | None, bound) -> Outcome:
        when = datetime.now(UTC)
        folder = ensure_dir(self.config.storage.quarantine / when.strftime("%Y-%m-%d"))
        base = f"{when.strftime('%H%M%S')}-{uuid.uuid4().hex[:8]}-{_safe_name(upload.name)}"
        target = folder / base
        sha256 = file_sha256(staged) if staged.exists() else ""
        size = staged.stat().st_size if staged.exists() else 0
        record = PackageRecord(
            sha256=sha256, size=size, account=upload.account, peer=upload.peer, upload_name=upload.name,
            message_id=envelope.message_id if envelope else None,
            numero=envelope.numero if envelope else None,
            demarche=envelope.demarche if envelope else None,
            insee=envelope.insee if envelope else None,
        )
        reason_file = {
            **rejection.as_dict(),
            "received_at": when.isoformat(timespec="seconds"),
            "upload_name": upload.name,
            "account": upload.account,
            "peer": upload.peer,
            "sha256": sha256,
            "size": size,
            "numero": record.numero,
            "message_id": record.message_id,
        }
        # The reason file lands first: an operator never finds a quarantined file without its reason.
        reason_path = folder / f"{base}.reason.json"
        reason_path.write_text(json.dumps(reason_file, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if staged.exists():
            publish_file(staged, target, mode=0o600, move=True)
        fsync_dir(folder)
        self.ledger.record_rejected(record, reason=rejection.reason.value, detail=rejection.detail, location=str(target))
        self._drop_sidecar(staged)
        bound.warning("intake.rejected", code=rejection.reason.value, reason=rejection.detail, quarantine=str(target),
                      numero=record.numero)
        self.acks.package_rejected(envelope, rejection)
        self.events.publish(PackageRejected(reason=rejection.reason.value, detail=rejection.detail, account=upload.account,
                                            peer=upload.peer, insee=record.insee, numero=record.numero))
        return Outcome("rejected", record.numero, target, rejection)

    def quarantine_partial(self, uploaded: Path, upload: Upload, rejection: Rejection) -> Outcome:
        """Quarantine a file that never became a committed package (e.g. it outgrew the size limit)."""
        staged = self.stage(uploaded, upload)
        bound = log.bind(account=upload.account, peer=upload.peer, upload=upload.name)
        return self._reject(staged, upload, rejection, None, bound)

    # -- helpers ---------------------------------------------------------------------

    def _archive_path(self, package: Package) -> Path:
        month = datetime.now(UTC).strftime("%Y/%m")
        return self.config.storage.archive / month / f"{package.numero}-{package.demarche}-{package.sha256[:12]}.zip"

    def _upload_of(self, staged: Path) -> Upload:
        sidecar = staged.with_suffix(SIDECAR_SUFFIX)
        try:
            return Upload(**json.loads(sidecar.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return Upload(account="?", peer="?", name=staged.name)

    @staticmethod
    def _drop_sidecar(staged: Path) -> None:
        staged.with_suffix(SIDECAR_SUFFIX).unlink(missing_ok=True)


def _record(package: Package, upload: Upload) -> PackageRecord:
    return PackageRecord(
        sha256=package.sha256, size=package.size, account=upload.account, peer=upload.peer, upload_name=upload.name,
        message_id=package.message_id, numero=package.numero, demarche=package.demarche, insee=package.insee,
    )


def _safe_name(name: str) -> str:
    """A client-chosen name, reduced to something safe to put in a file name."""
    base = os.path.basename(name.replace("\\", "/")) or "upload"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:120]

"""Return drops: what the business software hands back for the platform, checked and queued.

A drop sits in a commune's return directory. It is one of:

- a **status file** (``*.xml``, relayd's format, ``schemas/relayd-statut.xsd``) whose
  attachments sit beside it, written *before* it;
- a **zip** holding one status file and its attachments;
- a **PEC return package** (a zip with ``message.xml`` and a ``Retour`` body), checked and
  forwarded as it is.

A drop that passes becomes an outbox entry (a ``Retour`` package addressed from the
dossier's ``Aller`` routing, Sender and Recipient swapped) and goes, with its attachments,
to the archive. A drop that fails goes to the commune's ``rejected`` folder beside a
``.reason.json``, and nothing is sent. The same drop twice is queued once.

Every file is opened without following links and must be a regular file with a single
link (:mod:`relayd.outbound.dropfiles`); "goes" means a copy of what was read, in a file of
relayd's own, then the original name removed, so that no file relayd did not create ever
has its mode or owner changed. Attachments are opened with real parsers
(:mod:`relayd.outbound.attachments`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sqlite3
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

import structlog

from relayd import dossiers
from relayd.config import Commune, Config, Returns
from relayd.fsutil import ensure_dir, fsync_dir, resolve_gid, shown_name, temp_name, write_durably
from relayd.ledger import Ledger
from relayd.outbound.attachments import check_content
from relayd.outbound.dropfiles import TakenFile, read_regular, set_aside_name, take
from relayd.outbound.outbox import Entry, Outbox, Queued
from relayd.outbound.watcher import DropWatcher
from relayd.pec.envelope import Location, Party, Recipients, Routing, read_envelope
from relayd.pec.replies import Attachment, ReplyPackage, build_retour, read_reply
from relayd.pec.status import StatusFile, read_status_file
from relayd.pec.xml import parse_xml
from relayd.pec.zipcheck import PackageLimits, check_directory, check_extraction_names, open_zip
from relayd.rejections import Reason, Rejection

log = structlog.get_logger("relayd.returns")

#: accepted attachment types: the extension, what the content must start with, the MIME type
ATTACHMENT_TYPES: dict[str, tuple[bytes, str]] = {
    "pdf": (b"%PDF-", "application/pdf"),
    "png": (b"\x89PNG\r\n\x1a\n", "image/png"),
    "jpg": (b"\xff\xd8\xff", "image/jpeg"),
    "jpeg": (b"\xff\xd8\xff", "image/jpeg"),
}

#: how long a drop that is ahead of its dossier waits for the drop that should come first
MAX_DEFER_SECONDS = 300.0


@dataclass(frozen=True)
class DropOutcome:
    """What became of one drop."""

    status: Literal["queued", "duplicate", "rejected", "deferred", "vanished"]
    numero: str | None = None
    entry: Entry | None = None
    rejection: Rejection | None = None
    location: Path | None = None


@dataclass
class _Drop:
    """A drop, read: its parts and where they came from."""

    path: Path
    status: StatusFile | None = None
    forwarded: bytes | None = None  # a complete PEC return package, sent as it is
    numero: str | None = None
    state: str | None = None
    comment: str | None = None
    demarche: str | None = None
    attachments: list[tuple[str, str | None, bytes]] = field(default_factory=list)  # name, title, data
    taken: TakenFile | None = None  # the drop itself, once read safely
    companions: list[TakenFile] = field(default_factory=list)  # attachment files beside a status file
    untaken: list[Path] = field(default_factory=list)  # names beside it that were refused unread (links...)
    sha256: str = ""

    def names(self) -> list[str]:
        """Every attachment name beside the drop that goes where the drop goes."""
        return [shown_name(c.path.name) for c in self.companions] + [shown_name(p.name) for p in self.untaken]


def check_attachment_size(name: str, size: int, limits: Returns) -> None:
    """Refuse an attachment larger than the platform takes (1024 Ko unless configured)."""
    limit = limits.max_attachment_bytes
    if size > limit:
        raise Rejection(Reason.ATTACHMENT_TOO_LARGE,
                        f"{name!r} has {size} bytes; the platform accepts at most {limit} ({limit // 1024} Ko).")


def check_attachment(name: str, content: bytes, limits: Returns) -> str:
    """Check one attachment's size, its type by name, and its content with a real parser; return its MIME type."""
    check_attachment_size(name, len(content), limits)
    allowed = [t.lower().lstrip(".") for t in limits.attachment_types]
    ext = PurePosixPath(name).suffix.lower().lstrip(".")
    if ext not in allowed or ext not in ATTACHMENT_TYPES:
        raise Rejection(Reason.ATTACHMENT_TYPE, f"{name!r}: the accepted types are {', '.join(allowed)}.")
    magic, media_type = ATTACHMENT_TYPES[ext]
    if not content.startswith(magic):
        raise Rejection(Reason.ATTACHMENT_TYPE, f"{name!r} is named .{ext} but its content is not {ext.upper()}.")
    check_content(name, ext, content)
    return media_type


def next_state_error(numero: str, current: str, wanted: str) -> Rejection | None:
    """Why ``current`` cannot move to ``wanted`` (contract 6), or None when it can."""
    detail = dossiers.move_refusal(numero, current, wanted)
    return None if detail is None else Rejection(Reason.TRANSITION_INVALID, detail)


class ReturnDrops:
    """Check drops against the ledger's dossiers and queue the returns they ask for."""

    def __init__(self, config: Config, ledger: Ledger, outbox: Outbox):
        self.config = config
        self.ledger = ledger
        self.outbox = outbox
        self._first_deferred: dict[Path, float] = {}

    def commune_for(self, directory: Path) -> Commune | None:
        """The commune whose return directory this is."""
        return next((c for c in self.config.communes if c.returns == directory), None)

    # -- one drop --------------------------------------------------------------------

    def process(self, path: Path, commune: Commune, *, others_waiting: bool = False) -> DropOutcome:
        """Check one complete drop and queue it, or set it aside with a reason. Never raises for bad input."""
        bound = log.bind(commune=commune.insee, drop=shown_name(path.name))
        drop = _Drop(path)
        if not os.path.lexists(path):
            # Taken back by whoever dropped it between the scan and now: nothing to send, nothing to set aside.
            bound.info("returns.vanished")
            return DropOutcome("vanished")
        try:
            self._read(drop, commune)
            bound = bound.bind(numero=drop.numero, state=drop.state)
            previous = self.outbox.by_source(drop.sha256)
            if previous is not None:
                return self._duplicate(drop, previous, bound)
            dossier = self._dossier(drop, commune)
            self._check_transition(drop, dossier["requested_state"] or dossier["state"])
            entry = self._queue(drop, dossier)
        except _Defer:
            waited = time.monotonic() - self._first_deferred.setdefault(path, time.monotonic())
            if others_waiting and waited < MAX_DEFER_SECONDS:
                bound.info("returns.deferred", reason="an earlier drop of this directory is still settling")
                return DropOutcome("deferred", drop.numero)
            self._first_deferred.pop(path, None)
            return self._reject(drop, commune, self._transition_error(drop), bound)
        except Rejection as rejection:
            self._first_deferred.pop(path, None)
            return self._reject(drop, commune, rejection, bound)
        except sqlite3.IntegrityError:
            # The outbox keys replies by MessageId: a forwarded package may not reuse one.
            rejection = Rejection(Reason.RETURN_PACKAGE_INVALID, "its MessageId was already used by another return.")
            return self._reject(drop, commune, rejection, bound)
        except FileNotFoundError:
            if not os.path.lexists(path):
                bound.info("returns.vanished")  # taken back while it was being read
                return DropOutcome("vanished")
            bound.exception("returns.internal_error", error="FileNotFoundError")
            rejection = Rejection(Reason.INTERNAL_ERROR, "relayd failed on this drop (FileNotFoundError).")
            return self._reject(drop, commune, rejection, bound)
        except Exception as exc:  # noqa: BLE001 - a drop must never stop the watcher
            bound.exception("returns.internal_error", error=type(exc).__name__)
            rejection = Rejection(Reason.INTERNAL_ERROR, f"relayd failed on this drop ({type(exc).__name__}).")
            return self._reject(drop, commune, rejection, bound)
        self._first_deferred.pop(path, None)
        location = self._archive(drop)
        bound.info("returns.queued", outbox=entry.id, remote_name=entry.remote_name)
        return DropOutcome("queued", drop.numero, entry, location=location)

    # -- reading ---------------------------------------------------------------------

    def _read(self, drop: _Drop, commune: Commune) -> None:
        # Every file is opened once, without following links, and only what that descriptor read is used.
        limits = self.config.returns
        if drop.path.suffix.lower() == ".xml":
            limit = limits.max_status_bytes
            drop.taken = read_regular(drop.path, limit=limit, what="the status file", too_large=lambda size: Rejection(
                Reason.XML_TOO_LARGE, f"the status file has {size} bytes; the limit is {limit}."))
            data = drop.taken.data
            self._take_status(drop, read_status_file(data, max_bytes=limits.max_status_bytes))
            digest = hashlib.sha256(data)
            for attachment in drop.status.attachments:
                companion = self._read_beside(drop, attachment.file)
                drop.attachments.append((attachment.file, attachment.title, companion.data))
                digest.update(hashlib.sha256(companion.data).digest())
            drop.sha256 = digest.hexdigest()
        else:
            budget = limits.max_status_bytes + limits.max_attachments * limits.max_attachment_bytes + 1024 * 1024
            drop.taken = read_regular(drop.path, limit=budget, what="the zip", too_large=lambda size: Rejection(
                Reason.ATTACHMENT_TOO_LARGE, f"the zip has {size} bytes; no valid return is that large."))
            data = drop.taken.data
            drop.sha256 = hashlib.sha256(data).hexdigest()
            self._read_zip(drop, data, budget)
        self._check_attachments(drop)

    def _read_beside(self, drop: _Drop, name: str) -> TakenFile:
        """Read one attachment named by a status file; a refused one goes where the drop goes, unread."""
        beside = drop.path.parent / name
        try:
            companion = read_regular(beside, limit=self.config.returns.max_attachment_bytes, what="the attachment",
                                     too_large=lambda size: self._size_error(name, size))
        except FileNotFoundError:
            raise Rejection(Reason.ATTACHMENT_MISSING,
                            f"{name!r} is not beside the status file; write attachments first.") from None
        except Rejection:
            drop.untaken.append(beside)
            raise
        drop.companions.append(companion)
        return companion

    def _size_error(self, name: str, size: int) -> Rejection:
        try:
            check_attachment_size(name, size, self.config.returns)
        except Rejection as rejection:
            return rejection
        return Rejection(Reason.ATTACHMENT_TOO_LARGE, f"{name!r} grew while it was read.")

    def _read_zip(self, drop: _Drop, data: bytes, budget: int) -> None:
        zf = open_zip(io.BytesIO(data), label="the return zip")
        with zf:
            limits = PackageLimits(max_package_bytes=budget, max_members=self.config.returns.max_attachments + 1,
                                   max_total_uncompressed_bytes=budget)
            infos = check_directory(zf, limits, label="the return zip")
            check_extraction_names((i.filename for i in infos), label="the return zip")
            names = [i.filename for i in infos if not i.is_dir()]
            if "message.xml" in names:
                reply = read_reply(data)
                if reply.kind != "Retour" or reply.retour is None:
                    raise Rejection(Reason.RETURN_PACKAGE_INVALID, f"the package is an {reply.kind} ack, not a Retour.")
                drop.forwarded = data
                drop.numero = reply.retour.numero
                drop.state = reply.retour.state
                drop.demarche = reply.retour.demarche
                drop.attachments = [(name, None, content) for name, content in reply.members.items()]
                return
            statuses = [n for n in names if n.lower().endswith(".xml")]
            if len(statuses) != 1:
                raise Rejection(Reason.STATUS_INVALID,
                                f"a return zip holds exactly one status file (.xml); this one holds {len(statuses)}.")
            info = {i.filename: i for i in infos}
            status_info = info[statuses[0]]
            if status_info.file_size > self.config.returns.max_status_bytes:
                raise Rejection(Reason.XML_TOO_LARGE, f"{statuses[0]!r} is larger than a status file may be.")
            self._take_status(drop, read_status_file(zf.read(status_info), max_bytes=self.config.returns.max_status_bytes))
            listed = {a.file for a in drop.status.attachments}
            for name in names:
                if name != statuses[0] and name not in listed:
                    raise Rejection(Reason.STATUS_INVALID, f"the zip holds {name!r}, which the status file does not list.")
            for attachment in drop.status.attachments:
                if attachment.file not in info:
                    raise Rejection(Reason.ATTACHMENT_MISSING, f"{attachment.file!r} is not in the zip.")
                self._check_size(attachment.file, info[attachment.file].file_size)
                drop.attachments.append((attachment.file, attachment.title, zf.read(info[attachment.file])))

    @staticmethod
    def _take_status(drop: _Drop, status: StatusFile) -> None:
        drop.status = status
        drop.numero = status.numero
        drop.state = status.state
        drop.comment = status.comment
        drop.demarche = status.demarche

    def _check_size(self, name: str, size: int) -> None:
        check_attachment_size(name, size, self.config.returns)

    def _check_attachments(self, drop: _Drop) -> None:
        limits = self.config.returns
        if len(drop.attachments) > limits.max_attachments:
            raise Rejection(Reason.TOO_MANY_ATTACHMENTS,
                            f"the return carries {len(drop.attachments)} attachments; the limit is {limits.max_attachments}.")
        for name, _, content in drop.attachments:
            check_attachment(name, content, limits)

    # -- checking against the ledger -------------------------------------------------

    def _dossier(self, drop: _Drop, commune: Commune) -> sqlite3.Row:
        assert drop.numero is not None
        dossier = self.ledger.dossier(drop.numero)
        if dossier is None:
            if not commune.allow_unknown_dossiers:
                raise Rejection(Reason.DOSSIER_UNKNOWN, f"this relay never received dossier {drop.numero}.")
            return self._adopt(drop, commune)
        if dossier["insee"] != commune.insee:
            raise Rejection(Reason.RETURN_WRONG_COMMUNE,
                            f"dossier {drop.numero} belongs to commune {dossier['insee']}, not {commune.insee}.")
        return dossier

    def _adopt(self, drop: _Drop, commune: Commune) -> sqlite3.Row:
        """Record a dossier the relay never saw, as the configuration allows, to follow its states."""
        if not drop.demarche:
            raise Rejection(Reason.STATUS_INVALID,
                            f"dossier {drop.numero} is unknown here: the status file must give its NumeroDemarche.")
        routing = _routing_for_unknown(drop.numero, drop.demarche, commune)
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self.ledger.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO dossiers (numero, demarche, insee, state, received_at, updated_at, message_id,"
                " sha256, routing) VALUES (?, ?, ?, ?, ?, ?, '', '', ?)",
                (drop.numero, drop.demarche, commune.insee, dossiers.TRANSMIS, now, now, routing.to_xml(encoding="unicode")),
            )
            Ledger.event(db, drop.numero, "adopted", "a return for a dossier this relay never received (allowed here)")
        dossier = self.ledger.dossier(drop.numero)
        assert dossier is not None
        return dossier

    def _check_transition(self, drop: _Drop, current: str) -> None:
        if dossiers.can_move(current, drop.state or ""):
            return
        # "clos" while "reçu" is still settling in the same folder: wait for it rather than refuse.
        if dossiers.skips_a_step(current, drop.state or ""):
            raise _Defer(current)
        raise self._transition_error(drop, current)

    def _transition_error(self, drop: _Drop, current: str | None = None) -> Rejection:
        if current is None:
            dossier = self.ledger.dossier(drop.numero or "")
            current = dossiers.heading(dossier["state"], dossier["requested_state"]) if dossier else dossiers.TRANSMIS
        return next_state_error(drop.numero or "?", current, drop.state or "?") or Rejection(Reason.TRANSITION_INVALID)

    # -- queueing --------------------------------------------------------------------

    def _queue(self, drop: _Drop, dossier: sqlite3.Row) -> Entry:
        routing = self.routing_of(dossier)
        if drop.forwarded is not None:
            reply = ReplyPackage(
                message_id=_forwarded_message_id(drop.forwarded, dossier["message_id"], drop.sha256), kind="Retour",
                data=drop.forwarded,
                name=_forwarded_name(drop, dossier["demarche"]),
            )
        else:
            attachments = [Attachment(name=name, data=data, media_type=check_attachment(name, data, self.config.returns),
                                      title=title) for name, title, data in drop.attachments]
            reply = build_retour(routing, numero=drop.numero, demarche=dossier["demarche"], state=drop.state,
                                 comment=drop.comment, attachments=attachments, style=self.config.reply_style)
        return self.queue_retour(reply, dossier["numero"], drop.state, ref_message_id=dossier["message_id"] or None,
                                 source_sha256=drop.sha256, source=shown_name(drop.path.name))

    def routing_of(self, dossier: sqlite3.Row) -> Routing:
        """The routing of the dossier's Aller envelope: from the ledger, or from the archived package.

        Ledgers written before the routing was recorded still have the package in the archive.
        """
        if dossier["routing"]:
            return Routing.from_xml(dossier["routing"])
        archived = Path(dossier["archive_path"] or "")
        try:
            with zipfile.ZipFile(archived) as zf:
                root = parse_xml(zf.read("message.xml"), name="message.xml")
            return read_envelope(root).header.routing
        except (OSError, KeyError, zipfile.BadZipFile, Rejection):
            raise Rejection(Reason.INTERNAL_ERROR,
                            f"the envelope of dossier {dossier['numero']} is neither in the ledger nor readable in "
                            f"the archive ({archived}); its routing is unknown.") from None

    def queue_retour(self, reply: ReplyPackage, numero: str, state: str, *, ref_message_id: str | None,
                     source_sha256: str | None, source: str) -> Entry:
        """Queue a Retour and move the dossier's requested state, in one transaction.

        The transition is checked again inside the transaction, so two writers (a drop and the
        automatic receipt) cannot both move the same dossier.
        """

        def advance(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT state, requested_state FROM dossiers WHERE numero = ?", (numero,)).fetchone()
            current = dossiers.heading(row["state"], row["requested_state"])
            if not dossiers.can_move(current, state):
                raise Rejection(Reason.TRANSITION_INVALID, f"dossier {numero} moved to {current} meanwhile.")
            db.execute("UPDATE dossiers SET requested_state = ? WHERE numero = ?", (state, numero))

        queued = Queued(kind="Retour", numero=numero, ref_message_id=ref_message_id, target_state=state,
                        source_sha256=source_sha256, source=source)
        return self.outbox.enqueue(reply, queued, also=advance)

    def auto_receipt(self, numero: str) -> Entry | None:
        """Queue "reçu" for a dossier just handed over, if nothing has moved it yet."""
        dossier = self.ledger.dossier(numero)
        if dossier is None or dossier["state"] != dossiers.TRANSMIS or dossier["requested_state"] is not None:
            return None
        reply = build_retour(self.routing_of(dossier), numero=numero, demarche=dossier["demarche"],
                             state=dossiers.RECU, comment=None, attachments=[], style=self.config.reply_style)
        try:
            return self.queue_retour(reply, numero, dossiers.RECU, ref_message_id=dossier["message_id"],
                                     source_sha256=None, source="auto_receipt")
        except Rejection:
            return None  # a drop moved it first

    # -- settling the drop -----------------------------------------------------------

    def _duplicate(self, drop: _Drop, previous: Entry, bound) -> DropOutcome:
        location = self._archive(drop)
        self.ledger.record_event(drop.numero, "return_redropped",
                                 f"{shown_name(drop.path.name)} was already queued as outbox #{previous.id}; not sent again")
        bound.info("returns.duplicate", outbox=previous.id)
        return DropOutcome("duplicate", drop.numero, previous, location=location)

    def _archive(self, drop: _Drop) -> Path:
        # A copy of exactly what was checked, in relayd's own files; the business software's names go.
        assert drop.taken is not None
        folder = ensure_dir(self.config.storage.archive / "returns" / datetime.now(UTC).strftime("%Y/%m"))
        stamp = _stamp()
        target = folder / aside_name(stamp, drop.path.name)
        for companion in drop.companions:
            take(companion, folder / aside_name(stamp, companion.path.name), mode=0o600)
        take(drop.taken, target, mode=0o600)
        return target

    def _reject(self, drop: _Drop, commune: Commune, rejection: Rejection, bound) -> DropOutcome:
        folder = commune.rejected_dir
        assert folder is not None
        ensure_dir(folder, 0o755)
        when = datetime.now(UTC)
        stamp = _stamp()
        target = folder / aside_name(stamp, drop.path.name)
        gid = resolve_gid(commune.group)
        reason = {
            **rejection.as_dict(),
            "rejected_at": when.isoformat(timespec="seconds"),
            "drop": shown_name(drop.path.name),
            "numero": drop.numero,
            "state": drop.state,
            "attachments": drop.names(),
            "sent": False,
        }
        # The reason first: whoever finds the refused drop finds why beside it.
        # The business software reads this folder: its files get the commune's mode and group.
        write_durably(folder / f"{target.name}.reason.json",
                      (json.dumps(reason, indent=2, ensure_ascii=False) + "\n").encode(), mode=commune.mode, gid=gid)
        # What relayd read is copied into files of its own; a name it refused to read moves as a name only.
        for companion in drop.companions:
            take(companion, folder / aside_name(stamp, companion.path.name), mode=commune.mode, gid=gid)
        for name in drop.untaken:
            set_aside_name(name, folder / aside_name(stamp, name.name))
        if drop.taken is not None:
            take(drop.taken, target, mode=commune.mode, gid=gid)
        else:
            set_aside_name(drop.path, target)
        fsync_dir(folder)
        if drop.numero and self.ledger.dossier(drop.numero) is not None:
            self.ledger.record_event(drop.numero, "return_rejected",
                                     f"{shown_name(drop.path.name)}: {rejection.reason.value}: {rejection.detail}")
        bound.warning("returns.rejected", code=rejection.reason.value, reason=rejection.detail, moved_to=str(target))
        return DropOutcome("rejected", drop.numero, rejection=rejection, location=target)


class _Defer(Exception):
    """The drop is ahead of its dossier; another drop may bring the missing step."""


def _stamp() -> str:
    """A file-name prefix that sorts by time and never repeats, so nothing set aside is overwritten."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


#: the longest name relayd gives a file it keeps: with ".reason.json" after it, even the temporary name
#: it is written under fits in the 255 bytes most file systems allow
_MAX_KEPT_NAME_BYTES = 255 - len(temp_name(".reason.json"))
_KEPT_SUFFIX_CHARS = 16


def aside_name(stamp: str, name: str) -> str:
    """``<stamp>-<name>`` for a copy relayd keeps of a file named by the business software.

    Valid UTF-8, and short enough for the stamp and ``.reason.json`` to fit in a file name:
    a longer name loses the middle of its stem, keeping its extension.
    """
    shown = shown_name(name)
    budget = _MAX_KEPT_NAME_BYTES - len(stamp.encode()) - 1
    if len(shown.encode()) <= budget:
        return f"{stamp}-{shown}"
    suffix = PurePosixPath(shown).suffix
    suffix = suffix if len(suffix) <= _KEPT_SUFFIX_CHARS else ""
    room = budget - len(suffix.encode()) - len("…".encode())
    stem = shown[: len(shown) - len(suffix)].encode()[:room].decode("utf-8", "ignore")
    return f"{stamp}-{stem}…{suffix}"


def _routing_for_unknown(numero: str, demarche: str, commune: Commune) -> Routing:
    """A routing for a dossier the relay never received: the platform's service as the sender.

    There is no original MessageId to refer to; the Retour names the dossier and says so.
    """
    return Routing(
        message_id=f"{numero} inconnu-du-relais",
        flow_type=demarche,
        sender=Party(country="FR", location=Location(service=demarche)),
        recipients=Recipients(recipients=[Party(country="FR", location=Location(service=commune.insee))]),
    )


def _forwarded_message_id(data: bytes, answered: str | None, sha256: str) -> str:
    """The outbox's key for a forwarded package: its MessageId, unless it is the answered Aller's.

    A package built as the real replier builds it (``platform.reply_style: mirror``) keeps the
    Aller's MessageId, as every reply to that dossier does: its key is made unique by its content.
    """
    message_id = read_reply(data).message_id
    return f"{message_id} Retour {sha256[:12]}" if answered and message_id == answered else message_id


def _forwarded_name(drop: _Drop, demarche: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H_%M_%S")
    return f"relayd.{stamp}.{drop.numero}-{demarche}.Retour.{drop.sha256[:12]}.zip"


#: the longest wait before a drop that failed for a reason of relayd's own is tried again
MAX_RETRY_SECONDS = 3600.0


async def watch_returns(watcher: DropWatcher, drops: ReturnDrops) -> None:
    """Process drops as the watcher finds them, until cancelled."""
    failures: dict[Path, int] = {}
    while True:
        try:
            await _process_batch(watcher, drops, failures)
        except Exception as exc:  # noqa: BLE001 - the watcher outlives any one surprise
            log.exception("returns.batch_failed", error=type(exc).__name__)
            await asyncio.sleep(watcher.rescan_seconds)


async def _process_batch(watcher: DropWatcher, drops: ReturnDrops, failures: dict[Path, int]) -> None:
    """Wait for complete drops and process them, oldest first.

    A drop whose processing fails for a reason that is not its own (its refusal cannot be set
    aside, the archive cannot take it) stays where it is and is offered again after a wait that
    doubles up to :data:`MAX_RETRY_SECONDS`; the drops after it in the batch go on meanwhile.
    """
    batch = await watcher.next_batch()
    for i, path in enumerate(batch):
        commune = drops.commune_for(path.parent)
        if commune is None:
            continue
        # A drop later in this batch, or one still settling, may be the step this one needs first.
        others = watcher.waiting_in(path.parent, path) or any(p.parent == path.parent for p in batch[i + 1:])
        try:
            outcome = await asyncio.to_thread(drops.process, path, commune, others_waiting=others)
        except Exception as exc:  # noqa: BLE001 - one drop's trouble must not hold back the others
            tries = failures[path] = failures.get(path, 0) + 1
            wait = min(MAX_RETRY_SECONDS, watcher.rescan_seconds * 2 ** (tries - 1))
            log.exception("returns.drop_failed", commune=commune.insee, drop=shown_name(path.name),
                          error=type(exc).__name__, tries=tries, retry_in=round(wait, 1),
                          effect="the drop stays in the return directory and is tried again")
            watcher.release(path, after=wait)
            continue
        failures.pop(path, None)
        if outcome.status == "deferred":
            watcher.release(path, after=max(watcher.settle_seconds, 0.5))

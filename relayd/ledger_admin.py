"""Looking after the ledger: the start-up guard, and ``relayd ledger check | backup | rebuild``.

The ledger is relayd's memory (duplicates, dossier states, the outbox); the archive is its
evidence (every accepted package, every reply sent, byte for byte). So a ledger that is
missing while the archive holds files is never taken for a fresh install: relayd refuses to
start and names the way out, ``relayd ledger rebuild``, which rebuilds the ledger from the archive.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from relayd import dossiers
from relayd.config import Config
from relayd.fsutil import fsync_dir
from relayd.ledger import EXIT_LEDGER_LOCKED, EXIT_LEDGER_UNUSABLE, Ledger, LedgerUnusable, PackageRecord, is_fresh
from relayd.pec.package import inspect_package
from relayd.pec.replies import read_reply
from relayd.rejections import Rejection

log = structlog.get_logger("relayd.ledger")


# -- start-up ---------------------------------------------------------------------------


def earlier_use(config: Config) -> str | None:
    """What in storage shows that relayd has run here before (archived files, an outbox, staged uploads), if anything."""
    storage = config.storage
    for what, folder in (("the archive", storage.archive), ("the outbox", storage.outbox),
                         ("staging", storage.staging)):
        found = next(_files(folder), None)
        if found is not None:
            return f"{what} holds files ({found})"
    return None


def open_for_run(config: Config) -> Ledger:
    """Open the daemon's ledger, or raise :class:`LedgerUnusable` with the one line that says why and what to do."""
    path = config.storage.ledger
    if is_fresh(path):
        used = earlier_use(config)
        if used is not None:
            state = "empty (0 bytes)" if path.exists() else "missing"
            raise LedgerUnusable(
                f"the ledger {path} is {state} but {used}: relayd will not start with no memory of earlier dossiers. "
                f"Run `relayd ledger rebuild -c <config>` to rebuild it from the archive (or restore a backup)")
    timeout = config.storage.ledger_lock_timeout_seconds

    def waiting() -> None:
        log.warning("ledger.locked_waiting", ledger=str(path), timeout_seconds=timeout,
                    hint="another process holds the ledger; relayd waits for it")

    return Ledger(path, lock_timeout=timeout, on_wait=waiting)


# -- relayd ledger check ------------------------------------------------------------------


def check(config: Config) -> tuple[list[str], int]:
    """Problems found (SQLite's integrity check, then relayd's own consistency), and how many rows were checked."""
    path = config.storage.ledger
    if is_fresh(path):
        return [f"the ledger {path} is missing or empty"], 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        return [f"cannot open {path}: {exc}"], 0
    db.row_factory = sqlite3.Row
    with closing(db):
        try:
            integrity = [row[0] for row in db.execute("PRAGMA integrity_check(20)")]
        except sqlite3.DatabaseError as exc:
            return [f"SQLite: {exc}"], 0
        if integrity != ["ok"]:
            return [f"SQLite: {line}" for line in integrity], 0
        problems: list[str] = []
        dossiers = db.execute("SELECT numero, archive_path, scrubbed_at FROM dossiers").fetchall()
        accepted = db.execute("SELECT numero, sha256 FROM packages WHERE outcome = 'accepted'").fetchall()
        with_dossier = {row["numero"] for row in dossiers}
        for row in accepted:
            if row["numero"] not in with_dossier:
                problems.append(f"accepted package {row['sha256'][:12]} (dossier {row['numero']}) has no dossier row")
        purged_before = _archive_purged(config)
        for row in dossiers:
            archived = row["archive_path"]
            if archived and not Path(archived).is_file() and not _may_be_purged(archived, purged_before):
                problems.append(f"dossier {row['numero']}: its archived package {archived} is missing")
        for row in db.execute("SELECT id, status, payload FROM outbox WHERE status IN ('pending', 'dead')"):
            if not Path(row["payload"]).is_file():
                problems.append(f"outbox #{row['id']} ({row['status']}): its file {row['payload']} is missing")
        return problems, len(dossiers) + len(accepted)


def _archive_purged(config: Config) -> float:
    """Archived files older than this (a timestamp) may have been removed by retention, as configured."""
    return datetime.now(UTC).timestamp() - config.retention.archive_days * 86400


def _may_be_purged(archived: str, purged_before: float) -> bool:
    # archive/YYYY/MM/name: retention removes whole months once they are old enough.
    parts = Path(archived).parts
    try:
        month = datetime(int(parts[-3]), int(parts[-2]), 1, tzinfo=UTC)
    except (ValueError, IndexError):
        return False
    return month.timestamp() < purged_before


# -- relayd ledger backup -------------------------------------------------------------------


def backup(config: Config, target: Path) -> int:
    """Copy the ledger to ``target`` with SQLite's online backup API (safe while relayd runs); return its page count."""
    source_path = config.storage.ledger
    if is_fresh(source_path):
        raise LedgerUnusable(f"the ledger {source_path} is missing or empty: nothing to back up")
    target = target.resolve()
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True, timeout=30)
    try:
        with closing(sqlite3.connect(partial)) as copy:
            # Pages go over in steps, so the daemon's writers are never held up for long; a write
            # during the copy makes SQLite start the remaining steps again from a consistent state.
            source.backup(copy, pages=256, sleep=0.01)
            pages = copy.execute("PRAGMA page_count").fetchone()[0]
            integrity = copy.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            raise LedgerUnusable(f"the copy in {partial} fails SQLite's integrity check ({integrity}); it was kept for a look")
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, target)
        fsync_dir(target.parent)
    except sqlite3.DatabaseError as exc:
        partial.unlink(missing_ok=True)
        raise LedgerUnusable(f"cannot back up {source_path}: {exc}") from None
    finally:
        source.close()
    return pages


# -- relayd ledger rebuild ------------------------------------------------------------------


@dataclass
class Rebuilt:
    """What a rebuild found in the archive."""

    dossiers: int = 0
    replies: int = 0
    requeued: int = 0
    skipped: list[str] | None = None
    kept_aside: Path | None = None


def rebuild(config: Config, *, force: bool = False) -> Rebuilt:
    """Rebuild packages, dossiers and the sent replies from the archive, and queue again what waits in the outbox.

    A ledger that opens and holds dossiers is kept unless ``force``; whatever is replaced is moved
    aside (``ledger.sqlite.replaced-<time>``), never deleted.
    """
    path = config.storage.ledger
    done = Rebuilt(skipped=[])
    if not is_fresh(path):
        if not force:
            try:
                with closing(Ledger(path, lock_timeout=1)) as current:
                    count = current.query("SELECT COUNT(*) AS n FROM dossiers")[0]["n"]
            except LedgerUnusable as exc:
                if exc.exit_status == EXIT_LEDGER_LOCKED:
                    raise  # someone (relayd?) is using it: not a ledger to replace
                count = None
            if count:
                raise LedgerUnusable(f"the ledger {path} opens and holds {count} dossier(s); "
                                     "add --force to replace it (it is kept aside)", 1)
    fresh = path.with_name(path.name + ".rebuilding")
    for leftover in _sqlite_files(fresh):
        leftover.unlink(missing_ok=True)
    with closing(Ledger(fresh)) as ledger:
        _rebuild_packages(config, ledger, done)
        _rebuild_replies(config, ledger, done)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    if path.exists():
        done.kept_aside = path.with_name(f"{path.name}.replaced-{stamp}")
        for old, suffix in zip(_sqlite_files(path), ("", "-wal", "-shm"), strict=True):
            if old.exists():
                os.replace(old, done.kept_aside.with_name(done.kept_aside.name + suffix))
    os.replace(fresh, path)
    fsync_dir(path.parent)
    return done


def _rebuild_packages(config: Config, ledger: Ledger, done: Rebuilt) -> None:
    archive = config.storage.archive
    sent = archive / "sent"
    for zipped in sorted(p for p in _files(archive) if sent not in p.parents and p.suffix == ".zip"):
        try:
            package = inspect_package(zipped, config.limits)
        except (Rejection, OSError) as exc:
            done.skipped.append(f"{zipped}: {exc}")
            continue
        if ledger.accepted_by_sha256(package.sha256) is not None:
            continue
        commune = config.commune(package.insee)
        inbox = str(commune.inbox) if commune is not None else None
        rec = PackageRecord(sha256=package.sha256, size=package.size, upload_name=zipped.name,
                            message_id=package.message_id, numero=package.numero, demarche=package.demarche,
                            insee=package.insee)
        received = _mtime(zipped)
        with ledger.transaction() as db:
            db.execute(
                "INSERT INTO packages (received_at, upload_name, size, sha256, message_id, numero, demarche, insee,"
                " outcome, location) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'accepted', ?)",
                (received, rec.upload_name, rec.size, rec.sha256, rec.message_id, rec.numero, rec.demarche, rec.insee,
                 inbox))
            db.execute(
                "INSERT OR IGNORE INTO dossiers (numero, demarche, insee, state, deposited_at, received_at, updated_at,"
                " message_id, sha256, inbox_path, archive_path, routing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.numero, rec.demarche, rec.insee, dossiers.TRANSMIS, package.message.aller.teledemarche.date, received, received,
                 rec.message_id, rec.sha256, inbox, str(zipped),
                 package.message.header.routing.to_xml(encoding="unicode")))
            Ledger.event(db, rec.numero, "rebuilt", f"recorded again from the archive ({zipped.name})")
        done.dossiers += 1


def _rebuild_replies(config: Config, ledger: Ledger, done: Rebuilt) -> None:
    """Sent replies (archive/sent) become delivered entries and move their dossier on; the outbox folder's, pending ones."""
    sent = sorted(_files(config.storage.archive / "sent"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    waiting = sorted(_files(config.storage.outbox), key=lambda p: (p.stat().st_mtime_ns, p.name))
    for path, status in [(p, "delivered") for p in sent] + [(p, "pending") for p in waiting]:
        data = path.read_bytes()
        try:
            reply = read_reply(data)
        except (Rejection, OSError, ValueError) as exc:
            done.skipped.append(f"{path}: {exc}")
            continue
        body = reply.retour if reply.retour is not None else reply.ack
        numero = body.numero if body is not None else None
        state = reply.retour.state if reply.retour is not None else None
        at = _mtime(path)
        with ledger.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO outbox (created_at, kind, numero, queue_key, target_state, message_id, ref_message_id,"
                " remote_name, payload, size, sha256, source, status, attempts, next_attempt_at, delivered_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'rebuild', ?, 0, 0, ?)",
                (at, reply.kind, numero, numero or f"message:{reply.message_id}", state, reply.message_id,
                 body.message_id_origine if body is not None else None, path.name,
                 str(path), len(data), hashlib.sha256(data).hexdigest(), status,
                 at if status == "delivered" else None))
            if not cursor.rowcount:
                continue
            if status == "delivered" and state is not None and numero is not None:
                row = db.execute("SELECT state FROM dossiers WHERE numero = ?", (numero,)).fetchone()
                if row is not None and dossiers.is_later(state, row["state"]):
                    db.execute("UPDATE dossiers SET state = ?, updated_at = ? WHERE numero = ?", (state, at, numero))
        if status == "delivered":
            done.replies += 1
        else:
            done.requeued += 1


def _files(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder`` (none if it does not exist)."""
    if not folder.is_dir():
        return
    for dirpath, _dirs, names in os.walk(folder):
        for name in sorted(names):
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


def _sqlite_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="milliseconds")


# -- the command ------------------------------------------------------------------------------


def register(sub) -> None:
    """Add ``relayd ledger check | backup | rebuild`` to the command line."""
    p_ledger = sub.add_parser("ledger", help="check, back up or rebuild the ledger",
                              description="Look after the ledger (storage.root/ledger.sqlite). Exit status: 0 when all "
                                          "is well, 1 when a problem was found, 2 on a configuration error, "
                                          f"{EXIT_LEDGER_UNUSABLE} when the ledger cannot be opened.")
    actions = p_ledger.add_subparsers(dest="action", required=True)
    actions.add_parser("check", help="SQLite's integrity check, then relayd's own (archived files, outbox files)")
    p_backup = actions.add_parser("backup", help="an online copy with SQLite's backup API, safe while relayd runs")
    p_backup.add_argument("file", type=Path)
    p_rebuild = actions.add_parser("rebuild", help="rebuild packages, dossiers and sent replies from the archive "
                                                   "(stop relayd first)")
    p_rebuild.add_argument("--force", action="store_true", help="replace a ledger that still opens (kept aside)")
    for p in actions.choices.values():
        p.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))


def run_command(config: Config, args) -> int:
    """Run ``relayd ledger <action>``; print the outcome, one line per problem."""
    try:
        if args.action == "check":
            problems, checked = check(config)
            for problem in problems:
                print(f"relayd: {problem}", file=sys.stderr)
            if problems:
                return EXIT_LEDGER_UNUSABLE if problems[0].startswith(("SQLite", "cannot open")) else 1
            print(f"{config.storage.ledger}: OK ({checked} rows checked)")
            return 0
        if args.action == "backup":
            pages = backup(config, args.file)
            print(f"{config.storage.ledger} copied to {args.file} ({pages} pages)")
            return 0
        done = rebuild(config, force=args.force)
    except LedgerUnusable as exc:
        print(f"relayd: {exc.message}", file=sys.stderr)
        return exc.exit_status
    for skipped in done.skipped or []:
        print(f"relayd: skipped {skipped}", file=sys.stderr)
    aside = f"; the previous ledger is kept as {done.kept_aside}" if done.kept_aside else ""
    print(f"{config.storage.ledger}: rebuilt from the archive: {done.dossiers} dossier(s), {done.replies} sent "
          f"repl(y/ies), {done.requeued} outbox entr(y/ies) queued again{aside}")
    return 1 if done.skipped else 0

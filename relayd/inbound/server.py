"""The inbound SFTP server: who may log in, what they may do, and when an upload is complete.

The SFTP surface is deliberately small (contract 7). An account sees only its drop
folder, as ``/`` (and as its configured ``directory``, e.g. ``/depot``, whose parents are
read-only folders). It may write package files (``*.zip``, any case) or temporary files
(``server.temporary_prefixes`` / ``temporary_suffixes``, any case, winning over ``.zip``),
rename a temporary file to a package name, list the folder and remove its own files.
Nothing else: no reads, no sub-folders, no links. Setstat of times and permissions is
accepted and ignored (modes are forced); ownership, setuid bits and size changes are refused.

Each open for writing gets a private file of its own (relayd/inbound/uploads.py): no other
handle, session or connection shares it. Writes may come out of order within a pipelining
window but may leave no gap (``upload_hole``); limits count the file's size.

Completion (contract 1): a package is committed by

* a rename from a temporary name to a package name (of this session's own closed file
  under that name, or else of what the drop folder shows under it), or
* an explicit close of a handle written under a package name.

A close that asyncssh issues because the session dropped is never a commit: the file is
a partial and is removed. Intake runs (in its own bounded pool) before the rename or close
is answered, so the client learns the outcome on that very request. A second writer of a
name is a separate upload: its commit is a resend (``duplicate``, answered OK) or a
conflict (``dossier_conflict``). Every request is guarded: a client only ever reads
generic text, never an exception's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import os
import posixpath
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import asyncssh
import structlog
from asyncssh.constants import FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_TRUNC, FXF_WRITE

from relayd.config import Config
from relayd.events import Events, PackageReceived
from relayd.inbound.banbook import BanBook, Network
from relayd.inbound.defender import Defender, parse_address
from relayd.inbound.diskguard import DiskGuard
from relayd.inbound.host_keys import keypairs_for, read_or_make_key
from relayd.inbound.intake import Intake, Outcome, Upload
from relayd.inbound.passwords import hash_password, verify_password
from relayd.inbound.startups import StartupBudget
from relayd.inbound.uploads import Extents, UploadArea, copy_into, is_reserved, same_file
from relayd.rejections import Reason, Rejection
from relayd.ssh_algorithms import LEGACY_ADDITIONS, PROFILES

log = structlog.get_logger("relayd.sftp")

_GENERIC_DENIED = "permission denied"
_SYNC_EVERY = 32 * 1024 * 1024
# How far past the unbroken run of bytes from 0 a write may land: pipelining clients keep many
# requests in flight (OpenSSH 64 x 32 KiB, rclone up to 64 x 256 KiB). Further is a hole, refused at once.
_PIPELINE_WINDOW = 16 * 1024 * 1024
# Out-of-order writes leave pieces until the gaps fill; past this many, the upload is refused.
_MAX_PIECES = 4096
# Verifications that may run at once; they have their own threads, so password checks never wait behind them.
_VERIFY_WORKERS = 2
# Compared against when the username is unknown, so that timing does not reveal which names exist.
_DUMMY_HASH = hash_password("relayd-dummy-password")
# Refused attempts (keys and passwords) one connection may make before it is cut, as OpenSSH's MaxAuthTries:
# trying more keys then takes more connections, and each counts with the defender.
_MAX_AUTH_TRIES = 6
# A refused connection is told why this long after its accept. Disconnecting at once would close the socket
# with the client's version line still unread, and the reset that follows can destroy the disconnect text
# before the client reads it (paramiko then says only "EOF"); meanwhile the client can at most finish the key
# exchange, and a login attempt gets the same disconnect. It slows a banned client down, too.
_REFUSAL_LINGER_SECONDS = 0.5


@dataclass
class AccountAuth:
    """What authentication needs of one account, resolved once per configuration load."""

    password_hash: str | None
    authorized_keys: asyncssh.SSHAuthorizedKeys | None


def resolve_auth(config: Config) -> dict[str, AccountAuth]:
    """Read every account's password hash and public keys (files and credentials included)."""
    out: dict[str, AccountAuth] = {}
    for account in config.accounts:
        keys = account.public_keys()
        out[account.username] = AccountAuth(
            password_hash=account.resolved_password_hash(),
            authorized_keys=asyncssh.import_authorized_keys("\n".join(keys)) if keys else None,
        )
    return out


@dataclass
class ServerState:
    """What the running server shares between connections.

    A reload replaces ``config`` and ``auth``: each connection reads them at every step, so
    open sessions go on under the new limits and a new account can log in at once.
    """

    config: Config
    intake: Intake
    auth: dict[str, AccountAuth]
    events: Events = field(default_factory=Events)
    #: every SSH connection open now, logged in or not (``startups.pending`` holds those not yet logged in)
    connections: set[RelaySSHServer] = field(default_factory=set)
    #: every SFTP session open now
    sessions: set[DropSFTPServer] = field(default_factory=set)
    #: bans prefixes that fail to log in too often (reads ``config.defender`` at each use, keeps bans in the ledger)
    defender: Defender = field(init=False)
    #: the limits of connections not yet logged in (reads ``config.limits`` at each use)
    startups: StartupBudget = field(init=False)
    #: writes the defender's failures and logins to the ledger, in order and off the event loop (a commit
    #: waits for the disk: milliseconds that a flood of failed logins must not take from every other client)
    _defender_writer: ThreadPoolExecutor = field(
        init=False, default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="defender"))
    #: refuses uploads while free space under the storage root is short (reads ``config`` at each use)
    disk: DiskGuard = field(init=False)
    #: the bounded pool that verifies committed uploads (intake), apart from the default one
    verifier: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=_VERIFY_WORKERS, thread_name_prefix="relayd-verify"))

    def __post_init__(self) -> None:
        self.defender = Defender(lambda: self.config.defender, BanBook(self.intake.ledger), self.events)
        self.startups = StartupBudget(lambda: self.config.limits, self.defender)
        self.disk = DiskGuard(lambda: self.config, self.events)

    def record(self, write: Callable[..., object], *args: object) -> None:
        """Run one of the defender's ledger writes (``failed``, ``logged_in``) on its writer thread."""
        try:
            future = self._defender_writer.submit(write, *args)
        except RuntimeError:
            return  # stopped (flush_defender): the ledger is closing
        future.add_done_callback(_log_failed_write)

    def flush_defender(self) -> None:
        """Wait for the defender's pending writes (before the ledger closes); later ones are dropped."""
        self._defender_writer.shutdown(wait=True)

    def uploads_in_flight(self) -> int:
        """Sessions with an upload begun and not yet committed or discarded."""
        return sum(1 for session in self.sessions if session.busy)


def _log_failed_write(future: Future[object]) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("defender.write_failed", error=str(exc), kind=type(exc).__name__)


class _Handle:
    """An open upload: its private file (see uploads.py), the visible name, and what was written."""

    __slots__ = ("fd", "local", "name", "append", "extents", "written", "refusal", "synced", "syncing")

    def __init__(self, fd: int, local: Path, name: str, *, append: bool = False):
        self.fd = fd
        #: the handle's own file in the hidden upload area, never the visible name
        self.local = local
        self.name = name
        self.append = append
        self.extents = Extents()
        self.written = 0
        #: set when a write was refused: the close then quarantines what arrived, never commits it
        self.refusal: Rejection | None = None
        self.synced = 0
        self.syncing: asyncio.Future[None] | None = None


class RelaySSHServer(asyncssh.SSHServer):
    """One SSH connection: authentication, the defender, the connection limits, and the peer for logs.

    From its accept until it logs in, a connection is *pending*: it counts against the
    pre-authentication budget (relayd/inbound/startups.py), never against ``max_sessions``
    or ``max_sessions_per_ip``, which count logged-in connections only.

    What the defender counts as a failure (see relayd/inbound/defender.py): each refused
    password at once; refused public keys once per connection, when it ends without logging
    in; a login from an address the account does not allow, like either of those; and, with
    ``defender.unauthenticated_weight``, a connection that ends without logging in and
    without any of those (idle until the login timeout, or closed before authentication).
    """

    def __init__(self, state: ServerState):
        self._state = state
        self._conn: asyncssh.SSHServerConnection | None = None
        self._counted = False
        self.peer = "?"
        #: the source address alone, as the defender and the per-address limits see it
        self.ip = "?"
        #: the network the defender and the per-address limits count this address under
        self.prefix: Network | None = None
        self._username = "?"
        #: why this account may not log in from here (allowed_ips), or None
        self._address_refused: str | None = None
        self._keys_refused = 0
        self._tries = 0
        #: failures of this connection already told to the defender
        self._failures = 0
        self._authenticated = False
        #: refused by max_sessions / max_sessions_per_ip: the relay's own limit, not the client's failure
        self._limited = False
        #: the disconnect a refused connection gets (code, text), or None
        self._refusal: tuple[int, str] | None = None

    @property
    def authenticated(self) -> bool:
        """Whether this connection has logged in."""
        return self._authenticated

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ip = str(peer[0]) if peer else "?"
        self.prefix = self._state.defender.prefix(self.ip)
        banned = self._state.defender.refuses(self.ip)
        refusal = banned or self._state.startups.refusal(self.ip, self.prefix)
        if refusal is not None:
            # The client reads why (OpenSSH: "Received disconnect from ...: <reason>"); no login is possible.
            code = asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT if banned else asyncssh.DISC_TOO_MANY_CONNECTIONS
            self._refusal = (code, refusal)
            asyncio.get_running_loop().call_later(_REFUSAL_LINGER_SECONDS, _disconnect, conn, code, refusal)
            return
        self._state.connections.add(self)
        self._state.startups.pending.add(self)
        self._counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return  # refused at once: not a login attempt
        self._counted = False
        self._state.connections.discard(self)
        self._state.startups.pending.discard(self)
        if self._authenticated:
            return
        if self._keys_refused:
            # One failure however many keys were offered: an OpenSSH client offers all it holds.
            log.warning("sftp.auth_failed", account=self._username, peer=self.peer, method="publickey",
                        keys_refused=self._keys_refused, why=self._address_refused or "no authorized key offered")
            self._failed("publickey")
        elif not self._failures and not self._limited and exc is not None:
            # (exc is None when the relay closed the connection itself: a stop is not the client's failure.)
            timed_out = isinstance(exc, asyncssh.ConnectionLost) and "timeout" in str(exc).lower()
            why = "login timeout" if timed_out else "closed before logging in"
            log.info("sftp.unauthenticated_closed", account=self._username, peer=self.peer, why=why)
            self._failed("none", self._state.config.defender.unauthenticated_weight)

    def close(self) -> None:
        """Close this connection (graceful stop): what it had not committed is discarded."""
        if self._conn is not None:
            self._conn.close()

    async def wait_closed(self) -> None:
        """Wait until this connection is closed."""
        if self._conn is not None:
            await self._conn.wait_closed()

    def begin_auth(self, username: str) -> bool:
        if self._refusal is not None:
            raise asyncssh.DisconnectError(*self._refusal)
        self._check_banned()
        self._check_session_limits(username)
        # asyncssh calls this again when a client changes username, and clears the keys set before.
        self._username = username
        self._address_refused = None
        account = self._state.config.account(username)
        if account is not None and account.allowed_ips:
            address = parse_address(self.ip)
            if address is None or not any(address in net for net in account.allowed_ips):
                # No key is trusted and no password matches: to the client, just a failed login.
                self._address_refused = "address not in the account's allowed_ips"
                return True
        auth = self._state.auth.get(username)
        if auth is not None and auth.authorized_keys is not None and self._conn is not None:
            self._conn.set_authorized_keys(auth.authorized_keys)
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh asks only about keys that the account's authorized keys did not match.
        self._check_banned()
        self._keys_refused += 1
        self._count_try()
        return False

    async def validate_password(self, username: str, password: str) -> bool:
        self._check_banned()
        auth = self._state.auth.get(username)
        encoded = auth.password_hash if auth and auth.password_hash else _DUMMY_HASH
        ok = await asyncio.to_thread(verify_password, password, encoded)
        ok = ok and auth is not None and auth.password_hash is not None and self._address_refused is None
        if ok:
            log.info("sftp.login", account=username, peer=self.peer, method="password")
            return True
        log.warning("sftp.auth_failed", account=username, peer=self.peer, method="password",
                    why=self._address_refused or "wrong password or unknown account")
        # A failure that brings a ban is answered like any other; the next attempt is cut (_check_banned).
        self._failed("password")
        self._count_try()
        return False

    def auth_completed(self) -> None:
        self._authenticated = True
        self._state.startups.pending.discard(self)
        if self._conn is None:
            return
        account = self._conn.get_extra_info("username")
        log.info("sftp.authenticated", account=account, peer=self.peer)
        self._state.record(self._state.defender.logged_in, self.ip)
        try:
            # Checked at begin_auth already; two logins that ran side by side may both have passed it.
            self._check_session_limits(account, logged_in=True)
        except asyncssh.DisconnectError as exc:
            asyncio.get_running_loop().call_soon(_disconnect, self._conn, exc.code, exc.reason)

    def _check_session_limits(self, username: str, *, logged_in: bool = False) -> None:
        """Refuse a login past ``max_sessions`` or ``max_sessions_per_ip`` (logged-in connections only)."""
        limits = self._state.config.limits
        others = [c for c in self._state.connections if c.authenticated and c is not self]
        self._limited = True  # until both checks pass
        if len(others) >= limits.max_sessions:
            log.warning("sftp.too_many_sessions", peer=self.peer, account=username, limit=limits.max_sessions)
            raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections")
        if sum(1 for c in others if c.prefix == self.prefix) >= limits.max_sessions_per_ip:
            log.warning("sftp.too_many_sessions_per_ip", peer=self.peer, account=username,
                        limit=limits.max_sessions_per_ip)
            raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections from your address")
        self._limited = False

    def _failed(self, method: str, weight: float = 1.0) -> None:
        self._failures += 1
        self._state.record(self._state.defender.failed, self.ip, self._username, method, weight)

    def _check_banned(self) -> None:
        """Cut a connection whose address was banned while it was logging in."""
        ban = self._state.defender.ban_holding(self.ip)
        if ban is not None:
            raise asyncssh.DisconnectError(asyncssh.DISC_HOST_NOT_ALLOWED_TO_CONNECT,
                                           self._state.defender.ban_message(ban))

    def _count_try(self) -> None:
        self._tries += 1
        if self._tries >= _MAX_AUTH_TRIES:
            log.warning("sftp.too_many_auth_tries", account=self._username, peer=self.peer, tries=self._tries)
            raise asyncssh.DisconnectError(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                           "too many authentication failures")


def _disconnect(conn: asyncssh.SSHServerConnection, code: int, reason: str) -> None:
    """Send a disconnect with ``reason`` and close, unless the client has gone already."""
    try:
        conn.disconnect(code, reason)
    except (OSError, asyncssh.Error):
        conn.abort()


class DropSFTPServer(asyncssh.SFTPServer):
    """The SFTP surface of one session, chrooted on the account's drop folder.

    The account's ``directory`` (e.g. ``/depot``) is an alias of the drop folder: its parents
    are read-only folders that hold only it. Every request is guarded (see :func:`_guarded`):
    whatever goes wrong inside, the client gets a generic sentence, never an exception's text.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel, state: ServerState):
        self._state = state
        self.account = chan.get_extra_info("username")
        conn = chan.get_connection()
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        config = state.config
        account = config.account(self.account)
        if account is None:  # removed by a reload since login
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        self.root = config.drop_dir(account)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        super().__init__(chan, chroot=os.fsencode(self.root))
        self._root_b = os.fsencode(os.path.realpath(self.root))
        self._root_real = Path(os.fsdecode(self._root_b))
        self._area = UploadArea(self._root_real)
        directory = (account.directory or "").encode()
        self._directory = directory or None
        #: the proper parents of the account's directory, each with the one child it shows
        self._parents: dict[bytes, bytes] = {}
        if directory:
            parts = directory.strip(b"/").split(b"/")
            for i in range(len(parts)):
                self._parents[b"/" + b"/".join(parts[:i])] = parts[i]
        self._open: dict[int, _Handle] = {}
        # This session's closed temporary files, by visible name: its own private link to each.
        self._closed: dict[str, Path] = {}
        # Temporary names this session committed, and the package name each went to: a client that
        # removes the target and renames again after a refusal hears the refusal again.
        self._consumed: dict[str, str] = {}
        # Outcomes of this session's commits, by name: the size written (accepted) or the refusal.
        # Clients that stat after an upload (paramiko does) get an answer though the file moved on,
        # and clients that ignore close errors (paramiko does) still learn why a package was refused.
        self._outcomes: dict[str, int | str] = {}
        self._session_bytes = 0
        #: commits being processed now: a graceful stop waits for them
        self._committing = 0
        self.log = log.bind(account=self.account, peer=self.peer)
        state.sessions.add(self)

    @property
    def busy(self) -> bool:
        """Whether an upload is under way: a file open, written and not yet committed, or a commit running."""
        return bool(self._open or self._closed or self._committing)

    # -- paths -----------------------------------------------------------------------

    def _virtual(self, path: bytes) -> bytes:
        """The client's path, absolute and normalised, with the account's directory mapped to ``/``."""
        v = self._virtual_raw(path)
        d = self._directory
        if d is not None and (v == d or v.startswith(d + b"/")):
            v = b"/" + v[len(d):].lstrip(b"/")
        return v

    def _is_parent(self, path: bytes) -> bool:
        """Whether ``path`` names a proper parent of the account's directory other than ``/``."""
        v = self._virtual_raw(path)
        return v != b"/" and v in self._parents

    def _virtual_raw(self, path: bytes) -> bytes:
        """The client's path, absolute and normalised, as the client sees it."""
        if b"\x00" in path:
            raise asyncssh.SFTPNoSuchFile("no such file")
        v = posixpath.normpath(posixpath.join(b"/", path))
        return b"/" + v.lstrip(b"/")

    def map_path(self, path: bytes) -> bytes:
        """asyncssh's chroot mapping, and then no way out through a link found in the folder.

        Clients cannot make links, but someone on the host might; whatever they point to
        stays out of reach. The hidden upload area is out of reach too.
        """
        v = self._virtual(path)
        if any(is_reserved(os.fsdecode(part)) for part in v.split(b"/")):
            raise asyncssh.SFTPNoSuchFile("no such file")
        local = super().map_path(v)
        real = os.path.realpath(local)
        if real != self._root_b and not real.startswith(self._root_b + b"/"):
            self.log.warning("sftp.denied", op="path", why="resolves outside the drop folder")
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        return local

    def realpath(self, path: bytes) -> bytes:
        # The client's own view, its directory included: no links to resolve, since clients make none.
        return self._virtual_raw(path)

    def _local(self, path: bytes) -> Path:
        """Map a client path to a file directly inside the drop folder, or refuse."""
        local = self.map_path(path)
        if posixpath.dirname(local) != self._root_b:
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        return Path(os.fsdecode(local))

    def _is_temporary(self, name: str) -> bool:
        server = self._state.config.server
        lower = name.lower()
        return (any(lower.startswith(p.lower()) for p in server.temporary_prefixes)
                or any(lower.endswith(s.lower()) for s in server.temporary_suffixes))

    def _is_package(self, name: str) -> bool:
        # A temporary prefix or suffix wins: `.in.X.zip.` and `inprogress.X.zip` are still being written.
        # A hidden name is never a package, whatever the prefixes configured.
        suffixes = self._state.config.server.package_suffixes
        return (not self._is_temporary(name) and not name.startswith(".")
                and any(name.lower().endswith(s.lower()) for s in suffixes))

    # -- files -----------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> _Handle:
        if not pflags & FXF_WRITE:
            self.log.info("sftp.denied", op="read", path=os.fsdecode(path))
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        local = self._local(path)
        if not (self._is_package(local.name) or self._is_temporary(local.name)):
            self.log.info("sftp.denied", op="open", path=local.name, why="not a package or temporary name")
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        refusal = self._state.disk.refusal()
        if refusal is not None:
            self.log.warning("sftp.refused", op="open", path=local.name, code=refusal.reason.value)
            raise asyncssh.SFTPFailure(refusal.client_message())
        # What the name holds now: this session's own closed file, or what the drop folder shows.
        existing = self._closed.get(local.name)
        if existing is None:
            try:
                st = os.lstat(local)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
                existing = local
        if existing is not None and pflags & FXF_EXCL:
            raise asyncssh.SFTPFailure("file already exists")
        if existing is None and not pflags & FXF_CREAT:
            raise asyncssh.SFTPNoSuchFile("no such file")
        # A fresh file of this handle's own: nothing another handle does can reach it (see uploads.py).
        fd, private = self._area.create()
        handle = _Handle(fd, private, local.name, append=bool(pflags & FXF_APPEND))
        if existing is not None and not pflags & FXF_TRUNC:
            try:  # a resumed upload goes on from its own copy of what was there (off the loop: it may be large)
                size = await self._in_pool(copy_into, existing, fd, self._state.config.limits.max_package_bytes)
            except OSError:
                os.close(fd)
                private.unlink(missing_ok=True)
                raise asyncssh.SFTPFailure("cannot open file") from None
            handle.extents = Extents(size)
        self._open[id(handle)] = handle
        self._outcomes.pop(local.name, None)
        return handle

    def format_user(self, uid: int | None) -> str:
        return "relayd"  # the host's account names are none of the client's business

    def format_group(self, gid: int | None) -> str:
        return "relayd"

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        raise asyncssh.SFTPOpUnsupported("SFTP version 3 only")

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        handle = self._handle(file_obj)
        extents = handle.extents
        if handle.append:
            offset = extents.size
        end = offset + len(data)
        limits = self._state.config.limits
        # Limits count the file's size, which the no-holes rule keeps close to what was really sent.
        growth = max(0, end - extents.size)
        if handle.refusal is not None:
            pass
        elif end > limits.max_package_bytes:
            handle.refusal = Rejection(Reason.PACKAGE_TOO_LARGE, "the upload outgrew the package size limit.")
        elif offset > extents.filled + _PIPELINE_WINDOW or extents.pieces > _MAX_PIECES:
            handle.refusal = Rejection(
                Reason.UPLOAD_HOLE, f"a write at offset {offset} left a gap after byte {extents.filled}.")
        elif self._session_bytes + growth > limits.max_upload_bytes_per_session:
            handle.refusal = Rejection(Reason.SESSION_UPLOAD_LIMIT, "the session outgrew its upload limit.")
        elif (disk := self._state.disk.refusal()) is not None:
            self.log.warning("sftp.refused", op="write", path=handle.name, code=disk.reason.value)
            handle.refusal = disk
        if handle.refusal is not None:
            raise asyncssh.SFTPFailure(handle.refusal.client_message())
        before = extents.size
        written = os.pwrite(handle.fd, data, offset)
        extents.add(offset, offset + written)
        handle.written += written
        self._session_bytes += extents.size - before
        if handle.written - handle.synced >= _SYNC_EVERY and handle.syncing is None:
            # Flush to disk while the upload goes on, off the loop, so that the fsync the
            # hand-over owes costs little once the last byte is in.
            handle.synced = handle.written
            handle.syncing = asyncio.get_running_loop().run_in_executor(None, os.fdatasync, handle.fd)
            handle.syncing.add_done_callback(lambda _f, h=handle: setattr(h, "syncing", None))
        return written

    async def close(self, file_obj: object) -> None:
        handle = self._handle(file_obj)
        self._open.pop(id(handle), None)
        if handle.syncing is not None:
            await asyncio.shield(handle.syncing)  # never close a descriptor that a flush still uses
        os.close(handle.fd)
        if _session_ending(self.channel):
            # asyncssh closes every open handle when a session drops: that is no commit.
            self._discard(handle.local, handle.name, "session ended before the upload was closed")
            return
        upload = Upload(self.account, self.peer, handle.name)
        if handle.refusal is None and not handle.extents.whole():
            handle.refusal = Rejection(
                Reason.UPLOAD_HOLE, f"closed with bytes never written before byte {handle.extents.size}.")
        if handle.refusal is not None and handle.refusal.reason is Reason.DISK_LOW:
            # Nothing was accepted: what arrived is removed, not quarantined, which would take more space.
            self._discard(handle.local, handle.name, "the disk ran short during the upload")
            self._refuse(upload.name, Outcome("rejected", rejection=handle.refusal))
        if handle.refusal is not None:
            outcome = await self._in_pool(self._state.intake.quarantine_partial, handle.local, upload, handle.refusal)
            self._refuse(upload.name, outcome)
        if self._is_package(handle.name):
            await self._commit(handle.local, upload)
            return
        # A temporary name: the file shows under it, and this session keeps its own link for the rename.
        visible = self._root_real / handle.name
        try:
            self._area.publish(handle.local, visible)
        except OSError:
            handle.local.unlink(missing_ok=True)
            raise asyncssh.SFTPFailure("cannot store the file under this name") from None
        previous = self._closed.pop(handle.name, None)
        if previous is not None and previous != handle.local:
            previous.unlink(missing_ok=True)
        self._closed[handle.name] = handle.local

    def fsync(self, file_obj: object) -> None:
        os.fsync(self._handle(file_obj).fd)

    def fstat(self, file_obj: object) -> os.stat_result:
        return os.fstat(self._handle(file_obj).fd)

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        handle = self._handle(file_obj)
        self._check_setstat(attrs, handle.extents.size)

    # -- names -----------------------------------------------------------------------

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        # One rule for both renames: a rename to a package name commits.
        await self._rename(oldpath, newpath)

    async def _rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._local(oldpath), self._local(newpath)
        if not (self._is_package(new.name) or self._is_temporary(new.name)):
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        if any(h.name == old.name for h in self._open.values()):
            raise asyncssh.SFTPFailure("file is still open: close it before the rename")
        own = self._closed.get(old.name)
        if own is not None and not own.exists():
            del self._closed[old.name]
            raise asyncssh.SFTPFailure("the file was committed by another session")
        if own is None:
            if not old.exists() and not old.is_symlink() and old.name in self._consumed:
                self._repeat_outcome(self._consumed[old.name])
                return
            self._require_regular(old)
        source = own or old
        if self._is_package(new.name):
            try:
                claimed = self._area.claim(source)
            except FileNotFoundError:
                raise asyncssh.SFTPFailure("the file was committed or removed by another session") from None
            self._closed.pop(old.name, None)
            self._consumed[old.name] = new.name
            await self._commit(claimed, Upload(self.account, self.peer, new.name))
            return
        if own is not None:
            self._area.publish(own, new)
            if same_file(old, os.stat(own)):
                old.unlink()
            del self._closed[old.name]
            replaced = self._closed.pop(new.name, None)
            if replaced is not None:
                replaced.unlink(missing_ok=True)
            self._closed[new.name] = own
        else:
            os.replace(old, new)

    def remove(self, path: bytes) -> None:
        local = self._local(path)
        own = self._closed.pop(local.name, None)
        if own is not None:
            if own.exists() and same_file(local, os.stat(own)):
                local.unlink()
            own.unlink(missing_ok=True)
            return
        if not local.exists() and not local.is_symlink() and local.name in self._outcomes:
            # The package moved on at its commit: a refused one still says why, an accepted one has nothing left.
            self._repeat_outcome(local.name)
            return
        self._require_regular(local)
        local.unlink()

    def stat(self, path: bytes) -> os.stat_result | asyncssh.SFTPAttrs:
        return self.lstat(path)

    def lstat(self, path: bytes) -> os.stat_result | asyncssh.SFTPAttrs:
        if self._is_parent(path):
            return os.stat(self._root_real)
        local = Path(os.fsdecode(self.map_path(path)))
        if local.parent == self._root_real and not local.exists() and not local.is_symlink():
            outcome = self._outcomes.get(local.name)
            if isinstance(outcome, str):
                raise asyncssh.SFTPFailure(outcome)
            if outcome is not None:
                return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=outcome,
                                          permissions=stat.S_IFREG | 0o600)
            writing = [h for h in self._open.values() if h.name == local.name]
            if writing:  # an upload under way shows as it grows
                return os.fstat(writing[-1].fd)
        return os.lstat(local)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        if self._is_parent(path):
            child = self._parents[self._virtual_raw(path)]
            for name in (b".", b"..", child):
                yield asyncssh.SFTPName(name, attrs=asyncssh.SFTPAttrs.from_local(os.stat(self._root_real)))
            return
        local = self.map_path(path)
        at_root = local == self._root_b or os.path.realpath(local) == self._root_b
        async for entry in super().scandir(path):
            if at_root and is_reserved(os.fsdecode(entry.filename)):
                continue
            yield entry
        if at_root and self._virtual_raw(path) == b"/" and self._directory is not None:
            yield asyncssh.SFTPName(self._parents[b"/"],
                                    attrs=asyncssh.SFTPAttrs.from_local(os.stat(self._root_real)))

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        if self._is_parent(path):
            self._check_setstat(attrs, None)
            return
        local = Path(os.fsdecode(self.map_path(path)))
        if local == self._root_real:
            self._check_setstat(attrs, None)
            return
        st = self.lstat(path)
        if isinstance(st, os.stat_result) and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        self._check_setstat(attrs, st.st_size if isinstance(st, os.stat_result) and stat.S_ISREG(st.st_mode)
                            else getattr(st, "size", None))

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self.setstat(path, attrs)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        # `mkdir -p` of the account's directory finds every part of it there already.
        v = self._virtual_raw(path)
        if self._directory is not None and (v in self._parents or v == self._directory):
            return
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def rmdir(self, path: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def readlink(self, path: bytes) -> bytes:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        self.log.warning("sftp.denied", op="symlink")
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self.log.warning("sftp.denied", op="link")
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def exit(self) -> None:
        self._state.sessions.discard(self)
        for handle in list(self._open.values()):
            self._discard(handle.local, handle.name, "session ended before the upload was closed")
        for name, own in list(self._closed.items()):
            self._discard(own, name, "session ended before the upload was committed")
        self._area.tidy()

    # -- internals -------------------------------------------------------------------

    def _handle(self, file_obj: object) -> _Handle:
        if not isinstance(file_obj, _Handle):
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        return file_obj

    def _require_regular(self, local: Path) -> None:
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            raise asyncssh.SFTPNoSuchFile("no such file") from None
        if not stat.S_ISREG(st.st_mode):
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def _check_setstat(self, attrs: asyncssh.SFTPAttrs, size: int | None) -> None:
        """Accept what harms nothing (times, permissions, the current size) and ignore it; refuse the rest.

        Modes stay forced and times stay the server's (the time of receipt); ownership, the
        setuid, setgid and sticky bits and a change of size are refused, as SFTPGo's setstat_mode.
        """
        if attrs.uid is not None or attrs.gid is not None or attrs.owner is not None or attrs.group is not None:
            self.log.info("sftp.denied", op="setstat", why="ownership")
            raise asyncssh.SFTPPermissionDenied("ownership cannot be changed")
        if attrs.permissions is not None and attrs.permissions & 0o7000:
            self.log.info("sftp.denied", op="setstat", why="setuid, setgid or sticky bit")
            raise asyncssh.SFTPPermissionDenied("setuid, setgid and sticky bits are refused")
        if attrs.size is not None and attrs.size != size:
            self.log.info("sftp.denied", op="setstat", why="size change")
            raise asyncssh.SFTPPermissionDenied("the size of an upload cannot be changed")

    def _repeat_outcome(self, name: str) -> None:
        """Answer again with what the commit under ``name`` answered: its refusal, or nothing for an accepted one."""
        outcome = self._outcomes.get(name)
        if isinstance(outcome, str):
            raise asyncssh.SFTPFailure(outcome)

    def _discard(self, private: Path, name: str, why: str) -> None:
        """Remove an upload that was never committed: its private file, and its visible name if it is the same."""
        if self._closed.get(name) == private:
            del self._closed[name]
        try:
            st = os.lstat(private)
        except FileNotFoundError:
            return
        visible = self._root_real / name
        if same_file(visible, st):
            visible.unlink(missing_ok=True)
        private.unlink(missing_ok=True)
        self.log.warning("sftp.partial_removed", upload=name, size=st.st_size, why=why)

    async def _in_pool(self, fn, *args):
        """Run blocking intake work in the verification pool, never in the one password checks use."""
        return await asyncio.get_running_loop().run_in_executor(self._state.verifier, fn, *args)

    async def _commit(self, local: Path, upload: Upload) -> None:
        """Hand a committed file to intake and answer the client with the outcome."""
        size = local.stat().st_size
        intake = self._state.intake
        self.log.info("sftp.committed", upload=upload.name, size=size)
        self._state.events.publish(PackageReceived(account=self.account, peer=self.peer, size=size))
        self._committing += 1
        try:
            staged = await self._in_pool(intake.stage, local, upload)
            if not self._open and not self._closed:
                self._area.tidy()  # before the answer: an idle drop folder holds nothing of relayd's
            outcome: Outcome = await self._in_pool(intake.process, staged)
        finally:
            self._committing -= 1
        if outcome.status in ("accepted", "duplicate"):
            self._outcomes[upload.name] = size
            return
        self._refuse(upload.name, outcome)

    def _refuse(self, name: str, outcome: Outcome) -> NoReturn:
        """Answer the client's request with the refusal, and remember it for a later stat of that name."""
        self._outcomes[name] = outcome.client_message()
        raise asyncssh.SFTPFailure(outcome.client_message())


def _guarded(method):
    """Wrap one SFTP request handler: an unexpected error reaches the client as a generic sentence.

    asyncssh would otherwise send ``Uncaught exception: ...`` or an OS error's text; the
    details go to the log, and the daemon keeps serving.
    """

    def translate(exc: BaseException) -> asyncssh.SFTPError:
        if isinstance(exc, FileNotFoundError):
            return asyncssh.SFTPNoSuchFile("no such file")
        if isinstance(exc, PermissionError):
            return asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return asyncssh.SFTPFailure(Rejection(Reason.DISK_LOW).client_message())
        log.warning("sftp.request_failed", op=method.__name__, error=type(exc).__name__)
        return asyncssh.SFTPFailure("request failed")

    if inspect.isasyncgenfunction(method):
        async def agen_wrapper(self, *args):
            try:
                async for item in method(self, *args):
                    yield item
            except (asyncssh.SFTPError, NotImplementedError):
                raise
            except Exception as exc:  # noqa: BLE001 - the client gets a generic answer, the log the kind
                raise translate(exc) from None
        return functools.wraps(method)(agen_wrapper)
    if inspect.iscoroutinefunction(method):
        async def async_wrapper(self, *args):
            try:
                return await method(self, *args)
            except (asyncssh.SFTPError, NotImplementedError):
                raise
            except Exception as exc:  # noqa: BLE001
                raise translate(exc) from None
        return functools.wraps(method)(async_wrapper)

    def wrapper(self, *args):
        try:
            return method(self, *args)
        except (asyncssh.SFTPError, NotImplementedError):
            raise
        except Exception as exc:  # noqa: BLE001
            raise translate(exc) from None
    return functools.wraps(method)(wrapper)


# Every request a client can make, answered generically when something unexpected happens. Methods
# this class does not define (statvfs, fstatvfs, extensions) are asyncssh's, which map paths through
# map_path; they are guarded too.
for _name in ("open", "close", "read", "write", "fstat", "fsetstat", "fsync", "rename", "posix_rename", "remove",
              "stat", "lstat", "scandir", "setstat", "lsetstat", "mkdir", "rmdir", "readlink", "symlink", "link",
              "realpath", "statvfs", "fstatvfs", "lock", "unlock", "open56"):
    if hasattr(DropSFTPServer, _name):
        setattr(DropSFTPServer, _name, _guarded(getattr(DropSFTPServer, _name)))


def _session_ending(chan: asyncssh.SSHServerChannel) -> bool:
    """Whether the client has stopped sending: its connection dropped, or its side sent EOF.

    A client's explicit close always arrives while its side is open (it waits for the
    answer); the closes that asyncssh issues for a session that went away do not. A killed
    OpenSSH ``sftp`` leaves its ``ssh`` child to send a clean EOF, so the send state alone
    does not tell. asyncssh has no public accessor for the receive state.
    """
    return chan.is_closing() or getattr(chan, "_recv_state", "open") != "open"


class InboundServer:
    """The listening SFTP server. ``start`` binds; ``close`` stops accepting."""

    def __init__(self, state: ServerState, host_keys: list[asyncssh.SSHKey]):
        self.state = state
        self._host_keys = host_keys
        self._acceptors: list[asyncssh.SSHAcceptor] = []

    async def start(self, *, sock: object | None = None, socks: Sequence[object] = ()) -> None:
        """Listen on every configured address (or on inherited sockets, one per address, in order)."""
        inherited = [sock] if sock is not None else list(socks)
        limits = self.state.config.limits
        for i, listen in enumerate(self.state.config.server.listeners()):
            profile = PROFILES[listen.profile or "modern"]
            kwargs = dict(
                server_factory=lambda: RelaySSHServer(self.state),
                server_host_keys=keypairs_for(self._host_keys, profile),
                sftp_factory=lambda chan: DropSFTPServer(chan, self.state),
                sftp_version=3,
                allow_scp=False,
                encryption_algs=profile.ciphers,
                kex_algs=profile.kex_algs,
                mac_algs=profile.mac_algs,
                login_timeout=limits.login_timeout_seconds,
                keepalive_interval=30,  # with asyncssh's 3 missed replies: a dead peer is dropped in ~90 s
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=False,
            )
            if i < len(inherited):
                acceptor = await asyncssh.listen(sock=inherited[i], **kwargs)
            else:
                acceptor = await asyncssh.listen(listen.host, listen.port, reuse_address=True, **kwargs)
            self._acceptors.append(acceptor)
            if profile.name == "legacy":
                log.warning("sftp.legacy_profile", host=listen.host, port=acceptor.get_port(),
                            adds=list(LEGACY_ADDITIONS), why="SHA-1 algorithms, for older Java stacks only")
            log.info("sftp.listening", host=listen.host, port=acceptor.get_port(), profile=profile.name,
                     host_keys=[k.get_algorithm() for k in self._host_keys])

    @property
    def port(self) -> int:
        """The port actually bound by the first listener (useful with port 0)."""
        assert self._acceptors
        return self._acceptors[0].get_port()

    @property
    def ports(self) -> list[int]:
        """The ports actually bound, one per listener, in the configured order."""
        return [a.get_port() for a in self._acceptors]

    def stop_accepting(self) -> None:
        """Close the listeners: no new connection is accepted; open ones go on."""
        for acceptor in self._acceptors:
            acceptor.close()

    async def drain(self, grace_seconds: float) -> int:
        """Let uploads under way finish for up to ``grace_seconds``; return how many were still running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self.state.uploads_in_flight() and loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
        return self.state.uploads_in_flight()

    async def close(self, *, grace_seconds: float = 0.0) -> None:
        """Stop accepting, let uploads under way finish within ``grace_seconds``, then close every connection.

        A connection closed with an upload not yet committed loses it: asyncssh closes its
        handles as the session ends, which is never a commit, so nothing partial is promoted.
        A commit already running finishes in its worker thread before the process exits.
        """
        self.stop_accepting()
        left = await self.drain(grace_seconds)
        if left:
            log.warning("sftp.uploads_cut", uploads=left, grace_seconds=grace_seconds)
        connections = list(self.state.connections)
        for connection in connections:
            connection.close()
        if connections:
            await asyncio.gather(*(c.wait_closed() for c in connections), return_exceptions=True)
        for acceptor in self._acceptors:
            # Python 3.12 waits here for every connection; they are closed by now.
            await acceptor.wait_closed()
        self._acceptors = []
        self.state.flush_defender()


def load_host_keys(paths: list[Path]) -> list[asyncssh.SSHKey]:
    """Read these key files, making an Ed25519 key where one is absent (the testkit's return server uses it).

    The relay's own host keys, of every configured type, come from :func:`ensure_host_keys`.
    """
    return [read_or_make_key(path, "ed25519") for path in paths]

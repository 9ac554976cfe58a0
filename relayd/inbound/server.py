"""The inbound SFTP server: who may log in, what they may do, and when an upload is complete.

The SFTP surface is deliberately small (contract 7). An account sees only its drop
folder, as ``/``. It may write package files (``*.zip``) or temporary files
(``*.tmp``, ``*.part``...), rename a temporary file to a package name, list the folder
and remove its own files. Nothing else: no reads, no sub-folders, no links, no setstat.
Modes are forced, whatever the client asks.

Completion (contract 1): a package is committed by

* a rename from a temporary name to a package name, or
* an explicit close of a handle written under a package name.

A close that asyncssh issues because the session dropped is never a commit: the file is
a partial and is removed. Intake runs before the rename or close is answered, so the
client learns the outcome on that very request.
"""

from __future__ import annotations

import asyncio
import errno
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import asyncssh
import structlog
from asyncssh.constants import FXF_APPEND, FXF_CREAT, FXF_EXCL, FXF_TRUNC, FXF_WRITE

from relayd.config import Config
from relayd.events import Events, PackageReceived
from relayd.inbound.defender import Defender, parse_address
from relayd.inbound.diskguard import DiskGuard
from relayd.inbound.intake import Intake, Outcome, Upload
from relayd.inbound.passwords import hash_password, verify_password
from relayd.rejections import Reason, Rejection
from relayd.ssh_algorithms import CIPHERS, KEX_ALGS, MAC_ALGS

log = structlog.get_logger("relayd.sftp")

_GENERIC_DENIED = "permission denied"
_SYNC_EVERY = 32 * 1024 * 1024
#: the extended attribute a stat of a committed name carries: b"accepted" or b"duplicate" (a resend)
OUTCOME_ATTRIBUTE = b"outcome@relayd"
# Compared against when the username is unknown, so that timing does not reveal which names exist.
_DUMMY_HASH = hash_password("relayd-dummy-password")
# Refused attempts (keys and passwords) one connection may make before it is cut, as OpenSSH's MaxAuthTries:
# trying more keys then takes more connections, and each counts with the defender.
_MAX_AUTH_TRIES = 6


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
    #: every SSH connection open now
    connections: set[RelaySSHServer] = field(default_factory=set)
    #: every SFTP session open now
    sessions: set[DropSFTPServer] = field(default_factory=set)
    #: bans addresses that fail to log in too often (reads ``config.defender`` at each use)
    defender: Defender = field(init=False)
    #: refuses uploads while free space under the storage root is short (reads ``config`` at each use)
    disk: DiskGuard = field(init=False)

    def __post_init__(self) -> None:
        self.defender = Defender(lambda: self.config.defender, self.events)
        self.disk = DiskGuard(lambda: self.config, self.events)

    def uploads_in_flight(self) -> int:
        """Sessions with an upload begun and not yet committed or discarded."""
        return sum(1 for session in self.sessions if session.busy)


class _Handle:
    """An open upload: the descriptor and what the session wrote through it."""

    __slots__ = ("fd", "local", "name", "written", "refusal", "synced", "syncing")

    def __init__(self, fd: int, local: Path, name: str):
        self.fd = fd
        self.local = local
        self.name = name
        self.written = 0
        #: set when a write was refused: the close then quarantines what arrived, never commits it
        self.refusal: Rejection | None = None
        self.synced = 0
        self.syncing: asyncio.Future[None] | None = None


class RelaySSHServer(asyncssh.SSHServer):
    """One SSH connection: authentication, the defender, the connection limits, and the peer for logs.

    What the defender counts as a failure (see relayd/inbound/defender.py): each refused
    password at once; refused public keys once per connection, when it ends without logging
    in; a login from an address the account does not allow, like either of those.
    """

    def __init__(self, state: ServerState):
        self._state = state
        self._conn: asyncssh.SSHServerConnection | None = None
        self._counted = False
        self.peer = "?"
        #: the source address alone, as the defender and the per-address limit see it
        self.ip = "?"
        self._username = "?"
        #: why this account may not log in from here (allowed_ips), or None
        self._address_refused: str | None = None
        self._keys_refused = 0
        self._tries = 0
        self._authenticated = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ip = str(peer[0]) if peer else "?"
        if self._state.defender.refuses(self.ip):
            # Banned: dropped before the version exchange, so a ban costs next to nothing.
            conn.abort()
            return
        self._state.connections.add(self)
        self._counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._state.connections.discard(self)
            self._counted = False
        if self._keys_refused and not self._authenticated:
            # One failure however many keys were offered: an OpenSSH client offers all it holds.
            log.warning("sftp.auth_failed", account=self._username, peer=self.peer, method="publickey",
                        keys_refused=self._keys_refused, why=self._address_refused or "no authorized key offered")
            self._state.defender.failed(self.ip, self._username, "publickey")

    def close(self) -> None:
        """Close this connection (graceful stop): what it had not committed is discarded."""
        if self._conn is not None:
            self._conn.close()

    async def wait_closed(self) -> None:
        """Wait until this connection is closed."""
        if self._conn is not None:
            await self._conn.wait_closed()

    def begin_auth(self, username: str) -> bool:
        self._check_banned()
        limits = self._state.config.limits
        if len(self._state.connections) > limits.max_sessions:
            log.warning("sftp.too_many_sessions", peer=self.peer, account=username)
            raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections")
        from_here = sum(1 for c in self._state.connections if c.ip == self.ip)
        if from_here > limits.max_sessions_per_ip:
            log.warning("sftp.too_many_sessions_per_ip", peer=self.peer, account=username,
                        limit=limits.max_sessions_per_ip)
            raise asyncssh.DisconnectError(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections from your address")
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
        self._state.defender.failed(self.ip, username, "password")
        self._count_try()
        return False

    def auth_completed(self) -> None:
        self._authenticated = True
        if self._conn is not None:
            log.info("sftp.authenticated", account=self._conn.get_extra_info("username"), peer=self.peer)

    def _check_banned(self) -> None:
        """Cut a connection whose address was banned while it was logging in."""
        if self._state.defender.ban_remaining(self.ip):
            raise asyncssh.DisconnectError(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                           "too many failed logins from your address; try again later")

    def _count_try(self) -> None:
        self._tries += 1
        if self._tries >= _MAX_AUTH_TRIES:
            log.warning("sftp.too_many_auth_tries", account=self._username, peer=self.peer, tries=self._tries)
            raise asyncssh.DisconnectError(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                           "too many authentication failures")


class DropSFTPServer(asyncssh.SFTPServer):
    """The SFTP surface of one session, chrooted on the account's drop folder."""

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
        self._open: dict[int, _Handle] = {}
        # Files this session created and has not committed: removed when it ends.
        self._created: set[Path] = set()
        # Outcomes of this session's commits, by name: the size written (accepted) or the refusal.
        # Clients that stat after an upload (paramiko does) get an answer though the file moved on,
        # and clients that ignore close errors (paramiko does) still learn why a package was refused.
        self._outcomes: dict[str, tuple[int, str] | str] = {}  # (size, accepted|duplicate) or the refusal
        self._session_bytes = 0
        #: commits being processed now: a graceful stop waits for them
        self._committing = 0
        self.log = log.bind(account=self.account, peer=self.peer)
        state.sessions.add(self)

    @property
    def busy(self) -> bool:
        """Whether an upload is under way: a file open, written and not yet committed, or a commit running."""
        return bool(self._open or self._created or self._committing)

    # -- paths -----------------------------------------------------------------------

    def map_path(self, path: bytes) -> bytes:
        """asyncssh's chroot mapping, and then no way out through a link found in the folder.

        Clients cannot make links, but someone on the host might; whatever they point to
        stays out of reach.
        """
        local = super().map_path(path)
        real = os.path.realpath(local)
        if real != self._root_b and not real.startswith(self._root_b + b"/"):
            self.log.warning("sftp.denied", op="path", why="resolves outside the drop folder")
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        return local

    def _local(self, path: bytes) -> Path:
        """Map a client path to a file directly inside the drop folder, or refuse."""
        local = self.map_path(path)
        if posixpath.dirname(local) != self._root_b:
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        return Path(os.fsdecode(local))

    def _is_package(self, name: str) -> bool:
        return any(name.endswith(s) for s in self._state.config.server.package_suffixes) and not name.startswith(".")

    def _is_temporary(self, name: str) -> bool:
        return any(name.endswith(s) for s in self._state.config.server.temporary_suffixes)

    # -- files -----------------------------------------------------------------------

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> _Handle:
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
        flags = os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        flags |= os.O_CREAT if pflags & FXF_CREAT else 0
        flags |= os.O_TRUNC if pflags & FXF_TRUNC else 0
        flags |= os.O_EXCL if pflags & FXF_EXCL else 0
        flags |= os.O_APPEND if pflags & FXF_APPEND else 0
        try:
            fd = os.open(local, flags, 0o600)  # the mode is ours, never the client's attrs
        except OSError as exc:
            self.log.info("sftp.open_failed", path=local.name, error=exc.strerror)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._state.disk.check()
                raise asyncssh.SFTPFailure(Rejection(Reason.DISK_LOW, "the drop folder is full.").client_message()) from None
            raise asyncssh.SFTPFailure("cannot open file") from None
        os.fchmod(fd, 0o600)
        handle = _Handle(fd, local, local.name)
        self._open[id(handle)] = handle
        self._created.add(local)
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
        limits = self._state.config.limits
        if offset + len(data) > limits.max_package_bytes:
            handle.refusal = Rejection(Reason.PACKAGE_TOO_LARGE, "the upload outgrew the package size limit.")
        elif self._session_bytes + len(data) > limits.max_upload_bytes_per_session:
            handle.refusal = Rejection(Reason.SESSION_UPLOAD_LIMIT, "the session outgrew its upload limit.")
        elif handle.refusal is None and (disk := self._state.disk.refusal()) is not None:
            self.log.warning("sftp.refused", op="write", path=handle.name, code=disk.reason.value)
            handle.refusal = disk
        if handle.refusal is not None:
            raise asyncssh.SFTPFailure(handle.refusal.client_message())
        try:
            written = os.pwrite(handle.fd, data, offset)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The drop folder's disk filled between two looks of the guard: the same refusal, not a bare errno.
            self.log.warning("sftp.refused", op="write", path=handle.name, code=Reason.DISK_LOW.value)
            handle.refusal = Rejection(Reason.DISK_LOW, "the drop folder's file system is full.")
            self._state.disk.check()
            raise asyncssh.SFTPFailure(handle.refusal.client_message()) from None
        handle.written += written
        self._session_bytes += written
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
            self._discard_partial(handle.local, "session ended before the upload was closed")
            return
        upload = Upload(self.account, self.peer, handle.name)
        if handle.refusal is not None and handle.refusal.reason is Reason.DISK_LOW:
            # Nothing was accepted: what arrived is removed, not quarantined, which would take more space.
            self._discard_partial(handle.local, "the disk ran short during the upload")
            self._refuse(upload.name, Outcome("rejected", rejection=handle.refusal))
        if handle.refusal is not None:
            self._created.discard(handle.local)
            intake = self._state.intake
            outcome = await asyncio.to_thread(intake.quarantine_partial, handle.local, upload, handle.refusal)
            self._refuse(upload.name, outcome)
        if self._is_package(handle.name):
            await self._commit(handle.local, upload)

    def fsync(self, file_obj: object) -> None:
        os.fsync(self._handle(file_obj).fd)

    def fstat(self, file_obj: object) -> os.stat_result:
        return os.fstat(self._handle(file_obj).fd)

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    # -- names -----------------------------------------------------------------------

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._rename(oldpath, newpath)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        # One rule for both renames: a rename to a package name commits.
        await self._rename(oldpath, newpath)

    async def _rename(self, oldpath: bytes, newpath: bytes) -> None:
        old, new = self._local(oldpath), self._local(newpath)
        self._require_regular(old)
        if any(h.local == old for h in self._open.values()):
            raise asyncssh.SFTPFailure("file is still open")
        if self._is_package(new.name):
            self._created.discard(old)
            await self._commit(old, Upload(self.account, self.peer, new.name))
            return
        if not self._is_temporary(new.name):
            raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)
        os.replace(old, new)
        if old in self._created:
            self._created.discard(old)
            self._created.add(new)

    def remove(self, path: bytes) -> None:
        local = self._local(path)
        self._require_regular(local)
        local.unlink()
        self._created.discard(local)

    def stat(self, path: bytes) -> os.stat_result | asyncssh.SFTPAttrs:
        return self.lstat(path)

    def lstat(self, path: bytes) -> os.stat_result | asyncssh.SFTPAttrs:
        local = Path(os.fsdecode(self.map_path(path)))
        outcome = self._outcomes.get(local.name) if local.parent == self._root_real else None
        if outcome is not None and not local.exists():
            if isinstance(outcome, str):
                raise asyncssh.SFTPFailure(outcome)
            size, status = outcome
            # The outcome rides along as an extended attribute, for clients that want to tell a resend.
            return asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=size,
                                      permissions=stat.S_IFREG | 0o600,
                                      extended=[(OUTCOME_ATTRIBUTE, status.encode())])
        return os.lstat(local)

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise asyncssh.SFTPPermissionDenied(_GENERIC_DENIED)

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
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
        for leftover in list(self._created):
            self._discard_partial(leftover, "session ended before the upload was committed")

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

    def _discard_partial(self, local: Path, why: str) -> None:
        self._created.discard(local)
        try:
            size = local.stat().st_size
            local.unlink()
        except FileNotFoundError:
            return
        self.log.warning("sftp.partial_removed", upload=local.name, size=size, why=why)

    async def _commit(self, local: Path, upload: Upload) -> None:
        """Hand a committed file to intake and answer the client with the outcome."""
        self._created.discard(local)
        size = local.stat().st_size
        intake = self._state.intake
        self.log.info("sftp.committed", upload=upload.name, size=size)
        self._state.events.publish(PackageReceived(account=self.account, peer=self.peer, size=size))
        self._committing += 1
        try:
            outcome: Outcome = await asyncio.to_thread(intake.take, local, upload)
        finally:
            self._committing -= 1
        if outcome.status in ("accepted", "duplicate"):
            self._outcomes[upload.name] = (size, outcome.status)
            return
        self._refuse(upload.name, outcome)

    def _refuse(self, name: str, outcome: Outcome) -> NoReturn:
        """Answer the client's request with the refusal, and remember it for a later stat of that name."""
        self._outcomes[name] = outcome.client_message()
        raise asyncssh.SFTPFailure(outcome.client_message())


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
        self._acceptor: asyncssh.SSHAcceptor | None = None

    async def start(self, *, sock: object | None = None) -> None:
        """Listen on the configured address (or on an inherited socket)."""
        listen = self.state.config.server.listen
        limits = self.state.config.limits
        kwargs = dict(
            server_factory=lambda: RelaySSHServer(self.state),
            server_host_keys=self._host_keys,
            sftp_factory=lambda chan: DropSFTPServer(chan, self.state),
            sftp_version=3,
            allow_scp=False,
            encryption_algs=CIPHERS,
            kex_algs=KEX_ALGS,
            mac_algs=MAC_ALGS,
            login_timeout=limits.login_timeout_seconds,
            keepalive_interval=30,  # with asyncssh's 3 missed replies: a dead peer is dropped in ~90 s
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
        )
        if sock is not None:
            self._acceptor = await asyncssh.listen(sock=sock, **kwargs)
        else:
            self._acceptor = await asyncssh.listen(listen.host, listen.port, reuse_address=True, **kwargs)
        log.info("sftp.listening", host=listen.host, port=self.port)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._acceptor is not None
        return self._acceptor.get_port()

    def stop_accepting(self) -> None:
        """Close the listener: no new connection is accepted; open ones go on."""
        if self._acceptor is not None:
            self._acceptor.close()

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
        if self._acceptor is not None:
            # Python 3.12 waits here for every connection; they are closed by now.
            await self._acceptor.wait_closed()
            self._acceptor = None


def load_host_keys(paths: list[Path]) -> list[asyncssh.SSHKey]:
    """Read the host keys, generating an Ed25519 key where a file is absent (first start)."""
    keys = []
    for path in paths:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = asyncssh.generate_private_key("ssh-ed25519")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(key.export_private_key())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
            log.info("sftp.host_key_generated", path=str(path), fingerprint=key.get_fingerprint())
        keys.append(asyncssh.read_private_key(path))
    return keys

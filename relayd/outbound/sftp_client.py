"""The SFTP client that publishes acks and return packages on the platform's return server.

One file at a time, so that the remote side sees each name once, complete (contract 5):

1. ``stat`` the final name. Present with the local size: an earlier attempt got as far as the
   rename and relayd stopped before recording it, so there is nothing to do. Present with
   another size: someone else's file, which is never overwritten (``remote_conflict``).
2. Upload to ``name.part`` (truncating what an earlier attempt left), ``fsync@openssh.com``
   where offered, close.
3. ``posix-rename@openssh.com`` where offered, a plain SFTP rename otherwise.
4. ``stat`` the final name again: its size must be the local size (``size_mismatch``).

The server's host key is pinned (a known_hosts file and/or SHA256 fingerprints) and a key
that is not pinned ends the connection before anything is sent. One connection and SFTP
session is kept between deliveries, closed after ``idle_seconds`` without use and after
any error. Every failure is a :class:`DeliveryError` with a stable ``code`` and a sentence
for a sysadmin; neither ever holds a password or key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import structlog

from relayd.config import ConfigError, ReturnServer
from relayd.ssh_algorithms import CIPHERS, KEX_ALGS, MAC_ALGS

log = structlog.get_logger("relayd.outbound")

T = TypeVar("T")

#: the ``code`` values of :class:`DeliveryError`
ERROR_CODES = frozenset(
    {"host_key_mismatch", "auth_failed", "connect_failed", "timeout", "remote_error", "size_mismatch", "remote_conflict",
     "remote_denied", "remote_dir_missing"}
)

#: how much of the local file goes in one SFTP write call (asyncssh splits it into parallel requests)
CHUNK_BYTES = 1024 * 1024

PART_SUFFIX = ".part"

# Host key algorithms offered when only fingerprints pin the key: OpenSSH's order, so that the key
# presented is the one an admin sees with `ssh` or `ssh-keyscan`; plain keys only (a certificate
# would be checked against a CA, which fingerprints cannot pin), and no SHA-1 `ssh-rsa`.
_FINGERPRINT_HOST_KEY_ALGS = [
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "rsa-sha2-512", "rsa-sha2-256",
]


class DeliveryError(Exception):
    """A delivery failed; ``code`` is stable (this module raises those of :data:`ERROR_CODES`), ``message`` is for a sysadmin."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _PinnedHostKeyClient(asyncssh.SSHClient):
    """asyncssh's per-connection client object: the pinned-fingerprint check, and a note of what was presented.

    asyncssh asks :meth:`validate_host_public_key` only about a key that is not among the trusted
    keys it was given (the known_hosts entries); answering False ends the handshake with
    ``HostKeyNotVerifiable`` before authentication, so before any byte of a file leaves.
    """

    def __init__(self, fingerprints: frozenset[str]) -> None:
        self._fingerprints = fingerprints
        self.presented: asyncssh.SSHKey | None = None
        self.presented_ca = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self.presented = key
        return key.get_fingerprint("sha256") in self._fingerprints

    def validate_host_ca_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # A CA is trusted only through an @cert-authority line of the known_hosts file, never by fingerprint.
        self.presented, self.presented_ca = key, True
        return False


class ReturnServerClient:
    """Publishes local files on the platform's return server, over one reused SFTP session.

    Deliveries are serialised; an instance belongs to one event loop. Call :meth:`close` at shutdown.
    """

    def __init__(self, server: ReturnServer) -> None:
        self.server = server
        #: how many SSH connections this client opened (a test checks reuse with it)
        self.connections_opened = 0
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._pinned = frozenset(server.host_key_fingerprints)
        self._endpoint = f"{server.host}:{server.port}"

    @property
    def connected(self) -> bool:
        """Whether a connection is open now, waiting to be reused."""
        return self._conn is not None and not self._conn.is_closed()

    async def deliver(self, local: Path, remote_name: str, *, remote_dir: str) -> None:
        """Publish ``local`` as ``remote_dir/remote_name``: upload ``.part``, fsync, rename, check the size.

        Idempotent: a final name already there with the same size counts as delivered. Raises
        :class:`DeliveryError`; ``ValueError`` if ``remote_name`` is not a plain file name, and
        ``OSError`` if the local file cannot be read (relayd's problem, not the remote side's).
        """
        _check_name(remote_name)
        final = posixpath.join(remote_dir, remote_name)
        self._cancel_idle_timer()
        async with self._lock:
            self._cancel_idle_timer()  # a timer armed by the delivery that held the lock
            try:
                fh = open(local, "rb")  # closed by the with below
            except OSError:
                self._arm_idle_timer()  # the connection is fine and stays reusable
                raise
            try:
                with fh:
                    await self._deliver_locked(fh, final, remote_dir)
            except DeliveryError as exc:
                self._abort()
                log.warning("outbound.delivery_failed", server=self._endpoint, remote=final, code=exc.code, error=exc.message)
                raise
            except BaseException:
                # Cancelled, or a bug: the session is in an unknown state; never reuse it.
                self._abort()
                raise
            finally:
                self._arm_idle_timer()  # a no-op once aborted

    async def close(self) -> None:
        """Close the connection, if one is open; the next :meth:`deliver` would open a new one."""
        self._cancel_idle_timer()
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.close()
            try:
                async with asyncio.timeout(min(self.server.operation_timeout_seconds, 10.0)):
                    await conn.wait_closed()
            except Exception:
                conn.abort()  # the peer does not take part in a clean close; do not wait for it

    async def __aenter__(self) -> ReturnServerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- one delivery ------------------------------------------------------------------

    async def _deliver_locked(self, fh: Any, final: str, remote_dir: str) -> None:
        size = os.fstat(fh.fileno()).st_size
        reused = self.connected
        sftp = await self._session()
        try:
            await self._publish(sftp, fh, size, final, remote_dir)
        except DeliveryError as exc:
            # A reused connection may have died while idle (the server restarted, a firewall forgot
            # it) without our noticing. Publishing is idempotent, so one more try on a new
            # connection is safe, and saves a whole retry period in the outbox.
            if not (reused and exc.code == "connect_failed"):
                raise
            log.info("outbound.reconnect", server=self._endpoint, why=exc.message)
            self._abort()
            fh.seek(0)
            sftp = await self._session()
            await self._publish(sftp, fh, size, final, remote_dir)

    async def _publish(self, sftp: asyncssh.SFTPClient, fh: Any, size: int, final: str, remote_dir: str) -> None:
        existing = await self._stat(sftp, final)
        if existing is not None:
            if existing.size == size:
                log.info("outbound.already_delivered", server=self._endpoint, remote=final, size=size)
                return
            raise DeliveryError(
                "remote_conflict",
                f"{final} already exists on the return server with {existing.size} bytes, not the {size} bytes "
                "to deliver; it was left untouched and nothing was sent",
            )

        part = final + PART_SUFFIX
        try:
            # "wb" = WRITE|CREAT|TRUNC: a .part left by an earlier attempt is emptied, never appended to.
            remote = await self._op(sftp.open(part, "wb"), f"open {part} for writing")
        except DeliveryError as exc:
            if exc.code == "remote_error" and await self._missing_dir(sftp, remote_dir):
                raise DeliveryError("remote_dir_missing", f"the remote directory {remote_dir} does not exist on the return server "
                                    f"(could not create {part}); nothing was delivered") from None
            raise
        # On an error the handle is not closed here: the caller aborts the whole connection, which
        # releases it, and a peer that stopped answering would only make a close wait out its timeout.
        sent = 0
        while chunk := await asyncio.to_thread(fh.read, CHUNK_BYTES):
            await self._op(remote.write(chunk, sent), f"write to {part}")
            sent += len(chunk)
        if sent != size:
            raise DeliveryError("size_mismatch", f"the local file changed while it was sent ({size} then {sent} bytes); "
                                f"{part} was not published")
        fsynced = True
        try:
            await self._op(remote.fsync(), f"fsync {part}")
        except DeliveryError as exc:
            if not isinstance(exc.__cause__, asyncssh.SFTPOpUnsupported):
                raise
            fsynced = False  # the server does not offer fsync@openssh.com; the rename still publishes atomically
        await self._op(remote.close(), f"close {part}")

        try:
            await self._op(sftp.posix_rename(part, final), f"rename {part} to {final}")
            how = "posix-rename"
        except DeliveryError as exc:
            if not isinstance(exc.__cause__, asyncssh.SFTPOpUnsupported):
                raise
            # A plain SFTPv3 rename fails if the target exists, which step 1 ruled out.
            await self._op(sftp.rename(part, final), f"rename {part} to {final}")
            how = "rename"

        landed = await self._stat(sftp, final)
        if landed is None or landed.size != size:
            got = "nothing" if landed is None else f"{landed.size} bytes"
            raise DeliveryError("size_mismatch", f"after the rename, {final} on the return server holds {got}, not {size} bytes")
        log.info("outbound.delivered", server=self._endpoint, remote=final, size=size, fsync=fsynced, rename=how)

    async def _stat(self, sftp: asyncssh.SFTPClient, path: str) -> asyncssh.SFTPAttrs | None:
        """The attributes of ``path``, or None when it does not exist."""
        try:
            return await self._op(sftp.stat(path), f"stat {path}")
        except DeliveryError as exc:
            if isinstance(exc.__cause__, asyncssh.SFTPNoSuchFile):
                return None
            raise

    async def _missing_dir(self, sftp: asyncssh.SFTPClient, remote_dir: str) -> bool:
        with contextlib.suppress(DeliveryError):
            return await self._stat(sftp, remote_dir) is None
        return False

    async def _op(self, awaitable: Awaitable[T], what: str) -> T:
        """One SFTP operation, bounded in time, its errors as DeliveryError (the asyncssh one as ``__cause__``)."""
        timeout = self.server.operation_timeout_seconds
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError:
            raise DeliveryError("timeout", f"the return server {self._endpoint} did not answer within {timeout:g} s ({what})") from None
        except asyncssh.SFTPConnectionLost as exc:
            raise DeliveryError("connect_failed", f"the connection to {self._endpoint} was lost ({what}): {exc.reason}") from exc
        except asyncssh.SFTPPermissionDenied as exc:
            raise DeliveryError("remote_denied", f"the return server denied the permission to {what}: "
                                f"{exc.reason or 'no reason given'}") from exc
        except asyncssh.SFTPError as exc:
            raise DeliveryError("remote_error", f"the return server refused to {what}: {exc.reason or 'no reason given'} "
                                f"(SFTP status {exc.code})") from exc
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise DeliveryError("connect_failed", f"the connection to {self._endpoint} was lost ({what}): {_reason(exc)}") from exc

    # -- the connection ----------------------------------------------------------------

    async def _session(self) -> asyncssh.SFTPClient:
        """The open SFTP session, or a new connection and session."""
        if self._sftp is not None and self.connected:
            return self._sftp
        self._abort()
        conn, fingerprint = await self._connect()
        try:
            sftp = await self._op(conn.start_sftp_client(), "start an SFTP session")
        except BaseException:
            conn.abort()
            raise
        self._conn, self._sftp = conn, sftp
        self.connections_opened += 1
        log.info("outbound.connected", server=self._endpoint, username=self.server.username, host_key=fingerprint,
                 connections_opened=self.connections_opened)
        return sftp

    async def _connect(self) -> tuple[asyncssh.SSHClientConnection, str]:
        server = self.server
        made: list[_PinnedHostKeyClient] = []

        def factory() -> _PinnedHostKeyClient:
            made.append(_PinnedHostKeyClient(self._pinned))
            return made[-1]

        options = self._options()
        try:
            conn = await asyncssh.connect(server.host, server.port, client_factory=factory, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            client = made[-1] if made else None
            presented = client.presented if client else None
            raise DeliveryError("host_key_mismatch", self._mismatch_message(presented, bool(client and client.presented_ca), exc)) from None
        except asyncssh.PermissionDenied:
            raise DeliveryError("auth_failed", f"the return server {self._endpoint} refused the login of {server.username!r} "
                                f"with the configured {'password' if server.private_key is None else 'private key'}") from None
        except TimeoutError:
            raise DeliveryError("timeout", f"no SSH session with {self._endpoint} within {server.connect_timeout_seconds:g} s "
                                "(connect_timeout_seconds)") from None
        except asyncssh.ConnectionLost as exc:
            if "timeout" in exc.reason.lower():
                raise DeliveryError("timeout", f"the login on {self._endpoint} did not finish within "
                                    f"{server.login_timeout_seconds:g} s (login_timeout_seconds)") from None
            raise DeliveryError("connect_failed", f"the connection to {self._endpoint} was lost: {exc.reason}") from None
        except (asyncssh.DisconnectError, OSError) as exc:
            raise DeliveryError("connect_failed", f"cannot connect to the return server {self._endpoint}: {_reason(exc)}") from None
        key = conn.get_server_host_key()
        return conn, key.get_fingerprint("sha256") if key is not None else "?"

    def check_settings(self) -> None:
        """Load the credentials and the known_hosts file now, as a connection would; raise DeliveryError if one fails."""
        self._options()

    def _options(self) -> dict[str, Any]:
        """asyncssh.connect() options, with nothing taken from ~/.ssh, an agent or the environment.

        They are passed to connect() itself, not as an options object: connect() would otherwise
        apply its own ``config=()`` default and read ~/.ssh/config (Hostname, ProxyCommand...).
        """
        server = self.server
        if server.known_hosts is not None:
            try:
                # Read at every connection, so that an edited file counts without a restart.
                trust: Any = asyncssh.read_known_hosts(str(server.known_hosts))
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                raise DeliveryError("connect_failed", f"cannot read the known_hosts file {server.known_hosts} ({_reason(exc)}); "
                                    "the server's key cannot be checked, so nothing was sent") from None
            host_key_algs: Any = ()  # asyncssh prefers the algorithms of the keys the file pins
        else:
            # Never None (that means "accept any key") nor empty (that means ~/.ssh/known_hosts):
            # three empty lists trust no key, so every key goes to validate_host_public_key.
            trust = ([], [], [])
            host_key_algs = _FINGERPRINT_HOST_KEY_ALGS

        client_keys: Any = None
        password = None
        if server.private_key is not None:
            try:
                client_keys = [asyncssh.read_private_key(server.private_key)]
            except (OSError, ValueError, asyncssh.KeyImportError) as exc:
                # The reason names the problem (missing, a passphrase, a format), never the content.
                raise DeliveryError("auth_failed", f"cannot load the private key {server.private_key} for {self._endpoint}: "
                                    f"{_reason(exc)}") from None
        else:
            try:
                password = server.password()
            except ConfigError as exc:
                raise DeliveryError("auth_failed", f"cannot load the password for {self._endpoint}: {exc}") from None

        return dict(
            username=server.username,
            known_hosts=trust,
            server_host_key_algs=host_key_algs,
            x509_trusted_certs=None,
            x509_trusted_cert_paths=[],
            config=[],  # not ~/.ssh/config
            client_keys=client_keys,
            agent_path=None,
            pkcs11_provider=None,
            password=password,
            password_auth=password is not None,
            kbdint_auth=False,
            host_based_auth=False,
            gss_auth=False,
            gss_kex=False,
            encryption_algs=CIPHERS,
            kex_algs=KEX_ALGS,
            mac_algs=MAC_ALGS,
            connect_timeout=server.connect_timeout_seconds,
            login_timeout=server.login_timeout_seconds,
            keepalive_interval=0,
        )

    def _mismatch_message(self, presented: asyncssh.SSHKey | None, by_ca: bool, exc: asyncssh.HostKeyNotVerifiable) -> str:
        pinned = []
        if self.server.known_hosts is not None:
            pinned.append(f"the known_hosts file {self.server.known_hosts}")
        if self._pinned:
            pinned.append("host_key_fingerprints " + ", ".join(sorted(self._pinned)))
        where = " nor ".join(pinned)
        if presented is None:
            what = f"a host key that could not be verified ({exc.reason})"
        elif by_ca:
            what = f"a host certificate signed by the CA key {presented.get_fingerprint('sha256')} ({presented.get_algorithm()})"
        else:
            what = f"{presented.get_fingerprint('sha256')} ({presented.get_algorithm()})"
        message = (f"the return server {self._endpoint} presented {what}, which is not pinned by {where}; "
                   "nothing was sent. If the platform announced a new key, add its fingerprint to the configuration")
        log.error("outbound.host_key_mismatch", server=self._endpoint,
                  presented=presented.get_fingerprint("sha256") if presented is not None else None)
        return message

    # -- idle timer and teardown -----------------------------------------------------

    def _arm_idle_timer(self) -> None:
        if self._conn is None:
            return
        self._idle_timer = asyncio.get_running_loop().call_later(self.server.idle_seconds, self._idle_expired)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._lock.locked() or self._conn is None:
            return  # a delivery is running; it arms a new timer when it ends
        conn, self._conn, self._sftp = self._conn, None, None
        log.info("outbound.idle_close", server=self._endpoint, idle_seconds=self.server.idle_seconds)
        conn.close()

    def _abort(self) -> None:
        """Drop the connection at once (after an error its state is unknown; the peer may not answer)."""
        self._cancel_idle_timer()
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.abort()


def _check_name(name: str) -> None:
    # The outbox names files; a path here would be a bug, and could escape remote_dir.
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")


def _reason(exc: BaseException) -> str:
    """A short text for an exception: asyncssh's reason, an OS error's strerror, or str()."""
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.ChannelOpenError):
        return exc.reason
    if isinstance(exc, socket.gaierror):
        # Its errno is getaddrinfo's (-2), which os.strerror would call "Unknown error -2".
        return f"its name does not resolve ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", rather than asyncio's "Connect call failed (...)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

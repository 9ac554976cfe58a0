"""Push packages to a relay over SFTP the way the platform does, and report what the relay answered.

A relay answers a package on its commit: the close of a ``.zip`` upload (``direct`` style) or the
rename of ``<name>.part`` to ``<name>`` (``rename`` style). A refusal is an SFTP failure whose
message is ``refused (<code>): <sentence>``. paramiko drops the server's answers to pipelined
writes and to a close, so after each upload the name written is checked with a ``stat``: the relay
answers it with the refusal, or the size it holds (a short size is a lost write on any server).
The relay's answer to that ``stat`` (after the rename, in ``rename`` style) also says whether the
package was a resend of one it had already accepted: ``duplicate``.

Every worker thread has its own SSH connection; the files are shared out through one queue, so a
slow package does not hold the others back.
"""

from __future__ import annotations

import os
import posixpath
import queue
import re
import socket
import threading
from base64 import b64encode
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal, TypeAlias

import paramiko

__all__ = [
    "MAX_CONCURRENCY",
    "ProgressCallback",
    "PushError",
    "PushResult",
    "Status",
    "Style",
    "collect_files",
    "exit_code",
    "parse_refusal",
    "push_files",
]

Status: TypeAlias = Literal["accepted", "duplicate", "refused", "error"]
Style: TypeAlias = Literal["direct", "rename"]
#: ``progress(files_done, files_total, bytes_done, bytes_total)``, called from worker threads (one at a time).
ProgressCallback: TypeAlias = Callable[[int, int, int, int], None]

#: More connections than this only queue up behind the relay's session limit.
MAX_CONCURRENCY = 32
_CHUNK = 32768  # paramiko's largest SFTP write request
_TEMP_SUFFIX = ".part"
_REFUSED_RE = re.compile(r"refused \(([a-z0-9_]+)\)")
#: the extended attribute in which relayd says what became of a committed name (see relayd.inbound.server)
_OUTCOME_ATTRIBUTE = "outcome@relayd"


class PushError(Exception):
    """A usage problem found before any connection (bad path, missing credential, unreadable file)."""


@dataclass(frozen=True)
class PushResult:
    """What became of one file: ``accepted``, ``duplicate`` (a resend the relay already had), ``refused``
    (``code`` is the relay's reason) or ``error``."""

    file: str
    status: Status
    code: str | None
    message: str | None
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """The result as the ``--json`` output carries it."""
        return asdict(self)


class _ConnectionLost(Exception):
    """The SSH connection broke during a transfer: the worker must reconnect before the next file."""


def parse_refusal(message: str) -> str | None:
    """The reason code in a relay's ``refused (<code>): <sentence>`` message, or None."""
    match = _REFUSED_RE.search(message)
    return match.group(1) if match else None


def collect_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files to push: each file as given, and every ``*.zip`` directly inside each folder, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.zip") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise PushError(f"{path}: no such file or folder")
    names: dict[str, Path] = {}
    for f in files:
        # The relay keeps one file per name: two uploads with one name would overwrite each other.
        if f.name in names:
            raise PushError(f"{names[f.name]} and {f} have the same name; push them separately")
        names[f.name] = f
    return files


def exit_code(results: Sequence[PushResult]) -> int:
    """0 if every file was accepted (or was a resend already accepted), 2 if any could not be delivered, else 1."""
    if any(r.status == "error" for r in results):
        return 2
    if any(r.status == "refused" for r in results):
        return 1
    return 0


def push_files(
    paths: Iterable[str | os.PathLike[str]],
    *,
    host: str,
    port: int,
    username: str,
    key_path: str | os.PathLike[str] | None = None,
    password: str | None = None,
    style: Style = "rename",
    concurrency: int = 1,
    remote_dir: str = ".",
    known_hosts: str | os.PathLike[str] | None = None,
    insecure_host_key: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float = 120.0,
) -> list[PushResult]:
    """Upload ``paths`` (files, or folders of ``*.zip``) and return one result per file, in input order.

    Log in with ``key_path`` or ``password`` (given both, the key is tried first). The host key is checked against ``known_hosts``
    (default ``~/.ssh/known_hosts``) unless ``insecure_host_key``. Connection failures do not
    raise: the files they leave undelivered get an ``error`` result. Raises :class:`PushError`
    for a usage problem found before connecting.
    """
    if style not in ("direct", "rename"):
        raise PushError(f"unknown upload style {style!r}; use 'direct' or 'rename'")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise PushError(f"concurrency must be between 1 and {MAX_CONCURRENCY}")
    if key_path is None and password is None:
        raise PushError("no credential: give a key file or a password")
    files = collect_files(paths)
    pkey = _load_key(Path(key_path)) if key_path is not None else None
    known = None if insecure_host_key else _load_known_hosts(known_hosts)
    if not files:
        return []

    login = _Login(host, port, username, pkey, password, known, timeout)
    try:
        sizes = [f.stat().st_size for f in files]
    except OSError as exc:
        raise PushError(f"{exc.filename}: {exc.strerror}") from None
    tracker = _Tracker(len(files), sum(sizes), progress)
    work: queue.Queue[int] = queue.Queue()
    for i in range(len(files)):
        work.put(i)
    results: list[PushResult | None] = [None] * len(files)
    connect_errors: list[str] = []
    workers = [
        threading.Thread(
            target=_worker, args=(login, style, remote_dir, files, work, results, tracker, connect_errors),
            name=f"relayd-push-{n}", daemon=True,
        )
        for n in range(min(concurrency, len(files)))
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    # Files no worker could take: every connection failed.
    why = connect_errors[-1] if connect_errors else "not sent"
    out = []
    for i, f in enumerate(files):
        result = results[i]
        if result is None:
            result = PushResult(str(f), "error", None, why, 0)
            tracker.file_done(sizes[i])
        out.append(result)
    return out


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class _Login:
    host: str
    port: int
    username: str
    pkey: paramiko.PKey | None
    password: str | None = None
    known: paramiko.HostKeys | None = None
    timeout: float = 120.0

    def __repr__(self) -> str:  # never let the password reach a traceback or a log
        return f"_Login({self.username}@{self.host}:{self.port})"


def _load_key(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise PushError(f"{path}: no such key file") from None
    except paramiko.PasswordRequiredException:
        raise PushError(f"{path}: the key is protected by a passphrase; use an unprotected test key") from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise PushError(f"{path}: not a private key paramiko can read ({exc})") from None


def _load_known_hosts(path: str | os.PathLike[str] | None) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if path is None:
        default = Path("~/.ssh/known_hosts").expanduser()
        if not default.is_file():
            return keys  # nothing known: every host is refused, with a message saying what to do
        path = default
    try:
        keys.load(os.fspath(path))
    except FileNotFoundError:
        raise PushError(f"{path}: no such known_hosts file") from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise PushError(f"{path}: unreadable known_hosts file ({exc})") from None
    return keys


def _fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + b64encode(sha256(key.asbytes()).digest()).decode().rstrip("=")


def _host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _connect(login: _Login) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    """One SSH connection with its SFTP session; raises ``_ConnectFailed`` with a readable message."""
    where = f"{login.host}:{login.port}"
    try:
        sock = socket.create_connection((login.host, login.port), timeout=min(login.timeout, 30.0))
    except OSError as exc:
        raise _ConnectFailed(f"cannot connect to {where}: {exc.strerror or exc}") from None
    transport = paramiko.Transport(sock)
    try:
        entry = _host_entry(login.host, login.port)
        known = login.known.lookup(entry) if login.known is not None else None
        if known:
            _prefer_key_types(transport, list(known.keys()))
        transport.start_client(timeout=min(login.timeout, 30.0))
        server_key = transport.get_remote_server_key()
        if login.known is not None:
            _check_host_key(entry, server_key, known)
        _authenticate(transport, login)
        sftp = paramiko.SFTPClient.from_transport(transport)
        if sftp is None:
            raise _ConnectFailed(f"{where}: the server refused the SFTP subsystem")
        sftp.get_channel().settimeout(login.timeout)
        return transport, sftp
    except _ConnectFailed:
        transport.close()
        raise
    except paramiko.BadAuthenticationType as exc:
        transport.close()
        raise _ConnectFailed(f"{where}: the server does not accept this login method (it offers {', '.join(exc.allowed_types)})") from None
    except paramiko.AuthenticationException:
        transport.close()
        raise _ConnectFailed(f"{where}: authentication failed for user {login.username!r}") from None
    except (paramiko.SSHException, EOFError, OSError) as exc:
        transport.close()
        raise _ConnectFailed(f"{where}: SSH session failed: {exc or type(exc).__name__}") from None


def _authenticate(transport: paramiko.Transport, login: _Login) -> None:
    if login.pkey is not None:
        try:
            transport.auth_publickey(login.username, login.pkey)
            return
        except paramiko.AuthenticationException:
            if login.password is None:
                raise
    transport.auth_password(login.username, login.password or "")


class _ConnectFailed(Exception):
    """No usable SFTP session; the message says why, never with a secret."""


def _prefer_key_types(transport: paramiko.Transport, known_types: list[str]) -> None:
    # Ask for a host key of a type we know for this host, as OpenSSH does; else a server with
    # several keys may present one we cannot check.
    wanted: list[str] = []
    for t in known_types:
        wanted += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if t == "ssh-rsa" else [t]
    options = transport.get_security_options()
    usable = tuple(t for t in wanted if t in options.key_types)
    if usable:
        options.key_types = usable


def _check_host_key(entry: str, key: paramiko.PKey, known: Any) -> None:
    presented = f"{key.get_name()} {_fingerprint(key)}"
    if not known:
        raise _ConnectFailed(
            f"host key of {entry} is not known (the server presented {presented}); add it to known_hosts, "
            f"give --known-hosts FILE, or use --insecure-host-key on a loopback test relay"
        )
    expected = known.get(key.get_name())
    if expected is None or expected.asbytes() != key.asbytes():
        raise _ConnectFailed(
            f"HOST KEY MISMATCH for {entry}: the server presented {presented}, which known_hosts does not hold for it"
        )


def _close(transport: paramiko.Transport | None) -> None:
    if transport is not None:
        try:
            transport.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not hide the real error
            pass


# --------------------------------------------------------------------------- workers


class _Tracker:
    """Counts files and bytes across workers and reports them to the progress callback."""

    def __init__(self, files_total: int, bytes_total: int, callback: ProgressCallback | None):
        self.files_total = files_total
        self.bytes_total = bytes_total
        self.files_done = 0
        self.bytes_done = 0
        self._callback = callback
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        self._update(0, n)

    def file_done(self, unsent: int) -> None:
        # A file cut short still counts as done: count its unsent bytes so the total adds up.
        self._update(1, unsent)

    def _update(self, files: int, n: int) -> None:
        with self._lock:
            self.files_done += files
            self.bytes_done += n
            if self._callback is not None:
                self._callback(self.files_done, self.files_total, self.bytes_done, self.bytes_total)


def _worker(
    login: _Login,
    style: Style,
    remote_dir: str,
    files: list[Path],
    work: queue.Queue[int],
    results: list[PushResult | None],
    tracker: _Tracker,
    connect_errors: list[str],
) -> None:
    transport: paramiko.Transport | None = None
    sftp: paramiko.SFTPClient | None = None
    try:
        while True:
            if sftp is None:
                try:
                    transport, sftp = _connect(login)
                except _ConnectFailed as exc:
                    # Leave the queue to the other workers; files nobody takes are reported by push_files.
                    connect_errors.append(str(exc))
                    return
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            local = files[i]
            try:
                results[i], broken = _push_one(sftp, local, style, remote_dir, tracker)
            except Exception as exc:  # noqa: BLE001 - one file's surprise must not stop the others
                results[i], broken = PushResult(str(local), "error", None, f"unexpected error: {exc!r}", 0), True
                tracker.file_done(local.stat().st_size if local.exists() else 0)
            if broken:
                _close(transport)
                transport = sftp = None
    finally:
        _close(transport)


class _Sent:
    """Bytes of one file sent so far, for the result and the progress."""

    def __init__(self, tracker: _Tracker, size: int):
        self.tracker = tracker
        self.size = size
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        self.tracker.add_bytes(n)


def _push_one(
    sftp: paramiko.SFTPClient, local: Path, style: Style, remote_dir: str, tracker: _Tracker
) -> tuple[PushResult, bool]:
    """Upload one file and read the relay's answer; True with it if the connection broke meanwhile."""
    size = local.stat().st_size
    sent = _Sent(tracker, size)
    try:
        return _push_one_on(sftp, local, style, remote_dir, sent), False
    except _ConnectionLost as exc:
        tracker.file_done(size - sent.count)
        return PushResult(str(local), "error", None, str(exc), sent.count), True


def _push_one_on(sftp: paramiko.SFTPClient, local: Path, style: Style, remote_dir: str, sent: _Sent) -> PushResult:
    """Upload one file and read the relay's answer. Raises ``_ConnectionLost`` if the session broke."""
    final = posixpath.join(remote_dir, local.name) if remote_dir not in ("", ".") else local.name
    target = final + _TEMP_SUFFIX if style == "rename" else final

    def done(status: Status, message: str | None = None) -> PushResult:
        sent.tracker.file_done(sent.size - sent.count)
        code = parse_refusal(message) if status == "refused" and message else None
        return PushResult(str(local), status, code, message, sent.count)

    try:
        failure = _upload(sftp, local, target, sent)
    except OSError as exc:
        if _is_connection_error(exc, sftp):
            raise _ConnectionLost(f"connection lost during the upload: {_describe(exc)}") from None
        return done("error", f"cannot read {local}: {_describe(exc)}")
    if failure is not None:
        if parse_refusal(failure):
            return done("refused", failure)
        if style == "rename":
            _remove_quietly(sftp, target)
        return done("error", f"upload failed: {failure}")

    step = "upload"
    try:
        # paramiko drops the server's answers to pipelined writes and to the close, so ask what the
        # server holds under the name written. The relay answers a refused upload's name with the refusal.
        attrs = sftp.stat(target)
        if attrs.st_size != sent.count:
            if style == "rename":
                _remove_quietly(sftp, target)
            return done("error", f"the server holds {attrs.st_size} bytes of {target}, {sent.count} were sent")
        if style == "rename":
            step = "rename"
            _rename(sftp, target, final)
            attrs = _answer_after_rename(sftp, final)
        return done("duplicate" if _said_duplicate(attrs) else "accepted")
    except (OSError, EOFError, paramiko.SSHException) as exc:
        message = _describe(exc)
        if parse_refusal(message):
            return done("refused", message)
        if _is_connection_error(exc, sftp):
            raise _ConnectionLost(f"connection lost before the relay answered (it may have the package): {message}") from None
        return done("error", f"{step} failed: {message}")


def _said_duplicate(attrs: paramiko.SFTPAttributes | None) -> bool:
    """Whether the relay's stat answer says the package was a resend of one it already had."""
    extended = getattr(attrs, "attr", None) or {}
    # paramiko's reader fills ``attr[get_string()] = get_string()``, which Python evaluates value first:
    # the pair arrives swapped. Look for it either way round.
    pairs = {frozenset(_text(x) for x in item) for item in extended.items()}
    return frozenset({_OUTCOME_ATTRIBUTE, "duplicate"}) in pairs


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _answer_after_rename(sftp: paramiko.SFTPClient, final: str) -> paramiko.SFTPAttributes | None:
    # The rename's own answer is only OK; the relay tells what it made of the package to a stat of the name.
    # Any other server may not show the name at all: that is no failure, the rename succeeded.
    try:
        return sftp.stat(final)
    except OSError:
        return None


def _upload(sftp: paramiko.SFTPClient, local: Path, target: str, sent: _Sent) -> str | None:
    """Write ``local`` to ``target``; the SFTP error message if the server failed a write or the open.

    Local read errors raise OSError; a broken connection raises ``_ConnectionLost``.
    """
    with open(local, "rb") as src:
        try:
            remote = sftp.open(target, "wb")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if _is_connection_error(exc, sftp):
                raise _ConnectionLost(f"connection lost: {_describe(exc)}") from None
            return _describe(exc)
        failure: str | None = None
        try:
            # Pipelined: the writes do not wait for their answers, so latency costs little.
            remote.set_pipelined(True)
            while chunk := src.read(_CHUNK):  # a local read error propagates as it is
                try:
                    remote.write(chunk)
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    failure = _server_failure(exc, sftp)
                    break
                sent.add(len(chunk))
            if failure is None:
                try:
                    remote.close()
                except (OSError, EOFError, paramiko.SSHException) as exc:
                    failure = _server_failure(exc, sftp)
        finally:
            if not remote.closed:
                _finish_close(remote)
        return failure


def _server_failure(exc: BaseException, sftp: paramiko.SFTPClient) -> str:
    """The server's message for a failed SFTP request; raises ``_ConnectionLost`` if the session broke."""
    if _is_connection_error(exc, sftp):
        raise _ConnectionLost(f"connection lost: {_describe(exc)}") from None
    return _describe(exc)


def _finish_close(remote: paramiko.SFTPFile) -> None:
    # After a failed write the handle may still be open on the server; close it so that the relay
    # settles the upload now (it quarantines a refused one) rather than at the end of the session.
    try:
        remote.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the answer to a close carries nothing more: the stat that follows asks again


def _rename(sftp: paramiko.SFTPClient, old: str, new: str) -> None:
    try:
        sftp.posix_rename(old, new)
    except OSError as exc:
        message = _describe(exc)
        if parse_refusal(message) or "unsupported" not in message.lower():
            raise
        # A server without the posix-rename extension: a plain rename commits just the same.
        sftp.rename(old, new)


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the relay removes leftovers when the session ends anyway


def _is_connection_error(exc: BaseException, sftp: paramiko.SFTPClient) -> bool:
    if isinstance(exc, (EOFError, paramiko.SSHException, TimeoutError, ConnectionError)):
        return True
    return not _transport_active(sftp)


def _transport_active(sftp: paramiko.SFTPClient) -> bool:
    channel = sftp.get_channel()
    transport = channel.get_transport() if channel is not None else None
    return transport is not None and transport.is_active() and not channel.closed


def _describe(exc: BaseException) -> str:
    # paramiko raises IOError(text) or IOError(errno, text) for an SFTP status: show the server's text.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text or type(exc).__name__

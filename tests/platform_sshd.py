"""The platform's return server, played by a real OpenSSH ``sshd`` on a loopback port.

relayd delivers acks and return packages to mon.service-public.fr's SFTP server. In the tests
that server is OpenSSH's own ``sshd`` with ``internal-sftp``: an independent SSH stack, with its
own Ed25519 host key, its own configuration and, when the tests run as root (CI), a chroot, so
the client is confined the way a real platform account is.

Usage in a test module (or, later, in ``conftest.py``)::

    from platform_sshd import PlatformSshd, platform_sshd_fixture  # noqa: F401  (registers ``platform_sshd``)

    def test_something(platform_sshd):
        sshd = platform_sshd()                       # started; killed at teardown, whatever happens
        server = ReturnServer.model_validate(sshd.relay_config(sshd.client_key))
        ...
        assert sshd.files() == ["ack.zip"]

``platform_sshd`` is a factory fixture: each call builds and starts one more server in the
test's ``tmp_path``; every server it made is stopped at teardown (sessions included).

Layout of a server's ``work`` folder::

    ssh_host_ed25519_key(.pub)   its host key, made by ssh-keygen
    client_ed25519_key(.pub)     the relay's key pair, when the factory made one
    authorized_keys              the client public key it accepts
    sshd_config                  the configuration, written once
    sshd.log                     sshd's stderr (-e), appended across restarts; shown in failures
    chroot/incoming              where delivered files land (``incoming``), when root

Root and chroot: ``ChrootDirectory`` requires every component of the path to be owned by root
and writable by nobody else. pytest's ``tmp_path`` lives under ``/tmp`` (mode 1777), so when
``work`` does not qualify, the chroot is made under ``/run/relayd-tests/`` instead and removed
by :meth:`PlatformSshd.cleanup`. Without root there is no chroot: ``remote_dir`` is then the
absolute path of ``incoming``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

SSHD = "/usr/sbin/sshd"
#: where a chroot goes when ``work`` is not a valid chroot parent (pytest's tmp_path is under /tmp)
CHROOT_BASE = Path("/run/relayd-tests")
#: every wait in this module is bounded by this many seconds
WAIT_SECONDS = 20.0


def _require(program: str) -> str:
    """The path of a program the fixture needs; fail the test clearly when it is missing."""
    path = shutil.which(program) or (program if os.path.isabs(program) and os.access(program, os.X_OK) else None)
    if path is None:
        pytest.fail(f"{program} is not installed; `.ci/run` installs it (Debian: openssh-server / openssh-client)")
    return path


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_client_key(folder: Path, name: str = "client_ed25519_key") -> Path:
    """A new Ed25519 key pair made by ssh-keygen: ``folder/name`` (mode 0600) and ``folder/name.pub``."""
    path = folder / name
    subprocess.run([_require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)],
                   check=True, capture_output=True, timeout=WAIT_SECONDS)
    return path


def public_key_line(private_key: Path) -> str:
    """The OpenSSH public key line beside a private key made by :func:`make_client_key`."""
    return private_key.with_name(private_key.name + ".pub").read_text(encoding="ascii").strip()


def fingerprint(public_key_file: Path) -> str:
    """``SHA256:...`` of a public key, computed by ssh-keygen (not by the SSH stack under test)."""
    out = subprocess.run([_require("ssh-keygen"), "-l", "-E", "sha256", "-f", str(public_key_file)],
                         check=True, capture_output=True, text=True, timeout=WAIT_SECONDS).stdout
    return out.split()[1]


def _safe_chroot_parent(path: Path) -> bool:
    """Whether sshd would accept a chroot below ``path``: every component root-owned, not group/other-writable."""
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
    return True


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                # The command name (field 2) may hold spaces and parentheses; the ppid follows the last ')'.
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        children = parents.get(todo.pop(0), [])
        out += children
        todo += children
    return out


class PlatformSshd:
    """A real OpenSSH sshd serving SFTP on ``127.0.0.1:port`` with a single account: the current user.

    The host key, the port and the folders stay the same across :meth:`restart`, so a client that
    pinned the key can reconnect. (Only the very first :meth:`start` may move to another port, if
    the chosen one was taken meanwhile: read ``port`` and :meth:`relay_config` after starting.)
    Call :meth:`cleanup` (the fixture does) so that no sshd outlives a test.
    """

    def __init__(self, work: Path, *, client_public_key: str) -> None:
        """Prepare keys, folders and ``sshd_config`` in ``work``; nothing runs until :meth:`start`."""
        self.sshd = _require(SSHD)
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.username = pwd.getpwuid(os.getuid()).pw_name
        self.port = free_port()
        self.log_path = work / "sshd.log"
        self.client_key: Path | None = None  # set by the fixture when it made the client's key pair
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused: list[int] = []
        self._started_once = False

        self.host_key = work / "ssh_host_ed25519_key"
        subprocess.run([_require("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "platform-return-server",
                        "-f", str(self.host_key)], check=True, capture_output=True, timeout=WAIT_SECONDS)
        self.host_public_key = self.host_key.with_name(self.host_key.name + ".pub").read_text(encoding="ascii").strip()
        self.host_key_fingerprint = fingerprint(self.host_key.with_name(self.host_key.name + ".pub"))

        self.authorized_keys = work / "authorized_keys"
        self.authorized_keys.write_text(client_public_key.strip() + "\n", encoding="ascii")
        self.authorized_keys.chmod(0o600)

        # As root, confine the account like a real platform does; sshd refuses a chroot path that
        # anyone but root could write to, hence a separate parent when ``work`` is under /tmp.
        self.chrooted = os.geteuid() == 0
        self._own_chroot_parent: Path | None = None
        self.chroot: Path | None = None
        if self.chrooted:
            if _safe_chroot_parent(work):
                chroot = work / "chroot"
            else:
                CHROOT_BASE.mkdir(mode=0o755, exist_ok=True)
                self._own_chroot_parent = Path(tempfile.mkdtemp(prefix="platform-sshd-", dir=CHROOT_BASE))
                self._own_chroot_parent.chmod(0o755)
                chroot = self._own_chroot_parent / "chroot"
            chroot.mkdir(mode=0o755)
            chroot.chmod(0o755)  # whatever the umask: sshd insists
            self.chroot = chroot
            self.incoming = chroot / "incoming"
            self.remote_dir = "/incoming"
        else:
            self.incoming = work / "incoming"
            self.remote_dir = str(self.incoming)
        self.incoming.mkdir(mode=0o755)

        self.config_path = work / "sshd_config"
        self.config_path.write_text(self._config(), encoding="ascii")
        if self.chrooted:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        # Check the configuration once, so that a mistake reads as sshd's own message.
        check = subprocess.run([self.sshd, "-t", "-f", str(self.config_path)], capture_output=True, text=True,
                               timeout=WAIT_SECONDS)
        if check.returncode != 0:
            raise RuntimeError(f"sshd refuses {self.config_path}: {check.stderr.strip()}")

    def _config(self) -> str:
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {self.work / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.username}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTTY no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
        ]
        if self.chrooted:
            lines += [f"ChrootDirectory {self.chroot}", "ForceCommand internal-sftp -d /incoming"]
        return "\n".join(lines) + "\n"

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start sshd and return once it answers with an SSH banner on its port.

        The port was free when chosen, but another process may have taken it since: on the very
        first start only (a restart must keep the port clients know), sshd is retried on a new one.
        """
        if self.running:
            return
        for attempt in range(3):
            if self._spawn():
                self._started_once = True
                return
            lost_port = "Address already in use" in self.log_text().rsplit("--- sshd start", 1)[-1]
            if self._started_once or not lost_port or attempt == 2:
                break
            self.port = free_port()
            self.config_path.write_text(self._config(), encoding="ascii")
        assert self._proc is not None
        raise RuntimeError(f"sshd exited with {self._proc.returncode}:\n{self.log_text()}")

    def _spawn(self) -> bool:
        """Run sshd; True once it answers, False if it exited (e.g. its port was taken)."""
        with open(self.log_path, "ab") as log:
            log.write(f"--- sshd start on port {self.port}\n".encode())
            log.flush()
            # A session of its own: a stray signal to the test's process group does not reach it.
            self._proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.config_path)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._banner():
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not answer on port {self.port} within {WAIT_SECONDS} s:\n{self.log_text()}")

    def _banner(self) -> bool:
        """Whether an SSH server answers on the port (a listener of another program would not say SSH-2.0)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def _accepts(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop sshd *and* its open sessions, like a platform going down; return once the port refuses.

        sshd's per-connection processes call setsid() and survive the listener's death, so they are
        found in /proc (descendants of our sshd) and killed by pid first.
        """
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        self._resume()
        if proc.poll() is None:
            for pid in _descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.terminate()
            try:
                proc.wait(timeout=WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=WAIT_SECONDS)
        deadline = time.monotonic() + WAIT_SECONDS
        while self._accepts():
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still accepts connections after sshd stopped")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the listener and every session at once, like a platform that crashes mid-transfer."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        self._resume()
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_SECONDS)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same host key."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop, and remove the chroot made outside ``work`` (if any)."""
        self.stop()
        if self._own_chroot_parent is not None:
            shutil.rmtree(self._own_chroot_parent, ignore_errors=True)
            self._own_chroot_parent = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the listener and every session (SIGSTOP) inside the block: a platform that hangs.

        TCP still connects (the kernel completes the handshake) but nothing answers. Resumed on exit.
        """
        if not self.running or self._proc is None:
            raise RuntimeError("sshd is not running")
        pids = [self._proc.pid, *_descendants(self._proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                self._paused.append(pid)
        try:
            yield
        finally:
            self._resume()

    def _resume(self) -> None:
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []

    def session_pids(self) -> list[int]:
        """The pids of the open sessions' processes (empty when no client is connected)."""
        if self._proc is None:
            return []
        return _descendants(self._proc.pid)

    # -- what the tests look at --------------------------------------------------------

    def known_hosts_line(self) -> str:
        """This server's line for an OpenSSH known_hosts file: ``[127.0.0.1]:PORT ssh-ed25519 AAAA...``."""
        keytype, blob = self.host_public_key.split()[:2]
        return f"[127.0.0.1]:{self.port} {keytype} {blob}"

    def files(self) -> list[str]:
        """The names in ``incoming``, sorted (``.part`` leftovers included)."""
        return sorted(p.name for p in self.incoming.iterdir())

    def log_text(self) -> str:
        """sshd's log so far, for assertions and failure messages."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def logins(self) -> int:
        """How many times a client logged in, according to sshd's own log."""
        return self.log_text().count("Accepted publickey for ")

    def relay_config(self, private_key: Path, **overrides: Any) -> dict[str, Any]:
        """The ``platform:`` mapping of a relay YAML configuration that reaches this server.

        ``overrides`` replace keys, e.g. ``host_key_fingerprints=[...]`` or ``idle_seconds=0``. The
        timeouts are short enough for a test to fail fast rather than hang.
        """
        config: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "username": self.username,
            "private_key": str(private_key),
            "host_key_fingerprints": [self.host_key_fingerprint],
            "remote_dir": self.remote_dir,
            "connect_timeout_seconds": 10.0,
            "login_timeout_seconds": 10.0,
            "operation_timeout_seconds": 30.0,
            "idle_seconds": 30.0,
        }
        config.update(overrides)
        return config

    def __repr__(self) -> str:
        return f"<PlatformSshd 127.0.0.1:{self.port} {'running' if self.running else 'stopped'} {self.work}>"


@pytest.fixture(name="platform_sshd")
def platform_sshd_fixture(tmp_path: Path) -> Iterator[Callable[..., PlatformSshd]]:
    """A factory of started :class:`PlatformSshd` servers; every one is stopped at teardown.

    ``platform_sshd(client_key=None, start=True)``: without ``client_key`` (a private key path with
    its ``.pub`` beside it) a new Ed25519 pair is made in the server's work folder; either way it is
    the server's ``client_key`` attribute.
    """
    servers: list[PlatformSshd] = []

    def make(*, client_key: Path | None = None, start: bool = True) -> PlatformSshd:
        work = tmp_path / f"platform-sshd-{len(servers)}"
        work.mkdir()
        key = client_key or make_client_key(work)
        sshd = PlatformSshd(work, client_public_key=public_key_line(key))
        sshd.client_key = key
        servers.append(sshd)
        if start:
            sshd.start()
        return sshd

    try:
        yield make
    finally:
        for sshd in servers:
            sshd.cleanup()

"""Fixtures that run a real relayd process on loopback and push to it with real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import paramiko
import pytest
import yaml

from relayd.inbound.passwords import hash_password

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "fixtures" / "real"
REAL_PACKAGE = REAL / "RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip"
REAL_MOTDEPASSE = "En@Qk#SE5Q"

PASSWORD = "correct horse battery staple"
OTHER_PASSWORD = "another account's password"


def wait_for(predicate, *, timeout: float = 60, what: str = "condition") -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    """A port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_key_pair(folder: Path, name: str) -> Path:
    """A new Ed25519 key pair in OpenSSH format: ``folder/name`` and ``folder/name.pub``."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = folder / name
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    path.with_name(f"{name}.pub").write_bytes(key.export_public_key())
    return path


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The platform account's key pair."""
    return write_key_pair(tmp_path_factory.mktemp("keys"), "platform_key")


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    return {"plateforme": hash_password(PASSWORD), "autre": hash_password(OTHER_PASSWORD)}


@dataclass
class Relay:
    """A relayd process under test."""

    root: Path
    config_path: Path
    port: int
    log_path: Path
    key: Path
    proc: subprocess.Popen | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: extra environment for the process (NOTIFY_SOCKET, WATCHDOG_USEC...)
    env: dict[str, str] = field(default_factory=dict)

    def inbox(self, insee: str) -> Path:
        return self.root / "inbox" / insee

    def drop(self, account: str = "plateforme") -> Path:
        return self.root / "var" / "drop" / account

    def returns(self, insee: str = "90017") -> Path:
        """The commune's return directory, where the business software drops status files."""
        return self.root / "returns" / insee / "retours"

    def rejected(self, insee: str = "90017") -> list[dict[str, Any]]:
        """Every refusal in the commune's rejected folder whose refused file has arrived too, with its path.

        relayd writes the reason first and moves the refused file in after, so a refusal is
        complete, as the business software would see it, only once both are there.
        """
        folder = self.root / "returns" / insee / "rejected"
        out = []
        # In the order they were written: names hold a random part, and two refusals in one second may swap.
        for reason in sorted(folder.glob("*.reason.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            data = json.loads(reason.read_text())
            data["_file"] = reason.with_name(reason.name.removesuffix(".reason.json"))
            if data["_file"].exists():
                out.append(data)
        return out

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a ``relayd`` command against this relay's configuration."""
        command, *rest = args
        nested = command in ("outbox", "ledger")  # commands with an action: `relayd outbox list -c F`
        sub = [command, *rest[:1]] if nested else [command]
        rest = rest[1:] if nested else rest
        return subprocess.run([sys.executable, "-m", "relayd", *sub, "-c", str(self.config_path), *rest],
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def outbox(self) -> list[dict[str, Any]]:
        """Every outbox row, oldest first."""
        return self.ledger_rows("SELECT * FROM outbox ORDER BY id")

    @property
    def quarantine(self) -> Path:
        return self.root / "var" / "quarantine"

    @property
    def ledger_path(self) -> Path:
        return self.root / "var" / "ledger.sqlite"

    def start(self, timeout: float = 30) -> None:
        """Start relayd and wait until it says it is ready."""
        ready_before = self._ready_count()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relayd", "run", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relayd exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._ready_count() > ready_before:
                return
            time.sleep(0.05)
        raise RuntimeError(f"relayd did not get ready:\n{self.log_text()}")

    def write_config(self) -> None:
        """Write ``self.config`` to the relay's configuration file (before a start or a SIGHUP)."""
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def _ready_count(self) -> int:
        return sum(e.get("event") == "relayd.ready" for e in self.events())

    def stop(self) -> None:
        """SIGTERM, and wait."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        with open(self.log_path, "ab") as fh:
            fh.write(b"\n")
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def ledger_rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        import sqlite3

        db = sqlite3.connect(self.ledger_path)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(sql, params).fetchall()]
        finally:
            db.close()

    def quarantined(self) -> list[dict[str, Any]]:
        """Every reason file in quarantine, with the path of the file it explains."""
        out = []
        for reason in sorted(self.quarantine.rglob("*.reason.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            data = json.loads(reason.read_text())
            data["_file"] = reason.with_name(reason.name.removesuffix(".reason.json"))
            out.append(data)
        return out


def relay_config(root: Path, port: int, key: Path, hashes: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A configuration with two accounts and three communes; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "server": {"listen": {"host": "127.0.0.1", "port": port}, "host_keys": ["host_keys/ssh_host_ed25519_key"]},
        "storage": {"root": "var"},
        "limits": {"max_package_bytes": 64 * 1024 * 1024},
        "accounts": [
            {"username": "plateforme", "password_hash": hashes["plateforme"],
             "authorized_keys": [key.with_name(key.name + ".pub").read_text().strip()],
             "communes": ["90017", "75056"]},
            {"username": "autre", "password_hash": hashes["autre"], "communes": ["2A004"]},
        ],
        "communes": [
            {"insee": "90017", "name": "Test 90017", "inbox": "inbox/90017", "demarches": ["DAUA", "ILE", "recensementCitoyen"],
             "delivery": "zip", "file_mode": "0640", "returns": "returns/90017/retours",
             "rejected": "returns/90017/rejected"},
            {"insee": "75056", "name": "Test 75056", "inbox": "inbox/75056", "demarches": ["DAUA", "ILE", "recensementCitoyen"],
             "delivery": "extracted", "file_mode": "0640", "returns": "returns/75056/retours",
             "rejected": "returns/75056/rejected"},
            {"insee": "2A004", "name": "Test 2A004", "inbox": "inbox/2A004", "demarches": ["ILE", "recensementCitoyen"]},
        ],
        # Tests drop their files by rename or wait for them; a short settle keeps them quick.
        "returns": {"settle_seconds": 0.3, "rescan_seconds": 2},
        "logging": {"format": "json", "level": "info"},
    }
    config.update(overrides)
    return config


@pytest.fixture
def make_relay(tmp_path: Path, client_key: Path, password_hashes: dict[str, str]) -> Iterator[Any]:
    """Build and start relays; every one is stopped at the end of the test."""
    relays: list[Relay] = []

    def make(start: bool = True, **overrides: Any) -> Relay:
        root = tmp_path / f"relay{len(relays)}"
        root.mkdir()
        port = free_port()
        config = relay_config(root, port, client_key, password_hashes, **overrides)
        config_path = root / "relayd.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        relay = Relay(root, config_path, port, root / "relayd.log", client_key, config=config)
        relays.append(relay)
        if start:
            relay.start()
        return relay

    yield make
    for relay in relays:
        relay.kill()


@pytest.fixture
def relay(make_relay) -> Relay:
    return make_relay()


@dataclass
class Demo:
    """A ``relayd demo`` process, started as a newcomer would, on free ports."""

    folder: Path
    info: dict[str, Any]
    proc: subprocess.Popen
    log_path: Path


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    folder = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "demo", "--dir", str(folder), "--port", "0",
                                 "--platform-port", "0"], stdout=log, stderr=subprocess.STDOUT)
    info_path = folder / "demo.json"
    try:
        wait_for(lambda: info_path.exists() or proc.poll() is not None, timeout=30, what="demo.json")
        assert proc.poll() is None, log_path.read_text()
        yield Demo(folder, json.loads(info_path.read_text()), proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # its threads' stacks, into demo.log, to see where it hung
            time.sleep(1)
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"relayd demo did not stop on SIGTERM:\n{log_path.read_text()[-6000:]}") from None


# -- clients -------------------------------------------------------------------------


def require_program(name: str) -> str:
    """The path of a program the test needs; fail clearly when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `.ci/run` installs it (Debian: openssh-client / openssh-server)")
    return path


def sftp_batch(relay: Relay, commands: list[str], *, user: str = "plateforme", key: Path | None = None,
               password: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run OpenSSH ``sftp -b`` against the relay. Batch mode stops at the first failing command."""
    sftp = require_program("sftp")
    batch = relay.root / f"batch-{time.monotonic_ns()}.txt"
    batch.write_text("\n".join(commands) + "\n")
    args = [sftp, "-b", str(batch), "-P", str(relay.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10"]
    env = dict(os.environ)
    if password is not None:
        # sftp -b forbids interactive auth; sshpass is not assumed, so password logins go through paramiko.
        raise ValueError("use paramiko for password logins")
    args += ["-i", str(key or relay.key), "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no"]
    args.append(f"{user}@127.0.0.1")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def sftp_put(relay: Relay, local: Path, remote: str, *, style: str = "direct", **kw: Any) -> subprocess.CompletedProcess:
    """Push one file with OpenSSH sftp: ``direct`` (put) or ``rename`` (put as .part, then rename)."""
    if style == "direct":
        return sftp_batch(relay, [f'put "{local}" "{remote}"'], **kw)
    return sftp_batch(relay, [f'put "{local}" "{remote}.part"', f'rename "{remote}.part" "{remote}"'], **kw)


def paramiko_client(relay: Relay, *, user: str = "plateforme", password: str | None = None,
                    key: Path | None = None) -> paramiko.SFTPClient:
    """An SFTP session with paramiko, by password or key."""
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    if password is not None:
        transport.connect(username=user, password=password)
    else:
        pkey = paramiko.Ed25519Key.from_private_key_file(str(key or relay.key))
        transport.connect(username=user, pkey=pkey)
    client = paramiko.SFTPClient.from_transport(transport)
    assert client is not None
    return client


def paramiko_put(relay: Relay, local: Path, remote: str, *, style: str = "direct", **kw: Any) -> None:
    """Push one file with paramiko in either style; raises IOError when the relay refuses."""
    client = paramiko_client(relay, **kw)
    try:
        if style == "direct":
            client.put(str(local), remote)
        else:
            client.put(str(local), remote + ".part")
            client.posix_rename(remote + ".part", remote)
    finally:
        client.close()
        client.get_channel().get_transport().close()

"""The disk guard: uploads are refused while the storage root runs short of space, and accepted again after."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PASSWORD, REAL_PACKAGE, paramiko_client, paramiko_put, sftp_put, wait_for
from relayd.config import Config
from relayd.events import DiskLow, Events
from relayd.inbound.diskguard import DiskGuard
from relayd.rejections import Reason

MiB = 1024 * 1024
DISK_LOW_MESSAGE = f"refused (disk_low): {Reason.DISK_LOW.summary}"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted at the end (whatever still uses it is the test's to stop first)."""
    mount = shutil.which("mount")
    folder = tmp_path / "small"
    folder.mkdir()
    if mount is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(path: Path, size: int) -> None:
    chunk = b"\0" * MiB
    with open(path, "wb") as fh:
        for _ in range(size // MiB):
            fh.write(chunk)


def _events(relay, name: str) -> list[dict]:
    return [e for e in relay.events() if e.get("event") == name]


@pytest.fixture
def small_relay(make_relay, tmpfs: Path):
    """A relay whose storage root is the tmpfs, refusing uploads under 32 MiB free."""
    relay = make_relay(start=False, storage={"root": str(tmpfs)},
                       limits={"max_package_bytes": 16 * MiB, "min_free_bytes": 32 * MiB})
    relay.start()
    try:
        yield relay
    finally:
        relay.kill()  # before the tmpfs is unmounted


def _drop(relay) -> Path:
    return Path(relay.config["storage"]["root"]) / "drop" / "plateforme"


def test_uploads_are_refused_while_the_disk_is_low_and_accepted_after(small_relay, tmpfs: Path):
    relay = small_relay
    ballast = tmpfs / "ballast"
    _fill(ballast, 40 * MiB)  # 64 MiB - 40 MiB < 32 MiB
    wait_for(lambda: _refused_now(relay), timeout=30, what="the guard to see the disk low")

    openssh = sftp_put(relay, REAL_PACKAGE, "a.zip")
    assert openssh.returncode != 0
    assert "Failure" in openssh.stderr  # OpenSSH's sftp prints the status, not the server's message
    with pytest.raises(OSError) as refused:
        paramiko_put(relay, REAL_PACKAGE, "b.zip", password=PASSWORD)
    assert DISK_LOW_MESSAGE in str(refused.value)
    (low,) = _events(relay, "disk.low")
    assert low["level"] == "error" and low["threshold_bytes"] == 32 * MiB and low["free_bytes"] < 32 * MiB
    assert {e["code"] for e in _events(relay, "sftp.refused")} == {"disk_low"}
    assert not any(relay.inbox("90017").iterdir())
    assert not list(_drop(relay).iterdir())

    ballast.unlink()
    # The guard trusts a look at the disk for about a second: wait until it has looked again.
    wait_for(lambda: sftp_put(relay, REAL_PACKAGE, "c.zip").returncode == 0, timeout=30, what="an accepted upload")
    assert (relay.inbox("90017") / "A-9-X3UGO4V7-DAUA.zip").exists()
    paramiko_put(relay, REAL_PACKAGE, "d.zip", password=PASSWORD)  # the same dossier again: accepted (a resend)
    assert _events(relay, "disk.ok")
    assert len(_events(relay, "disk.low")) == 1  # logged on the change, not at each refusal


def _refused_now(relay) -> bool:
    """Whether opening a temporary file is refused for low disk now (an accepted open leaves nothing behind)."""
    client = paramiko_client(relay, password=PASSWORD)
    try:
        try:
            client.open("probe.part", "wb").close()
        except OSError as exc:
            assert DISK_LOW_MESSAGE in str(exc)
            return True
        client.remove("probe.part")
        return False
    finally:
        client.close()
        client.get_channel().get_transport().close()


def test_an_upload_under_way_is_refused_when_the_disk_runs_short(small_relay, tmpfs: Path):
    relay = small_relay
    client = paramiko_client(relay, password=PASSWORD)
    errors: list[str] = []
    try:
        remote = client.open("slow.zip", "wb")
        remote.write(b"\0" * MiB)
        _fill(tmpfs / "ballast", 40 * MiB)

        def write_refused() -> bool:
            try:
                remote.write(b"\0" * 32 * 1024)
            except OSError as exc:
                errors.append(str(exc))
                return True
            return False

        wait_for(write_refused, timeout=30, what="a write refused")
        remote.close()  # paramiko ignores errors on close; the relay remembers the refusal for a stat
        with pytest.raises(OSError) as after:
            client.stat("slow.zip")
        assert DISK_LOW_MESSAGE in str(after.value)
    finally:
        client.close()
        client.get_channel().get_transport().close()
    assert DISK_LOW_MESSAGE in errors[0]
    wait_for(lambda: not list(_drop(relay).iterdir()), timeout=20, what="the partial upload removed")
    assert not relay.quarantined()  # nothing was accepted: nothing to keep
    assert not any(relay.inbox("90017").iterdir())


def test_the_guard_publishes_each_change_once(tmp_path: Path):
    heard: list = []
    events = Events()
    events.subscribe(heard.append)
    base = {"storage": {"root": str(tmp_path)}, "accounts": [{"username": "p", "authorized_keys": [],
                                                               "password_hash": "scrypt$14$8$1$c2FsdA$aGFzaA",
                                                               "communes": ["90017"]}],
            "communes": [{"insee": "90017", "name": "T", "inbox": str(tmp_path / "in"), "demarches": ["ILE"]}]}
    config = {"now": Config.model_validate({**base, "limits": {"min_free_bytes": 2**60}})}
    clock = [0.0]
    guard = DiskGuard(lambda: config["now"], events, clock=lambda: clock[0])
    assert guard.refusal() is not None
    assert guard.refusal().reason is Reason.DISK_LOW
    guard.check()
    config["now"] = Config.model_validate({**base, "limits": {"min_free_bytes": 0}})
    assert guard.refusal() is not None  # the last look is trusted for a second...
    clock[0] += 1.5
    assert guard.refusal() is None  # ...then the disk is looked at again
    guard.check()
    assert [(e.low, e.threshold_bytes) for e in heard if isinstance(e, DiskLow)] == [(True, 2**60), (False, 0)]

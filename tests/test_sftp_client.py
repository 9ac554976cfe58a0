"""The return-server client against a real OpenSSH sshd (tests/platform_sshd.py), no mock of the wire."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from platform_sshd import PlatformSshd, make_client_key, platform_sshd_fixture  # noqa: F401  (registers the fixture)

from relayd.config import ReturnServer
from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    """Run one test's async body, bounded so that nothing can hang."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 90)

    return asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Wait (bounded) until ``predicate()`` holds, letting the event loop run meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def other_fingerprint() -> str:
    """A well-formed SHA256 fingerprint of no key in this test."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(os.urandom(16)).digest()).decode().rstrip("=")


def client_for(sshd: PlatformSshd, **overrides: Any) -> ReturnServerClient:
    return ReturnServerClient(ReturnServer.model_validate(sshd.relay_config(sshd.client_key, **overrides)))


@pytest.fixture
def sshd(platform_sshd) -> PlatformSshd:
    return platform_sshd()


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A local file to deliver, larger than one SFTP write so that the upload takes several requests."""
    path = tmp_path / "Retour-A-9-X3UGO4V7-clos.zip"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 12345))
    return path


# -- publishing --------------------------------------------------------------------------


def test_file_arrives_identical_and_no_part_is_left(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    assert sshd.files() == [package.name]
    assert (sshd.incoming / package.name).read_bytes() == package.read_bytes()


def test_a_second_delivery_of_the_same_name_uploads_nothing(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            first = (sshd.incoming / package.name).stat()
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            again = (sshd.incoming / package.name).stat()
            # An upload would have made a new inode (.part then rename) and a new mtime.
            assert (again.st_ino, again.st_mtime_ns, again.st_ctime_ns) == (first.st_ino, first.st_mtime_ns, first.st_ctime_ns)

    run(body())
    assert sshd.files() == [package.name]


def test_delivered_before_a_crash_counts_as_delivered(sshd: PlatformSshd, package: Path) -> None:
    """relayd renamed, then died before recording it: a new client finds the file and sends nothing."""
    (sshd.incoming / package.name).write_bytes(package.read_bytes())
    before = (sshd.incoming / package.name).stat()

    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    after = (sshd.incoming / package.name).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sshd.files() == [package.name]


def test_a_stale_part_from_an_earlier_attempt_is_replaced(sshd: PlatformSshd, package: Path) -> None:
    # Longer than the package: an upload that did not truncate would leave its tail behind.
    (sshd.incoming / (package.name + ".part")).write_bytes(b"x" * (package.stat().st_size + 4096))

    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    assert sshd.files() == [package.name]
    assert (sshd.incoming / package.name).read_bytes() == package.read_bytes()


def test_a_remote_file_of_another_size_is_a_conflict_and_stays_untouched(sshd: PlatformSshd, package: Path) -> None:
    theirs = sshd.incoming / package.name
    theirs.write_bytes(b"someone else's file")

    async def body() -> DeliveryError:
        async with client_for(sshd) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            assert not client.connected  # closed on any error
            return caught.value

    error = run(body())
    assert error.code == "remote_conflict"
    assert package.name in error.message and "untouched" in error.message
    assert theirs.read_bytes() == b"someone else's file"
    assert sshd.files() == [package.name]


def test_a_missing_remote_directory_is_a_clear_error(sshd: PlatformSshd, package: Path) -> None:
    missing = sshd.remote_dir.rstrip("/") + "/no-such-dir"

    async def body() -> DeliveryError:
        async with client_for(sshd) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=missing)
            return caught.value

    error = run(body())
    assert error.code == "remote_dir_missing"
    assert f"the remote directory {missing} does not exist" in error.message
    assert sshd.files() == []


def test_a_name_with_a_path_is_refused_before_connecting(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> None:
        async with client_for(sshd) as client:
            for name in ("../escape.zip", "a/b.zip", "", ".."):
                with pytest.raises(ValueError):
                    await client.deliver(package, name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 0

    run(body())


def test_an_unreadable_local_file_leaves_the_connection_reusable(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            with pytest.raises(FileNotFoundError):
                await client.deliver(tmp_path / "gone.zip", "gone.zip", remote_dir=sshd.remote_dir)
            assert client.connected
            ack = tmp_path / "ack.zip"
            ack.write_bytes(b"ack")
            await client.deliver(ack, ack.name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 1

    run(body())
    assert sshd.files() == sorted([package.name, "ack.zip"])


# -- host key pinning --------------------------------------------------------------------


def _refused(sshd: PlatformSshd, package: Path, **overrides: Any) -> DeliveryError:
    async def body() -> DeliveryError:
        async with client_for(sshd, **overrides) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            return caught.value

    return run(body())


def test_an_unpinned_host_key_is_refused_and_named(sshd: PlatformSshd, package: Path) -> None:
    pinned = other_fingerprint()
    error = _refused(sshd, package, host_key_fingerprints=[pinned])
    assert error.code == "host_key_mismatch"
    assert f"presented {sshd.host_key_fingerprint} (ssh-ed25519)" in error.message
    assert pinned in error.message and "nothing was sent" in error.message
    assert sshd.files() == []
    assert sshd.logins() == 0  # the client stopped before authenticating


def test_a_mismatch_never_falls_back_to_the_users_known_hosts_or_agent(
    sshd: PlatformSshd, package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """~/.ssh trusting the server (and an ssh config saying not to check) changes nothing."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line() + "\n127.0.0.1 " + sshd.host_public_key + "\n")
    (home / ".ssh" / "config").write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    error = _refused(sshd, package, host_key_fingerprints=[other_fingerprint()])
    assert error.code == "host_key_mismatch"
    assert sshd.files() == []


def test_rotation_either_pinned_fingerprint_is_accepted(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> None:
        async with client_for(sshd, host_key_fingerprints=[other_fingerprint(), sshd.host_key_fingerprint]) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    assert sshd.files() == [package.name]


def test_a_known_hosts_file_pins_the_key(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("# the platform's return server\n" + sshd.known_hosts_line() + "\n")

    async def body() -> None:
        async with client_for(sshd, known_hosts=str(known_hosts), host_key_fingerprints=[]) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    assert sshd.files() == [package.name]


def test_a_known_hosts_file_with_another_key_is_refused(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    other = make_client_key(tmp_path, "some_other_host_key")
    keytype, blob = other.with_name(other.name + ".pub").read_text().split()[:2]
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {keytype} {blob}\n")
    error = _refused(sshd, package, known_hosts=str(known_hosts), host_key_fingerprints=[])
    assert error.code == "host_key_mismatch"
    assert sshd.host_key_fingerprint in error.message and str(known_hosts) in error.message
    assert sshd.files() == []


def test_the_right_key_pinned_for_another_host_is_refused(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("retour.example.gouv.fr " + sshd.host_public_key + "\n")
    error = _refused(sshd, package, known_hosts=str(known_hosts), host_key_fingerprints=[])
    assert error.code == "host_key_mismatch"
    assert sshd.files() == []


# -- authentication ----------------------------------------------------------------------


def test_a_key_the_server_does_not_know_is_auth_failed(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    stranger = make_client_key(tmp_path, "stranger")

    async def body() -> DeliveryError:
        server = ReturnServer.model_validate(sshd.relay_config(stranger))
        async with ReturnServerClient(server) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            return caught.value

    error = run(body())
    assert error.code == "auth_failed"
    assert sshd.username in error.message and "private key" in error.message
    assert "PRIVATE KEY" not in error.message and stranger.read_text().splitlines()[1] not in error.message
    assert sshd.files() == []


def test_a_missing_private_key_is_auth_failed_naming_the_file(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_key"

    async def body() -> DeliveryError:
        async with ReturnServerClient(ReturnServer.model_validate(sshd.relay_config(missing))) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            return caught.value

    error = run(body())
    assert error.code == "auth_failed"
    assert str(missing) in error.message
    assert sshd.logins() == 0


def test_a_missing_known_hosts_file_sends_nothing(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no_known_hosts"
    error = _refused(sshd, package, known_hosts=str(missing), host_key_fingerprints=[])
    assert error.code == "connect_failed"
    assert str(missing) in error.message and "nothing was sent" in error.message
    assert sshd.files() == []


# -- connections: reuse, idle, outages, hangs --------------------------------------------


def test_two_deliveries_share_one_connection(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    ack = tmp_path / "ack.zip"
    ack.write_bytes(b"PK\x05\x06" + bytes(18))

    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            await client.deliver(ack, ack.name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 1

    run(body())
    assert sshd.logins() == 1  # sshd's own count agrees
    assert sshd.files() == sorted([package.name, ack.name])


def test_an_idle_connection_is_closed_then_reopened(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.zip"
    second.write_bytes(b"second")

    async def body() -> None:
        async with client_for(sshd, idle_seconds=0.2) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            assert client.connected
            await until(lambda: not client.connected, "the idle timer to close the connection")
            await until(lambda: not sshd.session_pids(), "sshd to end the session")
            await client.deliver(second, second.name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 2

    run(body())
    assert sshd.logins() == 2
    assert sshd.files() == sorted([package.name, second.name])


def test_server_down_is_connect_failed_then_the_same_client_delivers(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> None:
        async with client_for(sshd) as client:
            sshd.stop()
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            assert caught.value.code == "connect_failed"
            assert f"127.0.0.1:{sshd.port}" in caught.value.message and "refused" in caught.value.message
            assert sshd.files() == []
            sshd.start()
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)

    run(body())
    assert sshd.files() == [package.name]


def test_a_server_restart_between_deliveries_is_survived(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    """The kept connection died with the server; the next delivery reconnects by itself."""
    second = tmp_path / "second.zip"
    second.write_bytes(b"second")

    async def body() -> None:
        async with client_for(sshd) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            sshd.restart()
            await client.deliver(second, second.name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 2

    run(body())
    assert sshd.files() == sorted([package.name, second.name])


def test_a_hung_server_is_a_timeout_and_nothing_is_published(sshd: PlatformSshd, package: Path, tmp_path: Path) -> None:
    second = tmp_path / "second.zip"
    second.write_bytes(b"second")

    async def body() -> None:
        async with client_for(sshd, operation_timeout_seconds=0.5) as client:
            await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            with sshd.paused():
                with pytest.raises(DeliveryError) as caught:
                    await client.deliver(second, second.name, remote_dir=sshd.remote_dir)
            assert caught.value.code == "timeout"
            assert "did not answer" in caught.value.message
            assert not client.connected
            await client.deliver(second, second.name, remote_dir=sshd.remote_dir)
            assert client.connections_opened == 2

    run(body())
    assert sshd.files() == sorted([package.name, second.name])


def test_a_server_that_never_speaks_is_a_connect_timeout(sshd: PlatformSshd, package: Path) -> None:
    async def body() -> DeliveryError:
        async with client_for(sshd, connect_timeout_seconds=0.5) as client:
            with sshd.paused():  # TCP connects (kernel backlog) but no SSH banner ever comes
                with pytest.raises(DeliveryError) as caught:
                    await client.deliver(package, package.name, remote_dir=sshd.remote_dir)
            return caught.value

    error = run(body())
    assert error.code == "timeout"
    assert "connect_timeout_seconds" in error.message
    assert sshd.files() == []

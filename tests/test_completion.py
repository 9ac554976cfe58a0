"""The completion contract: only an explicit commit reaches an inbox; partials are cleaned up."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from conftest import Relay, require_program, sftp_put, wait_for
from relayd.inbound.uploads import AREA_NAME
from relayd.testkit.samples import SampleSpec, build_package

BIG = 48 * 1024 * 1024


@pytest.fixture(scope="module")
def big_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SampleSpec(numero="A-3-BIGPACK01", demarche="RCO", insee="90017", annex_bytes=BIG, annex_fill="random")
    path = tmp_path_factory.mktemp("big") / "big.zip"
    path.write_bytes(build_package(spec))
    return path


def _start_slow_put(relay: Relay, local: Path, remote: str) -> subprocess.Popen:
    """An OpenSSH sftp upload throttled to ~4 MB/s, so that it can be cut in the middle."""
    batch = relay.root / "slow-batch.txt"
    batch.write_text(f'put "{local}" "{remote}"\n')
    return subprocess.Popen(
        [require_program("sftp"), "-l", "32000", "-b", str(batch), "-P", str(relay.port), "-i", str(relay.key),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         "plateforme@127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _partial_size(relay: Relay, name: str) -> int:
    """The size of the upload under way: its bytes are in relayd's private area until the close."""
    area = relay.drop() / AREA_NAME
    try:
        return sum(p.stat().st_size for p in area.iterdir())
    except FileNotFoundError:
        return 0


def _leftovers(relay: Relay) -> list[Path]:
    """Whatever the drop folder holds, the private area's files included."""
    return [p for p in relay.drop().rglob("*") if not p.is_dir()]


@pytest.mark.parametrize("remote", ["big.zip", "big.zip.part"])
def test_client_killed_mid_upload_leaves_nothing(relay, big_package, remote):
    proc = _start_slow_put(relay, big_package, remote)
    wait_for(lambda: _partial_size(relay, remote) > 4 * 1024 * 1024, what="the upload to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # The session's end is noticed and the partial removed, without waiting for a restart.
    # (The log line follows the removal: wait for it, not for the file to go.)
    wait_for(lambda: any(e.get("event") == "sftp.partial_removed" for e in relay.events()),
              what="the partial to be removed")
    assert not (relay.drop() / remote).exists()
    assert not any(relay.inbox("90017").iterdir())
    assert relay.ledger_rows("SELECT * FROM packages") == []
    relay.restart()
    assert _leftovers(relay) == []
    assert not any(relay.inbox("90017").iterdir())
    assert not any((relay.root / "var" / "staging").iterdir())


def test_relay_killed_mid_upload_cleans_the_partial_at_next_start(relay, big_package):
    proc = _start_slow_put(relay, big_package, "big.zip")
    wait_for(lambda: _partial_size(relay, "big.zip") > 4 * 1024 * 1024, what="the upload to start")
    relay.kill()
    proc.wait(timeout=60)
    assert _leftovers(relay)  # what a crash leaves behind...
    relay.start()
    assert _leftovers(relay) == []  # ...is gone once relayd is back
    assert not any(relay.inbox("90017").iterdir())
    assert any(e.get("event") == "startup.partial_removed" for e in relay.events())


def test_completed_large_upload_lands_whole(relay, big_package):
    result = sftp_put(relay, big_package, "big.zip", style="rename")
    assert result.returncode == 0, result.stderr
    delivered = relay.inbox("90017") / "A-3-BIGPACK01-RCO.zip"
    assert delivered.read_bytes() == big_package.read_bytes()


def test_staged_package_is_finished_after_a_crash(make_relay, tmp_path):
    """A package committed just before a crash (still in staging) is handed over at the next start."""
    relay = make_relay()
    relay.stop()  # it has run: a ledger exists (staging without one is refused at start, as a forgotten ledger)
    spec = SampleSpec(numero="A-3-CRASHED1", demarche="ILE", insee="90017")
    staging = relay.root / "var" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "0123abcd.zip").write_bytes(build_package(spec))
    (staging / "0123abcd.upload.json").write_text('{"account": "plateforme", "peer": "127.0.0.1:1", "name": "c.zip"}')
    relay.start()
    assert (relay.inbox("90017") / "A-3-CRASHED1-ILE.zip").exists()
    assert not any(staging.iterdir())
    [row] = relay.ledger_rows("SELECT account, outcome FROM packages")
    assert row == {"account": "plateforme", "outcome": "accepted"}


def test_a_temporary_name_alone_is_never_promoted(relay, tmp_path):
    """A complete zip uploaded under a temporary name waits for its rename, and goes when the session ends."""
    local = tmp_path / "p.zip"
    local.write_bytes(build_package(SampleSpec(numero="A-3-NORENAME", demarche="RCO", insee="90017")))
    result = sftp_put(relay, local, "p.zip.part")
    assert result.returncode == 0
    assert not any(relay.inbox("90017").iterdir())
    # The client is gone before the relay finishes the session's clean-up: wait for its word.
    wait_for(lambda: any(e.get("event") == "sftp.partial_removed" for e in relay.events()),
              what="the leftover to be removed")
    assert not (relay.drop() / "p.zip.part").exists()
    assert not any(relay.inbox("90017").iterdir())

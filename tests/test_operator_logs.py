"""Logs the journal understands, and a failed start told in one line with its exit status."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from relayd.testkit.samples import SampleSpec, build_package

PREFIXED = re.compile(r"^<[0-7]>\S")


def test_every_line_off_a_terminal_has_a_priority_and_a_refusal_is_a_warning(make_relay, tmp_path):
    relay = make_relay(start=False, logging={"format": "auto", "level": "info"})
    relay.write_config()
    relay.start = _start_plain(relay)  # the fixture waits for JSON; this relay speaks the journal's form
    relay.start()
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not a zip at all")
    from conftest import paramiko_put

    with pytest.raises(IOError):
        paramiko_put(relay, broken, "broken.zip")
    wait_for(lambda: "package.rejected" in relay.log_text() or "intake.rejected" in relay.log_text(),
             what="the refusal in the log")
    relay.stop()
    lines = [line for line in relay.log_text().splitlines() if line.strip()]
    assert lines and all(PREFIXED.match(line) for line in lines), [x for x in lines if not PREFIXED.match(x)]
    refusal = next(line for line in lines if "rejected" in line.split()[0])
    assert refusal.startswith("<4>"), refusal
    assert "reason=" in refusal or "code=" in refusal, refusal
    ready = next(line for line in lines if line.startswith("<6>relayd.ready"))
    assert f"port={relay.port}" in ready


def _start_plain(relay):
    def start() -> None:
        import os

        log = open(relay.log_path, "ab")
        relay.proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(relay.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=relay.root,
                                      env={k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
        wait_for(lambda: "relayd.ready" in relay.log_text() or relay.proc.poll() is not None, what="relayd ready")
        assert relay.proc.poll() is None, relay.log_text()
    return start


def test_json_stays_available(relay):
    # The fixtures ask for JSON: each line parses, with its level.
    assert any(e.get("event") == "relayd.ready" and e.get("level") == "info" for e in relay.events())


def _run(config_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", *extra, "run", "-c", str(config_path)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def _one_line(result: subprocess.CompletedProcess) -> str:
    out = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in out if line.startswith("<3>")]
    assert len(errors) == 1, out
    return errors[0]


def test_a_port_in_use_is_one_line_and_status_3(make_relay):
    relay = make_relay(start=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", relay.port))
        taken.listen()
        result = _run(relay.config_path)
    assert result.returncode == 3
    line = _one_line(result)
    assert f"cannot listen on 127.0.0.1:{relay.port}: Address already in use" in line


def test_an_unreadable_host_key_is_one_line_and_status_4(make_relay):
    relay = make_relay(start=False)
    key = relay.root / "host_keys" / "ssh_host_ed25519_key"
    key.parent.mkdir()
    key.write_text("this is not a key\n")
    result = _run(relay.config_path)
    assert result.returncode == 4
    assert f"cannot read the host key {key}" in _one_line(result)


def test_a_bad_configuration_is_one_line_and_status_2(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text("storage: {root: var}\naccounts: []\ncommunes: []\nlogging: {formt: json}\n")
    result = _run(path)
    assert result.returncode == 2
    line = _one_line(result)
    assert "invalid configuration" in line and "did you mean 'format'" in line and "accounts (line 2)" in line


def test_an_unwritable_storage_is_one_line_and_status_5(make_relay):
    relay = make_relay(start=False)
    relay.config["storage"] = {"root": "/proc/relayd-test"}
    relay.write_config()
    result = _run(relay.config_path)
    assert result.returncode == 5
    assert "cannot write /proc/relayd-test" in _one_line(result)


def test_debug_shows_the_traceback(tmp_path, make_relay):
    relay = make_relay(start=False)
    key = relay.root / "host_keys" / "ssh_host_ed25519_key"
    key.parent.mkdir()
    key.write_text("this is not a key\n")
    result = _run(relay.config_path, "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_return_server_name_that_does_not_resolve_reads_as_a_sentence(tmp_path):
    from conftest import write_key_pair
    from relayd.config import ReturnServer
    from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient

    key = write_key_pair(tmp_path, "k")
    server = ReturnServer(host="no-such-host.relayd-test.invalid", username="c", private_key=key,
                          host_key_fingerprints=["SHA256:" + "A" * 43], connect_timeout_seconds=10)
    local = tmp_path / "x.zip"
    local.write_bytes(build_package(SampleSpec(numero="A-1-DNS00001", demarche="ILE", insee="90017")))

    async def attempt() -> DeliveryError:
        async with ReturnServerClient(server) as client:
            with pytest.raises(DeliveryError) as caught:
                await client.deliver(local, "x.zip", remote_dir=".")
        return caught.value

    error = asyncio.run(attempt())
    assert "no-such-host.relayd-test.invalid" in error.message and "does not resolve" in error.message, error.message
    assert "Unknown error" not in error.message


def test_on_the_journal_lines_carry_no_timestamp_of_their_own(tmp_path, monkeypatch):
    """journald stamps each entry; on a file (not the journal) the line keeps its own time."""
    import structlog

    from relayd.logs import configure_logging

    import logging

    handlers = logging.getLogger().handlers[:]
    try:
        _log_one_warning_each_way(tmp_path, monkeypatch, configure_logging, structlog)
    finally:
        logging.getLogger().handlers[:] = handlers  # the test process logs as before
        structlog.reset_defaults()


def _log_one_warning_each_way(tmp_path, monkeypatch, configure_logging, structlog) -> None:
    import os

    for on_journal in (True, False):
        path = tmp_path / f"log-{on_journal}"
        with open(path, "w") as stream:
            st = os.fstat(stream.fileno())
            monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}" if on_journal else "0:0")
            configure_logging("auto", "info", stream=stream)
            structlog.get_logger("relayd.test").warning("intake.rejected", reason="xml_forbidden",
                                                        detail="a DOCTYPE\non two lines", password="hunter2")
        [line] = path.read_text().splitlines()
        assert line.startswith("<4>intake.rejected ")
        assert "reason=xml_forbidden" in line and 'detail="a DOCTYPE\\non two lines"' in line
        assert "hunter2" not in line
        assert ("ts=" in line) is not on_journal

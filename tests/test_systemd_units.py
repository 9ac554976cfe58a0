"""The files in systemd/: checked by systemd's own tools, and socket activation against a real inherited socket."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, require_program, sftp_batch, wait_for

from relayd.systemd import listen_sockets

UNITS = REPO / "systemd"


def directives(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (keys may repeat, as systemd allows)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_service_scores_two_or_less_in_systemd_analyze_security():
    analyze = require_program("systemd-analyze")
    result = subprocess.run([analyze, "security", "--offline=true", str(UNITS / "relayd.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    score = float(re.search(r"Overall exposure level for relayd\.service: ([0-9.]+)", result.stdout).group(1))
    assert score <= 2.0, result.stdout


def test_the_service_is_a_notify_service_with_a_watchdog_and_its_own_user():
    unit = directives(UNITS / "relayd.service")
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert int(unit["WatchdogSec"][0]) > 0
    assert unit["Restart"] == ["on-failure"]
    # A bad ledger is not mended by a restart: systemd must not loop on it.
    from relayd.ledger import EXIT_LEDGER_LOCKED, EXIT_LEDGER_UNUSABLE

    assert unit["RestartPreventExitStatus"] == [str(EXIT_LEDGER_UNUSABLE)]
    assert str(EXIT_LEDGER_LOCKED) not in unit["RestartPreventExitStatus"][0].split()
    assert unit["User"] == ["relayd"] and unit["Group"] == ["relayd"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The stop timeout leaves room for the uploads' grace (server.stop_grace_seconds, 30 s by default).
    assert int(unit["TimeoutStopSec"][0]) > 30
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["ExecStart"][0].split()[1:] == ["run", "-c", "/etc/relayd/relayd.yaml"]


def test_sysusers_and_tmpfiles_make_the_user_and_the_folders(tmp_path: Path):
    sysusers, tmpfiles = require_program("systemd-sysusers"), require_program("systemd-tmpfiles")
    # Installed where a package would put them, in a root of their own.
    for source, folder in (("relayd.sysusers", "usr/lib/sysusers.d"), ("relayd.tmpfiles", "usr/lib/tmpfiles.d")):
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(UNITS / source, tmp_path / folder / "relayd.conf")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}"], check=True, capture_output=True, timeout=60)
    passwd = (tmp_path / "etc" / "passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("relayd:"))
    assert user[5] == "/var/lib/relayd" and user[6] == "/usr/sbin/nologin"
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create"], check=True, capture_output=True, timeout=60)
    for folder, mode in (("etc/relayd", 0o750), ("var/lib/relayd", 0o750), ("srv/relayd", 0o755)):
        assert (tmp_path / folder).stat().st_mode & 0o7777 == mode, folder
    assert (tmp_path / "var/lib/relayd").stat().st_uid == int(user[2])


def test_the_socket_unit_listens_on_port_22_for_the_service():
    unit = directives(UNITS / "relayd.socket")
    assert unit["ListenStream"] == ["22"]
    assert unit["Accept"] == ["no"]  # one relayd for every connection, as with its own listener


def test_relayd_serves_on_a_socket_systemd_hands_it(make_relay, tmp_path: Path):
    """Socket activation as systemd does it: the listening socket as fd 3, LISTEN_FDS=1, LISTEN_PID=the pid."""
    relay = make_relay(start=False)
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    port = inherited.getsockname()[1]
    assert port != relay.port
    # exec keeps the pid, so the variable names the very process that reads it.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1';"
                " os.environ['LISTEN_PID'] = str(os.getpid());"
                " os.execv(sys.executable, [sys.executable, '-m', 'relayd', 'run', '-c', sys.argv[2]])")
    with open(relay.log_path, "ab") as log:
        relay.proc = subprocess.Popen([sys.executable, "-c", launcher, str(inherited.fileno()), str(relay.config_path)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=relay.root, pass_fds=[inherited.fileno()])
    inherited.close()  # relayd holds its own copy now
    try:
        wait_for(lambda: any(e.get("event") == "relayd.ready" for e in relay.events()) or relay.proc.poll() is not None,
                 what="relayd ready")
        assert relay.proc.poll() is None, relay.log_text()
        ready = next(e for e in relay.events() if e.get("event") == "relayd.ready")
        assert ready["port"] == port
        relay.port = port
        assert sftp_batch(relay, ["ls"]).returncode == 0
        # The configured port was never bound.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", relay.config["server"]["listen"]["port"])) != 0
    finally:
        relay.stop()


def test_without_socket_activation_no_socket_is_taken(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert listen_sockets() == []
    # Variables meant for another process (the parent's pid) are left alone.
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", "1")
    assert listen_sockets() == []


def test_the_readme_install_section_installs_files_that_exist_where_the_units_expect_them():
    text = (REPO / "README.md").read_text()
    section = text.split("## Install on Debian (systemd)", 1)[1].split("\n## ", 1)[0]
    commands = "\n".join(re.findall(r"```sh\n(.+?)\n```", section, flags=re.S))
    for line in commands.splitlines():
        if line.startswith("install "):
            *sources, _target = [w for w in line.split()[1:] if not w.startswith("-") and w not in ("0644", "0640", "relayd")]
            for source in sources:
                assert (REPO / source).is_file(), f"the README installs {source}, which is not in the repository"
    venv = re.search(r"python3 -m venv (\S+)", commands).group(1)
    unit = directives(UNITS / "relayd.service")
    assert unit["ExecStart"][0].startswith(f"{venv}/bin/relayd ")
    assert "/etc/relayd/relayd.yaml" in commands and "/etc/relayd/relayd.yaml" in unit["ExecStart"][0]

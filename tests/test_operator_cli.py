"""The command line an operator meets: help, shell completion, the man page, keygen, and a demo on free ports."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from conftest import wait_for


def _relayd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", *args], capture_output=True, text=True, timeout=60, **kw)


def _commands() -> list[str]:
    from relayd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_the_top_level_help_lists_every_command_and_c_shows_its_default():
    top = _relayd("--help")
    assert top.returncode == 0
    for command in _commands():
        assert command in top.stdout, command
    assert "exit status" in top.stdout and '"""' not in top.stdout
    run = _relayd("run", "--help")
    assert "the configuration file (default: /etc/relayd/relayd.yaml)" in " ".join(run.stdout.split())


def test_bash_completion_is_generated_from_the_parser():
    bash = shutil.which("bash")
    result = _relayd("completion", "bash")
    assert result.returncode == 0
    script = result.stdout
    for command in ("dossier", "check-config", "keygen", "outbox"):
        assert command in script
    assert subprocess.run([bash, "-n"], input=script, text=True).returncode == 0
    # Sourced in bash, it completes `relayd dos` to `dossier`.
    probe = script + '\nCOMP_WORDS=(relayd dos); COMP_CWORD=1; _shtab_relayd; printf "%s\\n" "${COMPREPLY[@]}"\n'
    completed = subprocess.run([bash, "-c", probe], capture_output=True, text=True, timeout=30)
    assert "dossier" in completed.stdout.split(), completed.stdout + completed.stderr


def test_the_man_page_renders_every_command():
    result = _relayd("manpage")
    assert result.returncode == 0 and result.stdout.startswith('.TH RELAYD "8"')
    page = Path(os.environ.get("TMPDIR", "/tmp")) / f"relayd-{os.getpid()}.8"
    page.write_text(result.stdout)
    try:
        if shutil.which("man") is None:
            pytest.skip("man is not installed")
        shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
    finally:
        page.unlink()
    assert shown.returncode == 0, shown.stderr
    for command in ("run", "check-config", "dossier", "keygen", "outbox", "status"):
        assert command in shown.stdout, command


def test_keygen_writes_a_private_key_for_the_service_user_and_prints_its_public_line(tmp_path):
    user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    out = tmp_path / "etc" / "platform_ed25519"
    result = _relayd("keygen", "--out", str(out), "--user", user)
    assert result.returncode == 0, result.stderr
    st = out.stat()
    assert st.st_mode & 0o777 == 0o600
    assert pwd.getpwuid(st.st_uid).pw_name == user
    key = asyncssh.read_private_key(out)
    line = result.stdout.strip()
    assert line.split()[:2] == key.export_public_key().decode().split()[:2]
    assert (tmp_path / "etc" / "platform_ed25519.pub").read_text().strip() == line
    again = _relayd("keygen", "--out", str(out), "--user", user)
    assert again.returncode == 1 and "is kept" in again.stderr
    assert asyncssh.read_private_key(out).export_public_key() == key.export_public_key()


def test_keygen_goes_where_the_configuration_points(tmp_path):
    import yaml

    from relayd.inbound.passwords import hash_password

    config = {"storage": {"root": "var"},
              "accounts": [{"username": "p", "password_hash": hash_password("x"), "communes": ["90017"]}],
              "communes": [{"insee": "90017", "name": "X", "inbox": "inbox", "demarches": ["ILE"]}],
              "platform": {"host": "127.0.0.1", "username": "c", "private_key": "keys/platform",
                           "host_key_fingerprints": ["SHA256:" + "A" * 43]}}
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    user = pwd.getpwuid(os.geteuid()).pw_name
    result = _relayd("keygen", "-c", str(path), "--user", user)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "keys" / "platform").exists()
    assert _relayd("check-config", "-c", str(path)).returncode == 0


def test_a_closed_pipe_is_no_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "completion", "bash"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has its lines
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr


def test_demo_port_0_binds_nothing_fixed_and_allowlists_only_loopback(tmp_path):
    # The platform simulator's usual port is taken: with --port 0 the demo must not need it.
    from relayd.demo import DEMO_PLATFORM_PORT

    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", DEMO_PLATFORM_PORT))
            taken.listen()
        except OSError:
            pass  # already taken by someone else: the same situation
        log = open(tmp_path / "demo.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "relayd", "demo", "--dir", str(tmp_path / "demo"), "--port", "0"],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            info_path = tmp_path / "demo" / "demo.json"
            wait_for(lambda: info_path.exists() or proc.poll() is not None, timeout=30, what="demo.json")
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            info = json.loads(info_path.read_text())
            assert info["platform"]["port"] not in (0, DEMO_PLATFORM_PORT)
            known = Path(info["known_hosts"]).read_text()
            assert known.startswith(f"[127.0.0.1]:{info['sftp']['port']} ssh-ed25519 ")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    from relayd.config import load_config

    config = load_config(info["config"])
    assert [str(n) for n in config.defender.allowlist] == ["127.0.0.1/32"]


def test_broken_all_against_the_demo_says_oversized_cannot_be_refused(capsys, tmp_path):
    from relayd.demo import build_demo
    from relayd.testkit.broken import BROKEN_KINDS, OVERSIZED_BYTES
    from relayd.testkit.platform import _feasible

    limit = build_demo(tmp_path / "demo")["limits"]["max_package_bytes"]
    assert limit > OVERSIZED_BYTES  # the demo takes real-sized packages
    kept = _feasible(sorted(BROKEN_KINDS), limit, explicit=False)
    assert "oversized" not in kept and len(kept) == len(BROKEN_KINDS) - 1
    assert "'oversized'" in capsys.readouterr().err
    assert _feasible(["oversized"], limit, explicit=True) == ["oversized"]
    assert _feasible(["oversized"], 2 * 1024 * 1024, explicit=False) == ["oversized"]

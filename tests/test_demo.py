"""`relayd demo`: a newcomer's first command builds a working relay and says how to reach it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import paramiko

from conftest import REAL_PACKAGE, require_program


def test_demo_describes_itself_and_accepts_the_real_package(demo):
    info, log = demo.info, demo.log_path
    sftp = info["sftp"]
    assert sftp["host"] == "127.0.0.1" and sftp["port"] > 0
    assert Path(info["config"]).exists()
    assert {"90017", "75056"} <= set(info["communes"])

    # With the generated password, through paramiko...
    transport = paramiko.Transport((sftp["host"], sftp["port"]))
    transport.connect(username=sftp["username"], password=sftp["password"])
    client = paramiko.SFTPClient.from_transport(transport)
    client.put(str(REAL_PACKAGE), "real.zip")
    transport.close()
    inbox = Path(info["communes"]["90017"]["inbox"])
    assert (inbox / "A-9-X3UGO4V7-DAUA.zip").read_bytes() == REAL_PACKAGE.read_bytes()

    # ...and with the generated key, through OpenSSH.
    out = subprocess.run(
        [require_program("sftp"), "-b", "-", "-i", sftp["private_key"], "-P", str(sftp["port"]),
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         f"{sftp['username']}@{sftp['host']}"],
        input="ls\n", capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert sftp["password"] not in log.read_text()


def test_demo_reuses_its_credentials(tmp_path):
    from relayd.demo import build_demo

    first = build_demo(tmp_path / "d")
    second = build_demo(tmp_path / "d")
    assert first["sftp"]["password"] == second["sftp"]["password"]
    assert (tmp_path / "d" / "platform_key").stat().st_mode & 0o777 == 0o600

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


def _readme_demo_steps() -> str:
    """The README's "Try the demo" commands, up to the platform simulator's run (tested on its own)."""
    import re

    from conftest import REPO

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Try the demo"):text.index("## Integration-tester kit")]
    (block,) = re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)
    return block[:block.index("# the platform's whole side at once")]


def test_the_readme_walkthrough_runs_twice_in_two_folders_without_touching_home(tmp_path):
    """Two clones, one after the other, on the same port: each demo pins its own host key in demo/known_hosts."""
    import json
    import os
    import signal
    import sys

    from conftest import REAL, free_port, wait_for

    for program in ("bash", "sftp"):
        require_program(program)
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    steps = _readme_demo_steps().replace("-P 2222", f"-P {port}").replace("--port 2222", f"--port {port}")
    env = {**os.environ, "HOME": str(home)}
    for run in ("first", "second"):
        checkout = tmp_path / run / "relayd"
        checkout.mkdir(parents=True)
        (checkout / ".venv").symlink_to(Path(sys.executable).parents[1])
        (tmp_path / run / "shared").symlink_to(REAL.parents[1])
        log = open(tmp_path / f"{run}-demo.log", "wb")
        demo = subprocess.Popen([str(checkout / ".venv" / "bin" / "relayd"), "demo", "--port", str(port),
                                 "--platform-port", "0"], cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            info_path = checkout / "demo" / "demo.json"
            wait_for(lambda: info_path.exists() or demo.poll() is not None, timeout=30, what="demo.json")
            assert demo.poll() is None, (tmp_path / f"{run}-demo.log").read_text()
            result = subprocess.run(["bash", "-c", "set -uo pipefail\n" + steps], cwd=checkout, env=env,
                                    capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
            out = result.stdout + result.stderr
            assert "Host key verification failed" not in out and "IDENTIFICATION HAS CHANGED" not in out, out
            assert "A-9-X3UGO4V7-DAUA.zip" in result.stdout, out                   # in the inbox
            assert "dossier A-9-X3UGO4V7" in result.stdout and "days left" in result.stdout, out
            assert "xml_forbidden" in out, out                                    # the broken package refused
            received = Path(json.loads(info_path.read_text())["platform"]["received"])
            wait_for(lambda: {".AVL.", ".Retour."} <= {k for k in (".AVL.", ".Retour.")
                                                       for p in received.iterdir() if k in p.name},
                     what="the ack and the reçu at the platform")
        finally:
            demo.send_signal(signal.SIGTERM)
            demo.wait(timeout=30)
            log.close()
    assert not (home / ".ssh").exists()

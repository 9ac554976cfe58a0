"""check-config as a reviewer: sentences with the file, a 1-based path and the line; what cannot work is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from relayd.inbound.passwords import hash_password


def _check(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", "check-config", "-c", str(path), *extra],
                          capture_output=True, text=True, timeout=60)


def _minimal() -> dict:
    return {
        "storage": {"root": "var"},
        "accounts": [{"username": "plateforme", "password_hash": hash_password("x"), "communes": ["90017"]}],
        "communes": [{"insee": "90017", "name": "X", "inbox": "inbox", "demarches": ["ILE"]}],
    }


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _line(path: Path, text: str) -> int:
    """The 1-based line of the first line of ``path`` that holds ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_an_unknown_key_gets_did_you_mean_with_its_line(tmp_path):
    config = _minimal()
    config["communes"].append({"insee": "75056", "name": "Y", "inbox": "inbox2", "demarches": ["ILE"],
                               "delivry": "zip"})
    path = _write(tmp_path, config)
    result = _check(path)
    assert result.returncode == 2
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "delivry" in text)
    assert f"{path}: communes[2].delivry (line {line}): 'delivry' is not a setting relayd knows; " \
           "did you mean 'delivery'?" in result.stderr, result.stderr
    assert "Extra inputs" not in result.stderr and "communes.1" not in result.stderr


def test_errors_are_sentences_not_pydantic_wording(tmp_path):
    config = _minimal()
    config["communes"][0]["insee"] = "9001"
    config["logging"] = {"level": "loud"}
    path = _write(tmp_path, config)
    result = _check(path)
    assert result.returncode == 2
    assert f"communes[1].insee (line {_line(path, 'insee')}): this value does not have the expected form: " \
           "an INSEE code" in result.stderr
    assert f"logging.level (line {_line(path, 'level:')}): this must be one of 'debug', 'info', 'warning' or 'error'" in result.stderr
    assert "String should match" not in result.stderr and "Input should be" not in result.stderr


def test_a_duplicated_key_is_refused(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(_minimal(), sort_keys=False) + "storage:\n  root: elsewhere\n")
    result = _check(path)
    assert result.returncode == 2
    again = _line(path, "root: elsewhere") - 1
    assert f"{path}: storage (line {again}): this key is written twice (lines 1 and {again})" in result.stderr


def test_yaml_errors_give_the_line_not_unicode_string(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text("storage:\n  root: [unclosed\n")
    result = _check(path)
    assert result.returncode == 2
    assert f"{path}: line 3, column 1: this is not valid YAML" in result.stderr
    assert "<unicode string>" not in result.stderr


@pytest.mark.parametrize("folder", ["/proc/relayd/inbox", "/sys/relayd", "/dev/shm/relayd"])
def test_folders_under_system_trees_are_refused(tmp_path, folder):
    config = _minimal()
    config["communes"][0]["inbox"] = folder
    path = _write(tmp_path, config)
    result = _check(path)
    assert result.returncode == 2
    assert f"communes[1].inbox (line {_line(path, 'inbox:')}): {folder} is under /{folder.split('/')[1]}, a system tree" in result.stderr


def test_a_return_server_that_does_not_resolve_is_said(tmp_path):
    config = _minimal()
    (tmp_path / "k").write_text("")
    from conftest import write_key_pair

    key = write_key_pair(tmp_path, "platform_key")
    config["platform"] = {"host": "no-such-host.relayd-test.invalid", "username": "c", "private_key": str(key),
                          "host_key_fingerprints": ["SHA256:" + "A" * 43]}
    result = _check(_write(tmp_path, config))
    # Intake works without the return server: the file is valid, and the operator is told.
    assert result.returncode == 0, result.stderr
    assert "platform.host (line" in result.stderr and "does not resolve" in result.stderr
    assert "Unknown error" not in result.stderr
    assert "OK" in result.stdout


def test_as_user_checks_every_folder_for_the_service_user():
    if os.geteuid() != 0:
        pytest.skip("checking as another user needs root")
    folder = Path(tempfile.mkdtemp(prefix="relayd-test-"))
    try:
        folder.chmod(0o755)
        config = _minimal()
        config["storage"]["root"] = str(folder / "state")
        (folder / "state").mkdir()
        os.chown(folder / "state", 65534, 65534)  # nobody's, as /var/lib/relayd is relayd's
        (folder / "srv").mkdir(mode=0o755)          # root's: nobody cannot make the inbox there
        config["communes"][0]["inbox"] = str(folder / "srv" / "inbox")
        path = _write(folder, config)
        path.chmod(0o644)
        as_root = _check(path)
        assert as_root.returncode == 0, as_root.stderr
        result = _check(path, "--as-user", "nobody")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"communes[1].inbox (line {_line(path, 'inbox:')}): nobody cannot write in {folder / 'srv' / 'inbox'}" in result.stderr
        assert "storage.root" not in result.stderr
    finally:
        shutil.rmtree(folder)

"""Configuration: errors name the file and the key path; secrets are never in clear."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from relayd.config import ConfigError, load_config
from relayd.inbound.passwords import hash_password, verify_password


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "relayd", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def _check_edited(tmp_path: Path, edit) -> subprocess.CompletedProcess:
    """check-config on the minimal configuration after ``edit`` changed it."""
    config = _minimal(tmp_path)
    edit(config)
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    return _check(path)


def _minimal(tmp_path: Path) -> dict:
    return {
        "storage": {"root": "var"},
        "accounts": [{"username": "plateforme", "password_hash": hash_password("x"), "communes": ["90017"]}],
        "communes": [{"insee": "90017", "name": "X", "inbox": "inbox", "demarches": ["ILE"]}],
    }


def _example_filled_in(tmp_path: Path) -> str:
    """The example with its placeholders replaced, as an administrator would, and its files made real."""
    from conftest import write_key_pair

    key = write_key_pair(tmp_path, "platform_ed25519")
    text = (REPO / "config" / "relayd.example.yaml").read_text().replace("/etc/relayd/platform_ed25519", str(key))
    (tmp_path / "smtp.password").write_text("not a real password\n")
    text = text.replace("/etc/relayd/smtp.password", str(tmp_path / "smtp.password"))
    text = text.replace('"scrypt$14$8$1$REPLACE_WITH_SALT$REPLACE_WITH_HASH"', f'"{hash_password("x")}"')
    text = text.replace("example-replace-me", "platform-2026")
    text = text.replace("retour.example.invalid", "127.0.0.1").replace("smtp.example.invalid", "127.0.0.1")
    text = text.replace("SHA256:REPLACEwithTHEplatformsHOSTkeyFINGERPRINT00", "SHA256:" + "A" * 43)
    for folder in ("/var/lib/relayd", "/srv/relayd"):
        text = text.replace(folder, str(tmp_path / folder.strip("/").replace("/", "-")))
    return text


def test_the_unchanged_example_is_refused_with_each_placeholder_named(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text((REPO / "config" / "relayd.example.yaml").read_text())
    result = _check(path)
    assert result.returncode == 2
    for placeholder in ("accounts[1].password_hash (line", "'REPLACE_WITH'", "'example-replace-me'",
                        "platform.host (line", "'example.invalid'", "platform.host_key_fingerprints[1]", "mail.host"):
        assert placeholder in result.stderr, result.stderr
    assert "OK" not in result.stdout


def test_example_config_is_valid_once_filled_in(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text(_example_filled_in(tmp_path))
    result = _check(path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "return server configured" in result.stdout


def test_check_config_reads_the_return_server_key(tmp_path):
    config = _minimal(tmp_path)
    config["platform"] = {"host": "127.0.0.1", "username": "c", "private_key": "missing_key",
                          "host_key_fingerprints": ["SHA256:" + "A" * 43]}
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _check(path)
    assert result.returncode == 2
    assert "platform: cannot load the private key" in result.stderr and "missing_key" in result.stderr


_PLATFORM = {"host": "127.0.0.1", "username": "c", "private_key": "k", "host_key_fingerprints": ["SHA256:" + "A" * 43]}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(platform={**_PLATFORM, "host_key_fingerprints": []}), "pin the server's host key"),
        (lambda c: c.update(platform={**_PLATFORM, "host_key_fingerprints": ["MD5:aa:bb"]}),
         "platform.host_key_fingerprints"),
        (lambda c: c.update(platform={**_PLATFORM, "password_file": "p"}), "exactly one of private_key"),
        (lambda c: c["communes"].append({"insee": "75056", "name": "Y", "inbox": "inbox2", "demarches": ["ILE"],
                                         "returns": "same"}) or c["communes"][0].update(returns="same"),
         "share a return directory"),
        (lambda c: c["communes"][0].update(returns="inbox"), "communes[1].returns"),
    ],
)
def test_return_path_settings_are_checked(tmp_path, edit, message):
    result = _check_edited(tmp_path, edit)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("edit", "key_path"),
    [
        (lambda c: c["communes"][0].update(insee="9001"), "communes[1].insee"),
        (lambda c: c["communes"][0].update(delivery="tar"), "communes[1].delivery"),
        (lambda c: c["accounts"][0].update(password="hunter2"), "accounts[1].password"),
        (lambda c: c["accounts"][0].update(password_hash="hunter2"), "accounts[1].password_hash"),
        (lambda c: c.setdefault("limits", {}).update(max_members=-1), "limits.max_members"),
        (lambda c: c["accounts"][0].update(authorized_keys=["ssh-ed25519 garbage"]), "accounts[1].authorized_keys"),
        (lambda c: c.setdefault("server", {}).setdefault("listen", {}).update(port=70000), "server.listen.port"),
        (lambda c: c["accounts"][0].update(communes=["75056"]), "accounts"),
    ],
)
def test_check_config_names_the_key_path(tmp_path, edit, key_path):
    result = _check_edited(tmp_path, edit)
    assert result.returncode == 2
    assert f"{tmp_path / 'relayd.yaml'}: {key_path}" in result.stderr
    assert "hunter2" not in result.stderr  # a mistaken clear password is not echoed back


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("storage: [unclosed\n")
    result = _check(path)
    assert result.returncode == 2 and str(path) in result.stderr


def test_relative_paths_follow_the_config_file(tmp_path):
    path = tmp_path / "etc" / "relayd.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(_minimal(tmp_path)))
    config = load_config(path)
    assert config.storage.root == tmp_path / "etc" / "var"
    assert config.communes[0].inbox == tmp_path / "etc" / "inbox"


def test_password_file_and_systemd_credential(tmp_path, monkeypatch):
    config = _minimal(tmp_path)
    del config["accounts"][0]["password_hash"]
    config["accounts"][0]["password_credential"] = "plateforme-password"
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "plateforme-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    account = load_config(path).accounts[0]
    assert verify_password("s3cret", account.resolved_password_hash())
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        account.resolved_password_hash()


def test_run_refuses_a_broken_config(tmp_path):
    path = tmp_path / "relayd.yaml"
    path.write_text("accounts: []\n")
    result = subprocess.run([sys.executable, "-m", "relayd", "run", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "storage" in result.stderr and "accounts" in result.stderr


def test_hash_password_command():
    result = subprocess.run([sys.executable, "-m", "relayd", "hash-password"], input="pa55word\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert "pa55word" not in encoded
    assert verify_password("pa55word", encoded) and not verify_password("other", encoded)


def test_check_config_reads_the_smtp_password_file(tmp_path):
    config = _minimal(tmp_path)
    config["mail"] = {"host": "127.0.0.1", "sender": "relayd@example.org", "username": "relayd",
                      "password_file": "missing.password"}
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _check(path)
    assert result.returncode == 2
    assert "mail: cannot read its password file" in result.stderr


def test_host_keys_default_to_the_storage_root_where_the_service_may_write(tmp_path):
    from relayd.config import load_config

    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(_minimal(tmp_path)))
    assert load_config(path).server.host_keys == [tmp_path / "var" / "host_keys" / "ssh_host_ed25519_key"]
    # A key that an earlier release generated beside the configuration is kept: the platform pins it.
    legacy = tmp_path / "host_keys" / "ssh_host_ed25519_key"
    legacy.parent.mkdir()
    legacy.write_text("a key")
    assert load_config(path).server.host_keys == [legacy]


@pytest.fixture
def shared_tmp() -> Path:
    """A folder that other users can traverse (pytest's own are private to root)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="relayd-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_check_config_as_the_service_user_names_a_folder_it_cannot_write(shared_tmp):
    """ExecStartPre= runs check-config as the relayd user: a host key it could not create is caught there."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's setpriv to run check-config as another user")
    tmp_path = shared_tmp
    config = _minimal(tmp_path)
    config["storage"]["root"] = str(tmp_path / "state")
    config["server"] = {"host_keys": [str(tmp_path / "etc" / "host_keys" / "ssh_host_ed25519_key")]}
    (tmp_path / "etc").mkdir(mode=0o755)  # root's, as /etc/relayd is
    (tmp_path / "state").mkdir()
    os.chown(tmp_path / "state", 65534, 65534)  # the service user's, as /var/lib/relayd is
    path = tmp_path / "relayd.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run([*as_nobody, sys.executable, "-m", "relayd", "check-config", "-c", str(path)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "server.host_keys[1] (line " in result.stderr
    assert f"relayd cannot write in {tmp_path / 'etc' / 'host_keys'}" in result.stderr
    assert "storage.root" not in result.stderr

"""Every client a platform or a tester uses can connect, log in, deliver and see a refusal.

Real clients from Debian, against a real relayd process: JSch (Debian's libjsch-java, through
the small program in tests/java/, default settings), lftp, curl (``sftp://``, libssh2), PuTTY's
``psftp``, OpenSSH ``sftp`` and paramiko. Each pins the relay's host key with what
``relayd fingerprints`` printed, as the platform's technical contact would. Each runs against
a fresh installation (relayd makes Ed25519, ECDSA and RSA host keys) and against one that
started with only an Ed25519 key (it gains the others and keeps its own).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import paramiko
import pytest

from conftest import PASSWORD, REAL_PACKAGE, Relay, free_port, require_program
from relayd.testkit.broken import build_broken
from relayd.testkit.samples import SampleSpec, package_filename

JSCH_JAR = Path("/usr/share/java/jsch.jar")
JAVA_SOURCE = Path(__file__).parent / "java" / "JschPush.java"
REAL_SHA = hashlib.sha256(REAL_PACKAGE.read_bytes()).hexdigest()
NUMERO = "A-9-X3UGO4V7"


def _need(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (Debian: {package}; `.ci/run` installs it)")
    return path


# -- keys and relays -------------------------------------------------------------------


@dataclass
class Keys:
    """The platform account's RSA key in the forms the clients read: PEM (JSch, libssh2, OpenSSH) and .ppk (PuTTY)."""

    pem: Path
    ppk: Path | None

    @property
    def public(self) -> str:
        return self.pem.with_name(self.pem.name + ".pub").read_text().strip()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("interop-keys")
    pem = folder / "platform_rsa"
    # PEM ("BEGIN RSA PRIVATE KEY"): the one private-key form JSch 0.1.5x and libssh2 both read.
    subprocess.run([require_program("ssh-keygen"), "-q", "-t", "rsa", "-b", "3072", "-m", "PEM", "-N", "", "-f",
                    str(pem)], check=True)
    ppk = None
    if shutil.which("puttygen"):
        ppk = folder / "platform_rsa.ppk"
        subprocess.run(["puttygen", str(pem), "-O", "private", "-o", str(ppk)], check=True, capture_output=True)
    return Keys(pem, ppk)


@pytest.fixture(scope="session")
def jsch_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JschPush compiled once per session against Debian's JSch."""
    javac = shutil.which("javac")
    if javac is None or not JSCH_JAR.exists():
        pytest.skip("javac or JSch is not installed (Debian: default-jdk-headless, libjsch-java; `.ci/run` installs them)")
    out = tmp_path_factory.mktemp("jsch-classes")
    subprocess.run([javac, "-cp", str(JSCH_JAR), "-d", str(out), str(JAVA_SOURCE)], check=True, capture_output=True)
    return out


def make_interop_relay(make_relay, keys: Keys, installation: str, *, server: dict | None = None, **overrides) -> Relay:
    """A relay whose platform account also accepts the RSA key; ``installation`` is ``fresh`` or ``ed25519_only``.

    ``fresh`` leaves ``server.host_keys`` out, as a new configuration does. ``ed25519_only`` is an
    installation from before: its configuration names the one Ed25519 key an earlier release made.
    """
    relay = make_relay(start=False, **overrides)
    relay.config["server"] = {"listen": relay.config["server"]["listen"], **(server or {})}
    if installation == "ed25519_only":
        relay.config["server"]["host_keys"] = ["host_keys/ssh_host_ed25519_key"]
        folder = relay.root / "host_keys"
        folder.mkdir(mode=0o700)
        old = asyncssh.generate_private_key("ssh-ed25519")
        (folder / "ssh_host_ed25519_key").write_bytes(old.export_private_key())
        (folder / "ssh_host_ed25519_key").chmod(0o600)
    relay.config["accounts"][0]["authorized_keys"].append(keys.public)
    relay.write_config()
    relay.start()
    return relay


def known_hosts(relay: Relay) -> Path:
    """What ``relayd fingerprints`` prints, saved as the platform saves it: a known_hosts file (made once per relay)."""
    path = relay.root / "known_hosts"
    if not path.exists():
        result = relay.cli("fingerprints", "--host", "127.0.0.1")
        assert result.returncode == 0, result.stderr
        path.write_text(result.stdout)
    return path


def fingerprints(relay: Relay) -> dict[str, dict[str, str]]:
    """Key type -> its known_hosts key and SHA256/MD5 fingerprints, as ``relayd fingerprints`` printed them."""
    out: dict[str, dict[str, str]] = {}
    text = known_hosts(relay).read_text()
    for block in re.findall(r"#   (SHA256:\S+)\n#   (MD5:\S+)\n\S+ (\S+) (\S+)", text):
        sha, md5, keytype, blob = block
        out[keytype] = {"sha256": sha, "md5": md5, "blob": blob}
    return out


def last_upload(relay: Relay) -> dict:
    rows = relay.ledger_rows("SELECT * FROM packages ORDER BY id DESC LIMIT 1")
    return rows[0] if rows else {}


def assert_delivered(relay: Relay, uploads_before: int, name: str) -> None:
    """The relay took the real package, byte for byte, under its final name; the commune has it."""
    rows = relay.ledger_rows("SELECT * FROM packages ORDER BY id")
    assert len(rows) == uploads_before + 1, rows
    row = rows[-1]
    assert row["sha256"] == REAL_SHA and row["outcome"] in ("accepted", "duplicate"), row
    assert (relay.inbox("90017") / f"{NUMERO}-DAUA.zip").read_bytes() == REAL_PACKAGE.read_bytes()


def broken_package(tmp_path: Path) -> tuple[Path, str]:
    """A package the relay must refuse (an XML external entity), with its platform-style name."""
    spec = SampleSpec(numero="A-1-BRKN0001", demarche="recensementCitoyen", insee="90017")
    local = tmp_path / "broken.zip"
    local.write_bytes(build_broken("xxe", spec))
    return local, package_filename(spec)


def assert_refused(relay: Relay, uploads_before: int) -> None:
    rows = relay.ledger_rows("SELECT * FROM packages ORDER BY id")
    assert len(rows) == uploads_before + 1 and rows[-1]["outcome"] == "rejected", rows
    assert rows[-1]["reason"] == "xml_forbidden"


def uploads(relay: Relay) -> int:
    return len(relay.ledger_rows("SELECT id FROM packages"))


# -- the clients -----------------------------------------------------------------------
# Each pushes one file in one style, by password or by key, and says whether the relay accepted it.


@dataclass
class Push:
    ok: bool
    output: str


def jsch_push(relay: Relay, classes: Path, keys: Keys, auth: str, commands: list[str], *,
              config: dict[str, str] | None = None, port: int | None = None) -> Push:
    java = _need("java", "default-jdk-headless")
    secret = f"password:{PASSWORD}" if auth == "password" else f"key:{keys.pem}"
    args = [java, "-cp", f"{JSCH_JAR}:{classes}", "JschPush", "127.0.0.1", str(port or relay.port), "plateforme",
            str(known_hosts(relay)), secret]
    for key, value in (config or {}).items():
        args += ["--config", f"{key}={value}"]
    result = subprocess.run(args + commands, capture_output=True, text=True, timeout=120)
    return Push(result.returncode == 0, result.stdout + result.stderr)


def _jsch(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    if style == "direct":
        return jsch_push(relay, classes, keys, auth, ["put", str(local), remote])
    return jsch_push(relay, classes, keys, auth, ["put", str(local), remote + ".part", "rename", remote + ".part", remote])


def _lftp(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    lftp = _need("lftp", "lftp")
    # lftp's sftp runs OpenSSH's ssh; the platform's pinning is the known_hosts file.
    ssh = f"ssh -a -x -oUserKnownHostsFile={known_hosts(relay)} -oStrictHostKeyChecking=yes -oConnectTimeout=10"
    if auth == "key":
        ssh += f" -oIdentitiesOnly=yes -oPasswordAuthentication=no -i {keys.pem}"
        user = "plateforme,"
    else:
        ssh += " -oPubkeyAuthentication=no"
        user = f"plateforme,{PASSWORD}"
    steps = [f'put "{local}" -o "{remote}"'] if style == "direct" else [
        f'put "{local}" -o "{remote}.part"', f'mv "{remote}.part" "{remote}"']
    script = "; ".join([f'set sftp:connect-program "{ssh}"', "set net:max-retries 1", "set cmd:fail-exit yes",
                        "set xfer:clobber on", f'open -u "{user}" -p {relay.port} sftp://127.0.0.1', *steps, "bye"])
    result = subprocess.run([lftp, "-c", script], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    return Push(result.returncode == 0, result.stdout + result.stderr)


def _curl(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    curl = _need("curl", "curl")
    # curl (libssh2) checks the host key against ~/.ssh/known_hosts: the file the relay printed.
    home = relay.root / "curl-home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    shutil.copy(known_hosts(relay), home / ".ssh" / "known_hosts")
    target = remote if style == "direct" else remote + ".part"
    args = [curl, "-sS", "--connect-timeout", "10", "-T", str(local), f"sftp://127.0.0.1:{relay.port}/{target}"]
    if style == "rename":
        args += ["-Q", f"-rename /{target} /{remote}"]
    if auth == "key":
        args += ["-u", "plateforme:", "--key", str(keys.pem), "--pubkey", str(keys.pem) + ".pub"]
    else:
        args += ["-u", f"plateforme:{PASSWORD}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)})
    return Push(result.returncode == 0, result.stdout + result.stderr)


def _psftp(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    psftp = _need("psftp", "putty-tools")
    batch = relay.root / "psftp.batch"
    steps = [f'put "{local}" "{remote}"'] if style == "direct" else [
        f'put "{local}" "{remote}.part"', f'mv "{remote}.part" "{remote}"']
    batch.write_text("\n".join([*steps, "quit"]) + "\n")
    args = [psftp, "-batch", "-b", str(batch), "-P", str(relay.port)]
    for fingerprint in fingerprints(relay).values():
        args += ["-hostkey", fingerprint["sha256"]]
    if auth == "key":
        assert keys.ppk is not None
        args += ["-i", str(keys.ppk), "-noagent"]
    else:
        args += ["-pw", PASSWORD]
    result = subprocess.run([*args, "plateforme@127.0.0.1"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    return Push(result.returncode == 0, result.stdout + result.stderr)


def _openssh(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    sftp = require_program("sftp")
    batch = relay.root / "sftp.batch"
    steps = [f'put "{local}" "{remote}"'] if style == "direct" else [
        f'put "{local}" "{remote}.part"', f'rename "{remote}.part" "{remote}"']
    batch.write_text("\n".join(steps) + "\n")
    result = subprocess.run([sftp, "-b", str(batch), "-P", str(relay.port), "-oStrictHostKeyChecking=yes",
                             f"-oUserKnownHostsFile={known_hosts(relay)}", "-oIdentitiesOnly=yes", "-i", str(keys.pem),
                             "plateforme@127.0.0.1"], capture_output=True, text=True, timeout=120)
    return Push(result.returncode == 0, result.stdout + result.stderr)


def _paramiko(relay, classes, keys, auth, local: Path, remote: str, style: str) -> Push:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts(relay)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if auth == "password":
        client.connect("127.0.0.1", relay.port, "plateforme", password=PASSWORD, allow_agent=False, look_for_keys=False)
    else:
        client.connect("127.0.0.1", relay.port, "plateforme", key_filename=str(keys.pem), allow_agent=False,
                       look_for_keys=False)
    try:
        sftp = client.open_sftp()
        if style == "direct":
            sftp.put(str(local), remote)
        else:
            sftp.put(str(local), remote + ".part")
            sftp.posix_rename(remote + ".part", remote)
        return Push(True, "")
    except OSError as exc:
        return Push(False, str(exc))
    finally:
        client.close()


CLIENTS = {"jsch": _jsch, "lftp": _lftp, "curl": _curl, "psftp": _psftp, "openssh": _openssh, "paramiko": _paramiko}
# curl's direct upload does not look at the answer to its close: a refusal there looks like success.
SILENT_DIRECT_REFUSAL = {"curl"}
# What each client shows of a refusal: the relay's reason where it passes the server's message on.
SHOWS_REFUSAL = {"jsch": "sftp-error id=4 refused (xml_forbidden): ", "lftp": "Access failed: refused (xml_forbidden): ",
                 "paramiko": "refused (xml_forbidden): ", "openssh": "Failure", "psftp": "failure", "curl": "failed"}
# `sftp -b` never asks for a password (it runs ssh in batch mode); lftp drives OpenSSH's ssh by password.
KEY_ONLY = {"openssh"}


@pytest.fixture
def classes(request) -> Path | None:
    """JschPush, compiled, for the JSch tests only (the others need no Java)."""
    return request.getfixturevalue("jsch_classes") if "jsch" in request.node.name else None


@pytest.mark.parametrize("installation", ["fresh", "ed25519_only"])
@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_client_delivers_in_both_styles_and_sees_a_refusal(client, installation, make_relay, keys, classes, tmp_path):
    relay = make_interop_relay(make_relay, keys, installation)
    push = CLIENTS[client]
    for auth in ("key",) if client in KEY_ONLY else ("password", "key"):
        for style in ("direct", "rename"):
            before = uploads(relay)
            result = push(relay, classes, keys, auth, REAL_PACKAGE, REAL_PACKAGE.name, style)
            assert result.ok, f"{client} {auth} {style}: {result.output}"
            assert_delivered(relay, before, REAL_PACKAGE.name)

    broken, name = broken_package(tmp_path)
    for style in ("rename", "direct"):
        before = uploads(relay)
        result = push(relay, classes, keys, "key", broken, name, style)
        assert_refused(relay, before)
        if style == "direct" and client in SILENT_DIRECT_REFUSAL:
            # What docs/formats.md warns of: the refusal is on the relay's side only; use the rename style.
            assert result.ok, result.output
        else:
            assert not result.ok, f"{client} {style} took a refused package for delivered: {result.output}"
            assert SHOWS_REFUSAL[client] in result.output, result.output
    assert not (relay.inbox("90017") / "A-1-BRKN0001-RCO.zip").exists()


def test_jsch_default_settings_show_the_ecdsa_key_with_the_md5_fingerprint_relayd_prints(make_relay, keys,
                                                                                          jsch_classes):
    """JSch 0.1.5x knows no Ed25519: it meets the relay on ECDSA, and shows the MD5 fingerprint the contact was given."""
    relay = make_interop_relay(make_relay, keys, "ed25519_only")
    result = jsch_push(relay, jsch_classes, keys, "password", [])
    assert result.ok, result.output
    md5 = fingerprints(relay)["ecdsa-sha2-nistp256"]["md5"].removeprefix("MD5:")
    assert f"hostkey ecdsa-sha2-nistp256 {md5}" in result.output


def test_jsch_delivers_to_a_fresh_relayd_demo(demo, keys, jsch_classes, tmp_path):
    java = _need("java", "default-jdk-headless")
    sftp = demo.info["sftp"]
    printed = subprocess.run([sys.executable, "-m", "relayd", "fingerprints", "-c", demo.info["config"],
                              "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    hosts = tmp_path / "known_hosts"
    # The demo was asked for port 0 (any free one): its configuration says 0, demo.json the port bound.
    hosts.write_text(printed.stdout.replace("[127.0.0.1]:0 ", f"[127.0.0.1]:{sftp['port']} "))
    result = subprocess.run([java, "-cp", f"{JSCH_JAR}:{jsch_classes}", "JschPush", "127.0.0.1", str(sftp["port"]),
                             sftp["username"], str(hosts), f"password:{sftp['password']}",
                             "put", str(REAL_PACKAGE), REAL_PACKAGE.name], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    inbox = Path(demo.info["communes"]["90017"]["inbox"])
    assert (inbox / f"{NUMERO}-DAUA.zip").read_bytes() == REAL_PACKAGE.read_bytes()


# -- host keys -------------------------------------------------------------------------


def _openssh_offering(relay: Relay, host_key_alg: str, port: int | None = None) -> subprocess.CompletedProcess:
    """OpenSSH offering only ``host_key_alg``, pinning with the printed known_hosts: does the handshake pass?"""
    batch = relay.root / "noop.batch"
    batch.write_text("pwd\n")
    return subprocess.run([require_program("sftp"), "-b", str(batch), "-P", str(port or relay.port),
                           f"-oHostKeyAlgorithms={host_key_alg}", "-oStrictHostKeyChecking=yes",
                           f"-oUserKnownHostsFile={known_hosts(relay)}", "-oIdentitiesOnly=yes",
                           "-i", str(relay.key), "plateforme@127.0.0.1"], capture_output=True, text=True, timeout=60)


def test_a_fresh_relay_serves_ed25519_ecdsa_and_rsa_with_sha2_signatures(make_relay, keys):
    relay = make_interop_relay(make_relay, keys, "fresh")
    folder = relay.root / "var" / "host_keys"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"ssh_host_{t}_key{pub}" for t in ("ed25519", "ecdsa", "rsa") for pub in ("", ".pub"))
    for name in ("ed25519", "ecdsa", "rsa"):
        assert (folder / f"ssh_host_{name}_key").stat().st_mode & 0o777 == 0o600
    rsa = subprocess.run(["ssh-keygen", "-lf", str(folder / "ssh_host_rsa_key.pub")], capture_output=True, text=True)
    assert rsa.stdout.split()[0] == "3072" and rsa.stdout.rstrip().endswith("(RSA)"), rsa.stdout
    made = [e for e in relay.events() if e.get("event") == "sftp.host_key_generated"]
    assert sorted(e["type"] for e in made) == ["ecdsa", "ed25519", "rsa"]
    for alg in ("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512", "rsa-sha2-256"):
        result = _openssh_offering(relay, alg)
        assert result.returncode == 0, f"{alg}: {result.stderr}"
    # SHA-1 signatures by the RSA key are for legacy only.
    refused = _openssh_offering(relay, "ssh-rsa")
    assert refused.returncode != 0 and "no matching host key type" in refused.stderr, refused.stderr


def test_an_ed25519_only_installation_keeps_its_key_and_gains_the_others(make_relay, keys):
    relay = make_interop_relay(make_relay, keys, "ed25519_only")
    folder = relay.root / "host_keys"
    old = asyncssh.read_private_key(folder / "ssh_host_ed25519_key")
    added = [e for e in relay.events() if e.get("event") == "sftp.host_key_added"]
    assert sorted(e["type"] for e in added) == ["ecdsa", "rsa"]
    assert all("relayd fingerprints" in e["hint"] for e in added)
    assert not [e for e in relay.events() if e.get("event") == "sftp.host_key_generated"]
    assert (folder / "ssh_host_ecdsa_key").exists() and (folder / "ssh_host_rsa_key").exists()
    # The platform pinned the Ed25519 key: it is the one still served, and printed.
    assert fingerprints(relay)["ssh-ed25519"]["sha256"] == old.get_fingerprint("sha256")
    assert _openssh_offering(relay, "ssh-ed25519").returncode == 0
    # A restart makes nothing new.
    relay.restart()
    assert len([e for e in relay.events() if e.get("event") == "sftp.host_key_added"]) == 2
    assert asyncssh.read_private_key(folder / "ssh_host_ed25519_key").get_fingerprint() == old.get_fingerprint()


def test_host_key_types_say_which_keys_are_served(make_relay, keys):
    relay = make_interop_relay(make_relay, keys, "ed25519_only", server={"host_key_types": ["ed25519"]})
    assert sorted(p.name for p in (relay.root / "host_keys").iterdir()) == ["ssh_host_ed25519_key"]
    assert list(fingerprints(relay)) == ["ssh-ed25519"]
    result = _openssh_offering(relay, "ecdsa-sha2-nistp256")
    assert result.returncode != 0 and "no matching host key type" in result.stderr, result.stderr


def test_fingerprints_match_ssh_keygen(make_relay, keys):
    relay = make_interop_relay(make_relay, keys, "fresh")
    printed = fingerprints(relay)
    assert sorted(printed) == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    for pub in sorted((relay.root / "var" / "host_keys").glob("*.pub")):
        sha = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()
        md5 = subprocess.run(["ssh-keygen", "-E", "md5", "-lf", str(pub)], capture_output=True, text=True,
                             check=True).stdout.split()
        keytype, blob = pub.read_text().split()[:2]
        assert printed[keytype] == {"sha256": sha[1], "md5": md5[1], "blob": blob}, pub.name
    # The known_hosts lines name the listener as OpenSSH does for a port other than 22.
    lines = [line for line in known_hosts(relay).read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 3 and all(line.startswith(f"[127.0.0.1]:{relay.port} ") for line in lines)
    # And ssh-keygen finds the relay in them under that name.
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{relay.port}", "-f", str(known_hosts(relay))],
                           capture_output=True, text=True)
    found_lines = [x for x in found.stdout.splitlines() if x.startswith(f"[127.0.0.1]:{relay.port} ")]
    assert found.returncode == 0 and len(found_lines) == 3, found.stdout


def test_fingerprints_on_port_22_and_before_the_first_start(make_relay, keys):
    relay = make_relay(start=False)
    relay.config["server"] = {"listen": {"host": "relay.example.fr", "port": 22}}
    relay.write_config()
    before = relay.cli("fingerprints")
    assert before.returncode == 1
    assert "not made yet" in before.stderr and "ssh_host_rsa_key" in before.stderr
    folder = relay.root / "var" / "host_keys"
    assert not folder.exists(), "printing must not make keys (it may run as another user than the service)"
    folder.mkdir(parents=True)
    key = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    (folder / "ssh_host_ecdsa_key").write_bytes(key.export_private_key())
    relay.config["server"]["host_key_types"] = ["ecdsa"]
    relay.write_config()
    printed = relay.cli("fingerprints")
    assert printed.returncode == 0, printed.stderr
    line = next(x for x in printed.stdout.splitlines() if not x.startswith("#"))
    assert line == "relay.example.fr " + key.export_public_key().decode().strip()


# -- profiles --------------------------------------------------------------------------

SHA1_ONLY_JSCH = {"kex": "diffie-hellman-group14-sha1", "mac.c2s": "hmac-sha1", "mac.s2c": "hmac-sha1",
                  "server_host_key": "ssh-rsa"}


def test_legacy_listener_lets_a_sha1_only_stack_in_and_modern_keeps_it_out(make_relay, keys, jsch_classes):
    legacy_port = free_port()
    relay = make_relay(start=False)
    relay.config["server"] = {"listen": relay.config["server"]["listen"],
                              "extra_listen": [{"host": "127.0.0.1", "port": legacy_port, "profile": "legacy"}]}
    relay.config["accounts"][0]["authorized_keys"].append(keys.public)
    relay.write_config()
    relay.start()

    modern = jsch_push(relay, jsch_classes, keys, "password", ["put", str(REAL_PACKAGE), REAL_PACKAGE.name],
                       config=SHA1_ONLY_JSCH)
    assert not modern.ok and "Algorithm negotiation fail" in modern.output, modern.output
    assert uploads(relay) == 0

    before = uploads(relay)
    legacy = jsch_push(relay, jsch_classes, keys, "key", ["put", str(REAL_PACKAGE), REAL_PACKAGE.name],
                       config=SHA1_ONLY_JSCH, port=legacy_port)
    assert legacy.ok, legacy.output
    assert "hostkey ssh-rsa" in legacy.output
    assert_delivered(relay, before, REAL_PACKAGE.name)

    # OpenSSH asking for SHA-1 key exchange only: the same split.
    for port, accepted in ((relay.port, False), (legacy_port, True)):
        batch = relay.root / "pwd.batch"
        batch.write_text("pwd\n")
        result = subprocess.run(["sftp", "-b", str(batch), "-P", str(port), "-oKexAlgorithms=diffie-hellman-group14-sha1",
                                 "-oMACs=hmac-sha1", "-oStrictHostKeyChecking=no", "-oUserKnownHostsFile=/dev/null",
                                 "-oIdentitiesOnly=yes", "-i", str(relay.key), "plateforme@127.0.0.1"],
                                capture_output=True, text=True, timeout=60)
        assert (result.returncode == 0) is accepted, (port, result.stderr)

    warned = [e for e in relay.events() if e.get("event") == "sftp.legacy_profile"]
    assert [e["port"] for e in warned] == [legacy_port]
    assert "diffie-hellman-group14-sha1" in warned[0]["adds"]
    check = relay.cli("check-config")
    assert check.returncode == 0, check.stderr
    assert "legacy profile on 127.0.0.1:" in check.stderr and "hmac-sha1" in check.stderr
    # The known_hosts lines name both listeners.
    line = next(x for x in known_hosts(relay).read_text().splitlines() if not x.startswith("#"))
    assert line.startswith(f"[127.0.0.1]:{relay.port},[127.0.0.1]:{legacy_port} ")


def test_modern_check_config_says_nothing_of_legacy(make_relay):
    relay = make_relay(start=False)
    check = relay.cli("check-config")
    assert check.returncode == 0 and "legacy" not in check.stderr, check.stderr


# -- an account's directory (accounts[].directory) ----------------------------------------


def test_jsch_delivers_into_the_accounts_directory(make_relay, keys, jsch_classes):
    relay = make_relay(start=False)
    relay.config["accounts"][0]["directory"] = "/depot"
    relay.config["accounts"][0]["authorized_keys"].append(keys.public)
    relay.write_config()
    relay.start()
    result = jsch_push(relay, jsch_classes, keys, "password", ["cd", "/depot", "put", str(REAL_PACKAGE),
                                                                REAL_PACKAGE.name])
    assert result.ok, result.output
    assert_delivered(relay, 0, REAL_PACKAGE.name)


def test_openssh_delivers_into_the_accounts_directory(make_relay):
    relay = make_relay(start=False)
    relay.config["accounts"][0]["directory"] = "/depot"
    relay.write_config()
    relay.start()
    batch = relay.root / "depot.batch"
    batch.write_text(f'-mkdir /depot\ncd /depot\nput "{REAL_PACKAGE}" "{REAL_PACKAGE.name}.part"\n'
                     f'rename "{REAL_PACKAGE.name}.part" "/depot/{REAL_PACKAGE.name}"\n')
    result = subprocess.run(["sftp", "-b", str(batch), "-P", str(relay.port), "-oStrictHostKeyChecking=no",
                             "-oUserKnownHostsFile=/dev/null", "-oIdentitiesOnly=yes", "-i", str(relay.key),
                             "plateforme@127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_delivered(relay, 0, REAL_PACKAGE.name)


def test_an_unknown_profile_or_key_type_is_named_by_check_config(make_relay):
    relay = make_relay(start=False)
    relay.config["server"].update(profile="ancient", host_key_types=["ed25519", "dsa"])
    relay.write_config()
    check = relay.cli("check-config")
    assert check.returncode == 2
    # Sentences with a 1-based path and the line (config_source.py), not pydantic's wording.
    assert "server.profile (line " in check.stderr and "this must be one of 'modern' or 'legacy'" in check.stderr, \
        check.stderr
    assert "server.host_key_types[2] (line " in check.stderr, check.stderr
    assert "this must be one of 'ed25519', 'ecdsa' or 'rsa'" in check.stderr, check.stderr

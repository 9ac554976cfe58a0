"""The SFTP surface, as a security reviewer would probe it, with real clients on real sockets.

Every test drives a real relayd process (``relay`` fixture) with the OpenSSH client
binaries and/or paramiko and checks the outcome on disk, not only the client's answer.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest
from paramiko.auth_handler import AuthHandler
from paramiko.message import Message

from conftest import (
    OTHER_PASSWORD,
    PASSWORD,
    REAL_PACKAGE,
    paramiko_client,
    require_program,
    sftp_batch,
    wait_for,
    write_key_pair,
)
from relayd.inbound.uploads import AREA_NAME

GCM = "aes128-gcm@openssh.com"
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no", "-o", "ConnectTimeout=10"]


# -- helpers -------------------------------------------------------------------------


def _token() -> str:
    """A name fragment unique to this test run, to find any file the test caused to exist."""
    return f"surface-{uuid.uuid4().hex[:12]}"


@contextmanager
def _session(relay, **kw) -> Iterator[paramiko.SFTPClient]:
    """A paramiko SFTP session kept open for the ``with`` block (temp files live as long as it)."""
    client = paramiko_client(relay, **kw)
    try:
        yield client
    finally:
        client.close()
        client.get_channel().get_transport().close()


def _visible(drop: Path) -> list[Path]:
    """What the drop folder holds, without relayd's hidden area of uploads under way."""
    return [p for p in drop.iterdir() if p.name != AREA_NAME]


def _find_token(relay, token: str) -> set[Path]:
    """Every path whose name holds ``token`` in /tmp, /etc and the relay's own tree."""
    hits: set[Path] = set()
    for top in ("/tmp", "/etc", str(relay.root)):
        for dirpath, dirnames, filenames in os.walk(top):
            hits.update(Path(dirpath, n).resolve() for n in dirnames + filenames if token in n)
    return hits


def _probe(relay, token: str, out: Path) -> str:
    """An sftp batch line that, while the session is still open, lists files named after ``token``."""
    return f"!find /tmp /etc {relay.root} -name '*{token}*' > {out} 2>/dev/null"


def _outside_var(relay) -> set[Path]:
    """Files and folders under the relay root that are neither in var/ nor sftp batch files."""
    var = relay.root / "var"
    return {p for p in relay.root.rglob("*") if not p.is_relative_to(var) and not p.name.startswith("batch-")}


def _planted_link(relay, name: str = "evil.part") -> tuple[Path, Path]:
    """A symlink in the drop folder pointing to a file outside it, as if left there by someone else."""
    target = relay.root / "outside-secret.txt"
    target.write_text("outside the drop folder\n")
    relay.drop().mkdir(parents=True, exist_ok=True)
    link = relay.drop() / name
    link.symlink_to(target)
    return link, target


def _ssh(relay, *args: str, key: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The OpenSSH ``ssh`` client against the relay, by key, never interactive."""
    ssh = require_program("ssh")
    cmd = [ssh, "-p", str(relay.port), "-i", str(key or relay.key), *SSH_OPTIONS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _new_key(folder: Path) -> Path:
    """An Ed25519 key pair that no account authorises."""
    return write_key_pair(folder, "stranger_key")


def _connected_transport(relay) -> paramiko.Transport:
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    transport.connect(username="plateforme", pkey=paramiko.Ed25519Key.from_private_key_file(str(relay.key)))
    return transport


# -- 1. the chroot -------------------------------------------------------------------


def test_openssh_listing_shows_only_the_drop_folder(relay):
    """`cd ..`, `ls ..`, `ls /` and `ls ../..` all show the account's drop folder and nothing above it."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "mine.part").write_text("mine")
    relay.drop("autre").mkdir(parents=True, exist_ok=True)
    (relay.drop("autre") / "theirs.part").write_text("theirs")
    (relay.root / "outside-marker.txt").write_text("outside")

    result = sftp_batch(relay, ["pwd", "cd ..", "pwd", "cd ../../..", "pwd",
                                "ls -1a", "ls -1a ..", "ls -1a /", "ls -1a ../..", "ls -1a /../../.."])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("Remote working directory: /\n") == 3
    listings = [line.strip() for line in out.splitlines() if not line.startswith(("sftp>", "Remote working"))]
    assert {posixpath.basename(x) for x in listings if x} == {".", "..", "mine.part"}
    for foreign in ("theirs.part", "outside-marker.txt", "relayd.yaml", "relayd.log", "host_keys", "inbox",
                    "drop", "autre", "plateforme", "ledger.sqlite", "etc", "tmp"):
        assert foreign not in out


def test_paramiko_realpath_of_parent_is_root(relay):
    """The client's view of the filesystem tops out at its own folder: realpath('..') is '/'."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "mine.part").write_text("mine")
    with _session(relay) as client:
        assert client.normalize(".") == "/"
        assert client.normalize("..") == "/"
        assert client.normalize("/../../..") == "/"
        assert client.listdir("..") == client.listdir("/") == client.listdir("/../../..") == ["mine.part"]
        # The host's files are out of sight: /etc/passwd is looked up inside the drop folder.
        with pytest.raises(FileNotFoundError):
            client.stat("/etc/passwd")
        with pytest.raises(FileNotFoundError):
            client.stat("/../../relayd.yaml")
        assert stat.S_IMODE(client.stat("/..").st_mode) == stat.S_IMODE(relay.drop().stat().st_mode)
        assert client.stat("/..").st_mtime == int(relay.drop().stat().st_mtime)


def test_openssh_puts_outside_the_chroot_land_in_the_drop_folder_or_are_refused(relay, tmp_path):
    """`put` to ../x, /../../tmp/x, /etc/x and deep ../ paths never writes outside the drop folder."""
    token = _token()
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"not a package\n")
    found = tmp_path / "found-during-session.txt"
    before = _outside_var(relay)
    targets = [f"../{token}-parent.part", f"/../../tmp/{token}-tmp.part", f"/etc/{token}-etc.part",
               f"../../../../../../../../tmp/{token}-deep.part", f"../{token}-escape.zip",
               f"/../../tmp/{token}-x.zip", f"/etc/{token}-x.zip"]
    commands = [f'-put "{payload}" "{t}"' for t in targets] + [_probe(relay, token, found)]

    result = sftp_batch(relay, commands)
    assert result.returncode == 0, result.stderr

    during = {Path(line).resolve() for line in found.read_text().splitlines() if line}
    drop = relay.drop().resolve()
    var = (relay.root / "var").resolve()
    # Positive evidence that the probe sees uploads: the first one was accepted, inside the drop folder.
    assert drop / f"{token}-parent.part" in during
    # Temp files sit in the drop folder; a committed .zip has moved on to intake (staging, quarantine), in var/.
    assert all(p.parent == drop or (p.is_relative_to(var) and p.name.endswith((".zip", ".json"))) for p in during)
    assert all(p.is_relative_to(var) for p in _find_token(relay, token))
    assert _outside_var(relay) == before
    for name in (f"{token}-tmp.part", f"{token}-deep.part", f"{token}-x.zip"):
        assert not (Path("/tmp") / name).exists()
    assert not (Path("/etc") / f"{token}-etc.part").exists()


def test_paramiko_writes_outside_the_chroot_land_in_the_drop_folder_or_are_refused(relay):
    """Opening ../x, /../../tmp/x, /etc/x for writing creates files only directly in the drop folder."""
    token = _token()
    before = _outside_var(relay)
    landed = {}
    with _session(relay) as client:
        for path in (f"../{token}-a.part", f"/../../tmp/{token}-b.part", f"/etc/{token}-c.part",
                     f"../../../../../../../../tmp/{token}-d.part", f"/../{token}-e.part",
                     f"../plateforme/{token}-f.part", f"/var/drop/plateforme/{token}-g.part"):
            try:
                with client.open(path, "w") as fh:
                    fh.write(b"x")
            except PermissionError:
                landed[path] = None
            else:
                landed[path] = path
        hits = _find_token(relay, token)  # while the session is open: temp files still exist
    drop = relay.drop().resolve()
    assert {p.name for p in hits} == {f"{token}-a.part", f"{token}-e.part"}
    assert all(p.parent == drop for p in hits), hits
    assert landed[f"/etc/{token}-c.part"] is None
    assert landed[f"/../../tmp/{token}-b.part"] is None
    assert _outside_var(relay) == before


# -- 2. other accounts, and reading --------------------------------------------------


def test_other_account_cannot_see_or_touch_plateforme_files(relay):
    """`autre` cannot list, stat, read, append to, rename or remove a file in plateforme's drop folder."""
    secret = b"plateforme's upload in progress"
    with _session(relay) as owner:
        with owner.open("x.part", "w") as fh:
            fh.write(secret)
        assert (relay.drop() / "x.part").read_bytes() == secret
        with _session(relay, user="autre", password=OTHER_PASSWORD) as other:
            assert other.listdir("/") == []
            assert other.listdir("..") == []
            with pytest.raises(FileNotFoundError):
                other.stat("/x.part")
            with pytest.raises(FileNotFoundError):
                other.stat("/../plateforme/x.part")
            with pytest.raises(FileNotFoundError):
                other.listdir("/../plateforme")
            with pytest.raises(PermissionError):
                other.open("/../plateforme/x.part", "r")
            with pytest.raises(PermissionError):
                other.open("../plateforme/x.part", "a")
            with pytest.raises(OSError):
                other.remove("../plateforme/x.part")
            with pytest.raises(OSError):
                other.rename("../plateforme/x.part", "stolen.part")
            with pytest.raises(OSError):
                other.rename("../plateforme/x.part", "stolen.zip")
            assert (relay.drop() / "x.part").read_bytes() == secret
            assert not any(relay.drop("autre").iterdir())
        assert owner.listdir("/") == ["x.part"]


def test_other_account_cannot_deliver_for_plateforme_communes(relay):
    """`autre` (commune 2A004) uploading plateforme's package for 90017 is refused, and nothing reaches 90017."""
    with _session(relay, user="autre", password=OTHER_PASSWORD) as other:
        with pytest.raises(OSError, match="refused"):
            other.put(str(REAL_PACKAGE), REAL_PACKAGE.name)
    assert not relay.inbox("90017").exists() or not any(relay.inbox("90017").iterdir())
    assert not relay.ledger_rows("SELECT * FROM packages WHERE outcome = 'accepted'")


def test_paramiko_cannot_read_its_own_temp_file(relay):
    """Reading is refused, even the account's own temporary file: open for read fails with permission denied."""
    with _session(relay) as client:
        with client.open("mine.part", "w") as fh:
            fh.write(b"my own bytes")
        with pytest.raises(PermissionError):
            client.open("mine.part", "r")
        with pytest.raises(PermissionError):
            with client.open("mine.part", "r+") as fh:  # write access granted, reading still refused
                fh.read(4)
        assert (relay.drop() / "mine.part").read_bytes() == b"my own bytes"


def test_openssh_get_is_refused(relay, tmp_path):
    """OpenSSH `get` of a file in the drop folder downloads nothing."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "planted.part").write_bytes(b"server-side bytes")
    local = tmp_path / "downloaded"
    result = sftp_batch(relay, [f'get planted.part "{local}"'])
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert not local.exists() or local.read_bytes() == b""


# -- 3. modes, setstat ---------------------------------------------------------------


def test_paramiko_setstat_that_harms_nothing_is_accepted_and_ignored(relay):
    """chmod and utime on an upload succeed and change nothing; chown, setuid and truncate are refused."""
    with _session(relay) as client:
        with client.open("t.part", "w") as fh:
            fh.write(b"12345")
            fh.flush()
            fh.chmod(0o777)
            fh.utime((1_000_000_000, 1_000_000_000))
            with pytest.raises(PermissionError, match="ownership"):
                fh.chown(1, 1)
            with pytest.raises(PermissionError, match="setuid"):
                fh.chmod(0o4755)
            with pytest.raises(PermissionError, match="size"):
                fh.truncate(1)
        client.chmod("t.part", 0o777)
        client.utime("t.part", (1_000_000_000, 1_000_000_000))
        client.truncate("t.part", 5)  # the size it has: harmless
        with pytest.raises(PermissionError):
            client.chown("t.part", 1, 1)
        with pytest.raises(PermissionError):
            client.chmod("t.part", 0o2777)
        with pytest.raises(PermissionError):
            client.truncate("t.part", 1)
        st = (relay.drop() / "t.part").stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 5
        assert int(st.st_mtime) != 1_000_000_000
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        assert client.stat("t.part").st_size == 5


def test_openssh_put_p_succeeds_without_carrying_the_local_mode(relay, tmp_path):
    """`put -p` of a 0777 file, then `chmod 777`, both succeed: the file on disk stays 0600 with the server's mtime."""
    local = tmp_path / "wide-open.bin"
    local.write_bytes(b"12345")
    local.chmod(0o777)
    os.utime(local, (1_000_000_000, 1_000_000_000))
    seen = tmp_path / "stat.txt"
    on_disk = relay.drop() / "t.part"
    result = sftp_batch(relay, [f'put -p "{local}" t.part', "chmod 777 t.part",
                                f"!stat -c '%a %Y %s' {on_disk} > {seen}"])
    assert result.returncode == 0, result.stderr
    assert "Permission denied" not in result.stderr
    mode, mtime, size = seen.read_text().split()
    assert mode == "600"
    assert int(mtime) != 1_000_000_000
    assert size == "5"


def test_openssh_put_p_of_a_package_reports_success(relay, tmp_path):
    """`put -p X.zip` (times preserved, as rclone does by default) exits 0 and the package is accepted."""
    local = tmp_path / REAL_PACKAGE.name
    shutil.copyfile(REAL_PACKAGE, local)
    os.utime(local, (1_000_000_000, 1_000_000_000))
    result = sftp_batch(relay, [f'put -p "{local}" X.zip', f'put -p "{local}" Y.zip.part',
                                "rename Y.zip.part Y.zip"])
    assert result.returncode == 0, result.stderr
    assert [p.read_bytes() for p in relay.inbox("90017").iterdir()] == [REAL_PACKAGE.read_bytes()]
    rows = relay.ledger_rows("SELECT upload_name, outcome FROM packages ORDER BY id")
    assert [r["outcome"] for r in rows] == ["accepted", "duplicate"], rows


@pytest.mark.parametrize("put", ["put", "put -p"])
def test_inbox_file_mode_is_forced(relay, tmp_path, put):
    """A committed package reaches the inbox as 0640, whatever the mode of the client's local copy (0777)."""
    local = tmp_path / REAL_PACKAGE.name
    shutil.copyfile(REAL_PACKAGE, local)
    local.chmod(0o777)
    result = sftp_batch(relay, [f'-{put} "{local}" "{local.name}"'])
    assert result.returncode == 0, result.stderr
    delivered = list(relay.inbox("90017").iterdir())
    assert len(delivered) == 1
    assert delivered[0].read_bytes() == REAL_PACKAGE.read_bytes()
    assert stat.S_IMODE(delivered[0].stat().st_mode) == 0o640


# -- 4. links and folders ------------------------------------------------------------


def test_openssh_ln_symlink_mkdir_rmdir_are_refused(relay, tmp_path):
    """OpenSSH `ln`, `ln -s`, `mkdir` and `rmdir` fail and leave no link or folder behind."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "keep.d").mkdir()
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x")
    result = sftp_batch(relay, [f'put "{payload}" t.part', "-ln t.part hard.part", "-ln -s t.part soft.part",
                                "-ln -s /etc/passwd passwd.part", "-mkdir sub", "-rmdir keep.d"])
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Permission denied") == 5, result.stderr
    # t.part goes with the session's clean-up, which may finish just after the client exits.
    wait_for(lambda: sorted(p.name for p in relay.drop().iterdir()) == ["keep.d"], timeout=30,
             what="only keep.d to remain")
    assert (relay.drop() / "keep.d").is_dir()


def test_paramiko_symlink_mkdir_rmdir_are_refused(relay):
    """paramiko symlink, mkdir and rmdir are refused; the drop folder keeps only the upload."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "keep.d").mkdir()
    with _session(relay) as client:
        with client.open("t.part", "w") as fh:
            fh.write(b"x")
        with pytest.raises(PermissionError):
            client.symlink("t.part", "soft.part")
        with pytest.raises(PermissionError):
            client.symlink("/etc/passwd", "passwd.part")
        with pytest.raises(PermissionError):
            client.mkdir("sub")
        with pytest.raises(PermissionError):
            client.rmdir("keep.d")
        assert sorted(p.name for p in _visible(relay.drop())) == ["keep.d", "t.part"]
        assert not (relay.drop() / "t.part").is_symlink()


def test_readlink_of_a_planted_link_is_refused(relay):
    """readlink of a symlink found in the drop folder is refused and does not reveal its target."""
    link, target = _planted_link(relay)
    with _session(relay) as client:
        with pytest.raises(PermissionError) as info:
            client.readlink(link.name)
    assert str(target) not in str(info.value)


def test_planted_link_is_not_followed(relay):
    """A symlink in the drop folder is neither written through nor committed: its target stays untouched."""
    link, target = _planted_link(relay)
    original = target.read_bytes()
    with _session(relay) as client:
        with pytest.raises(OSError):
            with client.open(link.name, "w") as fh:
                fh.write(b"overwritten through the link")
        with pytest.raises(OSError):
            client.rename(link.name, "evil.zip")
    assert target.read_bytes() == original
    assert link.is_symlink()
    assert not relay.ledger_rows("SELECT * FROM packages")


def test_planted_folder_link_does_not_open_a_view_outside(relay):
    """A symlink to a folder, found in the drop folder, does not let the client list or stat what it points to."""
    outside = relay.root / "outside-folder"
    outside.mkdir()
    (outside / "outside-secret.txt").write_text("outside the drop folder\n")
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "linked").symlink_to(outside)
    with _session(relay) as client:
        with pytest.raises(OSError):
            client.listdir("linked")
        with pytest.raises(OSError):
            client.stat("linked/outside-secret.txt")


# -- 5. names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "package.zip.txt", "run.sh", "noextension", "x.zip.bak"])
def test_write_under_other_names_is_refused(relay, name):
    """Writing a file that is neither a package (*.zip) nor a temporary name is refused; nothing is created."""
    with _session(relay) as client:
        with pytest.raises(PermissionError):
            client.open(name, "w")
        assert not (relay.drop() / name).exists()
        assert client.listdir("/") == []


def test_openssh_put_notes_txt_is_refused(relay, tmp_path):
    """OpenSSH `put notes.txt` fails, and no notes.txt exists while the session is still open."""
    local = tmp_path / "notes.txt"
    local.write_text("hello\n")
    listing = tmp_path / "listing.txt"
    result = sftp_batch(relay, [f'-put "{local}" notes.txt', f"!ls -A {relay.drop()} > {listing}"])
    assert result.returncode == 0, result.stderr
    assert "Permission denied" in result.stderr
    assert listing.read_text() == ""


def test_rename_to_other_names_is_refused(relay):
    """A temp file cannot be renamed to a name that is neither a package nor a temporary name."""
    with _session(relay) as client:
        with client.open("x.part", "w") as fh:
            fh.write(b"x")
        with pytest.raises(PermissionError):
            client.rename("x.part", "notes.txt")
        with pytest.raises(PermissionError):
            client.posix_rename("x.part", "notes.txt")
        assert client.listdir("/") == ["x.part"]
        assert sorted(p.name for p in _visible(relay.drop())) == ["x.part"]


# -- 6. authentication ---------------------------------------------------------------


def test_wrong_password_is_refused_and_not_logged(relay):
    """A wrong password is refused, and neither it nor the right one appears in the log."""
    wrong = f"wrong-{uuid.uuid4().hex}"
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, password=wrong)
    log = relay.log_text()
    assert "auth_failed" in log  # the failure is logged...
    assert wrong not in log  # ...without the password
    assert PASSWORD not in log


def test_wrong_password_by_keyboard_interactive_is_refused_and_not_logged(relay):
    """The keyboard-interactive route refuses a wrong password too, and does not log it."""
    wrong = f"wrong-kbd-{uuid.uuid4().hex}"
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_interactive("plateforme", lambda title, instructions, prompts: [wrong for _ in prompts])
        assert not transport.is_authenticated()
    finally:
        transport.close()
    assert wrong not in relay.log_text()


@pytest.mark.parametrize("user, password", [("nobody", PASSWORD), ("root", PASSWORD), ("autre", PASSWORD),
                                            ("plateforme", OTHER_PASSWORD), ("plateforme", "")])
def test_unknown_user_or_other_accounts_password_is_refused(relay, user, password):
    """Unknown users, and one account's password used for another, are refused."""
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, user=user, password=password)


def test_key_not_in_authorized_keys_is_refused(relay, tmp_path):
    """A key no account authorises is refused, by paramiko and by OpenSSH sftp."""
    stranger = _new_key(tmp_path)
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, key=stranger)
    result = sftp_batch(relay, ["pwd"], key=stranger)
    assert result.returncode != 0
    assert "Remote working directory" not in result.stdout


def test_key_of_one_account_does_not_open_another(relay):
    """plateforme's key does not log in as `autre` (which has no key)."""
    with pytest.raises(paramiko.AuthenticationException):
        paramiko_client(relay, user="autre")
    result = sftp_batch(relay, ["pwd"], user="autre")
    assert result.returncode != 0


def _second_auth_with_key(relay, monkeypatch, first_user: str, second_user: str) -> bool:
    """Fail a password login as ``first_user``, then, on the same connection, try the key as ``second_user``.

    paramiko asks for the ssh-userauth service before each attempt, which asyncssh refuses the
    second time; the second attempt therefore sends its USERAUTH_REQUEST directly, as the protocol allows.
    """
    pkey = paramiko.Ed25519Key.from_private_key_file(str(relay.key))
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.AuthenticationException):
            transport.auth_password(first_user, "wrong password")

        def straight_to_request(handler: AuthHandler) -> None:
            accept = Message()
            accept.add_string("ssh-userauth")
            accept.rewind()
            handler._parse_service_accept(accept)

        with monkeypatch.context() as patch:
            patch.setattr(AuthHandler, "_request_auth", straight_to_request)
            try:
                transport.auth_publickey(second_user, pkey)
            except paramiko.AuthenticationException:
                return False
        return transport.is_authenticated()
    finally:
        transport.close()


def test_username_switch_mid_connection_does_not_carry_keys(relay, monkeypatch):
    """After a failed try as plateforme, switching to `autre` on one connection does not accept plateforme's key."""
    # The technique works: the same sequence with the key's own account logs in.
    assert _second_auth_with_key(relay, monkeypatch, "plateforme", "plateforme") is True
    assert _second_auth_with_key(relay, monkeypatch, "plateforme", "autre") is False


# -- 7. no shell, no exec, no forwarding ---------------------------------------------


def test_paramiko_exec_does_not_run(relay, tmp_path):
    """exec of a command is refused: the command does not run (no marker file, no `uid=` output)."""
    marker = tmp_path / f"{_token()}-exec"
    transport = _connected_transport(relay)
    try:
        chan = transport.open_session(timeout=10)
        output = b""
        try:
            chan.exec_command(f"touch {marker}; id")
        except paramiko.SSHException:
            status = None  # the request was refused outright
        else:
            chan.settimeout(10)
            while chunk := chan.recv(4096):
                output += chunk
            status = chan.recv_exit_status()
        assert status is None or status != 0
        assert b"uid=" not in output
        assert not marker.exists()
    finally:
        transport.close()


def test_paramiko_shell_does_not_run(relay, tmp_path):
    """A shell request is refused: nothing typed into it runs."""
    marker = tmp_path / f"{_token()}-shell"
    transport = _connected_transport(relay)
    try:
        chan = transport.open_session(timeout=10)
        output = b""
        try:
            chan.invoke_shell()
        except paramiko.SSHException:
            pass
        else:
            chan.settimeout(10)
            chan.sendall(f"touch {marker}; id; exit\n".encode())
            while chunk := chan.recv(4096):
                output += chunk
        assert b"uid=" not in output
        assert not marker.exists()
    finally:
        transport.close()


def test_direct_tcpip_forwarding_is_refused(relay):
    """A direct-tcpip channel (ssh -L) is refused, and the target port sees no connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(1)
        target = listener.getsockname()
        transport = _connected_transport(relay)
        try:
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("direct-tcpip", target, ("127.0.0.1", 0), timeout=10)
            with pytest.raises(paramiko.ChannelException):
                transport.open_channel("direct-tcpip", ("127.0.0.1", relay.port), ("127.0.0.1", 0), timeout=10)
        finally:
            transport.close()
        with pytest.raises(TimeoutError):
            listener.accept()


def test_remote_forwarding_is_refused(relay):
    """A tcpip-forward request (ssh -R) is refused."""
    transport = _connected_transport(relay)
    try:
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward("127.0.0.1", 0)
    finally:
        transport.close()


def test_openssh_ssh_command_does_not_run(relay, tmp_path):
    """`ssh plateforme@relay 'touch MARKER; id'` fails and runs nothing."""
    marker = tmp_path / f"{_token()}-ssh"
    result = _ssh(relay, "plateforme@127.0.0.1", f"touch {marker}; id")
    assert result.returncode != 0
    assert "uid=" not in result.stdout
    assert not marker.exists()
    # The refusal comes after a successful login: it is the exec that is refused, not the key.
    assert "exec request failed" in result.stderr


def test_openssh_legacy_scp_is_refused(relay, tmp_path):
    """`scp -O` (the legacy protocol, an exec of `scp -t`) cannot upload."""
    scp = require_program("scp")
    token = _token()
    local = tmp_path / REAL_PACKAGE.name
    shutil.copyfile(REAL_PACKAGE, local)
    result = subprocess.run([scp, "-O", "-P", str(relay.port), "-i", str(relay.key), *SSH_OPTIONS,
                             str(local), f"plateforme@127.0.0.1:{token}.zip"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert _find_token(relay, token) == set()
    assert not any(relay.drop().iterdir())
    assert not relay.inbox("90017").exists() or not any(relay.inbox("90017").iterdir())
    assert not relay.ledger_rows("SELECT * FROM packages")


# -- 8. generic errors ---------------------------------------------------------------


def test_refusals_do_not_reveal_server_paths(relay):
    """The error text of every refused operation is generic: no server path in it."""
    relay.drop().mkdir(parents=True, exist_ok=True)
    (relay.drop() / "keep.d").mkdir()
    _planted_link(relay)
    messages = []

    def refused(fn) -> None:
        with pytest.raises(IOError) as info:
            fn()
        messages.append(str(info.value))

    with _session(relay) as client:
        with client.open("x.part", "w") as fh:
            fh.write(b"x")
        refused(lambda: client.open("x.part", "r"))
        refused(lambda: client.open("notes.txt", "w"))
        refused(lambda: client.open("/sub/x.zip", "w"))
        refused(lambda: client.open("/../../tmp/x.zip", "w"))
        refused(lambda: client.open("x.part", "wx"))  # exists already
        refused(lambda: client.open("keep.d", "w"))
        refused(lambda: client.open("evil.part", "w"))  # a symlink
        refused(lambda: client.open("/", "w"))
        refused(lambda: client.mkdir("sub"))
        refused(lambda: client.rmdir("keep.d"))
        refused(lambda: client.chmod("x.part", 0o4777))  # setuid
        refused(lambda: client.symlink("x.part", "l.part"))
        refused(lambda: client.readlink("evil.part"))
        refused(lambda: client.stat("missing.part"))
        refused(lambda: client.stat("/etc/passwd"))
        refused(lambda: client.listdir("/missing"))
        refused(lambda: client.remove("missing.part"))
        refused(lambda: client.remove("keep.d"))
        refused(lambda: client.rename("missing.part", "m.zip"))
        refused(lambda: client.rename("x.part", "notes.txt"))
        refused(lambda: client.putfo(io.BytesIO(b"not a zip"), "garbage.zip"))  # intake rejects it
    assert len(messages) == 21
    root = str(relay.root)
    for message in messages:
        assert root not in message, message
        assert str(Path(root).resolve()) not in message, message
        assert "/var/" not in message and "/drop" not in message and "/tmp" not in message, message
        assert "Traceback" not in message and "Uncaught exception" not in message, message


# -- 9. ciphers ----------------------------------------------------------------------


def test_server_proposes_aes_gcm_first(relay):
    """The server's KEXINIT, as OpenSSH `ssh -vv` shows it, lists aes128-gcm@openssh.com first, both ways."""
    result = _ssh(relay, "-vv", "plateforme@127.0.0.1", "true")
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "peer server KEXINIT proposal" in line)
    proposal = {}
    for line in lines[start + 1:start + 12]:
        for direction in ("ctos", "stoc"):
            if f"ciphers {direction}:" in line:
                proposal[direction] = line.split(":", 2)[-1].strip().split(",")
    assert proposal["ctos"][0] == GCM and proposal["stoc"][0] == GCM, proposal
    weak = [c for c in proposal["ctos"] + proposal["stoc"] if "cbc" in c or "3des" in c or "arcfour" in c
            or c == "none"]
    assert weak == []


def test_paramiko_negotiates_aes_gcm_when_offered(relay):
    """A client that offers AES-GCM (paramiko, GCM first) gets AES-GCM in both directions."""
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    try:
        transport.get_security_options().ciphers = (GCM, "aes128-ctr")
        transport.connect(username="plateforme", password=PASSWORD)
        assert transport.remote_cipher == GCM
        assert transport.local_cipher == GCM
    finally:
        transport.close()


def test_weak_ciphers_are_refused(relay):
    """A client offering only CBC/3DES ciphers cannot connect."""
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    try:
        transport.get_security_options().ciphers = ("aes128-cbc", "aes256-cbc", "3des-cbc")
        with pytest.raises(paramiko.SSHException):
            transport.connect(username="plateforme", password=PASSWORD)
        assert not transport.is_authenticated()
    finally:
        transport.close()


@pytest.mark.parametrize(
    "options",
    [["-o", "KexAlgorithms=diffie-hellman-group14-sha1"], ["-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1"]],
    ids=["sha1-kex", "sha1-mac"],
)
def test_sha1_key_exchange_and_macs_are_refused(relay, options):
    """An OpenSSH client offering only SHA-1 key exchange, or only SHA-1 MACs, cannot connect."""
    result = subprocess.run(
        [require_program("sftp"), "-b", "-", "-P", str(relay.port), "-i", str(relay.key), *options,
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         "plateforme@127.0.0.1"],
        input="ls\n", capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "no matching" in result.stderr


def test_listing_does_not_reveal_host_accounts(relay):
    """`ls -l` shows a neutral owner, not the host's user and group names."""
    import pwd

    with _session(relay) as client:
        with client.open("x.part", "w") as fh:
            fh.write(b"x")
        [entry] = client.listdir_attr("/")
        host_user = pwd.getpwuid(os.getuid()).pw_name
        assert host_user not in entry.longname
        assert "relayd" in entry.longname

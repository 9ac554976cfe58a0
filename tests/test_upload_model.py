"""The upload model against a real relay: one file per handle, no holes, pipelining, names, directory, renames.

Each test drives a real relayd process with paramiko (and OpenSSH ``sftp`` where a user
would) and checks what a user would check: the client's answers, the inbox, the archive
and the ledger.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paramiko
import pytest
from paramiko.message import Message
from paramiko.sftp import CMD_STATUS, CMD_WRITE, SFTP_OK, int64

from conftest import PASSWORD, REAL_PACKAGE, paramiko_client, sftp_batch
from relayd.inbound.uploads import AREA_NAME
from relayd.testkit.samples import SampleSpec, build_package

PACKAGE = REAL_PACKAGE.read_bytes()
GARBAGE = b"\x00garbage written after the commit\x00" * 64
#: where the garbage goes: over the zip's end records, so that the copy it lands in is plainly no zip
TAIL = len(PACKAGE) - len(GARBAGE)


@contextmanager
def _session(relay, **kw) -> Iterator[paramiko.SFTPClient]:
    client = paramiko_client(relay, **kw)
    try:
        yield client
    finally:
        client.close()
        client.get_channel().get_transport().close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inbox_files(relay, insee: str = "90017") -> list[Path]:
    folder = relay.inbox(insee)
    return sorted(folder.iterdir()) if folder.exists() else []


def _archived(relay) -> list[Path]:
    return sorted((relay.root / "var" / "archive").rglob("*.zip"))


def _assert_inbox_is_what_was_verified(relay, expected: list[bytes]) -> None:
    """Inbox and archive hold exactly the accepted packages' bytes, whose sha256 the ledger recorded."""
    accepted = relay.ledger_rows("SELECT sha256, location FROM packages WHERE outcome = 'accepted'")
    assert sorted(r["sha256"] for r in accepted) == sorted(_sha(b) for b in expected)
    for row in accepted:
        assert _sha(Path(row["location"]).read_bytes()) == row["sha256"]
    assert sorted(_sha(p.read_bytes()) for p in _inbox_files(relay)) == sorted(_sha(b) for b in expected)
    assert sorted(_sha(p.read_bytes()) for p in _archived(relay)) == sorted(_sha(b) for b in expected)


def _pipelined_writes(client: paramiko.SFTPClient, handle: bytes, pieces: list[tuple[int, bytes]]) -> list[int]:
    """Send every write before reading any answer, as pipelining clients do; return the status codes."""
    pending = {client._async_request(type(None), CMD_WRITE, handle, int64(off), data) for off, data in pieces}
    codes = []
    while pending:
        t, data = client._read_packet()
        msg = Message(data)
        num = msg.get_int()
        assert t == CMD_STATUS and num in pending
        pending.discard(num)
        client._expecting.pop(num, None)
        codes.append(msg.get_int())
    return codes


def _package(numero: str, **kw) -> bytes:
    return build_package(SampleSpec(numero=numero, demarche="RCO", insee="90017", **kw))


# -- 1. each open for writing gets its own file --------------------------------------


def test_two_handles_in_one_session_cannot_change_a_committed_package(relay):
    """Two handles on X.zip: the second's close commits its own bytes; writes through the first never reach them."""
    with _session(relay) as client:
        first = client.open("X.zip", "w")
        second = client.open("X.zip", "w")
        first.write(PACKAGE)
        first.flush()
        second.write(PACKAGE)
        second.close()  # commits: accepted
        first.seek(TAIL)
        first.write(GARBAGE)
        first.close()  # commits its own, corrupted copy (paramiko ignores the answer to a close)...
        with pytest.raises(OSError, match=r"refused \(zip_invalid\)"):
            client.stat("X.zip")  # ...which was refused, and the accepted one is unchanged
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


def test_extracted_delivery_and_archive_match_what_was_verified(relay):
    """For a commune with extracted delivery: a second handle's writes change neither the files nor the archive."""
    package = build_package(SampleSpec(numero="A-3-EXTRACT1", demarche="RCO", insee="75056"))
    with _session(relay) as client:
        first = client.open("X.zip", "w")
        second = client.open("X.zip", "w")
        first.write(package)
        first.flush()
        second.write(package)
        second.close()
        first.seek(len(package) - len(GARBAGE))
        first.write(GARBAGE)
        first.close()
    [row] = relay.ledger_rows("SELECT sha256 FROM packages WHERE outcome = 'accepted'")
    assert row["sha256"] == _sha(package)
    assert [_sha(p.read_bytes()) for p in _archived(relay)] == [_sha(package)]
    [folder] = _inbox_files(relay, "75056")
    summary = json.loads((folder / "relayd.json").read_text())
    assert summary["package_sha256"] == _sha(package)
    for entry in summary["files"]:
        assert _sha((folder / entry["path"]).read_bytes()) == entry["sha256"], entry["path"]


def test_a_second_channel_cannot_commit_an_open_upload(relay):
    """A second SFTP channel renaming the first's .part commits only what the first closed, never its open handle."""
    transport = paramiko.Transport(("127.0.0.1", relay.port))
    transport.connect(username="plateforme", password=PASSWORD)
    try:
        one = paramiko.SFTPClient.from_transport(transport)
        two = paramiko.SFTPClient.from_transport(transport)
        with one.open("X.zip.part", "w") as fh:
            fh.write(PACKAGE)
        resumed = one.open("X.zip.part", "r+")  # open again for writing, on its own copy
        two.posix_rename("X.zip.part", "X.zip")  # commits the closed file: accepted
        resumed.seek(TAIL)
        resumed.write(GARBAGE)
        resumed.close()
        with pytest.raises(OSError, match=r"refused \(zip_invalid\)"):
            one.posix_rename("X.zip.part", "Y.zip")
        # While a handle is open on it, the name shows nothing another channel could commit.
        writing = one.open("Z.zip.part", "w")
        writing.write(PACKAGE)
        writing.flush()
        with pytest.raises(OSError):
            two.posix_rename("Z.zip.part", "Z.zip")
        writing.close()
    finally:
        transport.close()
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


def test_a_second_connection_cannot_change_a_committed_package(relay):
    """A stale connection still writing after another one committed the name changes nothing in the inbox."""
    with _session(relay) as stale, _session(relay, password=PASSWORD) as fresh:
        with stale.open("X.zip.part", "w") as fh:
            fh.write(PACKAGE)
        still_open = stale.open("X.zip.part", "r+")
        fresh.posix_rename("X.zip.part", "X.zip")
        still_open.seek(TAIL)
        still_open.write(GARBAGE)
        still_open.close()
        with pytest.raises(OSError, match="refused"):
            stale.posix_rename("X.zip.part", "X.zip")
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


def test_a_resumed_upload_goes_on_from_its_own_copy(relay):
    """Half a package, closed; opened again to append (as `reput` does) the rest: one whole package."""
    half = len(PACKAGE) // 2
    with _session(relay) as client:
        with client.open("X.zip.part", "w") as fh:
            fh.write(PACKAGE[:half])
        with client.open("X.zip.part", "a") as fh:
            fh.write(PACKAGE[half:])
        assert client.stat("X.zip.part").st_size == len(PACKAGE)
        client.posix_rename("X.zip.part", "X.zip")
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


def test_a_planted_link_in_place_of_the_upload_area_is_not_followed(relay):
    """A symlink where relayd keeps uploads under way (left by someone on the host) is never written through."""
    outside = relay.root / "outside-folder"
    outside.mkdir()
    (relay.drop() / AREA_NAME).symlink_to(outside)
    with _session(relay) as client:
        with pytest.raises(OSError):
            client.put(str(REAL_PACKAGE), "X.zip.part")
        assert client.listdir("/") == []
    assert list(outside.iterdir()) == []


def test_same_name_in_two_sessions_each_commits_its_own(relay):
    """Two sessions upload X.zip.part at once: each rename commits that session's own bytes, never `No such file`."""
    one_bytes, two_bytes = _package("A-3-SAMENAME1"), _package("A-3-SAMENAME2")
    with _session(relay) as one, _session(relay, password=PASSWORD) as two:
        with one.open("X.zip.part", "w") as fh:
            fh.write(one_bytes)
        with two.open("X.zip.part", "w") as fh:
            fh.write(two_bytes)
        one.posix_rename("X.zip.part", "X.zip")
        two.posix_rename("X.zip.part", "X.zip")
        assert one.stat("X.zip").st_size == len(one_bytes)
        assert two.stat("X.zip").st_size == len(two_bytes)
    _assert_inbox_is_what_was_verified(relay, [one_bytes, two_bytes])


# -- 2 and 3. no holes, pipelined writes ---------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sparse_writes_are_refused_at_once_and_cost_nothing(make_relay):
    """1 byte at 512 MiB - 2, six times: refused at the write with upload_hole, cheaply, and logins go on."""
    relay = make_relay(limits={"max_package_bytes": 1024 * 1024 * 1024})
    before = _cpu_seconds(relay.proc.pid)
    for i in range(6):
        with _session(relay, password=PASSWORD) as client:
            fh = client.open(f"sparse{i}.zip", "w")
            fh.seek(512 * 1024 * 1024 - 2)
            with pytest.raises(OSError, match=r"refused \(upload_hole\)"):
                fh.write(b"x")
                fh.flush()
            fh.close()
            with pytest.raises(OSError, match=r"upload_hole"):
                client.stat(f"sparse{i}.zip")
    spent = _cpu_seconds(relay.proc.pid) - before
    # Six logins and sessions cost well under this; verifying one 512 MiB sparse file took 1.6 s.
    assert spent < 3.0, spent
    assert [q["code"] for q in relay.quarantined()] == ["upload_hole"] * 6
    assert all(q["size"] == 0 for q in relay.quarantined())
    assert _inbox_files(relay) == []


def test_out_of_order_pipelined_writes_are_accepted(relay):
    """Writes of 32 KiB pieces sent all at once, in shuffled order, make a whole package that is accepted."""
    piece = 32 * 1024
    offsets = list(range(0, len(PACKAGE), piece))
    random.Random(7).shuffle(offsets)
    with _session(relay) as client:
        fh = client.open("X.zip", "w")
        codes = _pipelined_writes(client, fh.handle, [(off, PACKAGE[off:off + piece]) for off in offsets])
        assert codes == [SFTP_OK] * len(offsets)
        fh.close()
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


def test_a_hole_still_pending_at_close_is_never_promoted(relay):
    """Every piece but one, then close: refused as upload_hole; nothing reaches the inbox."""
    piece = 32 * 1024
    with _session(relay) as client:
        fh = client.open("X.zip", "w")
        pieces = [(off, PACKAGE[off:off + piece]) for off in range(0, len(PACKAGE), piece) if off != 10 * piece]
        assert _pipelined_writes(client, fh.handle, pieces) == [SFTP_OK] * len(pieces)
        fh.close()
        with pytest.raises(OSError, match=r"refused \(upload_hole\)"):
            client.stat("X.zip")
    assert _inbox_files(relay) == []
    assert [q["code"] for q in relay.quarantined()] == ["upload_hole"]


def test_file_size_counts_against_the_session_budget(make_relay):
    """Rewriting the same bytes does not exhaust the session's budget; growing the file past it does."""
    relay = make_relay(limits={"max_upload_bytes_per_session": 4 * 1024 * 1024})
    with _session(relay) as client:
        with client.open("a.part", "w") as fh:
            for _ in range(3):  # 3 x 3.3 MB written, 3.3 MB of file
                fh.seek(0)
                fh.write(PACKAGE)
        with pytest.raises(OSError, match="session_upload_limit"):
            with client.open("b.part", "w") as fh:
                fh.write(PACKAGE)


# -- 4. the account's directory ------------------------------------------------------


def _with_directory(make_relay, directory: str):
    relay = make_relay(start=False)
    relay.config["accounts"][0]["directory"] = directory
    relay.write_config()
    relay.start()
    return relay


def test_openssh_delivers_into_the_accounts_directory(make_relay, tmp_path):
    """`cd /depot`, `mkdir` of it, `ls` and `put` there work as at the root; a sub-folder stays refused."""
    relay = _with_directory(make_relay, "/depot")
    local = tmp_path / "p.zip"
    shutil.copyfile(REAL_PACKAGE, local)
    result = sftp_batch(relay, ["mkdir /depot", "cd /depot", "pwd", "ls -la", f'put "{local}" X.zip',
                                "-mkdir /depot/sub", f'-put "{local}" /depot/sub/Y.zip', f'-put "{local}" /other/Y.zip'])
    assert result.returncode == 0, result.stderr
    assert "Remote working directory: /depot" in result.stdout
    # The sub-folder's mkdir and the two puts outside the directory.
    assert result.stderr.count("Permission denied") == 3, result.stderr
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])
    assert [r["upload_name"] for r in relay.ledger_rows("SELECT upload_name FROM packages")] == ["X.zip"]


def test_paramiko_sees_the_directory_and_its_parents(make_relay):
    """/srv/depot: stat, listdir, realpath and mkdir of it and its parents succeed; uploads into it are accepted."""
    relay = _with_directory(make_relay, "/srv/depot")
    with _session(relay) as client:
        assert client.listdir("/") == ["srv"]
        assert client.listdir("/srv") == ["depot"]
        assert client.normalize("/srv/depot") == "/srv/depot"
        for folder in ("/", "/srv", "/srv/depot"):
            client.mkdir(folder)  # mkdir -p finds each part there
            assert client.stat(folder).st_mode & 0o170000 == 0o040000
        client.chdir("/srv/depot")
        client.put(str(REAL_PACKAGE), "X.zip.part")
        assert client.listdir(".") == ["X.zip.part"]
        client.posix_rename("X.zip.part", "X.zip")
        for refused in ("/srv/x.zip", "/srv/depot/sub/x.zip", "/elsewhere/x.zip"):
            with pytest.raises(PermissionError):
                client.open(refused, "w")
        with pytest.raises(PermissionError):
            client.mkdir("/srv/other")
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])


# -- 5. temporary names --------------------------------------------------------------


@pytest.mark.parametrize("temporary", ["X.zip.writing", "X.zip.inprogress", "X.zip.upload", ".X.zip", ".in.X.zip.",
                                       "X.ZIP.TMP", "X.zip.Part", "inprogress.X.zip"])
def test_temporary_names_wait_for_their_rename(relay, temporary):
    """Each client's temporary name is taken, not committed at close; the rename to X.ZIP commits once."""
    with _session(relay) as client:
        client.put(str(REAL_PACKAGE), temporary, confirm=False)
        assert client.listdir("/") == [temporary]
        assert _inbox_files(relay) == []
        client.posix_rename(temporary, "X.ZIP")
    _assert_inbox_is_what_was_verified(relay, [PACKAGE])
    assert len(relay.ledger_rows("SELECT * FROM packages")) == 1


def test_temporary_names_follow_the_setting(make_relay):
    """server.temporary_suffixes and temporary_prefixes replace the defaults."""
    relay = make_relay(start=False)
    relay.config["server"]["temporary_suffixes"] = [".wip"]
    relay.config["server"]["temporary_prefixes"] = ["~"]
    relay.write_config()
    relay.start()
    with _session(relay) as client:
        for name in ("X.zip.WIP", "~X.zip"):
            with client.open(name, "w") as fh:
                fh.write(b"x")
        for name in ("X.zip.part", ".X.zip"):
            with pytest.raises(PermissionError):
                client.open(name, "w")
        assert sorted(client.listdir("/")) == ["X.zip.WIP", "~X.zip"]


# -- 7. renames that survive fallbacks -----------------------------------------------


def test_remove_and_rename_again_after_a_refusal_repeat_the_reason(relay):
    """After a refused rename, remove(target) and the rename again both answer with the refusal, not `no such file`."""
    with _session(relay) as client:
        with client.open("X.zip.part", "w") as fh:
            fh.write(b"not a zip at all")
        with pytest.raises(OSError, match=r"refused \(zip_invalid\)"):
            client.rename("X.zip.part", "X.zip")
        with pytest.raises(OSError, match=r"refused \(zip_invalid\)"):
            client.remove("X.zip")
        with pytest.raises(OSError, match=r"refused \(zip_invalid\)"):
            client.rename("X.zip.part", "X.zip")
    assert [q["code"] for q in relay.quarantined()] == ["zip_invalid"]


def test_rename_onto_a_committed_name_is_answered_clearly(relay):
    """The same bytes again under the same name: OK (a resend, recorded as duplicate); other bytes: dossier_conflict."""
    first = _package("A-3-RENAMED1")
    other = _package("A-3-RENAMED1", annex_bytes=1000)
    with _session(relay) as client:
        client.putfo(io.BytesIO(first), "a.part", confirm=False)
        client.rename("a.part", "X.zip")
        client.putfo(io.BytesIO(first), "b.part", confirm=False)
        client.rename("b.part", "X.zip")
        client.putfo(io.BytesIO(other), "c.part", confirm=False)
        with pytest.raises(OSError, match=r"refused \(dossier_conflict\)"):
            client.rename("c.part", "X.zip")
    rows = relay.ledger_rows("SELECT outcome, reason FROM packages ORDER BY id")
    assert [(r["outcome"], r["reason"]) for r in rows] == [("accepted", None), ("duplicate", None),
                                                            ("rejected", "dossier_conflict")]
    _assert_inbox_is_what_was_verified(relay, [first])

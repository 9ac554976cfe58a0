"""Hostile SFTP requests: whatever a client sends, it gets generic text back, and the daemon keeps serving.

Requests are built by hand on paramiko's low-level channel (``_async_request`` and
``_send_packet``), so that NUL bytes, invalid UTF-8, huge lengths and offsets and
malformed packets reach the relay as an attacker would send them.
"""

from __future__ import annotations

import itertools
import re
import struct
import time

import paramiko
import pytest
from paramiko.message import Message
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_EXTENDED,
    CMD_FSETSTAT,
    CMD_FSTAT,
    CMD_LSTAT,
    CMD_MKDIR,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_READLINK,
    CMD_REALPATH,
    CMD_REMOVE,
    CMD_RENAME,
    CMD_RMDIR,
    CMD_SETSTAT,
    CMD_STAT,
    CMD_STATUS,
    CMD_SYMLINK,
    CMD_WRITE,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from conftest import REAL_PACKAGE, paramiko_client
from relayd.testkit.broken import build_broken
from relayd.testkit.samples import SampleSpec

FXF_WRITE_CREAT_TRUNC = 0x02 | 0x08 | 0x10

PATHS = [
    b"a\x00b.zip.part",
    b"\x00",
    b"/\x00/../etc/passwd",
    b"\xff\xfe\xfd.zip",
    b"\xc3\x28.part",
    b"/" * 4096,
    b"x" * 70000 + b".zip",
    b"../" * 2000 + b"etc/passwd",
    b"",
    b".relayd-uploads",
    b".relayd-uploads/w-0",
    b"/.RELAYD-UPLOADS/../x.part",
]

#: what must never reach a client: exception names and texts, tracebacks, internal paths
LEAKS = re.compile(r"Uncaught|Traceback|exception|[A-Z][a-z]+Error\b|embedded null|/tmp/|/var/|relayd\.|\.py\b")


def _attrs(**kw) -> SFTPAttributes:
    attrs = SFTPAttributes()
    for key, value in kw.items():
        setattr(attrs, key, value)
    return attrs


def _requests(handle: bytes) -> list[tuple[int, tuple]]:
    """Every request type, each with every hostile path, plus hostile handles, offsets and lengths."""
    out: list[tuple[int, tuple]] = []
    huge = _attrs(st_size=2**63, st_uid=0, st_gid=0, st_mode=0o7777, st_atime=2**32 - 1, st_mtime=2**32 - 1)
    for path in PATHS:
        out += [
            (CMD_OPEN, (path, FXF_WRITE_CREAT_TRUNC, SFTPAttributes())),
            (CMD_OPEN, (path, 0x01, SFTPAttributes())),
            (CMD_OPENDIR, (path,)),
            (CMD_STAT, (path,)),
            (CMD_LSTAT, (path,)),
            (CMD_SETSTAT, (path, huge)),
            (CMD_RENAME, (path, b"x.zip")),
            (CMD_RENAME, (b"x.part", path)),
            (CMD_REMOVE, (path,)),
            (CMD_MKDIR, (path, SFTPAttributes())),
            (CMD_RMDIR, (path,)),
            (CMD_REALPATH, (path,)),
            (CMD_READLINK, (path,)),
            (CMD_SYMLINK, (path, b"x.part")),
            (CMD_EXTENDED, ("posix-rename@openssh.com", path, b"y.zip")),
            (CMD_EXTENDED, ("hardlink@openssh.com", path, b"y.part")),
            (CMD_EXTENDED, ("statvfs@openssh.com", path)),
            (CMD_EXTENDED, ("lsetstat@openssh.com", path, huge)),
            (CMD_EXTENDED, ("expand-path@openssh.com", path)),
            (CMD_EXTENDED, ("home-directory", path)),
            (CMD_EXTENDED, ("no-such-extension@example.org", path)),
        ]
    bad = b"\x00" * 300
    for h in (handle, bad, b""):
        out += [
            (CMD_WRITE, (h, int64(2**64 - 1), b"x")),
            (CMD_WRITE, (h, int64(2**63), b"x" * 1000)),
            (CMD_WRITE, (h, int64(512 * 1024 * 1024 - 2), b"x")),
            (CMD_READ, (h, int64(0), 2**32 - 1)),
            (CMD_FSTAT, (h,)),
            (CMD_FSETSTAT, (h, huge)),
            (CMD_READDIR, (h,)),
            (CMD_EXTENDED, ("fsync@openssh.com", h)),
            (CMD_EXTENDED, ("fstatvfs@openssh.com", h)),
        ]
    out.append((CMD_CLOSE, (bad,)))
    return out


def _answer(client: paramiko.SFTPClient, num: int) -> tuple[int, str]:
    """Read the answer to request ``num``: its packet type and, for a status, its text."""
    while True:
        t, data = client._read_packet()
        msg = Message(data)
        if msg.get_int() != num:
            continue
        client._expecting.pop(num, None)
        if t != CMD_STATUS:
            return t, ""
        msg.get_int()
        return t, msg.get_string().decode("utf-8", "replace")


def _raw(client: paramiko.SFTPClient, t: int, body: bytes) -> int:
    """Send a request whose body is exactly ``body`` after a fresh request id."""
    num = next(_ids)
    client._send_packet(t, Message(struct.pack(">I", num) + body))
    return num


_ids = itertools.count(1_000_000)


def _malformed() -> list[tuple[int, bytes]]:
    """Packets that lie about their own lengths, or stop short."""
    return [
        (CMD_OPEN, struct.pack(">I", 0xFFFFFFF0) + b"x.zip"),
        (CMD_OPEN, struct.pack(">I", 5) + b"x.zip"),  # no flags, no attributes
        (CMD_WRITE, struct.pack(">I", 4) + b"\x00\x00\x00\x00" + b"\xff" * 8 + struct.pack(">I", 0x7FFFFFFF)),
        (CMD_SETSTAT, struct.pack(">I", 6) + b"x.part" + struct.pack(">I", 0xFFFFFFFF)),
        (CMD_RENAME, struct.pack(">I", 1) + b"a"),
        (CMD_EXTENDED, struct.pack(">I", 0xFFFFFFFF)),
        (CMD_EXTENDED, struct.pack(">I", 24) + b"posix-rename@openssh.com" + struct.pack(">I", 0x80000000)),
        (CMD_REALPATH, b""),
        (250, b"anything"),
    ]


def test_fuzzed_requests_get_generic_answers_and_the_daemon_keeps_serving(relay):
    client = paramiko_client(relay)
    texts: list[str] = []
    deadline = time.monotonic() + 120
    try:
        with client.open("x.part", "w") as fh:
            fh.write(b"x")
        fh = client.open("fuzz.part", "w")
        requests = _requests(fh.handle)
        assert len(requests) < 400  # bounded
        for t, args in requests:
            assert time.monotonic() < deadline, "the fuzz loop is bounded in time"
            num = client._async_request(type(None), t, *args)
            _, text = _answer(client, num)
            texts.append(text)
        for t, body in _malformed():
            assert time.monotonic() < deadline, "the fuzz loop is bounded in time"
            _, text = _answer(client, _raw(client, t, body))
            texts.append(text)
        # The session still works after all of it.
        with client.open("after.part", "w") as after:
            after.write(b"y")
        assert "after.part" in client.listdir("/")
    finally:
        client.close()
        client.get_channel().get_transport().close()
    leaks = sorted({t for t in texts if LEAKS.search(t) or str(relay.root) in t})
    assert leaks == [], leaks
    assert any(t for t in texts)  # the answers were read, not lost
    # And a new connection still delivers.
    again = paramiko_client(relay)
    try:
        again.put(str(REAL_PACKAGE), "X.zip")
    finally:
        again.close()
        again.get_channel().get_transport().close()
    assert len(list(relay.inbox("90017").iterdir())) == 1
    assert relay.proc.poll() is None


@pytest.mark.parametrize("path", [b"a\x00b.part", b"\xff\xfe.zip"])
def test_nul_and_invalid_utf8_paths_never_show_internal_text(relay, path):
    """The issue's own example: lstat of a path with a NUL answered `Uncaught exception: lstat: embedded null...`."""
    client = paramiko_client(relay)
    try:
        for t in (CMD_LSTAT, CMD_STAT, CMD_REALPATH, CMD_OPENDIR):
            _, text = _answer(client, client._async_request(type(None), t, path))
            assert not LEAKS.search(text), text
    finally:
        client.close()
        client.get_channel().get_transport().close()


def _upload(client: paramiko.SFTPClient, name: bytes, data: bytes) -> str:
    """Open, write and close ``name`` as raw bytes; the text of the answer to the close ("" for OK)."""
    _, msg = client._request(CMD_OPEN, name, FXF_WRITE_CREAT_TRUNC, SFTPAttributes())
    handle = msg.get_binary()
    client._request(CMD_WRITE, handle, int64(0), data)
    t, text = _answer(client, client._async_request(type(None), CMD_CLOSE, handle))
    assert t == CMD_STATUS
    return text


def test_a_package_named_in_latin1_gets_its_real_outcome(relay):
    # SFTP v3 names are bytes: a client in Windows-1252 sends "reçu.zip" as re\xe7u.zip. The name went into
    # the ledger and the quarantine's reason file as it was, which UTF-8 cannot encode: an accepted package
    # reached the inbox while the client heard "not kept; send it again", and a refused one was "kept and
    # processed again" until it became an internal error that could not be written either.
    broken = build_broken("document-missing", SampleSpec(numero="A-1-MISSING01"))
    client = paramiko_client(relay)
    try:
        assert _upload(client, b"re\xe7u.zip", REAL_PACKAGE.read_bytes()) == ""
        refused = _upload(client, b"cass\xe9.zip", broken)
    finally:
        client.close()
        client.get_channel().get_transport().close()
    assert refused.startswith("refused (member_missing): ")
    rows = relay.ledger_rows("SELECT outcome, upload_name FROM packages ORDER BY id")
    assert rows == [{"outcome": "accepted", "upload_name": "re\\xe7u.zip"},
                    {"outcome": "rejected", "upload_name": "cass\\xe9.zip"}]
    (reason,) = relay.quarantined()
    assert reason["code"] == "member_missing" and reason["upload_name"] == "cass\\xe9.zip"
    assert len(list(relay.inbox("90017").iterdir())) == 1
    assert list((relay.root / "var" / "staging").iterdir()) == []

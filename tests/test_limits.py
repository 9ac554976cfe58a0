"""Limits and ownership: sessions, sizes, and what lands in the inbox."""

from __future__ import annotations

import grp

import paramiko
import pytest

from conftest import PASSWORD, REAL_PACKAGE, paramiko_client, sftp_put


def test_sessions_beyond_the_limit_are_refused(make_relay):
    relay = make_relay(limits={"max_sessions": 2})
    first = paramiko_client(relay, password=PASSWORD)
    second = paramiko_client(relay, password=PASSWORD)
    with pytest.raises((paramiko.SSHException, EOFError, ConnectionError)):
        paramiko_client(relay, password=PASSWORD)
    assert any(e.get("event") == "sftp.too_many_sessions" for e in relay.events())
    first.close()
    first.get_channel().get_transport().close()
    # A freed slot is usable again.
    import time

    deadline = time.monotonic() + 10
    while True:
        try:
            third = paramiko_client(relay, password=PASSWORD)
            break
        except (paramiko.SSHException, EOFError, ConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert third.listdir("/") == []
    for client in (second, third):
        client.close()
        client.get_channel().get_transport().close()


def test_inbox_group_and_mode_are_forced(make_relay):
    group = "nogroup" if _has_group("nogroup") else "daemon"
    relay = make_relay(communes=[
        {"insee": "90017", "name": "T", "inbox": "inbox/90017", "demarches": ["DAUA"], "file_mode": "0660",
         "group": group},
        {"insee": "75056", "name": "P", "inbox": "inbox/75056", "demarches": ["DAUA"]},
        {"insee": "2A004", "name": "A", "inbox": "inbox/2A004", "demarches": ["ILE"]},
    ])
    assert sftp_put(relay, REAL_PACKAGE, "x.zip").returncode == 0
    st = (relay.inbox("90017") / "A-9-X3UGO4V7-DAUA.zip").stat()
    assert st.st_mode & 0o777 == 0o660
    assert st.st_gid == grp.getgrnam(group).gr_gid


def test_per_session_upload_budget(make_relay, tmp_path):
    relay = make_relay(limits={"max_upload_bytes_per_session": 1024 * 1024})
    client = paramiko_client(relay, password=PASSWORD)
    try:
        with pytest.raises(OSError):
            client.put(str(REAL_PACKAGE), "big.zip")  # 3.3 MB > 1 MiB for the session
    finally:
        client.close()
        client.get_channel().get_transport().close()
    assert not any(relay.inbox("90017").iterdir())
    assert [q["code"] for q in relay.quarantined()] == ["session_upload_limit"]


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False

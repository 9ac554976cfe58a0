"""The return-directory watcher: renamed-in files at once, files written in place once settled, nothing missed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relayd.outbound.watcher import DropWatcher, is_drop_name


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


@pytest.mark.parametrize(
    ("name", "is_drop"),
    [("A-1-AAAAAAAA-recu.xml", True), ("retour.ZIP", True), (".hidden.xml", False), ("x.xml.tmp", False),
     ("x.xml.part", False), ("attestation.pdf", False), ("x.xml~", False)],
)
def test_what_counts_as_a_drop(name, is_drop):
    assert is_drop_name(name) is is_drop


def test_a_renamed_in_file_is_taken_without_waiting_to_settle(tmp_path):
    async def scenario() -> list[Path]:
        watcher = DropWatcher([tmp_path], settle_seconds=3600, rescan_seconds=3600)
        watcher.start()
        try:
            (tmp_path / ".a.xml.tmp").write_text("<x/>")
            os.rename(tmp_path / ".a.xml.tmp", tmp_path / "a.xml")
            return await watcher.next_batch()
        finally:
            watcher.stop()

    assert run(scenario()) == [tmp_path / "a.xml"]


def test_a_file_written_in_place_waits_until_it_stops_changing(tmp_path):
    async def scenario() -> tuple[list[Path], int]:
        watcher = DropWatcher([tmp_path], settle_seconds=0.6, rescan_seconds=3600)
        watcher.start()
        target = tmp_path / "slow.xml"
        try:
            batch_task = asyncio.create_task(watcher.next_batch())
            with open(target, "wb") as fh:
                for _ in range(5):  # a slow writer: a chunk every 0.3 s, each before the file could settle
                    fh.write(b"<chunk/>")
                    fh.flush()
                    await asyncio.sleep(0.3)
                    assert not batch_task.done(), "taken while still being written"
            batch = await batch_task
            return batch, target.stat().st_size
        finally:
            watcher.stop()

    batch, size = run(scenario())
    assert batch == [tmp_path / "slow.xml"] and size == 5 * len(b"<chunk/>")


def test_without_events_the_scan_still_finds_everything(tmp_path):
    # No observer at all, as after an inotify overflow: the scan is the truth.
    for i in range(50):
        (tmp_path / f"{i:02d}.xml").write_text("<x/>")

    async def scenario() -> list[Path]:
        watcher = DropWatcher([tmp_path], settle_seconds=0.1, rescan_seconds=0.2)
        return await watcher.next_batch()

    assert sorted(p.name for p in run(scenario())) == [f"{i:02d}.xml" for i in range(50)]


def test_each_drop_is_handed_out_once_until_released(tmp_path):
    (tmp_path / "a.xml").write_text("<x/>")

    async def scenario() -> tuple[list[Path], list[Path]]:
        watcher = DropWatcher([tmp_path], settle_seconds=0, rescan_seconds=0.2)
        first = await watcher.next_batch()
        (tmp_path / "b.xml").write_text("<y/>")
        second = await watcher.next_batch()
        watcher.release(tmp_path / "a.xml", after=0.1)
        third = await watcher.next_batch()
        return first, second + third

    first, later = run(scenario())
    assert first == [tmp_path / "a.xml"]
    assert later == [tmp_path / "b.xml", tmp_path / "a.xml"]


def test_oldest_first(tmp_path):
    for i, name in enumerate(["c.xml", "a.xml", "b.xml"]):
        path = tmp_path / name
        path.write_text("<x/>")
        os.utime(path, ns=(1_000_000_000 * (i + 1), 1_000_000_000 * (i + 1)))

    async def scenario() -> list[Path]:
        return await DropWatcher([tmp_path], settle_seconds=0, rescan_seconds=1).next_batch()

    assert [p.name for p in run(scenario())] == ["c.xml", "a.xml", "b.xml"]


def test_a_file_that_is_no_drop_is_reported_once_after_a_while(tmp_path):
    from structlog.testing import capture_logs

    (tmp_path / "attestation.pdf").write_bytes(b"%PDF-1.4 an attachment whose status file never came")
    (tmp_path / ".being-written.xml.tmp").write_text("<x")

    async def scenario() -> None:
        watcher = DropWatcher([tmp_path], settle_seconds=0, rescan_seconds=0.05, stray_after_seconds=0.2)
        (tmp_path / "late.xml").write_text("<x/>")
        await watcher.next_batch()
        await asyncio.sleep(0.3)
        (tmp_path / "later.xml").write_text("<x/>")
        await watcher.next_batch()
        await asyncio.sleep(0.1)
        (tmp_path / "latest.xml").write_text("<x/>")
        await watcher.next_batch()

    with capture_logs() as logs:
        run(scenario())
    strays = [e for e in logs if e["event"] == "watcher.stray_file"]
    assert [Path(e["file"]).name for e in strays] == ["attestation.pdf"]

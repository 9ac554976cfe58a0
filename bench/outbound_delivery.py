"""Outbound delivery: acks and return packages published on the return server, against OpenSSH's sftp.

The reference is OpenSSH's ``sftp`` client in batch mode pushing the same files to the same
OpenSSH ``sshd`` (internal-sftp, loopback, its own host key) with the same publish pattern,
in one session::

    put f dir/f.part
    rename dir/f.part dir/f      (OpenSSH's sftp uses posix-rename@openssh.com when offered)

relayd's side is :class:`relayd.outbound.sftp_client.ReturnServerClient` (one reused connection,
pinned by the host key's fingerprint), which per file also stats the final name before and after
and fsyncs the ``.part`` on the server. Both sides use the cipher relayd negotiates. The figure
that matters is the ratio

    relayd speed / reference speed  =  reference seconds / relayd seconds   (higher is better)

Both sides' times include their SSH session's setup and close (for the reference, starting
the sftp and ssh processes too). Cases, each a median of ``--runs`` runs, the side that goes
first alternating from one run to the next:

1. small files (~2 KiB, like an AVL), delivered with ``ReturnServerClient.deliver``;
2. files of ~1 MiB (a Retour with an attestation), the same way;
3. end to end through the outbox: the small files queued in an ``Outbox`` on a real ledger
   (untimed), then delivered by ``DeliveryWorker.deliver_due()``, which adds to each delivery
   the ledger writes (SQLite, synchronous=FULL) and the move to the archive (fsynced).

The session setup alone (an empty sftp batch; relayd's connection and SFTP session) is measured
too, so that the cost per file can be shown without it. ``--profile`` then runs relayd once more
per case and splits its wall time by SFTP operation and by outbox step.

Every wait is bounded; nothing leaves 127.0.0.1; sshd and the temporary folder are removed
whatever happens. Durations are measured here and never asserted in tests.

    .venv/bin/python -m bench.outbound_delivery [--quick] [--runs 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.inbound_throughput import client_key, start_sshd  # noqa: E402
from relayd.config import ReturnServer  # noqa: E402
from relayd.ledger import Ledger  # noqa: E402
from relayd.logs import configure_logging  # noqa: E402
from relayd.outbound.delivery import DeliveryWorker  # noqa: E402
from relayd.outbound.outbox import Outbox, Queued  # noqa: E402
from relayd.outbound.sftp_client import ReturnServerClient  # noqa: E402
from relayd.pec.replies import ReplyPackage  # noqa: E402

#: the longest one side of one run may take (seconds): a hung peer ends the benchmark, not the machine
RUN_TIMEOUT = 300.0
SMALL_BYTES = 2 * 1024
LARGE_BYTES = 1024 * 1024

RelaydRun = Callable[["Context", list[Path], Path, int], Awaitable[tuple[float, int]]]


@dataclass
class Case:
    title: str
    files: list[Path]
    relayd: RelaydRun
    ref_times: list[float] = field(default_factory=list)
    #: the reference with ``put -f``, where relayd's side is ReturnServerClient alone (cases 1 and 2)
    fsync_ref: bool = False
    ref_fsync_times: list[float] = field(default_factory=list)
    relayd_times: list[float] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)


@dataclass
class Context:
    work: Path
    dest: Path
    port: int
    user: str
    key: Path
    server: ReturnServer
    cipher: str | None = None
    deadline: float = 0.0


# -- the files -------------------------------------------------------------------------


def make_files(folder: Path, count: int, size: int, kind: str) -> list[Path]:
    """``count`` incompressible files named as relayd names its replies (zips do not compress)."""
    folder.mkdir()
    files = []
    for i in range(count):
        path = folder / f"relayd.20260126T140305.A-9-B{i:07d}-recensementCitoyen.{kind}.{i:012x}.zip"
        path.write_bytes(os.urandom(size))
        files.append(path)
    return files


def check_landed(remote_dir: Path, files: list[Path]) -> None:
    """Every file is there under its final name with its size, and no ``.part`` is left."""
    names = sorted(p.name for p in remote_dir.iterdir())
    expected = sorted(f.name for f in files)
    if names != expected:
        raise RuntimeError(f"{remote_dir}: {len(names)} entries, expected {len(expected)} final names")
    for f in files:
        if (remote_dir / f.name).stat().st_size != f.stat().st_size:
            raise RuntimeError(f"{remote_dir / f.name}: wrong size")


# -- the reference ---------------------------------------------------------------------


def reference_push(ctx: Context, files: list[Path], remote_dir: Path | None, *, fsync: bool = False) -> float:
    """OpenSSH sftp, one session: put each file as .part, then rename it. Returns seconds (no files: the session alone).

    With ``fsync``, ``put -f`` asks the server for fsync@openssh.com after each upload, as relayd does.
    """
    put = "put -f" if fsync else "put"
    lines = []
    for f in files:
        part, final = f"{remote_dir}/{f.name}.part", f"{remote_dir}/{f.name}"
        lines += [f'{put} "{f}" "{part}"', f'rename "{part}" "{final}"']
    batch = ctx.work / "batch.sftp"
    batch.write_text("".join(line + "\n" for line in lines))
    cipher = ["-c", ctx.cipher] if ctx.cipher else []
    cmd = ["sftp", "-q", "-b", str(batch), "-P", str(ctx.port), "-i", str(ctx.key), *cipher,
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
           "-o", "IdentitiesOnly=yes", f"{ctx.user}@127.0.0.1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    # Not run(timeout=...): a wait with a timeout polls with sleeps of up to 50 ms, which would be
    # measured too. A blocking wait, and a watchdog that kills sftp if it hangs.
    watchdog = threading.Timer(RUN_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        code = proc.wait()
    except BaseException:  # SIGTERM or Ctrl-C while sftp runs: it goes too
        proc.kill()
        proc.wait(timeout=30)
        raise
    finally:
        watchdog.cancel()
    elapsed = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"sftp exited with {code}")
    return elapsed


# -- relayd ----------------------------------------------------------------------------


async def relayd_client_push(ctx: Context, files: list[Path], remote_dir: Path, run: int) -> tuple[float, int]:
    """ReturnServerClient.deliver for each file on a fresh client (so its handshake counts), then close."""
    client = ReturnServerClient(ctx.server)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            for f in files:
                await client.deliver(f, f.name, remote_dir=str(remote_dir))
    finally:
        await client.close()
    return time.perf_counter() - start, client.connections_opened


async def relayd_session_only(ctx: Context) -> float:
    """relayd's connection and SFTP session, opened and closed with nothing delivered."""
    client = ReturnServerClient(ctx.server)
    start = time.perf_counter()
    try:
        async with asyncio.timeout(RUN_TIMEOUT):
            await client._session()  # noqa: SLF001 - the setup deliver() does before its first file
    finally:
        await client.close()
    return time.perf_counter() - start


async def relayd_outbox_push(ctx: Context, files: list[Path], remote_dir: Path, run: int) -> tuple[float, int]:
    """Queue every file in an Outbox on a fresh ledger (untimed), then time DeliveryWorker.deliver_due()."""
    root = ctx.work / f"relayd-outbox-{run}-{time.monotonic_ns()}"
    ledger = Ledger(root / "ledger.sqlite")
    server = ctx.server.model_copy(update={"remote_dir": str(remote_dir), "acks_dir": None})
    try:
        outbox = Outbox(ledger, root / "outbox", root / "archive" / "sent", server.retry)
        for i, f in enumerate(files):
            # A distinct dossier each, as acks for many dossiers: none waits behind another.
            reply = ReplyPackage(message_id=f"BENCH-{run}-{i}", name=f.name, kind="AVL", data=f.read_bytes())
            outbox.enqueue(reply, Queued(kind="AVL", numero=f"A-9-B{i:07d}", source="bench"))
        worker = DeliveryWorker(outbox, server)
        assert worker.client is not None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(RUN_TIMEOUT):
                delivered = await worker.deliver_due()
        finally:
            await worker.client.close()
        elapsed = time.perf_counter() - start
        left = outbox.entries(("pending", "dead"))
        if delivered != len(files) or left:
            raise RuntimeError(f"outbox: {delivered} delivered, {len(left)} left ({left[0].last_error if left else ''})")
        archived = sum(1 for _ in (root / "archive").rglob("*.zip"))
        if archived != len(files) or any((root / "outbox").iterdir()):
            raise RuntimeError(f"outbox: {archived} files archived, expected {len(files)}")
        return elapsed, worker.client.connections_opened
    finally:
        ledger.close()
        shutil.rmtree(root, ignore_errors=True)


# -- where relayd's time goes (--profile) ------------------------------------------------


@contextlib.contextmanager
def breakdown() -> Iterator[dict[str, list[float]]]:
    """Wall time per SFTP operation, per hop to a thread and per outbox step, while the block runs.

    Wall time, not CPU: a delivery mostly waits, one round trip after another. The wrappers are
    removed on the way out.
    """
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def note(key: str, start: float) -> None:
        acc[key][0] += 1
        acc[key][1] += time.perf_counter() - start

    orig_op, orig_thread = ReturnServerClient._op, asyncio.to_thread
    orig_delivered, orig_due = Outbox.delivered, Outbox.due

    async def op(self: ReturnServerClient, awaitable: Awaitable[Any], what: str) -> Any:
        start = time.perf_counter()
        try:
            return await orig_op(self, awaitable, what)
        finally:
            verb = what.split()[0]
            note("sftp session start (after the handshake)" if verb == "start" else f"sftp {verb}", start)

    async def to_thread(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await orig_thread(func, *args, **kwargs)
        finally:
            note(f"asyncio.to_thread({getattr(func, '__qualname__', func)}), in all", start)

    def timed(orig: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                note(key, start)
        wrapper.__qualname__ = orig.__qualname__
        return wrapper

    ReturnServerClient._op = op  # type: ignore[method-assign]
    asyncio.to_thread = to_thread
    Outbox.delivered = timed(orig_delivered, "  of which Outbox.delivered (ledger + archive)")  # type: ignore[method-assign]
    Outbox.due = timed(orig_due, "  of which Outbox.due")  # type: ignore[method-assign]
    try:
        yield acc
    finally:
        ReturnServerClient._op = orig_op  # type: ignore[method-assign]
        asyncio.to_thread = orig_thread
        Outbox.delivered, Outbox.due = orig_delivered, orig_due  # type: ignore[method-assign]


async def profile_relayd(ctx: Context, cases: list[Case]) -> None:
    for i, case in enumerate(cases, 1):
        remote = ctx.dest / f"profile-{i}"
        remote.mkdir()
        with breakdown() as acc:
            elapsed, _ = await case.relayd(ctx, case.files, remote, 100 + i)
        check_landed(remote, case.files)
        shutil.rmtree(remote)
        n = len(case.files)
        print(f"\nwhere relayd's time goes, case {case.title}: {elapsed:.2f} s wall, {elapsed / n * 1000:.2f} ms per file")
        for key, (count, total) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
            print(f"  {key:<62} {int(count):5d} x {total / count * 1e6:6.0f} us = {total / n * 1000:5.2f} ms per file")


# -- running ---------------------------------------------------------------------------


async def warm_up(ctx: Context, sample: Path) -> None:
    """One untimed delivery per side (imports, key loading, page cache); learn relayd's cipher for the reference."""
    remote = ctx.dest / "warmup-relayd"
    remote.mkdir()
    client = ReturnServerClient(ctx.server)
    try:
        await asyncio.wait_for(client.deliver(sample, sample.name, remote_dir=str(remote)), RUN_TIMEOUT)
        conn = client._conn  # noqa: SLF001 - a benchmark may look at which cipher was negotiated
        ctx.cipher = conn.get_extra_info("send_cipher") if conn is not None else None
    finally:
        await client.close()
    remote = ctx.dest / "warmup-ref"
    remote.mkdir()
    reference_push(ctx, [sample], remote)


def check_time(ctx: Context) -> None:
    if time.monotonic() > ctx.deadline:
        raise RuntimeError("the benchmark ran past --max-seconds")


async def run_case(ctx: Context, case: Case, runs: int, tag: str) -> None:
    for run in range(runs):
        check_time(ctx)
        sides = ["ref", "relayd", "ref_fsync"] if case.fsync_ref else ["ref", "relayd"]
        shift = run % len(sides)  # each side takes its turn at going first
        for side in sides[shift:] + sides[:shift]:
            remote = ctx.dest / f"{tag}-{side}-{run}"
            remote.mkdir()
            if side == "ref":
                case.ref_times.append(reference_push(ctx, case.files, remote))
            elif side == "ref_fsync":
                case.ref_fsync_times.append(reference_push(ctx, case.files, remote, fsync=True))
            else:
                elapsed, conns = await case.relayd(ctx, case.files, remote, run)
                case.relayd_times.append(elapsed)
                case.connections.append(conns)
            check_landed(remote, case.files)
            shutil.rmtree(remote)


async def session_setup(ctx: Context, runs: int) -> tuple[float, float]:
    """Median seconds of a session with nothing sent: (reference, relayd)."""
    ref, rel = [], []
    for run in range(runs):
        check_time(ctx)
        if run % 2 == 0:
            ref.append(reference_push(ctx, [], None))
            rel.append(await relayd_session_only(ctx))
        else:
            rel.append(await relayd_session_only(ctx))
            ref.append(reference_push(ctx, [], None))
    return statistics.median(ref), statistics.median(rel)


def print_table(cases: list[Case], runs: int, setup: tuple[float, float]) -> None:
    print(f"\nmedians of {runs} runs; ratio = relayd speed / reference speed (higher is better)\n")
    cols = ["case", "reference", "relayd", "ratio", "ref files/s", "relayd files/s", "relayd conns"]
    widths = [44, 9, 8, 5, 11, 14, 12]
    print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for case in cases:
        ref, rel = statistics.median(case.ref_times), statistics.median(case.relayd_times)
        n = len(case.files)
        cells = [case.title, f"{ref:.2f} s", f"{rel:.2f} s", f"{ref / rel:.2f}", f"{n / ref:.0f}", f"{n / rel:.0f}",
                 "/".join(str(c) for c in case.connections)]
        print("| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |")
    print()
    for case in cases:
        print(f"  {case.title}: reference {', '.join(f'{t:.2f}' for t in case.ref_times)} s;"
              f" relayd {', '.join(f'{t:.2f}' for t in case.relayd_times)} s")
    ref_setup, rel_setup = setup
    print(f"\nsession alone (nothing sent): reference {ref_setup * 1000:.0f} ms (sftp and ssh processes, handshake),"
          f" relayd {rel_setup * 1000:.0f} ms (handshake, SFTP session)")
    print("cost per file without the session (median time minus session alone, / files):")
    for case in cases:
        n, ref_total = len(case.files), statistics.median(case.ref_times)
        if ref_total < 1.25 * ref_setup:
            print(f"  {case.title:<44} too few files to tell the session from the files apart")
            continue
        ref = (ref_total - ref_setup) / n
        rel = (statistics.median(case.relayd_times) - rel_setup) / n
        print(f"  {case.title:<44} reference {ref * 1000:5.2f} ms, relayd {rel * 1000:5.2f} ms, ratio {ref / rel:.2f}")
    print("the reference with `put -f` (fsync@openssh.com on the server after each upload, as relayd does):")
    for case in cases:
        if case.ref_fsync_times:
            ref, rel = statistics.median(case.ref_fsync_times), statistics.median(case.relayd_times)
            runs = ", ".join(f"{t:.2f}" for t in case.ref_fsync_times)
            per_file = (ref - ref_setup) / len(case.files) * 1000
            tail = f", {per_file:.2f} ms per file without the session" if ref >= 1.25 * ref_setup else ""
            print(f"  {case.title:<44} {ref:.2f} s ({runs}), ratio {ref / rel:.2f}{tail}")


async def amain(args: argparse.Namespace, work: Path, procs: list[subprocess.Popen]) -> int:
    key_path, pubkey = client_key(work)
    sshd, port, dest = start_sshd(work, pubkey)
    procs.append(sshd)
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(work / "sshd_host_key.pub")],
                                 check=True, capture_output=True, text=True, timeout=30).stdout.split()[1]
    server = ReturnServer(host="127.0.0.1", port=port, username=pwd.getpwuid(os.getuid()).pw_name, private_key=key_path,
                          host_key_fingerprints=[fingerprint], remote_dir=str(dest), operation_timeout_seconds=60)
    ctx = Context(work=work, dest=dest, port=port, user=server.username, key=key_path, server=server,
                  deadline=time.monotonic() + args.max_seconds)

    n_small, n_large, n_outbox = (40, 10, 40) if args.quick else (200, 50, 200)
    small = make_files(work / "small", max(n_small, n_outbox), SMALL_BYTES, "AVL")
    large = make_files(work / "large", n_large, LARGE_BYTES, "Retour")
    cases = [
        Case(f"1. {n_small} files of 2 KiB (AVL)", small[:n_small], relayd_client_push, fsync_ref=True),
        Case(f"2. {n_large} files of 1 MiB (Retour)", large, relayd_client_push, fsync_ref=True),
        Case(f"3. {n_outbox} x 2 KiB, Outbox + DeliveryWorker", small[:n_outbox], relayd_outbox_push),
    ]
    await warm_up(ctx, small[0])
    print(f"sshd 127.0.0.1:{port} (internal-sftp), cipher {ctx.cipher} on both sides, {os.cpu_count()} CPUs")
    for i, case in enumerate(cases, 1):
        await run_case(ctx, case, args.runs, f"case{i}")
    setup = await session_setup(ctx, args.runs)
    print_table(cases, args.runs, setup)
    bad = [c.title for c in cases if any(n != 1 for n in c.connections)]
    print(f"\nrelayd connections opened per run: {'1 in every run (reused)' if not bad else 'NOT 1 in ' + ', '.join(bad)}")
    if args.profile:
        await profile_relayd(ctx, cases)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 small files, 10 large, 40 through the outbox")
    parser.add_argument("--runs", type=int, default=3, help="runs per case and side; the median is shown (1 to 15)")
    parser.add_argument("--max-seconds", type=float, default=1200, help="stop starting runs after this long")
    parser.add_argument("--profile", action="store_true", help="then split one more relayd run per case by operation")
    args = parser.parse_args()
    if not 1 <= args.runs <= 15:
        parser.error("--runs must be between 1 and 15")
    # relayd logs at info, as the daemon does by default: the lines go nowhere, their cost stays.
    configure_logging("json", "info")
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed in the finally below
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sink)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally below

    signal.signal(signal.SIGTERM, stop)
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-out-"))
    procs: list[subprocess.Popen] = []
    try:
        return asyncio.run(amain(args, work, procs))
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        sink.close()


if __name__ == "__main__":
    raise SystemExit(main())

"""Outbound delivery: acks and return packages published on the return server, against OpenSSH's sftp.

The reference is OpenSSH's ``sftp`` client in batch mode pushing the same files to the same
OpenSSH ``sshd`` (internal-sftp, loopback, its own host key) with the same publish pattern,
in one session::

    put f dir/f.part
    rename dir/f.part dir/f      (OpenSSH's sftp uses posix-rename@openssh.com when offered)

relayd's side is :class:`relayd.outbound.sftp_client.ReturnServerClient` (one reused connection,
pinned by the host key's fingerprint), which per file also stats the final name before and after
and fsyncs the ``.part`` on the server. The figure that matters is the ratio

    relayd speed / reference speed  =  reference seconds / relayd seconds   (higher is better)

Both sides' times include their SSH handshake and the session's close. Cases (medians of
``--runs`` runs, the side that goes first alternating from one run to the next):

1. small files (~2 KiB, like an AVL), delivered with ``ReturnServerClient.deliver``;
2. files of ~1 MiB (a Retour with an attestation), the same way;
3. end to end through the outbox: the small files queued in an ``Outbox`` on a real ledger
   (untimed), then delivered by ``DeliveryWorker.deliver_due()``, which adds the ledger writes
   (SQLite, synchronous=FULL) and the moves to the archive (fsynced) to each delivery.

Every wait is bounded; nothing leaves 127.0.0.1; sshd and the temporary folder are removed
whatever happens. Durations are measured here and never asserted in tests.

    .venv/bin/python -m bench.outbound_delivery [--quick] [--runs 3] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import logging
import os
import pstats
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class Case:
    title: str
    files: list[Path]
    relayd: Callable[..., object]  # async (ctx, files, remote_dir, run) -> connections opened
    ref_times: list[float] = field(default_factory=list)
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
        path = folder / f"relayd.20260126T140305.A-9-B{i:07d}-RCO.{kind}.{i:012x}.zip"
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


def reference_push(ctx: Context, files: list[Path], remote_dir: Path) -> float:
    """OpenSSH sftp, one session: put each file as .part, then rename it. Returns seconds."""
    lines = []
    for f in files:
        part, final = f"{remote_dir}/{f.name}.part", f"{remote_dir}/{f.name}"
        lines += [f'put "{f}" "{part}"', f'rename "{part}" "{final}"']
    batch = ("\n".join(lines) + "\n").encode()
    cipher = ["-c", ctx.cipher] if ctx.cipher else []
    cmd = ["sftp", "-q", "-b", "-", "-P", str(ctx.port), "-i", str(ctx.key), *cipher,
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
           "-o", "IdentitiesOnly=yes", f"{ctx.user}@127.0.0.1"]
    start = time.perf_counter()
    subprocess.run(cmd, input=batch, check=True, stdout=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    return time.perf_counter() - start


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
        archived = sum(1 for p in (root / "archive").rglob("*.zip"))
        if archived != len(files) or any((root / "outbox").iterdir()):
            raise RuntimeError(f"outbox: {archived} files archived, expected {len(files)}")
        return elapsed, worker.client.connections_opened
    finally:
        ledger.close()
        shutil.rmtree(root, ignore_errors=True)


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


async def run_case(ctx: Context, case: Case, runs: int, tag: str) -> None:
    for run in range(runs):
        if time.monotonic() > ctx.deadline:
            raise RuntimeError("the benchmark ran past --max-seconds")
        sides = ["ref", "relayd"] if run % 2 == 0 else ["relayd", "ref"]
        for side in sides:
            remote = ctx.dest / f"{tag}-{side}-{run}"
            remote.mkdir()
            if side == "ref":
                case.ref_times.append(reference_push(ctx, case.files, remote))
            else:
                elapsed, conns = await case.relayd(ctx, case.files, remote, run)
                case.relayd_times.append(elapsed)
                case.connections.append(conns)
            check_landed(remote, case.files)
            shutil.rmtree(remote)


async def profile_relayd(ctx: Context, cases: list[Case]) -> None:
    """One more relayd run per case under cProfile: where the time goes (the wall time, not CPU, is what differs)."""
    for i, case in enumerate(cases, 1):
        remote = ctx.dest / f"profile-{i}"
        remote.mkdir()
        prof = cProfile.Profile()
        prof.enable()
        elapsed, _ = await case.relayd(ctx, case.files, remote, 99)
        prof.disable()
        shutil.rmtree(remote)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        print(f"\n--- profile, case {i} ({case.title}): {elapsed:.2f} s wall, "
              f"{sum(v[2] for v in stats.stats.values()):.2f} s in Python functions (tottime sum) ---")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip() and not line.startswith("   Ordered")))


def print_table(cases: list[Case], runs: int) -> None:
    print(f"\nmedians of {runs} runs; ratio = relayd speed / reference speed (higher is better)\n")
    head = f"| {'case':<44} | {'reference':>9} | {'relayd':>8} | {'ratio':>5} | {'ref files/s':>11} | {'relayd files/s':>14} | {'conns':>5} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for case in cases:
        ref, rel = statistics.median(case.ref_times), statistics.median(case.relayd_times)
        n = len(case.files)
        conns = "/".join(str(c) for c in case.connections)
        print(f"| {case.title:<44} | {ref:8.2f}s | {rel:7.2f}s | {ref / rel:5.2f} | {n / ref:11.0f} | {n / rel:14.0f} | {conns:>5} |")
    for case in cases:
        print(f"  {case.title}: reference {', '.join(f'{t:.2f}' for t in case.ref_times)} s;"
              f" relayd {', '.join(f'{t:.2f}' for t in case.relayd_times)} s")


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
        Case(f"1. {n_small} files of 2 KiB (AVL)", small[:n_small], relayd_client_push),
        Case(f"2. {n_large} files of 1 MiB (Retour)", large, relayd_client_push),
        Case(f"3. {n_outbox} x 2 KiB via Outbox + DeliveryWorker", small[:n_outbox], relayd_outbox_push),
    ]
    await warm_up(ctx, small[0])
    print(f"sshd 127.0.0.1:{port} (internal-sftp), cipher {ctx.cipher} on both sides, {os.cpu_count()} CPUs")
    for i, case in enumerate(cases, 1):
        await run_case(ctx, case, args.runs, f"case{i}")
    print_table(cases, args.runs)
    bad = [c.title for c in cases if any(n != 1 for n in c.connections)]
    print(f"\nrelayd connections opened per run: {'1 everywhere (reused)' if not bad else 'NOT 1 in ' + ', '.join(bad)}")
    if args.profile:
        await profile_relayd(ctx, cases)
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 small, 10 large, 40 through the outbox")
    parser.add_argument("--runs", type=int, default=3, help="runs per case and side (the median is shown)")
    parser.add_argument("--max-seconds", type=float, default=1200, help="give up once the runs have taken this long")
    parser.add_argument("--profile", action="store_true", help="then profile one more relayd run per case")
    args = parser.parse_args()
    if args.runs < 1 or args.runs > 15:
        parser.error("--runs must be between 1 and 15")
    # relayd logs at info as the daemon does by default; the lines go nowhere, their cost stays.
    configure_logging("json", "info")
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed in the finally below
    logging.getLogger().handlers[0].setStream(sink)  # type: ignore[attr-defined]

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

"""Inbound throughput: one large package, end to end into the inbox, against OpenSSH's sshd.

The reference is sshd with internal-sftp receiving the same file from the same OpenSSH
client in the same run. The figure that matters is the ratio

    sshd receive time / relayd end-to-end time   (the target is >= 0.9)

relayd's time includes verification (CRCs, hashing), the hand-over into the inbox with
fsync, and the archive's independent copy. That copy is a second write of the whole package
on a file system without reflinks (ext4), and nearly free on one with them (XFS, btrfs):
``--storage`` puts both sides' files on the file system to measure. ``--baseline-tree`` runs
a second relayd from another checkout (e.g. ``git worktree add /tmp/old <rev>``) in the same
rounds, so that a change is measured against what it replaces on the same machine at the same
time. Durations are measured here and never asserted in tests.

    .venv/bin/python bench/inbound_throughput.py [--mib 200] [--rounds 3] [--cipher aes128-gcm@openssh.com]
                                                 [--storage DIR] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from relayd.inbound.passwords import hash_password  # noqa: E402
from relayd.testkit.samples import SampleSpec, build_package  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_sshd(work: Path, pubkey: str) -> tuple[subprocess.Popen, int, Path]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    port = free_port()
    host_key = work / "sshd_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    auth = work / "sshd_authorized_keys"
    auth.write_text(pubkey + "\n")
    auth.chmod(0o600)
    dest = work / "sshd_dest"
    dest.mkdir()
    conf = work / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {work}/sshd.pid\n"
        f"AuthorizedKeysFile {auth}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port, dest


def start_relay(work: Path, pubkey: str, tree: Path | None = None, name: str = "relay"
                ) -> tuple[subprocess.Popen, int, Path]:
    """A relayd on a free port, from this checkout or from ``tree``; its process, port and inbox."""
    port = free_port()
    root = work / name
    root.mkdir()
    config = {
        "server": {"listen": {"host": "127.0.0.1", "port": port}},
        "storage": {"root": "var"},
        "limits": {"max_package_bytes": 4 * 1024**3},
        "accounts": [{"username": "plateforme", "password_hash": hash_password("unused"),
                      "authorized_keys": [pubkey], "communes": ["90017"]}],
        "communes": [{"insee": "90017", "name": "bench", "inbox": "inbox", "demarches": ["recensementCitoyen"]}],
        "logging": {"format": "json", "level": "warning"},
    }
    (root / "relayd.yaml").write_text(yaml.safe_dump(config))
    source = tree or Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(root / "relayd.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=source)
    wait_port(port)
    return proc, port, root / "inbox"


def client_key(work: Path) -> tuple[Path, str]:
    """A fresh Ed25519 key for the pushing client: its file and its public line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = work / "client_key"
    key_path.write_bytes(key.export_private_key())
    key_path.chmod(0o600)
    return key_path, key.export_public_key().decode().strip()


def drop_page_cache() -> None:
    """Empty the page cache (as root), so that each push starts from the same memory.

    On the virtual machines these figures come from, writing into a page cache that has grown
    past a few GiB is several times slower (0.06 s for 200 MiB, then 0.5 s): without this, each
    round would be slower than the last, and whoever writes more bytes would be charged for it
    rounds later. Without root, it does nothing and says so once.
    """
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        _note_cache_kept()


@functools.cache
def _note_cache_kept() -> None:
    print("note: not root, the page cache is not emptied between pushes", file=sys.stderr)


def push(port: int, user: str, key: Path, local: Path, remote: str, cipher: str) -> float:
    batch = f'put "{local}" "{remote}"\n'
    # Each push starts on a quiet disk: sshd never fsyncs, and the 200 MiB it leaves in the page
    # cache would otherwise be written out during (and charged to) the next push.
    os.sync()
    drop_page_cache()
    start = time.perf_counter()
    subprocess.run(
        ["sftp", "-q", "-b", "-", "-P", str(port), "-i", str(key), "-c", cipher,
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         f"{user}@127.0.0.1"], input=batch.encode(), check=True, stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cipher", default="aes128-gcm@openssh.com")
    parser.add_argument("--storage", type=Path, default=None,
                        help="a folder on the file system both sides write to (default: a temporary folder)")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="another relayd checkout to measure in the same rounds (a third column)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir=args.storage))
    fs_type = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True).stdout.strip()
    key_path, pubkey = client_key(work)
    procs = []
    try:
        sshd, sshd_port, sshd_dest = start_sshd(work, pubkey)
        procs.append(sshd)
        relay, relay_port, inbox = start_relay(work, pubkey)
        procs.append(relay)
        base_port = base_inbox = None
        if args.baseline_tree is not None:
            base, base_port, base_inbox = start_relay(work, pubkey, args.baseline_tree.resolve(), "baseline")
            procs.append(base)
        ref_times, relay_times, base_times = [], [], []
        # Each side: its times, port, user, the folder the file is put in ("" for the login's), its inbox.
        sides = [(ref_times, sshd_port, os.environ.get("USER", "root"), f"{sshd_dest}/", None),
                 (relay_times, relay_port, "plateforme", "", inbox)]
        if base_port is not None:
            sides.append((base_times, base_port, "plateforme", "", base_inbox))
        for i in range(args.rounds):
            # Each round is a distinct dossier, so that relayd does the whole job every time.
            spec = SampleSpec(numero=f"A-9-BENCH{i:04d}", demarche="recensementCitoyen", insee="90017",
                              annex_bytes=args.mib * 1024 * 1024, annex_fill="random")
            local = work / f"pkg{i}.zip"
            local.write_bytes(build_package(spec))
            # Each side takes its turn at going first: a virtual disk's write budget drains as a round
            # goes on, and a fixed order would charge that to whoever comes last.
            for times, port, user, folder, side_inbox in sides[i % len(sides):] + sides[:i % len(sides)]:
                times.append(push(port, user, key_path, local, f"{folder}pkg{i}.zip", args.cipher))
                if side_inbox is not None:
                    assert (side_inbox / f"{spec.numero}-recensementCitoyen.zip").stat().st_size == local.stat().st_size
            local.unlink()
        size = args.mib
        ref, rel = statistics.median(ref_times), statistics.median(relay_times)
        print(f"package ~{size} MiB, cipher {args.cipher}, {args.rounds} rounds (median), files on {fs_type}")
        print(f"  sshd internal-sftp receive : {ref:6.2f} s  {size / ref:7.1f} MiB/s")
        print(f"  relayd end to end (inbox)  : {rel:6.2f} s  {size / rel:7.1f} MiB/s")
        print(f"  ratio sshd/relayd          : {ref / rel:6.2f}   (target >= 0.90)")
        if base_times:
            old = statistics.median(base_times)
            paired = statistics.median(b / t for b, t in zip(base_times, relay_times, strict=True))
            print(f"  baseline ({args.baseline_tree}) : {old:6.2f} s  {size / old:7.1f} MiB/s")
            print(f"  ratio sshd/baseline        : {ref / old:6.2f}")
            # Round by round, the two relays pushed the same package minutes apart at most: the
            # median of their ratios is steadier than the ratio of their medians.
            print(f"  baseline/relayd, paired    : {paired:6.2f}   (above 1: this checkout is faster)")
            print(f"  rounds sshd/relayd         : {' '.join(f'{r / t:.2f}' for r, t in zip(ref_times, relay_times, strict=True))}")
            print(f"  rounds sshd/baseline       : {' '.join(f'{r / b:.2f}' for r, b in zip(ref_times, base_times, strict=True))}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

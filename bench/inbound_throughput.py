"""Inbound throughput: one large package, end to end into the inbox, against OpenSSH's sshd.

The reference is sshd with internal-sftp receiving the same file from the same OpenSSH
client in the same run. The figure that matters is the ratio

    sshd receive time / relayd end-to-end time   (the target is >= 0.9)

relayd's time includes verification (CRCs, hashing), the hand-over into the inbox with
fsync, and the archive's independent copy. That copy is a second write of the whole package
on a file system without reflinks (ext4), and nearly free on one with them (XFS, btrfs):
``--storage`` puts both sides' files on the file system to measure. Durations are measured
here and never asserted in tests.

    .venv/bin/python bench/inbound_throughput.py [--mib 200] [--rounds 3] [--cipher aes128-gcm@openssh.com]
                                                 [--storage DIR]
"""

from __future__ import annotations

import argparse
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


def start_relay(work: Path, pubkey: str) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    root = work / "relay"
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
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(root / "relayd.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port, root / "inbox"


def client_key(work: Path) -> tuple[Path, str]:
    """A fresh Ed25519 key for the pushing client: its file and its public line."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_path = work / "client_key"
    key_path.write_bytes(key.export_private_key())
    key_path.chmod(0o600)
    return key_path, key.export_public_key().decode().strip()


def push(port: int, user: str, key: Path, local: Path, remote: str, cipher: str) -> float:
    batch = f'put "{local}" "{remote}"\n'
    # Each push starts on a quiet disk: sshd never fsyncs, and the 200 MiB it leaves in the page
    # cache would otherwise be written out during (and charged to) the next push.
    os.sync()
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
        ref_times, relay_times = [], []
        for i in range(args.rounds):
            # Each round is a distinct dossier, so that relayd does the whole job every time.
            spec = SampleSpec(numero=f"A-9-BENCH{i:04d}", demarche="recensementCitoyen", insee="90017",
                              annex_bytes=args.mib * 1024 * 1024, annex_fill="random")
            local = work / f"pkg{i}.zip"
            local.write_bytes(build_package(spec))
            ref_times.append(push(sshd_port, os.environ.get("USER", "root"), key_path, local,
                                  str(sshd_dest / f"pkg{i}.zip"), args.cipher))
            relay_times.append(push(relay_port, "plateforme", key_path, local, f"pkg{i}.zip", args.cipher))
            assert (inbox / f"{spec.numero}-recensementCitoyen.zip").stat().st_size == local.stat().st_size
            local.unlink()
        size = args.mib
        ref, rel = statistics.median(ref_times), statistics.median(relay_times)
        print(f"package ~{size} MiB, cipher {args.cipher}, {args.rounds} rounds (median), files on {fs_type}")
        print(f"  sshd internal-sftp receive : {ref:6.2f} s  {size / ref:7.1f} MiB/s")
        print(f"  relayd end to end (inbox)  : {rel:6.2f} s  {size / rel:7.1f} MiB/s")
        print(f"  ratio sshd/relayd          : {ref / rel:6.2f}   (target >= 0.90)")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

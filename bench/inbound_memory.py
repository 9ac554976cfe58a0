"""Inbound memory: relayd's peak resident memory stays flat as packages grow.

Each size runs in a fresh relayd process that receives one package (zip delivery) and
one more for the extracted delivery; the peak RSS (VmHWM) is read from /proc afterwards.
The figure that matters is the ratio of peaks between the largest and the smallest
package (flat means close to 1), printed beside the ratio of package sizes.

    .venv/bin/python bench/inbound_memory.py [--sizes 16 64 200]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.inbound_throughput import client_key, free_port, push, wait_port  # noqa: E402
from relayd.inbound.passwords import hash_password  # noqa: E402
from relayd.testkit.samples import SampleSpec, build_package  # noqa: E402


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def run_size(work: Path, mib: int, key_path: Path, pubkey: str) -> int:
    root = work / f"relay-{mib}"
    root.mkdir()
    port = free_port()
    config = {
        "server": {"listen": {"host": "127.0.0.1", "port": port}},
        "storage": {"root": "var"},
        "limits": {"max_package_bytes": 4 * 1024**3},
        "accounts": [{"username": "plateforme", "password_hash": hash_password("unused"),
                      "authorized_keys": [pubkey], "communes": ["90017", "75056"]}],
        "communes": [{"insee": "90017", "name": "zip", "inbox": "inbox-zip", "demarches": ["recensementCitoyen"]},
                     {"insee": "75056", "name": "dir", "inbox": "inbox-dir", "demarches": ["recensementCitoyen"],
                      "delivery": "extracted"}],
        "logging": {"format": "json", "level": "warning"},
    }
    (root / "relayd.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(root / "relayd.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        for insee in ("90017", "75056"):
            spec = SampleSpec(numero=f"A-9-MEM{mib:05d}{insee[:1]}", demarche="recensementCitoyen", insee=insee,
                              annex_bytes=mib * 1024 * 1024, annex_fill="random")
            local = work / "pkg.zip"
            local.write_bytes(build_package(spec))
            push(port, "plateforme", key_path, local, "pkg.zip", "aes128-gcm@openssh.com")
            local.unlink()
        return peak_rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 200])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relayd-mem-"))
    key_path, pubkey = client_key(work)
    try:
        peaks = {mib: run_size(work, mib, key_path, pubkey) for mib in sorted(args.sizes)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    smallest, largest = min(peaks), max(peaks)
    for mib, kib in peaks.items():
        print(f"  package {mib:5d} MiB: relayd peak RSS {kib / 1024:7.1f} MiB")
    print(f"  sizes x{largest / smallest:.0f}, peak RSS x{peaks[largest] / peaks[smallest]:.2f} (flat is ~1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A crash campaign: SIGKILL relayd and the return server at random moments while packages and returns flow.

Seeded and bounded (a number of kills and a time limit). One real relayd process receives
generated packages over SFTP (paramiko, by ``.part`` then rename, as the platform does) while
the business software's part drops a *reçu* then a *clos* status file for each dossier, and a
real OpenSSH ``sshd`` plays the platform's return server. A killer thread SIGKILLs relayd
(restarted at once) or the sshd with its sessions (restarted after a short outage).

Then it audits what each side would see:

* lost: a package whose upload was answered OK and that is not in the commune's inbox;
* duplicated: the same package twice in the inbox;
* partial: a file in the inbox that is no pushed package, or a ``.part`` left on the server;
* ledger vs inbox: accepted packages in the ledger that are not in the inbox, or the reverse;
* acks missing (a dossier without an AVL on the server) and ANLs (none is expected);
* returns missing or duplicated: each dossier must have exactly one *reçu* and one *clos* on the server;
* order: per dossier, as the server saw the names appear, the AVL first, then *reçu*, then *clos*;
* undelivered: outbox entries not delivered at the end (pending or dead).

Run from the repository root: ``.venv/bin/python -m bench.crash --kills 60 --packages 400``
(``--json`` prints the figures as JSON). Exit status 0 when every count is 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test suite's real-process helpers: Relay and PlatformSshd

import yaml  # noqa: E402
from conftest import Relay, free_port, paramiko_client, relay_config  # noqa: E402
from platform_sshd import PlatformSshd, make_client_key, public_key_line  # noqa: E402
from watchdog.events import FileSystemEventHandler  # noqa: E402
from watchdog.observers import Observer  # noqa: E402

from relayd.inbound.passwords import hash_password  # noqa: E402
from relayd.pec.replies import read_reply  # noqa: E402
from relayd.pec.status import StatusFile, write_status_file  # noqa: E402
from relayd.testkit.samples import SampleSpec, build_package, package_filename, random_numero  # noqa: E402

INSEE = "90017"
RETRY = {"initial_seconds": 0.2, "factor": 2, "max_seconds": 1.0, "jitter": 0.2}


class Arrivals(FileSystemEventHandler):
    """The order in which names appear on the return server (its renames of ``.part`` into place)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._lock = threading.Lock()

    def on_moved(self, event: Any) -> None:
        with self._lock:
            self.names.append(os.path.basename(os.fsdecode(event.dest_path)))

    def first_seen(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for i, name in enumerate(self.names):
                out.setdefault(name, i)
            return out


@dataclass
class Campaign:
    """The moving parts and what the pusher and the business software did."""

    relay: Relay
    platform: PlatformSshd
    rng: random.Random
    deadline: float
    work: Path
    #: every package pushed, by sha256 -> numero
    pushed: dict[str, str] = field(default_factory=dict)
    #: numeros whose upload relayd answered OK
    confirmed: list[str] = field(default_factory=list)
    #: numero -> states dropped so far
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    relay_kills: int = 0
    server_kills: int = 0
    push_retries: int = 0
    pushes_given_up: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)
    done_pushing: threading.Event = field(default_factory=threading.Event)

    def relay_up(self) -> bool:
        return self.relay.proc is not None and self.relay.proc.poll() is None


# -- the platform pushes packages ------------------------------------------------------------


def push_one(c: Campaign, data: bytes, name: str) -> bool:
    """Push one package until relayd answers OK (rename accepted); False if the time ran out."""
    local = c.work / "outgoing" / name
    local.write_bytes(data)
    while time.monotonic() < c.deadline:
        try:
            client = paramiko_client(c.relay)
        except Exception:  # noqa: BLE001 - relayd is down or restarting: the platform tries again
            c.push_retries += 1
            time.sleep(0.2)
            continue
        try:
            client.put(str(local), name + ".part")
            client.posix_rename(name + ".part", name)
            return True
        except Exception:  # noqa: BLE001 - killed mid-upload: the platform sends the same file again
            c.push_retries += 1
            time.sleep(0.1)
        finally:
            try:
                client.close()
                client.get_channel().get_transport().close()
            except Exception:  # noqa: BLE001
                pass
    return False


def pusher(c: Campaign, count: int) -> None:
    (c.work / "outgoing").mkdir()
    seen: set[str] = set()
    for _ in range(count):
        if time.monotonic() >= c.deadline:
            break
        numero = random_numero(c.rng)
        while numero in seen:
            numero = random_numero(c.rng)
        seen.add(numero)
        spec = SampleSpec(numero=numero, demarche="recensementCitoyen", insee=INSEE)
        data = build_package(spec)
        with c.lock:
            c.pushed[hashlib.sha256(data).hexdigest()] = numero
        if push_one(c, data, package_filename(spec)):
            with c.lock:
                c.confirmed.append(numero)
        else:
            c.pushes_given_up += 1
    c.done_pushing.set()


# -- the business software drops returns -------------------------------------------------------


def drop(c: Campaign, numero: str, state: str) -> None:
    folder = c.relay.returns(INSEE)
    final = folder / f"{numero}-{state}.xml"
    tmp = folder / f".{final.name}.tmp"
    tmp.write_bytes(write_status_file(StatusFile(numero=numero, state=state, comment=f"{state} (crash bench)")))
    tmp.rename(final)
    with c.lock:
        c.dropped[numero].append(state)


def dropper(c: Campaign) -> None:
    """Drop *reçu* for confirmed dossiers, and *clos* once relayd has taken the *reçu* file (queued it)."""
    folder = c.relay.returns(INSEE)
    while time.monotonic() < c.deadline:
        with c.lock:
            candidates = [n for n in c.confirmed if len(c.dropped[n]) < 2]
        if not candidates and c.done_pushing.is_set():
            return
        for numero in c.rng.sample(candidates, min(len(candidates), 5)):
            states = c.dropped[numero]
            if not states:
                drop(c, numero, "recu")
            elif not (folder / f"{numero}-recu.xml").exists():
                drop(c, numero, "clos")
        time.sleep(c.rng.uniform(0.02, 0.2))


# -- the killer ----------------------------------------------------------------------------------


#: the share of the kills that hit the return server rather than relayd
SERVER_SHARE = 0.3


def killer(c: Campaign, kills: int, gap: tuple[float, float]) -> None:
    """SIGKILL relayd (restarted at once) or the return server (back after a short outage), ``kills`` times."""
    targets = ["server"] * round(kills * SERVER_SHARE)
    targets += ["relayd"] * (kills - len(targets))
    c.rng.shuffle(targets)
    if "server" in targets and "relayd" in targets:
        # The first two hit each side once, so that a run its time limit cuts short still crashes both.
        targets.remove("server")
        targets.remove("relayd")
        targets[:0] = ["relayd", "server"]
    for target in targets:
        wait = c.rng.uniform(*gap)
        if time.monotonic() + wait >= c.deadline:
            return
        time.sleep(wait)
        if target == "relayd":
            c.relay.kill()
            c.relay_kills += 1
            restart_relay(c)
        else:
            c.platform.kill()
            c.server_kills += 1
            time.sleep(c.rng.uniform(0.1, 1.5))
            c.platform.start()


def restart_relay(c: Campaign) -> None:
    with open(c.relay.log_path, "ab") as fh:
        fh.write(b"\n")
    c.relay.start(timeout=60)


# -- the audit --------------------------------------------------------------------------------


def settle(c: Campaign, timeout: float) -> bool:
    """Wait until every confirmed dossier has both returns dropped and every outbox entry is delivered."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with c.lock:
            dropped = all(len(c.dropped[n]) == 2 for n in c.confirmed)
        rows = c.relay.ledger_rows("SELECT status FROM outbox")
        returns_left = [p for p in c.relay.returns(INSEE).iterdir() if not p.name.startswith(".")]
        if dropped and not returns_left and rows and all(r["status"] == "delivered" for r in rows):
            expected = len(c.confirmed) * 2
            retours = c.relay.ledger_rows("SELECT COUNT(*) AS n FROM outbox WHERE kind = 'Retour'")[0]["n"]
            if retours >= expected:
                return True
        time.sleep(0.2)
    return False


def audit(c: Campaign, arrivals: Arrivals) -> dict[str, Any]:
    inbox = [p for p in c.relay.inbox(INSEE).iterdir() if p.is_file()]
    inbox_shas = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in inbox)
    confirmed_shas = {sha for sha, numero in c.pushed.items() if numero in set(c.confirmed)}
    accepted = {r["sha256"] for r in c.relay.ledger_rows("SELECT sha256 FROM packages WHERE outcome = 'accepted'")}

    names = [n for n in c.platform.files()]
    parts = [n for n in names if n.endswith(".part")]
    order = arrivals.first_seen()
    published = sorted((n for n in names if not n.endswith(".part")),
                       key=lambda n: (order.get(n, len(order)), (c.platform.incoming / n).stat().st_mtime_ns))
    per_dossier: dict[str, list[str]] = defaultdict(list)
    # Replies may keep the answered MessageId (platform.reply_style: mirror), so a reply's identity is its
    # dossier and what it says; a package is acked once per time it was received (a resend is acked again).
    received = Counter(r["numero"] for r in c.relay.ledger_rows(
        "SELECT numero FROM packages WHERE outcome IN ('accepted', 'duplicate')"))
    anl = 0
    for name in published:
        reply = read_reply((c.platform.incoming / name).read_bytes())
        if reply.kind == "ANL":
            anl += 1
        body = reply.retour if reply.retour is not None else reply.ack
        numero = body.numero if body is not None else None
        per_dossier[numero or "?"].append(reply.retour.state if reply.retour is not None else reply.kind)

    missing_acks = duplicate_acks = missing_returns = duplicate_returns = order_violations = 0
    for numero in c.confirmed:
        seen = per_dossier.get(numero, [])
        missing_acks += "AVL" not in seen
        duplicate_acks += max(0, seen.count("AVL") - received[numero])
        for state in ("recu", "clos"):
            n = seen.count(state)
            missing_returns += n == 0
            duplicate_returns += max(0, n - 1)
        states = [s for s in seen if s in ("recu", "clos")]
        if (seen and seen[0] != "AVL") or states != sorted(states, key=["recu", "clos"].index):
            order_violations += 1
    rows = c.relay.ledger_rows("SELECT status FROM outbox")
    return {
        "packages_pushed": len(c.pushed),
        "packages_confirmed": len(c.confirmed),
        "push_retries": c.push_retries,
        "pushes_given_up": c.pushes_given_up,
        "relayd_kills": c.relay_kills,
        "server_kills": c.server_kills,
        "replies_on_server": len(published),
        "lost": len(confirmed_shas - set(inbox_shas)),
        "duplicated_in_inbox": sum(n - 1 for n in inbox_shas.values() if n > 1),
        "partials": len([s for s in inbox_shas if s not in c.pushed]) + len(parts),
        "ledger_vs_inbox": len(accepted ^ set(inbox_shas)),
        "acks_missing": missing_acks,
        "acks_duplicated": duplicate_acks,
        "anl": anl,
        "returns_missing": missing_returns,
        "returns_duplicated": duplicate_returns,
        "order_violations": order_violations,
        "undelivered": len([r for r in rows if r["status"] != "delivered"]),
    }


#: the counts that must all be zero
FAULTS = ("lost", "duplicated_in_inbox", "partials", "ledger_vs_inbox", "acks_missing", "anl", "returns_missing",
          "returns_duplicated", "acks_duplicated", "order_violations", "undelivered")


def run(seed: int, kills: int, packages: int, max_seconds: float, work: Path,
        gap: tuple[float, float] = (0.5, 3.0)) -> dict[str, Any]:
    """Run one campaign in ``work``; return the audit's figures (with ``settled`` and ``seconds``)."""
    started = time.monotonic()
    # paramiko logs every upload the kills cut short, with a traceback: expected here, and noise.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL + 1)
    rng = random.Random(seed)
    platform_work = work / "platform"
    platform_work.mkdir(parents=True)
    client_key = make_client_key(platform_work)
    platform = PlatformSshd(platform_work, client_public_key=public_key_line(client_key))
    platform.client_key = client_key
    platform.start()
    observer = Observer()
    arrivals = Arrivals()
    observer.schedule(arrivals, str(platform.incoming), recursive=False)
    observer.start()

    root = work / "relay"
    root.mkdir()
    key = make_client_key(work, "platform_account_key")
    hashes = {"plateforme": hash_password("crash bench"), "autre": hash_password("another account")}
    config = relay_config(root, free_port(), key, hashes,
                          platform=platform.relay_config(client_key, retry=RETRY, idle_seconds=5.0,
                                                         connect_timeout_seconds=5.0, login_timeout_seconds=5.0,
                                                         operation_timeout_seconds=10.0),
                          returns={"settle_seconds": 0.3, "rescan_seconds": 1})
    config_path = root / "relayd.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    relay = Relay(root, config_path, config["server"]["listen"]["port"], root / "relayd.log", key, config=config)
    campaign = Campaign(relay, platform, rng, deadline=started + max_seconds * 0.75, work=work)
    try:
        relay.start(timeout=60)
        threads = [threading.Thread(target=pusher, args=(campaign, packages), name="pusher"),
                   threading.Thread(target=dropper, args=(campaign,), name="dropper"),
                   threading.Thread(target=killer, args=(campaign, kills, gap), name="killer")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max_seconds)
        if not campaign.relay_up():
            restart_relay(campaign)
        platform.start()
        # What is left of the time goes to letting every return be dropped and delivered.
        campaign.deadline = started + max_seconds
        rest = threading.Thread(target=dropper, args=(campaign,), name="dropper-end")
        rest.start()
        settled = settle(campaign, max(5.0, started + max_seconds - time.monotonic()))
        rest.join(timeout=10)
        figures = audit(campaign, arrivals)
    finally:
        relay.kill()
        observer.stop()
        observer.join(timeout=10)
        platform.cleanup()
    figures.update(seed=seed, settled=settled, seconds=round(time.monotonic() - started, 1))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kills", type=int, default=60, help="SIGKILLs of relayd or the return server, in all")
    parser.add_argument("--packages", type=int, default=400, help="at most this many packages pushed")
    parser.add_argument("--max-seconds", type=float, default=600, help="the whole run, audit included")
    parser.add_argument("--gap", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"),
                        help="seconds between two kills, drawn uniformly")
    parser.add_argument("--work", type=Path, help="keep the run's files here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="relayd-crash-"))
    try:
        figures = run(args.seed, args.kills, args.packages, args.max_seconds, work, tuple(args.gap))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:22} {value}")
    return 0 if figures["settled"] and not any(figures[k] for k in FAULTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())

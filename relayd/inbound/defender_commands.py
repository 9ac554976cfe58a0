"""``relayd defender list`` and ``relayd defender unban``: see and lift bans, while the daemon runs or not.

Both work on the ledger, where the daemon keeps its bans and reads them at each new
connection: an unban applies to the very next connection, without a reload.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from relayd.config import Config
from relayd.inbound.banbook import Ban, BanBook
from relayd.inbound.defender import Defender
from relayd.ledger import Ledger


def register(sub: argparse._SubParsersAction, config_default: Path) -> None:
    """Add ``defender list`` and ``defender unban`` to the ``relayd`` parser."""
    p_defender = sub.add_parser("defender", help="see and lift the bans of the brute-force defender")
    actions = p_defender.add_subparsers(dest="action", required=True)
    p_list = actions.add_parser("list", help="the bans in force, longest first")
    p_list.add_argument("--json", action="store_true", help="print JSON")
    p_unban = actions.add_parser(
        "unban", help="lift the bans that hold an address or overlap a network, and forgive its failures",
        description="Lift every ban that holds ADDRESS (or overlaps PREFIX, e.g. 192.0.2.0/24) and forget the "
                    "failures counted against it. The running daemon sees it at the next connection. Exit status: "
                    "0 when a ban was lifted, 1 when none held it, 2 on a bad address or configuration.")
    p_unban.add_argument("target", metavar="ADDRESS|PREFIX")
    for p in (p_list, p_unban):
        p.add_argument("-c", "--config", type=Path, default=config_default)


def run(args: argparse.Namespace, config: Config) -> int:
    """Carry out ``relayd defender ACTION``; return the exit status."""
    if not config.storage.ledger.exists():
        print(f"relayd: no ledger at {config.storage.ledger}: relayd has not run with this configuration",
              file=sys.stderr)
        return 2
    with closing(Ledger(config.storage.ledger)) as ledger:
        defender = Defender(lambda: config.defender, BanBook(ledger))
        if args.action == "list":
            return _list(defender, as_json=args.json)
        return _unban(defender, args.target)


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _as_dict(ban: Ban, now: float) -> dict[str, object]:
    return {"prefix": ban.prefix, "banned_at": _when(ban.banned_at), "banned_until": _when(ban.banned_until),
            "seconds_left": round(max(0.0, ban.banned_until - now)), "bans": ban.bans,
            "failures": ban.failures, "last_ip": ban.last_ip}


def _list(defender: Defender, *, as_json: bool) -> int:
    now = time.time()
    bans = defender.bans()
    if as_json:
        print(json.dumps([_as_dict(b, now) for b in bans], indent=2))
        return 0
    if not bans:
        print("no ban in force")
        return 0
    print(f"{'PREFIX':<28} {'BANNED UNTIL (UTC)':<26} {'LEFT':>8} {'BAN':>4} {'LAST ADDRESS'}")
    for ban in bans:
        left = max(0, round(ban.banned_until - now))
        print(f"{ban.prefix:<28} {_when(ban.banned_until):<26} {left:>7}s {ban.bans:>4} {ban.last_ip or '-'}")
    return 0


def _unban(defender: Defender, target: str) -> int:
    try:
        removed = defender.unban(target)
    except ValueError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 2
    now = time.time()
    lifted = [b for b in removed if b.banned_until > now]
    for ban in lifted:
        print(f"lifted the ban on {ban.prefix} (it ran until {_when(ban.banned_until)})")
    if not lifted:
        print(f"no ban in force holds {target}; its failures, if any, are forgiven")
        return 1
    return 0

"""The defender's memory in the ledger: failed logins, bans and the prefixes that logged in.

Kept in the ledger (tables ``defender_*``) rather than in the process, so that a restart
forgets nothing, ``relayd defender unban`` can lift a ban while the daemon runs (the daemon
reads the ban at each new connection), and several nodes sharing one ledger share their bans.
Times are Unix seconds. The policy (what counts, how long a ban lasts) lives in
:mod:`relayd.inbound.defender`; this module only reads and writes rows.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from relayd.ledger import Ledger

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

#: failure rows kept at most, whatever the window: a flood cannot grow the ledger without bound
MAX_FAILURE_ROWS = 100_000


def parse_address(ip: str) -> Address | None:
    """The address of a peer, IPv4-mapped IPv6 made plain IPv4; None when it is not an IP address."""
    try:
        address = ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_target(text: str) -> Network | None:
    """An address or a network as an operator types it (``203.0.113.7``, ``2001:db8::/48``); None if neither."""
    address = parse_address(text)
    if address is not None:
        return ip_network(address)
    try:
        return ip_network(text, strict=False)
    except ValueError:
        return None


def _key(address: Address) -> str:
    """An address as 32 hex digits, IPv4 in the IPv4-mapped range: ordered like the addresses themselves."""
    value = int(address) + (0xFFFF << 32 if isinstance(address, IPv4Address) else 0)
    return f"{value:032x}"


def span(network: Network) -> tuple[str, str]:
    """The first and last address of ``network``, as the ledger compares them."""
    return _key(network.network_address), _key(network.broadcast_address)


@dataclass(frozen=True)
class Ban:
    """One ban row: the prefix, when it ends, and how many bans that prefix has had."""

    prefix: str
    banned_at: float
    banned_until: float
    bans: int
    failures: float
    last_ip: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Ban:
        return cls(row["prefix"], row["banned_at"], row["banned_until"], row["bans"], row["failures"], row["last_ip"])


class BanBook:
    """Reads and writes the defender's rows; safe to share between threads (as the ledger is)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def ban_holding(self, address: Address, now: float) -> Ban | None:
        """The ban in force that covers ``address`` (the longest, if prefixes overlap), or None."""
        key = _key(address)
        rows = self.ledger.query(
            "SELECT * FROM defender_bans WHERE lo <= ? AND hi >= ? AND banned_until > ?"
            " ORDER BY banned_until DESC LIMIT 1", (key, key, now))
        return Ban.from_row(rows[0]) if rows else None

    def history(self, prefix: Network) -> Ban | None:
        """The ban row of exactly this prefix, in force or not (it tells how long the next ban lasts)."""
        rows = self.ledger.query("SELECT * FROM defender_bans WHERE prefix = ?", (str(prefix),))
        return Ban.from_row(rows[0]) if rows else None

    def add_failure(self, prefix: Network, weight: float, method: str, now: float, since: float) -> float:
        """Record one failure of ``prefix``; return what its failures since ``since`` add up to."""
        with self.ledger.transaction() as db:
            db.execute("INSERT INTO defender_failures (at, prefix, weight, method) VALUES (?, ?, ?, ?)",
                       (now, str(prefix), weight, method))
            (total,) = db.execute("SELECT COALESCE(SUM(weight), 0) FROM defender_failures WHERE prefix = ? AND at > ?",
                                  (str(prefix), since)).fetchone()
        return float(total)

    def failures_since(self, since: float) -> float:
        """What every prefix's failures since ``since`` add up to (the global budget)."""
        (total,) = self.ledger.query("SELECT COALESCE(SUM(weight), 0) FROM defender_failures WHERE at > ?",
                                     (since,))[0]
        return float(total)

    def ban(self, prefix: Network, ip: str, now: float, until: float, bans: int, failures: float) -> None:
        """Ban ``prefix`` until ``until`` (its ``bans``-th ban); its failures so far are spent."""
        lo, hi = span(prefix)
        with self.ledger.transaction() as db:
            db.execute(
                "INSERT INTO defender_bans (prefix, lo, hi, banned_at, banned_until, bans, failures, last_ip)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(prefix) DO UPDATE SET banned_at = excluded.banned_at,"
                " banned_until = excluded.banned_until, bans = excluded.bans, failures = excluded.failures,"
                " last_ip = excluded.last_ip",
                (str(prefix), lo, hi, now, until, bans, failures, ip))
            db.execute("DELETE FROM defender_failures WHERE prefix = ?", (str(prefix),))

    def bans(self, now: float | None = None) -> list[Ban]:
        """Every ban in force at ``now`` (every ban row, expired included, when ``now`` is None), longest first."""
        if now is None:
            rows = self.ledger.query("SELECT * FROM defender_bans ORDER BY banned_until DESC")
        else:
            rows = self.ledger.query("SELECT * FROM defender_bans WHERE banned_until > ? ORDER BY banned_until DESC",
                                     (now,))
        return [Ban.from_row(r) for r in rows]

    def unban(self, target: Network, *, forgive: Network | None = None) -> list[Ban]:
        """Lift every ban that overlaps ``target`` and forget those prefixes' failures (and ``forgive``'s, the
        prefix the defender counts ``target`` under); return the ban rows removed, expired ones included.

        The ban history goes too: an operator's unban is a fresh start, not a shorter ban.
        """
        lo, hi = span(target)
        with self.ledger.transaction() as db:
            lifted = [Ban.from_row(r) for r in db.execute(
                "SELECT * FROM defender_bans WHERE lo <= ? AND hi >= ?", (hi, lo))]
            for ban in lifted:
                db.execute("DELETE FROM defender_bans WHERE prefix = ?", (ban.prefix,))
            # Failures that have not brought a ban yet are forgiven as well.
            for prefix in {str(target), *([str(forgive)] if forgive else []), *(b.prefix for b in lifted)}:
                db.execute("DELETE FROM defender_failures WHERE prefix = ?", (prefix,))
        return lifted

    def logged_in(self, prefix: Network, now: float) -> None:
        """Remember that ``prefix`` logged in now (it is known-good for a while)."""
        with self.ledger.transaction() as db:
            db.execute("INSERT INTO defender_logins (prefix, last_login) VALUES (?, ?)"
                       " ON CONFLICT(prefix) DO UPDATE SET last_login = excluded.last_login", (str(prefix), now))

    def last_login(self, prefix: Network) -> float | None:
        """When ``prefix`` last logged in, or None."""
        rows = self.ledger.query("SELECT last_login FROM defender_logins WHERE prefix = ?", (str(prefix),))
        return float(rows[0]["last_login"]) if rows else None

    def prune(self, *, failures_before: float, bans_before: float, logins_before: float) -> None:
        """Forget failures older than ``failures_before``, bans (and their history) that ended before
        ``bans_before``, logins older than ``logins_before``; keep at most :data:`MAX_FAILURE_ROWS` failures."""
        with self.ledger.transaction() as db:
            db.execute("DELETE FROM defender_failures WHERE at < ?", (failures_before,))
            db.execute("DELETE FROM defender_failures WHERE id <= (SELECT MAX(id) FROM defender_failures) - ?",
                       (MAX_FAILURE_ROWS,))
            db.execute("DELETE FROM defender_bans WHERE banned_until < ?", (bans_before,))
            db.execute("DELETE FROM defender_logins WHERE last_login < ?", (logins_before,))

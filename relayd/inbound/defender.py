"""The brute-force defender: a failed-login score per source address, and bans that grow longer.

Each failed login attempt from an address counts; once ``max_failures`` fall within
``window_seconds`` the address is banned for ``ban_seconds``, and every later ban of the
same address lasts ``ban_factor`` times longer, up to ``max_ban_seconds``. A banned
address's new connections are closed as soon as they are accepted, before any key exchange
or authentication work. Addresses in ``allowlist`` are never banned (loopback is not
implicitly allowed). The settings are read from the configuration at each use, so a reload
applies at once.

What counts as one failure (the rule lives in :class:`relayd.inbound.server.RelaySSHServer`):

* each refused password;
* each connection that offered public keys, had them all refused, and ended without
  logging in, however many keys it offered. An OpenSSH client offers every key it holds in
  one connection, so one misconfigured login costs one failure, not one per key; a
  connection is cut after 6 refused attempts (OpenSSH's ``MaxAuthTries``), so trying more
  keys takes more connections, and each counts;
* a login refused because the account may not log in from that address (``allowed_ips``),
  counted like the above, for it looks the same to the client.

Ban state is kept in memory only: a restart forgets every score and every ban. The number
of addresses tracked is capped; past the cap, addresses with no ban in force are forgotten
first, oldest first. An address's ban history (what makes the next ban longer) is forgotten
once ``max_ban_seconds`` have passed since its last ban ended without new trouble.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

import structlog

from relayd.config import Defender as DefenderSettings
from relayd.events import NO_EVENTS, AddressBanned, AuthFailed, Events

log = structlog.get_logger("relayd.defender")

Address = IPv4Address | IPv6Address

#: addresses tracked at once; beyond this the least recently seen without a ban are dropped
MAX_ADDRESSES = 10_000


@dataclass
class _Record:
    """What the defender remembers of one address."""

    failures: list[float] = field(default_factory=list)
    banned_until: float = 0.0
    #: how many bans this address has had: the next one lasts ban_factor ** bans times longer
    bans: int = 0
    #: whether a refused connection was logged during the ban in force (logs stay small)
    refusal_logged: bool = False


def parse_address(ip: str) -> Address | None:
    """The address of a peer, IPv4-mapped IPv6 made plain IPv4; None when it is not an IP address."""
    try:
        address = ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Defender:
    """Scores failed logins per address and bans the addresses that fail too often.

    Used from the event loop only (it is not thread-safe). ``settings`` is called at each
    use, so it follows configuration reloads; ``clock`` is a monotonic clock in seconds.
    """

    def __init__(self, settings: Callable[[], DefenderSettings], events: Events = NO_EVENTS, *,
                 clock: Callable[[], float] = time.monotonic, max_addresses: int = MAX_ADDRESSES):
        self._settings = settings
        self._events = events
        self._clock = clock
        self._max = max_addresses
        # Least recently active first, so that the oldest are dropped when the cap is reached.
        self._records: OrderedDict[Address, _Record] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def allowlisted(self, ip: str) -> bool:
        """Whether this address is in the allowlist (never banned)."""
        address = parse_address(ip)
        return address is not None and any(address in net for net in self._settings().allowlist)

    def ban_remaining(self, ip: str) -> float:
        """Seconds left of the ban in force on this address; 0 when it is not banned."""
        settings = self._settings()
        address = parse_address(ip)
        if not settings.enabled or address is None or self.allowlisted(ip):
            return 0.0
        record = self._records.get(address)
        if record is None:
            return 0.0
        return max(0.0, record.banned_until - self._clock())

    def refuses(self, ip: str) -> bool:
        """Whether a new connection from ``ip`` must be closed now; logs ``defender.refused`` once per ban."""
        left = self.ban_remaining(ip)
        if not left:
            return False
        record = self._records[parse_address(ip)]  # type: ignore[index]  # banned, so tracked
        if not record.refusal_logged:
            record.refusal_logged = True
            log.warning("defender.refused", ip=ip, seconds_left=round(left, 1))
        return True

    def failed(self, ip: str, username: str, method: str) -> bool:
        """Count one failed login attempt; return True when it started a ban.

        ``AuthFailed`` is published for every attempt, ``AddressBanned`` when a ban starts.
        """
        self._events.publish(AuthFailed(ip=ip, username=username, method=method))
        settings = self._settings()
        address = parse_address(ip)
        if not settings.enabled or address is None or self.allowlisted(ip):
            return False
        now = self._clock()
        record = self._touch(address, now)
        if record.banned_until > now:
            return False  # attempts that were under way when the ban began: it is not made longer
        record.failures = [t for t in record.failures if now - t < settings.window_seconds][-settings.max_failures:]
        record.failures.append(now)
        if len(record.failures) < settings.max_failures:
            return False
        seconds = min(settings.ban_seconds * settings.ban_factor ** record.bans, settings.max_ban_seconds)
        failures = len(record.failures)
        record.bans += 1
        record.banned_until = now + seconds
        record.failures = []
        record.refusal_logged = False
        log.warning("defender.banned", ip=ip, seconds=round(seconds, 1), failures=failures, ban=record.bans)
        self._events.publish(AddressBanned(ip=ip, seconds=seconds, failures=failures))
        return True

    def banned(self) -> dict[str, float]:
        """Every address banned now, with the seconds its ban has left."""
        now = self._clock()
        return {str(a): r.banned_until - now for a, r in self._records.items() if r.banned_until > now}

    # -- memory ------------------------------------------------------------------------

    def _touch(self, address: Address, now: float) -> _Record:
        """The record of ``address``, made the most recent; old records are dropped past the cap."""
        record = self._records.pop(address, None)
        if record is not None and self._stale(record, now):
            record = None  # it stayed out of trouble long enough: its history is forgotten
        self._records[address] = record or _Record()
        if len(self._records) > self._max:
            self._shrink(now, keep=address)
        return self._records[address]

    def _stale(self, record: _Record, now: float) -> bool:
        settings = self._settings()
        history_over = record.bans == 0 or record.banned_until + settings.max_ban_seconds <= now
        return history_over and all(now - t >= settings.window_seconds for t in record.failures)

    def _shrink(self, now: float, keep: Address) -> None:
        """Drop forgotten records, then the least recently active without a ban in force (never ``keep``)."""
        for address in [a for a, r in self._records.items() if a != keep and self._stale(r, now)]:
            del self._records[address]
        excess = len(self._records) - self._max
        if excess <= 0:
            return
        unbanned = [a for a, r in self._records.items() if a != keep and r.banned_until <= now][:excess]
        for address in unbanned:
            del self._records[address]
        # Only banned addresses left over the cap (a flood of bans): the oldest go.
        while len(self._records) > self._max:
            self._records.popitem(last=False)

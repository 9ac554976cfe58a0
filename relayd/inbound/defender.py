"""The brute-force defender: failed logins counted per network prefix, and bans that grow longer.

Addresses are grouped by prefix: ``defender.ipv4_prefix`` (32: one address) and
``defender.ipv6_prefix`` (64: one IPv6 subnet, which a single host can fill with addresses).
Each failed login counts for its prefix; once the failures within ``window_seconds`` reach
``max_failures``, the prefix is banned for ``ban_seconds``, and every later ban of the same
prefix lasts ``ban_factor`` times longer, up to ``max_ban_seconds``. A banned client gets
the SSH version exchange and then a disconnect message that names the ban and its end
(OpenSSH prints ``Received disconnect from …: banned … until 07:15 UTC``), and no key
exchange or authentication work. Networks in ``allowlist`` are never banned (loopback is not
implicitly allowed). The settings are read at each use, so a reload applies at once.

What counts as a failure, and how much (the rules live in
:class:`relayd.inbound.server.RelaySSHServer`):

* each refused password: 1;
* each connection that offered public keys, had them all refused, and ended without
  logging in, however many keys it offered: 1 (an OpenSSH client offers every key it holds
  in one connection); a connection is cut after 6 refused attempts (``MaxAuthTries``);
* a login refused because the account may not log in from that address (``allowed_ips``),
  like the above;
* a connection that ends without trying to log in at all (idle until the login timeout,
  or closed before authentication): ``unauthenticated_weight`` (0.25). Softer, because a
  port check, ``ssh-keyscan`` or a client that distrusts the host key does the same;
  four of them weigh one wrong password.

Failures, bans and logins are kept in the ledger (:mod:`relayd.inbound.banbook`): a
restart forgets nothing, and ``relayd defender unban`` lifts a ban while the daemon runs,
for the daemon reads the ledger at each new connection. A prefix's ban history (what makes
the next ban longer) is forgotten once ``max_ban_seconds`` have passed since its last ban
ended. A ban holds every address inside its network, so a ban laid before the prefix
lengths were changed still holds until it ends.

The optional global budget, ``global_failures_per_minute``: when the failures of every
prefix together within the last minute exceed it (a spread-out attack, many prefixes, none
reaching its own ban), new connections are refused except from allowlisted and known-good
prefixes (one that logged in within ``known_good_days``), until the last minute's failures
fall back under the budget. The platform, which logs in every day, keeps delivering.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import IPv4Address, ip_network

import structlog

from relayd.config import Defender as DefenderSettings
from relayd.events import NO_EVENTS, AddressBanned, AuthFailed, Events
from relayd.inbound.banbook import Address, Ban, BanBook, Network, parse_address, parse_target

log = structlog.get_logger("relayd.defender")

__all__ = ["Defender", "parse_address"]

#: how often old rows are pruned from the ledger (seconds)
_PRUNE_EVERY = 60.0
#: how long the global budget's verdict is reused (seconds): one ledger read per second, not per connection
_GLOBAL_CHECK_EVERY = 1.0
#: bans whose first refused connection was logged, remembered so that logs stay small
_LOGGED_BANS = 1024


def until_text(moment: float, now: float) -> str:
    """When a ban ends, as a client reads it: ``07:15 UTC``, with the date when it is not today."""
    end = datetime.fromtimestamp(moment, UTC)
    same_day = end.date() == datetime.fromtimestamp(now, UTC).date()
    return end.strftime("%H:%M UTC" if same_day else "%Y-%m-%d %H:%M UTC")


class Defender:
    """Counts failed logins per prefix, bans the prefixes that fail too often, and says who may connect.

    ``settings`` is called at each use, so it follows configuration reloads; ``clock`` gives
    Unix seconds (bans are kept across restarts, so a monotonic clock would not do). The
    server asks (``refuses``, ``trusted``, ``ban_holding``: one indexed read each) on its event
    loop and writes (``failed``, ``logged_in``: one commit each) from a single writer thread;
    the ledger serialises them.
    """

    def __init__(self, settings: Callable[[], DefenderSettings], book: BanBook, events: Events = NO_EVENTS, *,
                 clock: Callable[[], float] = time.time):
        self._settings = settings
        self.book = book
        self._events = events
        self._clock = clock
        self._pruned = 0.0
        self._global: tuple[float, bool] = (float("-inf"), False)
        self._logged: OrderedDict[tuple[str, float], None] = OrderedDict()

    # -- who is who ------------------------------------------------------------------

    def prefix(self, ip: str) -> Network | None:
        """The prefix ``ip`` is counted under (``ipv4_prefix`` or ``ipv6_prefix``); None when it is not an address."""
        address = parse_address(ip)
        return None if address is None else self._prefix_of(address)

    def _prefix_of(self, address: Address) -> Network:
        settings = self._settings()
        length = settings.ipv4_prefix if isinstance(address, IPv4Address) else settings.ipv6_prefix
        return ip_network(f"{address}/{length}", strict=False)

    def allowlisted(self, ip: str) -> bool:
        """Whether this address is in the allowlist (never banned, never dropped early)."""
        address = parse_address(ip)
        return address is not None and any(address in net for net in self._settings().allowlist)

    def known_good(self, ip: str) -> bool:
        """Whether this address's prefix logged in within ``known_good_days``."""
        prefix = self.prefix(ip)
        if prefix is None:
            return False
        last = self.book.last_login(prefix)
        return last is not None and self._clock() - last <= self._settings().known_good_days * 86400

    def trusted(self, ip: str) -> bool:
        """Allowlisted or known-good: never dropped early, never held by the global budget."""
        return self.allowlisted(ip) or self.known_good(ip)

    # -- bans ------------------------------------------------------------------------

    def ban_holding(self, ip: str) -> Ban | None:
        """The ban in force on this address, or None (never for an allowlisted address or a disabled defender)."""
        address = parse_address(ip)
        if not self._settings().enabled or address is None or self.allowlisted(ip):
            return None
        return self.book.ban_holding(address, self._clock())

    def ban_remaining(self, ip: str) -> float:
        """Seconds left of the ban in force on this address; 0 when it is not banned."""
        ban = self.ban_holding(ip)
        return max(0.0, ban.banned_until - self._clock()) if ban else 0.0

    def ban_message(self, ban: Ban) -> str:
        """What a banned client is told, e.g. ``banned for too many failed logins from 192.0.2.0/24 until 07:15 UTC``."""
        return f"banned for too many failed logins from {ban.prefix} until {until_text(ban.banned_until, self._clock())}"

    def refuses(self, ip: str) -> str | None:
        """Why a new connection from ``ip`` must be turned away now (the text for the client), or None.

        A ban is logged (``defender.refused``) at its first refused connection only.
        """
        ban = self.ban_holding(ip)
        if ban is not None:
            key = (ban.prefix, ban.banned_until)
            if key not in self._logged:
                self._logged[key] = None
                if len(self._logged) > _LOGGED_BANS:
                    self._logged.popitem(last=False)
                log.warning("defender.refused", ip=ip, prefix=ban.prefix,
                            seconds_left=round(ban.banned_until - self._clock(), 1))
            return self.ban_message(ban)
        if self.over_global_budget() and not self.trusted(ip):
            return "too many failed logins to this relay: only known addresses may connect for now; try again later"
        return None

    def over_global_budget(self) -> bool:
        """Whether the last minute's failures, every prefix together, exceed ``global_failures_per_minute``."""
        settings = self._settings()
        if not settings.enabled or settings.global_failures_per_minute is None:
            return False
        now = self._clock()
        checked, verdict = self._global
        if now - checked < _GLOBAL_CHECK_EVERY:
            return verdict
        over = self.book.failures_since(now - 60) > settings.global_failures_per_minute
        if over and not verdict:
            log.warning("defender.global_budget_exceeded", per_minute=settings.global_failures_per_minute)
        elif verdict and not over:
            log.info("defender.global_budget_recovered", per_minute=settings.global_failures_per_minute)
        self._global = (now, over)
        return over

    # -- what happens ------------------------------------------------------------------

    def failed(self, ip: str, username: str, method: str, weight: float = 1.0) -> bool:
        """Count one failed login attempt of ``weight``; return True when it started a ban.

        ``AuthFailed`` is published for every attempt, ``AddressBanned`` when a ban starts.
        """
        self._events.publish(AuthFailed(ip=ip, username=username, method=method))
        settings = self._settings()
        address = parse_address(ip)
        if not settings.enabled or address is None or self.allowlisted(ip) or weight <= 0:
            return False
        now = self._clock()
        self._prune(now)
        prefix = self._prefix_of(address)
        if self.book.ban_holding(address, now) is not None:
            return False  # attempts that were under way when the ban began: it is not made longer
        total = self.book.add_failure(prefix, weight, method, now, now - settings.window_seconds)
        if total < settings.max_failures:
            return False
        history = self.book.history(prefix)
        bans = 0
        if history is not None and history.banned_until + settings.max_ban_seconds > now:
            bans = history.bans  # it was banned not long ago: this ban lasts longer
        seconds = min(settings.ban_seconds * settings.ban_factor ** bans, settings.max_ban_seconds)
        self.book.ban(prefix, ip, now, now + seconds, bans + 1, total)
        log.warning("defender.banned", ip=ip, prefix=str(prefix), seconds=round(seconds, 1),
                    failures=round(total, 2), ban=bans + 1)
        self._events.publish(AddressBanned(ip=ip, seconds=seconds, failures=round(total, 2), prefix=str(prefix)))
        return True

    def logged_in(self, ip: str) -> None:
        """Remember a successful login: its prefix is known-good for ``known_good_days``."""
        prefix = self.prefix(ip)
        if prefix is not None and self._settings().known_good_days > 0:
            self.book.logged_in(prefix, self._clock())

    def bans(self) -> list[Ban]:
        """Every ban in force now, longest first."""
        return self.book.bans(self._clock())

    def unban(self, target: str) -> list[Ban]:
        """Lift the bans that overlap an address or a prefix (and forgive its failures); return the rows removed.

        Raises ValueError when ``target`` is neither an address nor a network.
        """
        network = parse_target(target)
        if network is None:
            raise ValueError(f"{target!r} is neither an IP address nor a network")
        single = network.num_addresses == 1
        forgive = self._prefix_of(network.network_address) if single else None
        lifted = self.book.unban(network, forgive=forgive)
        self._global = (float("-inf"), False)
        for ban in lifted:
            log.info("defender.unbanned", prefix=ban.prefix, target=target)
        return lifted

    def _prune(self, now: float) -> None:
        if now - self._pruned < _PRUNE_EVERY:
            return
        self._pruned = now
        settings = self._settings()
        self.book.prune(failures_before=now - max(settings.window_seconds, 60.0),
                        bans_before=now - settings.max_ban_seconds,
                        logins_before=now - settings.known_good_days * 86400)

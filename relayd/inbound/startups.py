"""The pre-authentication budget: what unauthenticated connections may hold, apart from logged-in ones.

A connection is *pending* from its TCP accept until it authenticates (or closes). Pending
connections have their own limits, so that sockets that never log in cannot keep the
platform out (logged-in connections are capped by ``limits.max_sessions`` and
``limits.max_sessions_per_ip``, and pending ones never count there):

* ``limits.max_startups_per_ip``: pending connections from one prefix (the defender's
  ``ipv4_prefix`` / ``ipv6_prefix``); one more is refused;
* ``limits.max_startups``, OpenSSH's ``MaxStartups start:rate:full``: past ``start`` pending
  connections in all, a new one is refused with a probability that grows linearly from
  ``rate`` % to 100 % at ``full``;
* ``limits.login_timeout_seconds``: a pending connection is closed at the deadline.

Allowlisted and known-good addresses (see :mod:`relayd.inbound.defender`) are never refused
here: the platform, which logs in every day, is not dropped at random with the attackers.
A refused connection gets the SSH version exchange and a disconnect whose text says why.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from relayd.config import Limits
from relayd.inbound.banbook import Network
from relayd.inbound.defender import Defender

log = structlog.get_logger("relayd.sftp")

#: refusals are logged at most this often (seconds), with the count since the last line: a flood stays one line
_LOG_EVERY = 10.0


class Pending(Protocol):
    """A connection not yet authenticated."""

    prefix: Network | None


class StartupBudget:
    """Admits or refuses new unauthenticated connections; ``pending`` holds those admitted and not yet logged in."""

    def __init__(self, limits: Callable[[], Limits], defender: Defender, *,
                 chance: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic):
        self._limits = limits
        self._defender = defender
        self._chance = chance
        self._clock = clock
        self.pending: set[Pending] = set()
        self._refused = 0
        self._logged_at = float("-inf")

    def refusal(self, ip: str, prefix: Network | None) -> str | None:
        """Why a new connection from ``ip`` is refused now (the text for the client), or None to admit it."""
        why = self._over_budget(prefix)
        if why is None or self._defender.trusted(ip):  # trusted is a ledger read: only asked when it matters
            return None
        self._refused += 1
        now = self._clock()
        if now - self._logged_at >= _LOG_EVERY:
            log.warning("sftp.startup_refused", ip=ip, why=why, refused=self._refused, pending=len(self.pending))
            self._logged_at, self._refused = now, 0
        return f"{why}; try again later"

    def _over_budget(self, prefix: Network | None) -> str | None:
        limits = self._limits()
        if sum(1 for c in self.pending if c.prefix == prefix) >= limits.max_startups_per_ip:
            return "too many connections from your address waiting to log in"
        start, rate, full = limits.startup_budget()
        pending = len(self.pending)
        if pending >= full:
            return "too many connections waiting to log in"
        if pending >= start:
            chance = (rate + (100 - rate) * (pending - start) / (full - start)) / 100 if full > start else 1.0
            if self._chance() < chance:
                return "too many connections waiting to log in"
        return None

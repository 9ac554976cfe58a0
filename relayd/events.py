"""What happened, told to whoever listens: metrics and e-mail subscribe; intake, outbox and server publish.

Publishers do not know their listeners, so the SFTP server, intake and outbox stay free of
e-mail and metrics code (SFTPGo's split of protocol, storage and events). Events are
published from the event loop and from worker threads alike: a listener must be quick,
thread-safe and must never block. A listener that raises is logged and the others still hear.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("relayd.events")


@dataclass(frozen=True)
class PackageReceived:
    """An upload was committed by the client and goes to intake."""

    account: str
    peer: str
    size: int


@dataclass(frozen=True)
class PackageAccepted:
    """A new dossier is durably in its commune's inbox (not sent for a resend)."""

    numero: str
    demarche: str
    insee: str
    message_id: str
    size: int
    #: the envelope's EmailConfiguration, when the platform gave one
    email_subject: str | None = None
    email_body: str | None = None


@dataclass(frozen=True)
class PackageRejected:
    """A package was refused and quarantined."""

    reason: str
    detail: str
    account: str
    peer: str
    insee: str | None = None
    numero: str | None = None


@dataclass(frozen=True)
class ReplyDelivered:
    """An ack or Retour reached the platform; ``latency`` counts from its queueing."""

    kind: str
    numero: str | None
    latency_seconds: float


@dataclass(frozen=True)
class DeadLetter:
    """An outbox entry will not be retried by itself any more."""

    entry_id: int
    kind: str
    numero: str | None
    attempts: int
    error_code: str
    error: str


@dataclass(frozen=True)
class HostKeyMismatch:
    """The return server presented a key that is not pinned: nothing is sent."""

    host: str
    port: int
    #: names the presented key and what pins the expected one
    message: str


@dataclass(frozen=True)
class AuthFailed:
    """A login attempt failed."""

    ip: str
    username: str
    method: str


@dataclass(frozen=True)
class AddressBanned:
    """The defender banned a prefix; ``ip`` is the address whose failure brought the ban."""

    ip: str
    seconds: float
    failures: float
    #: the network banned, e.g. ``192.0.2.0/24`` (``defender.ipv4_prefix`` / ``ipv6_prefix``)
    prefix: str = ""


@dataclass(frozen=True)
class DiskLow:
    """Free space under the storage root fell below the threshold (``low``) or came back (not ``low``)."""

    low: bool
    free_bytes: int
    threshold_bytes: int
    path: str


@dataclass(frozen=True)
class ReturnServerOutage:
    """The return server has been out of reach for ``platform.alert_after_hours`` (``down``), or is back (not ``down``)."""

    down: bool
    host: str
    port: int
    #: how long it has lasted so far (down), or lasted in all (back)
    seconds: float
    error_code: str
    error: str
    #: entries waiting for it
    pending: int


Event = (PackageReceived | PackageAccepted | PackageRejected | ReplyDelivered | DeadLetter | HostKeyMismatch
         | AuthFailed | AddressBanned | DiskLow | ReturnServerOutage)
Listener = Callable[[Event], None]


class Events:
    """The hub: ``subscribe`` a listener, ``publish`` an event to every listener."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        """Add a listener; it hears every later event."""
        with self._lock:
            self._listeners = [*self._listeners, listener]

    def publish(self, event: Event) -> None:
        """Tell every listener; a failing listener is logged and never reaches the publisher."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not cost a dossier
                log.exception("events.listener_failed", listener=getattr(listener, "__qualname__", repr(listener)),
                              event=type(event).__name__)


#: for parts built without a hub (unit tests, one-shot commands): events go nowhere
NO_EVENTS = Events()

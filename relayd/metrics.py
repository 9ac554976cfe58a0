"""The Prometheus endpoint: counters fed by the events hub, gauges read from the ledger at scrape time.

Everything lives in a private :class:`CollectorRegistry`, so several relays (or tests) in one
process never share a counter. Label values are bounded: a reason is a
:class:`~relayd.rejections.Reason` code, an INSEE code and a démarche come from the configured
communes, a kind is one of the outbox's; anything else is counted under ``other``, never as free text.

The HTTP server runs in its own threads (the standard library's ``wsgiref``, as prometheus_client's
``start_http_server`` does), bound only to ``metrics.listen`` (loopback by default), and serves
``/metrics`` only. A scrape reads the ledger through :func:`relayd.deadlines.build_report`, as
``relayd status`` does, so both count late and overdue dossiers alike; it never writes.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from relayd import dossiers
from relayd.clock import SYSTEM_CLOCK, Clock
from relayd.config import Config, Listen
from relayd.deadlines import build_report
from relayd.events import (
    AddressBanned,
    AuthFailed,
    DeadLetter,
    DiskLow,
    Event,
    HostKeyMismatch,
    PackageAccepted,
    PackageReceived,
    PackageRejected,
    ReplyDelivered,
    ReturnServerOutage,
)
from relayd.ledger import Ledger
from relayd.rejections import Reason

log = structlog.get_logger("relayd.metrics")

#: the label value for anything outside the bounded set (never the raw value: it could be anything)
OTHER = "other"
#: what the outbox sends
REPLY_KINDS = ("AVL", "ANL", "Retour")
#: SSH authentication methods (RFC 4252 and 4256 names)
AUTH_METHODS = ("password", "publickey", "keyboard-interactive", "hostbased", "none")
OUTBOX_STATUSES = ("pending", "dead")
#: from a second to a day: an ack goes out in seconds, a Retour may wait out a platform outage
DELIVERY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
_REASONS = frozenset(r.value for r in Reason)
#: a client that says nothing for this long is dropped, so a stuck scraper cannot pile up threads
_REQUEST_TIMEOUT_SECONDS = 10.0


class ServerView(Protocol):
    """What the scrape reads of the running SFTP server (a :class:`~relayd.inbound.server.ServerState`)."""

    #: every SSH connection open now, each with ``authenticated``
    connections: set[Any]
    sessions: set[Any]
    #: the pre-authentication budget; ``startups.pending`` holds the connections not yet logged in
    startups: Any
    #: the brute-force defender; ``defender.bans()`` lists the bans in force
    defender: Any

    def uploads_in_flight(self) -> int: ...


class Metrics:
    """The part named ``metrics``: the registry, the event listener, and the HTTP endpoint's lifetime."""

    name = "metrics"

    def __init__(self, config: Config, ledger: Ledger, state: ServerView | None = None, clock: Clock = SYSTEM_CLOCK):
        self.config = config
        #: the address the endpoint was started with; a reload cannot move it
        self._running = config.metrics
        self.registry = CollectorRegistry(auto_describe=True)
        self.port: int | None = None
        r = self.registry
        self.received = Counter("relayd_packages_received", "Uploads committed by the platform and handed to intake.",
                                registry=r)
        self.received_bytes = Counter("relayd_packages_received_bytes", "Bytes of the committed uploads.", registry=r)
        self.accepted = Counter("relayd_packages_accepted", "New dossiers handed over to a commune's inbox.",
                                ["insee", "demarche"], registry=r)
        self.rejected = Counter("relayd_packages_rejected", "Packages refused and quarantined, by reason code.",
                                ["reason"], registry=r)
        self.delivered = Counter("relayd_replies_delivered", "Acks and Retours delivered to the platform.",
                                 ["kind"], registry=r)
        self.latency = Histogram("relayd_reply_delivery_seconds",
                                 "Time from queueing an ack or Retour to its delivery on the platform.",
                                 buckets=DELIVERY_BUCKETS, registry=r)
        self.dead_letters = Counter("relayd_dead_letters", "Outbox entries given up (dead-letter).", ["kind"],
                                    registry=r)
        self.host_key_mismatches = Counter("relayd_host_key_mismatches",
                                           "Connections to the return server refused for an unpinned host key.",
                                           registry=r)
        self.auth_failures = Counter("relayd_auth_failures", "Failed SSH logins, by method.", ["method"], registry=r)
        self.bans = Counter("relayd_bans", "Addresses banned by the brute-force defender.", registry=r)
        self.disk_low = Gauge("relayd_disk_low", "1 while free space under the storage root is below the threshold.",
                              registry=r)
        self.return_server_down = Gauge(
            "relayd_return_server_down",
            "1 while the return server has been out of reach for platform.alert_after_hours or more.", registry=r)
        for kind in REPLY_KINDS:
            # Series exist from the start, so rate() and alerts see a 0 rather than nothing.
            self.delivered.labels(kind=kind)
            self.dead_letters.labels(kind=kind)
        for method in ("password", "publickey"):
            self.auth_failures.labels(method=method)
        self._init_commune_series(config)
        r.register(LedgerCollector(ledger, lambda: self.config, state, clock))
        self._handlers: dict[type, Callable[[Any], None]] = {
            PackageReceived: self._on_received,
            PackageAccepted: self._on_accepted,
            PackageRejected: self._on_rejected,
            ReplyDelivered: self._on_delivered,
            DeadLetter: lambda e: self.dead_letters.labels(kind=_bounded(e.kind, REPLY_KINDS)).inc(),
            HostKeyMismatch: lambda e: self.host_key_mismatches.inc(),
            AuthFailed: lambda e: self.auth_failures.labels(method=_bounded(e.method, AUTH_METHODS)).inc(),
            AddressBanned: lambda e: self.bans.inc(),
            DiskLow: lambda e: self.disk_low.set(1 if e.low else 0),
            ReturnServerOutage: lambda e: self.return_server_down.set(1 if e.down else 0),
        }

    # -- events ----------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """The events-hub listener: count the event (quick, thread-safe, never blocks)."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _on_received(self, event: PackageReceived) -> None:
        self.received.inc()
        self.received_bytes.inc(max(0, event.size))

    def _on_accepted(self, event: PackageAccepted) -> None:
        commune = self.config.commune(event.insee)
        if commune is None:
            insee = demarche = OTHER
        else:
            insee, demarche = commune.insee, _bounded(event.demarche, commune.demarches)
        self.accepted.labels(insee=insee, demarche=demarche).inc()

    def _on_rejected(self, event: PackageRejected) -> None:
        self.rejected.labels(reason=event.reason if event.reason in _REASONS else OTHER).inc()

    def _on_delivered(self, event: ReplyDelivered) -> None:
        self.delivered.labels(kind=_bounded(event.kind, REPLY_KINDS)).inc()
        self.latency.observe(max(0.0, event.latency_seconds))

    def _init_commune_series(self, config: Config) -> None:
        for commune in config.communes:
            for demarche in commune.demarches:
                self.accepted.labels(insee=commune.insee, demarche=demarche)

    # -- the part --------------------------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """Follow a reload: new communes get their series; a new listen address needs a restart."""
        self.config = config
        self._init_commune_series(config)
        if config.metrics != self._running:
            log.warning("metrics.needs_restart", running_enabled=self._running.enabled,
                        running=_address(self._running.listen), configured_enabled=config.metrics.enabled,
                        configured=_address(config.metrics.listen))

    async def run(self) -> None:
        """Serve ``/metrics`` on the configured address until cancelled (or just wait, when disabled)."""
        if not self._running.enabled:
            await asyncio.Event().wait()
            return
        listen = self._running.listen
        try:
            server = await asyncio.to_thread(serve, listen, self.registry)  # a host name may need a lookup
        except OSError as exc:
            log.error("metrics.listen_failed", host=listen.host, port=listen.port, error=str(exc))
            raise
        self.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        log.info("metrics.listening", host=server.server_address[0], port=self.port)
        try:
            await asyncio.Event().wait()
        finally:
            # shutdown() waits for serve_forever's next poll: off the loop, so the stop is not held up.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            log.info("metrics.stopped")


class LedgerCollector(Collector):
    """Gauges computed at scrape time: outbox depth, dossiers by state and lateness, sessions and uploads."""

    def __init__(self, ledger: Ledger, config: Callable[[], Config], state: ServerView | None = None,
                 clock: Clock = SYSTEM_CLOCK):
        self._ledger = ledger
        self._config = config
        self._state = state
        self._clock = clock

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Given so that registering does not run a scrape (and a ledger query) at construction.
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("relayd_outbox_entries", "Outbox entries waiting (pending) or given up (dead).",
                                labels=["status"])
        yield GaugeMetricFamily("relayd_dossiers", "Dossiers by state.", labels=["state"])
        yield GaugeMetricFamily("relayd_dossiers_late",
                                "Open dossiers past deadlines.warn_days (late) or past deadlines.overdue_days "
                                "(overdue); a dossier counts in one level only.", labels=["level"])
        yield GaugeMetricFamily("relayd_sessions_open", "SSH connections logged in now.")
        yield GaugeMetricFamily("relayd_connections_pending",
                                "SSH connections accepted and not yet logged in (the pre-authentication budget).")
        yield GaugeMetricFamily("relayd_uploads_in_flight", "Uploads begun and not yet committed or discarded.")
        yield GaugeMetricFamily("relayd_bans_active", "Address prefixes the brute-force defender bans now.")

    def collect(self) -> Iterable[GaugeMetricFamily]:
        outbox, by_state, late, sessions, pending, uploads, bans = self._families()
        try:
            counts = self._read_ledger()
        except sqlite3.Error as exc:
            # The other gauges still go out; a missing series says the read failed, a 0 would lie.
            log.warning("metrics.ledger_read_failed", error=str(exc))
        else:
            for status in OUTBOX_STATUSES:
                outbox.add_metric([status], counts["outbox"].get(status, 0))
            for state in dossiers.STATES:
                by_state.add_metric([state], counts["dossiers"].get(state, 0))
            for level in ("late", "overdue"):
                late.add_metric([level], counts["late"].get(level, 0))
            yield from (outbox, by_state, late)
        if self._state is not None:
            # The sets change on the event loop while the scrape runs in a server thread: list() copies
            # one in a single step, where iterating it here could meet a change half way.
            connections = list(self._state.connections)
            sessions.add_metric([], sum(1 for c in connections if c.authenticated))
            pending.add_metric([], len(self._state.startups.pending))
            uploads.add_metric([], _uploads_in_flight(self._state))
            yield from (sessions, pending, uploads)
            try:
                bans.add_metric([], len(self._state.defender.bans()))
            except sqlite3.Error as exc:
                log.warning("metrics.ledger_read_failed", error=str(exc))
            else:
                yield bans

    def _read_ledger(self) -> dict[str, dict[str, int]]:
        # The same report as `relayd status` and the digest: one definition of late and overdue.
        report = build_report(self._ledger, self._config(), self._clock.now())
        states: dict[str, int] = {}
        for (_insee, _demarche, state), n in report.counts.items():
            states[state] = states.get(state, 0) + n
        return {
            "outbox": {"pending": report.outbox_pending, "dead": report.outbox_dead},
            "dossiers": dict(states),
            "late": {"late": len(report.late), "overdue": len(report.overdue)},
        }


def serve(listen: Listen, registry: CollectorRegistry) -> WSGIServer:
    """A threaded HTTP server bound to ``listen`` only, serving ``registry`` at ``/metrics`` (404 elsewhere).

    Not started: call ``serve_forever`` in a thread, then ``shutdown`` and ``server_close``.
    """
    family, _, _, _, address = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    server_class = type("MetricsServer", (_ThreadingServer,), {"address_family": family})
    return make_server(address[0], listen.port, _only_metrics(make_wsgi_app(registry)), server_class, _QuietHandler)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the stop


class _QuietHandler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
        pass  # wsgiref writes every request to stderr; a scrape every 15 s is not news


def _only_metrics(app: Callable[..., Any]) -> Callable[..., Any]:
    """prometheus_client answers on every path; relayd answers on ``/metrics`` only."""

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: relayd's metrics are at /metrics\n"]
        return app(environ, start_response)

    return wsgi


def _uploads_in_flight(state: ServerView) -> int:
    # The sessions set changes on the event loop while the scrape runs in a server thread: a
    # "changed size during iteration" is retried, a few times at most.
    for _ in range(3):
        try:
            return state.uploads_in_flight()
        except RuntimeError:
            continue
    return sum(1 for session in list(state.sessions) if session.busy)


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


def _address(listen: Listen) -> str:
    return f"{listen.host}:{listen.port}"

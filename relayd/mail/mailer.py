"""The mail part of the daemon: it hears events, queues mail, sends it with retries, and runs the daily digest.

Listening is quick and never touches the network: :meth:`Mailer.on_event` composes a mail and
inserts it into the spool (one small SQLite transaction), then wakes :meth:`Mailer.run`, which
sends due mail with smtplib in a worker thread. An SMTP outage only delays mail: it stays in the
ledger, across restarts, until the server takes it or it is too old (``mail.max_age_hours``).

Alerts to the administrator are throttled so that a problem that lasts gives one mail, not one
per retry: a host-key mismatch once per distinct message per 24 hours, low disk once per
episode, repeated rejections once per window, dead letters at once and then gathered into
one alert an hour.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from datetime import datetime, timedelta

import structlog

from relayd.clock import SYSTEM_CLOCK, Clock
from relayd.config import Config, Mail
from relayd.deadlines import build_report
from relayd.events import DeadLetter, DiskLow, Event, HostKeyMismatch, PackageAccepted, PackageRejected, ReturnServerOutage
from relayd.ledger import Ledger
from relayd.mail import messages
from relayd.mail.messages import Draft
from relayd.mail.smtp import SendError, SmtpConnection
from relayd.mail.spool import QueuedMail, Spool

log = structlog.get_logger("relayd.mail")

#: a host-key mismatch with the same message is told again after this long
HOST_KEY_ALERT_EVERY = timedelta(hours=24)
#: dead letters after the first are gathered into one alert this often: an outage can kill hundreds at once
DEAD_LETTER_ALERT_EVERY = timedelta(hours=1)
#: the state row that remembers the day of the last digest
DIGEST_STATE = "digest_date"


class Mailer:
    """The mail part: ``events.subscribe(mailer.on_event)``, run :meth:`run`, call :meth:`reconfigure` on reload."""

    name = "mail"

    def __init__(self, config: Config, ledger: Ledger, clock: Clock = SYSTEM_CLOCK, *,
                 poll_seconds: float = 30.0, batch: int = 20):
        self.config = config
        self.ledger = ledger
        self.clock = clock
        self.spool = Spool(ledger)
        #: the longest sleep: a moved clock (tests) or a digest hour is noticed within this
        self.poll_seconds = poll_seconds
        self.batch = batch
        self._lock = threading.Lock()  # listeners run on the loop and in worker threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop = threading.Event()
        self._host_key_alerts: dict[str, datetime] = {}
        self._disk_low = False
        self._rejected: deque[tuple[datetime, PackageRejected]] = deque()
        self._rejections_quiet_until: datetime | None = None
        self._dead_alert_at: datetime | None = None
        self._dead_held: list[DeadLetter] = []

    # -- the listener ----------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Queue the mail an event calls for. Quick: one SQLite insert at most, no network."""
        settings = self.config.mail
        if settings is None:
            return
        with self._lock:
            drafts = self._drafts_for(event, settings, self.clock.now())
        if drafts:
            self.queue(drafts)

    def _drafts_for(self, event: Event, settings: Mail, now: datetime) -> list[Draft]:
        admin = settings.admin
        if isinstance(event, PackageAccepted):
            commune = self.config.commune(event.insee)
            draft = messages.new_dossier(event, commune) if commune is not None else None
            if draft is None:
                log.debug("mail.no_address", numero=event.numero, insee=event.insee)
            return [draft] if draft else []
        if not admin:
            return []
        if isinstance(event, DeadLetter):
            self._dead_held.append(event)
            return self._held_dead_letters(admin, now)
        if isinstance(event, HostKeyMismatch):
            last = self._host_key_alerts.get(event.message)
            if last is not None and now - last < HOST_KEY_ALERT_EVERY:
                return []
            self._host_key_alerts = {m: t for m, t in self._host_key_alerts.items() if now - t < HOST_KEY_ALERT_EVERY}
            self._host_key_alerts[event.message] = now
            return [messages.host_key_mismatch(event, admin)]
        if isinstance(event, ReturnServerOutage):
            return [messages.return_server_outage(event, admin)]
        if isinstance(event, DiskLow):
            was_low, self._disk_low = self._disk_low, event.low
            return [messages.disk_low(event, admin)] if event.low and not was_low else []
        if isinstance(event, PackageRejected):
            return self._rejection(event, settings, now)
        return []

    def _held_dead_letters(self, admin: list[str], now: datetime) -> list[Draft]:
        """The dead letters held so far, as one alert, if the last one was long enough ago."""
        if not self._dead_held or (self._dead_alert_at is not None and now - self._dead_alert_at < DEAD_LETTER_ALERT_EVERY):
            return []
        held, self._dead_held = self._dead_held, []
        self._dead_alert_at = now
        return [messages.dead_letters(held, admin)]

    def flush_held(self) -> None:
        """Send what the throttle held back, once its time has come (called from the loop)."""
        settings = self.config.mail
        if settings is None or not settings.admin:
            return
        with self._lock:
            drafts = self._held_dead_letters(settings.admin, self.clock.now())
        if drafts:
            self.queue(drafts)

    def _rejection(self, event: PackageRejected, settings: Mail, now: datetime) -> list[Draft]:
        """Count refusals in a sliding window; enough of them give one alert, then quiet for a window."""
        window = timedelta(minutes=settings.rejection_alert_minutes)
        self._rejected.append((now, event))
        while self._rejected and now - self._rejected[0][0] > window:
            self._rejected.popleft()
        if self._rejections_quiet_until is not None and now < self._rejections_quiet_until:
            return []
        if len(self._rejected) < settings.rejection_alert_count:
            return []
        told = [e for _, e in self._rejected]
        self._rejected.clear()
        self._rejections_quiet_until = now + window
        return [messages.rejections(told, settings.rejection_alert_minutes, settings.admin)]

    def queue(self, drafts: list[Draft]) -> list[int]:
        """Put mail in the spool and wake the sender."""
        settings = self.config.mail
        domain = settings.sender.rpartition("@")[2] if settings else "localhost"
        ids = self.spool.add(drafts, self.clock.now().timestamp(), domain=domain)
        for mail_id, d in zip(ids, drafts, strict=True):
            log.info("mail.queued", id=mail_id, kind=d.kind, numero=d.numero, recipients=len(d.recipients))
        self._poke()
        return ids

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    # -- the part --------------------------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """Take new settings; with ``mail`` removed nothing is sent, and queued mail waits in the spool."""
        self.config = config
        self._poke()

    async def run(self) -> None:
        """Send due mail and the daily digest until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stop.clear()
        log.info("mail.started", enabled=self.config.mail is not None, queued=await asyncio.to_thread(self.spool.pending))
        while True:
            self._wake.clear()
            try:
                await asyncio.to_thread(self.flush_held)
                await self.digest_if_due()
                await self.send_due()
            except Exception:  # one bad turn (e.g. a locked ledger) must not end mail for good
                log.exception("mail.loop_failed")
            try:
                async with asyncio.timeout(await asyncio.to_thread(self._sleep_seconds)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _sleep_seconds(self) -> float:
        if self.config.mail is None:
            return self.poll_seconds
        due = self.spool.next_attempt_at()
        if due is None:
            return self.poll_seconds
        return min(self.poll_seconds, max(0.0, due - self.clock.now().timestamp()))

    async def send_due(self) -> int:
        """Send every mail due now, in batches over one SMTP connection each; returns how many went."""
        sent = 0
        for _ in range(100):  # bounded: a batch that sends nothing ends the turn anyway
            settings = self.config.mail
            if settings is None:
                return sent
            due = await asyncio.to_thread(self.spool.due, self.clock.now().timestamp(), self.batch)
            if not due:
                return sent
            job = asyncio.ensure_future(asyncio.to_thread(self._send_batch, settings, due))
            try:
                went = await asyncio.shield(job)
            except asyncio.CancelledError:
                # Stopping: let the mail in hand finish so that its row is deleted (no resend at the
                # next start), within one SMTP timeout; the rest stays queued.
                self._stop.set()
                try:
                    async with asyncio.timeout(settings.timeout_seconds + 5):
                        await job
                except Exception:  # TimeoutError included: the thread finishes on its own, the row may be sent again
                    pass
                raise
            sent += went
            if went < len(due):
                return sent
        return sent

    def _send_batch(self, settings: Mail, mails: list[QueuedMail]) -> int:
        """In a worker thread: one connection, each mail in turn; a broken connection fails the rest."""
        sent = 0
        remaining = list(mails)
        try:
            with SmtpConnection(settings) as smtp:
                while remaining and not self._stop.is_set():
                    mail = remaining[0]
                    message = messages.render(sender=settings.sender, recipients=mail.recipients, subject=mail.subject,
                                              body=mail.body, message_id=mail.message_id, date=mail.created)
                    try:
                        refused = smtp.send(message, mail.recipients)
                    except SendError as exc:
                        remaining.pop(0)
                        self._failed(mail, exc, settings)
                        if exc.code is None or exc.code == 421:  # the connection is gone
                            raise
                        continue
                    remaining.pop(0)
                    self.spool.sent(mail, f"new-dossier mail sent to {len(mail.recipients) - len(refused)} address(es)")
                    sent += 1
                    if refused:
                        log.warning("mail.recipients_refused", id=mail.id, kind=mail.kind, numero=mail.numero,
                                    refused=len(refused))
                    log.info("mail.sent", id=mail.id, kind=mail.kind, numero=mail.numero, attempts=mail.attempts + 1)
        except SendError as exc:
            for mail in remaining:
                self._failed(mail, exc, settings)
        return sent

    def _failed(self, mail: QueuedMail, exc: SendError, settings: Mail) -> None:
        wait = self.spool.failed(mail, str(exc), self.clock.now().timestamp(), retry_seconds=settings.retry_seconds,
                                 max_age_hours=settings.max_age_hours)
        if wait is None:
            log.error("mail.given_up", id=mail.id, kind=mail.kind, numero=mail.numero, attempts=mail.attempts + 1,
                      error=str(exc), max_age_hours=settings.max_age_hours)
        else:
            log.warning("mail.send_failed", id=mail.id, kind=mail.kind, numero=mail.numero, attempts=mail.attempts + 1,
                        error=str(exc), retry_in=round(wait, 1))

    # -- the daily digest ------------------------------------------------------------

    async def digest_if_due(self) -> bool:
        """Queue today's digest once ``mail.digest_at`` (local time) has passed; True when it was queued now.

        The day is recorded with the queued mail in one transaction, so a restart does not send it twice.
        Nothing late or overdue: no mail, and the day is still recorded.
        """
        settings = self.config.mail
        if settings is None:
            return False
        now = self.clock.now()
        local = now.astimezone()
        if local.time() < settings.digest_at:
            return False
        today = local.date().isoformat()
        if await asyncio.to_thread(self.spool.state, DIGEST_STATE) == today:
            return False
        config = self.config
        report = await asyncio.to_thread(build_report, self.ledger, config, now)
        drafts = messages.digests(report, config, settings.admin, now)
        ids = await asyncio.to_thread(self.spool.add, drafts, now.timestamp(),
                                      domain=settings.sender.rpartition("@")[2], state=(DIGEST_STATE, today))
        log.info("mail.digest", day=today, late=len(report.late), overdue=len(report.overdue), mails=len(ids))
        self._poke()
        return True

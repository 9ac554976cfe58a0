"""E-mail: new-dossier mail, the SMTP outage, login and STARTTLS, alerts and the daily digest.

Every mail goes through a real SMTP server (aiosmtpd) on loopback, started in the test. The
acceptance tests run a real relayd process; the throttling and digest tests drive a
:class:`Mailer` in process with a clock they move.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import ipaddress
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from conftest import REAL_MOTDEPASSE, REAL_PACKAGE, free_port, sftp_put, wait_for
from relayd.clock import Clock
from relayd.config import Config
from relayd.events import DeadLetter, DiskLow, HostKeyMismatch, PackageAccepted, PackageRejected
from relayd.inbound.passwords import hash_password
from relayd.ledger import Ledger, PackageRecord
from relayd.mail import Mailer

SENDER = "relayd@mairie.test"
ADMIN = "admin@mairie.test"
SERVICE = "urbanisme@mairie-90017.test"
# The test's server takes a login over plain text on loopback; aiosmtpd warns about that at every connection.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

REAL_SUBJECT = "DAUA - A-9-X3UGO4V7 : dossier à traiter"
SMTP_USER = "relayd"
SMTP_PASSWORD = "s3cret-smtp-Passw0rd!"


# -- a real SMTP server ----------------------------------------------------------------


@dataclass
class Received:
    """One message as the SMTP server got it."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    login: str | None

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        part = self.message.get_body(preferencelist=("plain",))
        assert part is not None
        return part.get_content()


class Sink:
    """An aiosmtpd handler that keeps every message; with ``password``, it checks logins too."""

    def __init__(self, password: str | None = None):
        self.received: list[Received] = []
        self.logins: list[tuple[str, str]] = []
        self.password = password
        self.port = 0
        self._lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content, session.auth_data))
        return "250 Message accepted for delivery"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.logins.append((login, password))
        ok = login == SMTP_USER and password == self.password
        # handled=False: aiosmtpd answers the failure itself (535)
        return AuthResult(success=ok, handled=False, auth_data=login)

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]


@pytest.fixture
def smtp_server() -> Iterator[Any]:
    """``start(port=None, password=None, **smtp_options) -> Sink``: a real SMTP server on 127.0.0.1."""
    controllers: list[Controller] = []

    def start(port: int | None = None, *, password: str | None = None, **options: Any) -> Sink:
        sink = Sink(password)
        sink.port = port or free_port()
        if password is not None:
            options.update(authenticator=sink.authenticate, auth_required=True, auth_require_tls=False)
        controller = Controller(sink, hostname="127.0.0.1", port=sink.port, **options)
        controller.start()
        controllers.append(controller)
        return sink

    yield start
    for controller in controllers:
        try:
            controller.stop()
        except (AssertionError, RuntimeError):
            pass  # already stopped


def mail_settings(port: int, **overrides: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "sender": SENDER, "admin": [ADMIN], "retry_seconds": 0.2,
            "timeout_seconds": 10, **overrides}


def mail_relay(make_relay: Any, port: int, *, start: bool = True, **overrides: Any) -> Any:
    """A relay with ``mail:`` pointing at ``port`` and an address for commune 90017 (``overrides``: top-level keys)."""
    relay = make_relay(start=False, mail=mail_settings(port), **overrides)
    relay.config["communes"][0]["emails"] = [SERVICE]
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    if start:
        relay.start()
    return relay


def spooled(relay: Any) -> list[dict[str, Any]]:
    return relay.ledger_rows("SELECT * FROM mail ORDER BY id")


def assert_no_secret(relay: Any, sink: Sink) -> None:
    """The MotDePasse is in no mail (raw or decoded) and in no log line."""
    for r in sink.received:
        assert REAL_MOTDEPASSE not in r.subject and REAL_MOTDEPASSE not in r.body
        assert REAL_MOTDEPASSE.encode() not in r.raw
    assert REAL_MOTDEPASSE not in relay.log_text()


# -- acceptance: a relayd process ------------------------------------------------------


def test_new_dossier_mail_carries_the_platforms_subject(make_relay, smtp_server):
    sink = smtp_server()
    relay = mail_relay(make_relay, sink.port)
    result = sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: sink.received, what="the new-dossier mail")

    mail = sink.received[0]
    assert mail.subject == REAL_SUBJECT
    assert mail.rcpt_tos == [SERVICE]
    assert mail.message["To"] == SERVICE
    assert mail.mail_from == SENDER and mail.message["From"] == SENDER
    # The platform's own text, with the placeholders relayd can fill in, and where the dossier is.
    assert "https://mdel.mon.service-public.fr/gsServiceInstructeur/suiviNoLogin.do" in mail.body
    assert "A-9-X3UGO4V7-DAUA-ent-{i}.xml" in mail.body
    assert str(relay.inbox("90017")) in mail.body
    assert_no_secret(relay, sink)
    # Sent: the spool forgets it, the dossier's history remembers it.
    wait_for(lambda: not spooled(relay), what="the spool to empty")
    kinds = [e["kind"] for e in relay.ledger_rows("SELECT kind FROM events WHERE numero = 'A-9-X3UGO4V7' ORDER BY id")]
    assert kinds.count("mail_sent") == 1 and kinds.index("received") < kinds.index("mail_sent")
    assert len(sink.received) == 1


def test_smtp_outage_delays_the_mail_and_loses_nothing(make_relay, smtp_server):
    port = free_port()  # nothing listens there yet
    relay = mail_relay(make_relay, port)
    result = sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name)
    assert result.returncode == 0, result.stderr
    # The dossier is handed over at once; the mail waits in the spool.
    assert (relay.inbox("90017") / "A-9-X3UGO4V7-DAUA.zip").exists()
    assert [m["kind"] for m in spooled(relay)] == ["new_dossier"]
    wait_for(lambda: any(e.get("event") == "mail.send_failed" for e in relay.events()), what="a failed attempt")

    sink = smtp_server(port)
    wait_for(lambda: not spooled(relay), what="the mail to go once the server is back")
    assert [r.subject for r in sink.received] == [REAL_SUBJECT]
    assert_no_secret(relay, sink)


def test_queued_mail_survives_a_restart(make_relay, smtp_server):
    port = free_port()
    relay = mail_relay(make_relay, port)
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: any(e.get("event") == "mail.send_failed" for e in relay.events()), what="a failed attempt")
    relay.restart()
    assert [m["kind"] for m in spooled(relay)] == ["new_dossier"]

    sink = smtp_server(port)
    wait_for(lambda: not spooled(relay), what="the queued mail to go after the restart")
    assert [r.subject for r in sink.received] == [REAL_SUBJECT]
    assert relay.ledger_rows("SELECT COUNT(*) AS n FROM events WHERE kind = 'mail_sent'")[0]["n"] == 1


def test_smtp_login_and_the_password_stays_out_of_the_log(make_relay, smtp_server, tmp_path):
    sink = smtp_server(password=SMTP_PASSWORD)
    secret = tmp_path / "smtp-password"
    secret.write_text(SMTP_PASSWORD + "\n")
    relay = make_relay(start=False, mail=mail_settings(sink.port, username=SMTP_USER, password_file=str(secret)))
    relay.config["communes"][0]["emails"] = [SERVICE]
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))
    relay.start()
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: sink.received, what="the mail, after a login")
    assert sink.logins == [(SMTP_USER, SMTP_PASSWORD)]
    assert sink.received[0].login == SMTP_USER and sink.received[0].subject == REAL_SUBJECT
    assert SMTP_PASSWORD not in relay.log_text()


def unreachable_platform(relay: Any, **overrides: Any) -> None:
    """Point the relay at a return server that never answers (before its start)."""
    relay.config["platform"] = {"host": "127.0.0.1", "port": free_port(), "username": "commune",
                                "private_key": str(relay.key), "host_key_fingerprints": ["SHA256:" + "A" * 43],
                                "retry": {"initial_seconds": 0.1, "max_seconds": 0.3, "max_attempts": 1}, **overrides}
    relay.config_path.write_text(yaml.safe_dump(relay.config, sort_keys=False))


def test_dead_letter_alerts_the_administrator(make_relay, smtp_server):
    sink = smtp_server()
    relay = mail_relay(make_relay, sink.port, start=False)
    # No AVL (platform.acks: none), so that the dossier's first entry is its Retour: an ack is kept in the
    # ledger with its bytes and its file written again when missing, a Retour's file is the only copy.
    unreachable_platform(relay, acks="none")
    relay.start()
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: relay.ledger_rows("SELECT 1 FROM packages"), what="the package recorded")
    dropped = relay.cli("return", "A-9-X3UGO4V7", "--state", "recu")
    assert dropped.returncode == 0, dropped.stderr
    # The outage alone never dead-letters; a Retour whose file is gone does, at once (nothing could be sent).
    wait_for(lambda: relay.outbox(), what="the Retour queued")
    Path(relay.outbox()[0]["payload"]).unlink()
    wait_for(lambda: sink.to(ADMIN), what="the dead-letter alert")
    alert = sink.to(ADMIN)[0]
    dead = relay.outbox()[0]
    assert dead["status"] == "dead" and dead["kind"] == "Retour"
    assert "Envoi abandonné" in alert.subject and "Retour" in alert.subject and "A-9-X3UGO4V7" in alert.subject
    assert f"relayd outbox retry -c <fichier de configuration> {dead['id']}" in alert.body
    assert dead["last_error_code"] == "payload_missing" and dead["last_error_code"] in alert.body
    assert "attendent derrière lui" in alert.body  # the dossier's later entries wait: the way out is named
    wait_for(lambda: sink.to(SERVICE), what="the new-dossier mail as well")
    assert_no_secret(relay, sink)


def test_a_long_outage_alerts_the_administrator_and_dead_letters_nothing(make_relay, smtp_server):
    sink = smtp_server()
    relay = mail_relay(make_relay, sink.port, start=False)
    unreachable_platform(relay, alert_after_hours=0.0003)  # about a second
    relay.start()
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    wait_for(lambda: sink.to(ADMIN), what="the outage alert")
    alert = sink.to(ADMIN)[0]
    assert "Serveur de retour injoignable" in alert.subject and "connect_failed" in alert.body
    assert [r["status"] for r in relay.outbox()] == ["pending"]
    assert relay.outbox()[0]["attempts"] >= 2  # past max_attempts, still waiting


def broken_package(folder: Path, kind: str) -> Path:
    """A broken package written by `relayd testkit sample --broken KIND`."""
    out = folder / kind
    subprocess.run([sys.executable, "-m", "relayd", "testkit", "sample", "--broken", kind, "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    (package,) = out.glob("*.zip")
    return package


def test_repeated_rejections_alert_once(make_relay, smtp_server, tmp_path):
    sink = smtp_server()
    relay = make_relay(mail=mail_settings(sink.port, rejection_alert_count=3, rejection_alert_minutes=60))
    kinds = ["xxe", "document-missing", "unknown-demarche", "not-a-zip"]
    for i, kind in enumerate(kinds):
        package = broken_package(tmp_path, kind)
        assert sftp_put(relay, package, package.name).returncode != 0, f"{kind} was accepted"
        if i == 1:
            assert not spooled(relay), "two refusals are below the threshold"
    # The refusal is told to the client only after intake has published it, so every alert is queued now.
    wait_for(lambda: not spooled(relay), what="the spool to empty")
    assert len(sink.received) == 1  # the fourth refusal falls in the quiet window
    alert = sink.received[0]
    assert alert.rcpt_tos == [ADMIN]
    assert alert.subject == "[relayd] 3 paquets refusés en 60 minutes"
    for code in ("xml_forbidden", "member_missing", "demarche_not_accepted"):
        assert code in alert.body
    assert "zip_invalid" not in alert.body


# -- in process: a Mailer with a clock the test moves ---------------------------------


def make_config(root: Path, mail: dict[str, Any] | None, **extra: Any) -> Config:
    return Config.model_validate({
        "storage": {"root": str(root / "var")},
        "accounts": [{"username": "plateforme", "password_hash": hash_password("x"), "communes": ["90017", "75056"]}],
        "communes": [
            {"insee": "90017", "name": "Belfort-Test", "inbox": str(root / "inbox/90017"), "demarches": ["recensementCitoyen", "ILE"],
             "emails": [SERVICE, "accueil@mairie-90017.test"]},
            {"insee": "75056", "name": "Paris-Test", "inbox": str(root / "inbox/75056"), "demarches": ["recensementCitoyen"]},
        ],
        "mail": mail,
        **extra,
    })


def accept(ledger: Ledger, numero: str, insee: str = "90017", *, days_ago: float = 0) -> None:
    """A dossier in the ledger, received ``days_ago`` days before the real now."""
    sha = hashlib.sha256(numero.encode()).hexdigest()
    ledger.record_accepted(PackageRecord(sha256=sha, size=1, numero=numero, demarche="recensementCitoyen", insee=insee,
                                         message_id=f"{numero} 1"), deposited_at=None, inbox_path="inbox", archive_path="a")
    received = (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(timespec="milliseconds")
    with ledger.transaction() as db:
        db.execute("UPDATE dossiers SET received_at = ? WHERE numero = ?", (received, numero))


def local_at(day: datetime, hour: int, minute: int = 0) -> datetime:
    """``day``'s date at hour:minute, local time (naive: Clock.at reads it as local)."""
    return datetime.combine(day.date(), time(hour, minute))


def move(clock: Clock, moment: datetime) -> None:
    clock.offset = Clock.at(moment).offset


def queued(ledger: Ledger) -> list[dict[str, Any]]:
    return [dict(r) for r in ledger.query("SELECT * FROM mail ORDER BY id")]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    yield ledger
    ledger.close()


def rejected(n: int, reason: str = "zip_invalid") -> PackageRejected:
    return PackageRejected(reason=reason, detail=f"refusal {n}.", account="plateforme", peer="127.0.0.1")


def test_alerts_are_throttled(tmp_path, ledger):
    config = make_config(tmp_path, mail_settings(1, rejection_alert_count=3, rejection_alert_minutes=10))
    clock = Clock()
    mailer = Mailer(config, ledger, clock)

    def alerts() -> list[str]:
        return [m["subject"] for m in queued(ledger) if m["kind"] == "alert"]

    # A host-key mismatch: once per distinct message per day, however often the worker retries.
    mismatch = HostKeyMismatch(host="127.0.0.1", port=2223, message="the server's key SHA256:abc is not pinned")
    for _ in range(5):
        mailer.on_event(mismatch)
    assert len(alerts()) == 1
    mailer.on_event(HostKeyMismatch(host="127.0.0.1", port=2223, message="the server's key SHA256:xyz is not pinned"))
    assert len(alerts()) == 2
    clock.offset += timedelta(hours=23)
    mailer.on_event(mismatch)
    assert len(alerts()) == 2
    clock.offset += timedelta(hours=2)
    mailer.on_event(mismatch)
    assert len(alerts()) == 3

    # Low disk: once per episode, and once when it clears.
    low = DiskLow(low=True, free_bytes=10 * 1024 * 1024, threshold_bytes=1024 ** 3, path=str(tmp_path))
    mailer.on_event(low)
    mailer.on_event(low)
    assert len(alerts()) == 4
    assert "Espace disque insuffisant" in alerts()[-1]
    mailer.on_event(DiskLow(low=False, free_bytes=2 * 1024 ** 3, threshold_bytes=1024 ** 3, path=str(tmp_path)))
    assert len(alerts()) == 5 and "de nouveau suffisant" in alerts()[-1]  # told again when it clears
    mailer.on_event(low)
    assert len(alerts()) == 6

    # Rejections: the third within the window alerts, then quiet until the window has passed.
    mailer.on_event(rejected(1, "xml_forbidden"))
    mailer.on_event(rejected(2))
    assert len(alerts()) == 6
    mailer.on_event(rejected(3))
    assert len(alerts()) == 7
    body = queued(ledger)[-1]["body"]
    assert "xml_forbidden : 1" in body and "zip_invalid : 2" in body and "refusal 3." in body
    for n in range(4, 10):
        mailer.on_event(rejected(n))
    assert len(alerts()) == 7
    clock.offset += timedelta(minutes=11)
    mailer.on_event(rejected(10))
    mailer.on_event(rejected(11))
    assert len(alerts()) == 7  # spaced-out refusals stay below the threshold
    mailer.on_event(rejected(12))
    assert len(alerts()) == 8

    # Dead letters: the first at once; those that follow within the hour come together in one alert after it.
    for entry in (1, 2, 3):
        mailer.on_event(DeadLetter(entry_id=entry, kind="Retour", numero=f"A-1-ABCDEFG{entry}", attempts=200,
                                   error_code="connect_failed", error="connection refused"))
    assert len(alerts()) == 9
    assert "#1 " in queued(ledger)[-1]["body"] and "#2 " not in queued(ledger)[-1]["body"]
    mailer.flush_held()
    assert len(alerts()) == 9
    clock.offset += timedelta(minutes=61)
    mailer.flush_held()
    assert len(alerts()) == 10
    summary = queued(ledger)[-1]
    assert summary["subject"] == "[relayd] 2 envois abandonnés"
    assert "#2 " in summary["body"] and "#3 " in summary["body"]
    assert "relayd outbox retry -c <fichier de configuration> 2 3" in summary["body"]

    # Without an administrator address nobody is told; without mail, nothing is queued at all.
    mailer.reconfigure(make_config(tmp_path, mail_settings(1, admin=[])))
    mailer.on_event(DeadLetter(entry_id=3, kind="AVL", numero=None, attempts=1, error_code="x", error="y"))
    mailer.reconfigure(make_config(tmp_path, None))
    mailer.on_event(PackageAccepted(numero="A-1-ABCDEFGH", demarche="recensementCitoyen", insee="90017", message_id="m", size=1))
    assert len(queued(ledger)) == 10


def test_daily_digest_once_a_day(tmp_path, ledger, smtp_server):
    sink = smtp_server()
    config = make_config(tmp_path, mail_settings(sink.port, digest_at="08:00"))
    accept(ledger, "A-1-LATE0001")                         # late 25 days on
    accept(ledger, "A-1-OVERDUE1", days_ago=11)            # overdue 25 days on
    accept(ledger, "A-1-PARIS001", insee="75056")          # late, but Paris-Test has no address
    accept(ledger, "A-1-CLOSED01", days_ago=11)
    with ledger.transaction() as db:
        db.execute("UPDATE dossiers SET state = 'clos' WHERE numero = 'A-1-CLOSED01'")
    day = datetime.now() + timedelta(days=25)
    clock = Clock.at(local_at(day, 7, 0))
    mailer = Mailer(config, ledger, clock)

    assert not asyncio.run(mailer.digest_if_due())  # before 08:00
    move(clock, local_at(day, 8, 30))
    assert asyncio.run(mailer.digest_if_due())
    assert asyncio.run(mailer.send_due()) == 2
    commune = sink.to(SERVICE)
    assert len(commune) == 1 and commune[0].rcpt_tos == [SERVICE, "accueil@mairie-90017.test"]
    assert commune[0].subject == "[relayd] Belfort-Test : 1 hors délai, 1 bientôt hors délai"
    body = commune[0].body
    assert body.index("A-1-OVERDUE1") < body.index("Bientôt hors délai") < body.index("A-1-LATE0001")
    assert "A-1-PARIS001" not in body and "A-1-CLOSED01" not in body
    admin = sink.to(ADMIN)
    assert len(admin) == 1 and "1 hors délai, 2 bientôt hors délai" in admin[0].subject
    assert all(n in admin[0].body for n in ("A-1-OVERDUE1", "A-1-LATE0001", "A-1-PARIS001"))
    assert "A-1-CLOSED01" not in admin[0].body

    # Once a day, also across a restart.
    move(clock, local_at(day, 18, 0))
    assert not asyncio.run(mailer.digest_if_due())
    assert not asyncio.run(Mailer(config, ledger, clock).digest_if_due())
    move(clock, local_at(day + timedelta(days=1), 8, 1))
    assert asyncio.run(mailer.digest_if_due())
    assert asyncio.run(mailer.send_due()) == 2

    # Nothing late: no mail.
    with ledger.transaction() as db:
        db.execute("UPDATE dossiers SET state = 'clos'")
    move(clock, local_at(day + timedelta(days=2), 8, 1))
    assert asyncio.run(mailer.digest_if_due())
    assert queued(ledger) == [] and len(sink.received) == 4


def test_failed_send_backs_off_then_gives_up(tmp_path, ledger):
    port = free_port()
    config = make_config(tmp_path, mail_settings(port, retry_seconds=60, max_age_hours=2))
    clock = Clock()
    mailer = Mailer(config, ledger, clock)
    mailer.on_event(PackageAccepted(numero="A-1-ABCDEFGH", demarche="ILE", insee="90017", message_id="m", size=1))
    waits = []
    for _ in range(4):
        before = clock.now().timestamp()
        assert asyncio.run(mailer.send_due()) == 0
        assert asyncio.run(mailer.send_due()) == 0  # not due again yet: no second attempt
        (row,) = queued(ledger)
        waits.append(round(row["next_attempt_at"] - before))
        clock.offset += timedelta(seconds=row["next_attempt_at"] - before + 1)
    assert waits == [60, 120, 240, 480]
    assert row["attempts"] == 4 and "connect" in row["last_error"]

    clock.offset += timedelta(hours=2)
    assert asyncio.run(mailer.send_due()) == 0
    assert queued(ledger) == []
    (given_up,) = ledger.events("A-1-ABCDEFGH")
    assert given_up["kind"] == "mail_given_up" and "5 attempts" in given_up["detail"]


def test_default_mail_wrong_password_and_reload(tmp_path, ledger, smtp_server):
    sink = smtp_server(password=SMTP_PASSWORD)
    secret = tmp_path / "smtp-password"
    secret.write_text("not the password")
    settings = mail_settings(sink.port, username=SMTP_USER, password_file=str(secret))
    mailer = Mailer(make_config(tmp_path, settings), ledger, Clock())
    # No EmailConfiguration in the envelope: relayd's own French subject and body.
    mailer.on_event(PackageAccepted(numero="A-1-ABCDEFGH", demarche="ILE", insee="90017", message_id="m", size=1))
    assert asyncio.run(mailer.send_due()) == 0
    (row,) = queued(ledger)
    assert "login: SMTP 535" in row["last_error"] and "not the password" not in row["last_error"]

    # The right password on reload; mail disabled meanwhile keeps it queued.
    secret.write_text(SMTP_PASSWORD)
    mailer.reconfigure(make_config(tmp_path, None))
    with ledger.transaction() as db:
        db.execute("UPDATE mail SET next_attempt_at = 0")
    assert asyncio.run(mailer.send_due()) == 0 and len(queued(ledger)) == 1
    mailer.reconfigure(make_config(tmp_path, settings))
    assert asyncio.run(mailer.send_due()) == 1
    (mail,) = sink.received
    assert mail.subject == "Nouveau dossier A-1-ABCDEFGH (ILE) à traiter"
    assert "Numéro du dossier : A-1-ABCDEFGH" in mail.body and "Belfort-Test (90017)" in mail.body
    assert str(tmp_path / "inbox/90017") in mail.body
    assert [e["kind"] for e in ledger.events("A-1-ABCDEFGH")] == ["mail_sent"]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, for the test's SMTP server."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd test SMTP")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "smtp.crt", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_starttls_checks_the_certificate(tmp_path, ledger, smtp_server, monkeypatch):
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = smtp_server(tls_context=context, require_starttls=True)
    mailer = Mailer(make_config(tmp_path, mail_settings(sink.port, starttls=True)), ledger, Clock())
    mailer.on_event(PackageAccepted(numero="A-1-ABCDEFGH", demarche="ILE", insee="90017", message_id="m", size=1))
    # A certificate nobody vouches for: nothing is sent.
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-ca.pem"))
    assert asyncio.run(mailer.send_due()) == 0
    assert "starttls:" in queued(ledger)[0]["last_error"]
    # The system trust store holds it (SSL_CERT_FILE stands in for it): the mail goes, encrypted.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with ledger.transaction() as db:
        db.execute("UPDATE mail SET next_attempt_at = 0")
    assert asyncio.run(mailer.send_due()) == 1
    assert [r.subject for r in sink.received] == ["Nouveau dossier A-1-ABCDEFGH (ILE) à traiter"]


def test_digest_time_must_be_quoted(tmp_path):
    from relayd.config import ConfigError, load_config

    raw = make_config(tmp_path, mail_settings(25)).model_dump(mode="json")
    raw["mail"]["digest_at"] = "DIGEST"
    path = tmp_path / "relayd.yaml"
    # Unquoted, YAML reads 18:30 as the number 1110: refused, rather than a digest at 00:18.
    path.write_text(yaml.safe_dump(raw).replace("DIGEST", "18:30"))
    with pytest.raises(ConfigError, match=r"mail\.digest_at \(line \d+\): .*quotes"):
        load_config(path)
    path.write_text(yaml.safe_dump(raw).replace("DIGEST", '"18:30"'))
    assert load_config(path).mail.digest_at == time(18, 30)

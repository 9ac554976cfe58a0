"""One SMTP conversation with smtplib: connect, STARTTLS and log in when configured, send, quit.

Blocking by nature: callers run it in a worker thread. Errors are turned into :class:`SendError`,
whose text names what failed and never carries the password.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from types import TracebackType

import structlog

from relayd.config import ConfigError, Mail

log = structlog.get_logger("relayd.mail")


class SendError(Exception):
    """A mail could not be handed to the SMTP server; ``code`` is the SMTP reply code when there was one."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class SmtpConnection:
    """An open, ready SMTP session (``with SmtpConnection(settings) as smtp: smtp.send(...)``)."""

    def __init__(self, settings: Mail):
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None

    def __enter__(self) -> SmtpConnection:
        s = self.settings
        try:
            smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
        except (OSError, smtplib.SMTPException) as exc:
            raise _error("connect", exc) from None
        self._smtp = smtp
        step = "greeting"
        try:
            smtp.ehlo_or_helo_if_needed()
            if s.starttls:
                step = "starttls"
                # The system's trust store and hostname check: an SMTP relay with a wrong certificate gets no mail.
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if s.username is not None:
                step = "login"
                password = s.password()
                if password is None:
                    raise SendError("login: no password configured")
                smtp.login(s.username, password)
        except SendError:
            self._abort()
            raise
        except ConfigError as exc:  # the password file or credential cannot be read
            self._abort()
            raise SendError(f"login: {exc}") from None
        except (OSError, smtplib.SMTPException) as exc:  # ssl.SSLError is an OSError
            self._abort()
            raise _error(step, exc) from None
        return self

    def send(self, message: EmailMessage, recipients: list[str]) -> list[str]:
        """Send one message; returns the recipients the server refused (the others got it)."""
        assert self._smtp is not None
        try:
            refused = self._smtp.send_message(message, from_addr=self.settings.sender, to_addrs=recipients)
        except (OSError, smtplib.SMTPException) as exc:
            raise _error("send", exc) from None
        return sorted(refused)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._smtp is None:
            return
        try:
            self._smtp.quit()
        except (OSError, smtplib.SMTPException):
            self._abort()
        self._smtp = None

    def _abort(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.close()
            except OSError:
                pass
            self._smtp = None


def _error(step: str, exc: BaseException) -> SendError:
    """A SendError naming the step and the server's answer; smtplib never echoes the password in these."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = sorted({code for code, _ in exc.recipients.values()})
        return SendError(f"{step}: every recipient refused (SMTP {', '.join(map(str, codes))})", codes[0] if codes else None)
    if isinstance(exc, smtplib.SMTPResponseException):
        text = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else str(exc.smtp_error)
        return SendError(f"{step}: SMTP {exc.smtp_code} {text[:200]}", exc.smtp_code)
    if isinstance(exc, TimeoutError):
        return SendError(f"{step}: timed out")
    if isinstance(exc, OSError) and exc.strerror:
        return SendError(f"{step}: {exc.strerror}")
    return SendError(f"{step}: {type(exc).__name__}: {str(exc)[:200]}")

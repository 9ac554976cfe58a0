"""Logging: structlog, in the journal's own form, as JSON lines, or readable on a terminal.

The journal form (``logging.format: journal``, and ``auto`` whenever the stream is not a
terminal) is one line per event: the sd-daemon priority prefix (``<4>`` for a warning, see
sd-daemon(3)), so that ``journalctl -p warning`` filters it, then the event and its fields as
``key=value``. Every value is on the same line: text with spaces, quotes or line breaks is
quoted as a JSON string, so a traceback stays one journal entry.

Secrets never reach a log line: any field whose name says it holds one is replaced,
and pydantic ``SecretStr`` values print as stars anyway.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog

_SECRET_FIELDS = {"password", "passwd", "motdepasse", "mot_de_passe", "secret", "private_key", "passphrase", "token"}

#: sd-daemon(3) priority prefixes, by structlog level name
PRIORITIES = {"critical": "<2>", "exception": "<3>", "error": "<3>", "warning": "<4>", "warn": "<4>",
              "notice": "<5>", "info": "<6>", "debug": "<7>"}

LogFormat = Literal["auto", "journal", "json", "console"]


def redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Replace the value of every field whose name marks it as a secret."""
    for key in list(event):
        if key.lower().replace("-", "_") in _SECRET_FIELDS:
            event[key] = "[redacted]"
    return event


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal: ``$JOURNAL_STREAM`` names its device and inode (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, AttributeError):
        return False


def effective_format(fmt: LogFormat, stream: TextIO) -> Literal["journal", "json", "console"]:
    """What ``auto`` means for this stream: console on a terminal, the journal's form otherwise."""
    if fmt != "auto":
        return fmt
    return "console" if _is_terminal(stream) and not is_journal(stream) else "journal"


def _logfmt_value(value: Any) -> str:
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float) for v in value):
        value = ",".join(str(v) for v in value)
    text = value if isinstance(value, str) else str(value) if isinstance(value, int | float | bool) or value is None \
        else json.dumps(value, ensure_ascii=False, default=str)
    if text and not any(c in text for c in ' "=\\\n\r\t') and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


class JournalRenderer:
    """One line: the priority prefix, the event, then ``key=value`` fields (timestamps are the journal's)."""

    def __init__(self, *, timestamps: bool):
        self._timestamps = timestamps

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> str:
        level = str(event.pop("level", method)).lower()
        message = str(event.pop("event", ""))
        stamp = event.pop("timestamp", None)
        fields = [f"{k}={_logfmt_value(v)}" for k, v in event.items()]
        if self._timestamps and stamp is not None:
            fields.insert(0, f"ts={stamp}")
        # The message reads as it is (it may have spaces); only line breaks are escaped, to keep one line.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        return " ".join([PRIORITIES.get(level, "<6>") + message, *fields])


def error_line(message: str, stream: TextIO | None = None, *, level: str = "error") -> None:
    """Print one line for a person (an error by default), with its priority prefix where it goes to the journal
    (or is not a terminal)."""
    stream = stream or sys.stderr
    prefix = "" if _is_terminal(stream) and not is_journal(stream) else PRIORITIES[level]
    print(prefix + " ".join(message.split("\n")), file=stream, flush=True)


def configure_logging(fmt: LogFormat = "auto", level: str = "info", *, stream: TextIO | None = None) -> None:
    """Send relayd's and its libraries' logs to ``stream`` (stdout) in the chosen form (see the module)."""
    stream = stream or sys.stdout
    form = effective_format(fmt, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        # The console shows local time, the way a person reads it; the machine forms keep ISO 8601 UTC.
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False) if form == "console"
        else structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any
    if form == "console":
        renderer = structlog.dev.ConsoleRenderer()
    elif form == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = JournalRenderer(timestamps=not is_journal(stream))
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.processors.format_exc_info],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh narrates every packet at INFO; relayd logs what matters itself.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # A library's warning at run time is a log line like any other, with its priority, never bare text.
    logging.captureWarnings(True)

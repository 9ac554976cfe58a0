"""Logging: structlog, JSON lines for the journal, a readable form on a terminal.

Secrets never reach a log line: any field whose name says it holds one is replaced,
and pydantic ``SecretStr`` values print as stars anyway.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

_SECRET_FIELDS = {"password", "passwd", "motdepasse", "mot_de_passe", "secret", "private_key", "passphrase", "token"}


def redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Replace the value of every field whose name marks it as a secret."""
    for key in list(event):
        if key.lower().replace("-", "_") in _SECRET_FIELDS:
            event[key] = "[redacted]"
    return event


def configure_logging(fmt: Literal["auto", "json", "console"] = "auto", level: str = "info", *,
                      stream: TextIO | None = None) -> None:
    """Send relayd's and its libraries' logs to ``stream`` (stdout), as JSON or for a human on a TTY."""
    stream = stream or sys.stdout
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
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
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # asyncssh narrates every packet at INFO; relayd logs what matters itself.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)

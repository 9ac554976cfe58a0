"""Why relayd could not start, told in one sentence with a documented exit status.

A failed start is something an operator fixes (a port taken, a key unreadable, a folder not
writable, a ledger that cannot be opened), so it is said as one line naming the cause, not as a Python traceback
(``relayd --debug run`` still shows one). The statuses are listed in ``relayd --help`` and the README.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import asyncssh

from relayd.config import Config, ConfigError
from relayd.ledger import LedgerUnusable

#: exit statuses of ``relayd run`` (and ``relayd demo``) when the start fails
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_LISTEN = 3
EXIT_KEY = 4
EXIT_STORAGE = 5

_LISTEN_ERRORS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM}


class ListenError(Exception):
    """An address other than ``server.listen`` could not be bound (the demo's platform simulator)."""

    def __init__(self, host: str, port: int, error: OSError):
        super().__init__(f"{host}:{port}")
        self.host, self.port, self.error = host, port, error


def explain(exc: BaseException, config: Config) -> tuple[int, str]:
    """The exit status and the one-line cause for an exception that stopped the start."""
    if isinstance(exc, LedgerUnusable):
        return exc.exit_status, exc.message
    if isinstance(exc, ListenError):
        reason = os.strerror(exc.error.errno) if exc.error.errno else str(exc.error)
        return EXIT_LISTEN, f"cannot listen on {exc.host}:{exc.port}: {reason} (--platform-port 0 picks a free port)"
    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, "invalid configuration: " + "; ".join(str(exc).splitlines())
    keys = [Path(k) for k in config.server.host_keys]
    if isinstance(exc, asyncssh.KeyImportError | ValueError) and not isinstance(exc, UnicodeError):
        bad = next((k for k in keys if not _readable_key(k)), None)
        if bad is not None:
            return EXIT_KEY, f"cannot read the host key {bad}: it is not an OpenSSH private key ({exc})"
    if isinstance(exc, OSError):
        # asyncio's bind error wraps the address into strerror; the errno's own words are shorter.
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        if exc.filename is not None:
            name = Path(os.fsdecode(exc.filename))
            if name in keys or name in [k.with_name(k.name + ".pub") for k in keys]:
                return EXIT_KEY, f"cannot read the host key {name}: {reason}"
            return EXIT_STORAGE, f"cannot write {name}: {reason} (storage.root and the inboxes must be writable by this user)"
        if exc.errno in _LISTEN_ERRORS:
            listen = config.server.listen
            hint = {errno.EADDRINUSE: " (another program, or another relayd, already listens there)",
                    errno.EACCES: " (a port below 1024 needs relayd.socket or CAP_NET_BIND_SERVICE)"}.get(exc.errno, "")
            return EXIT_LISTEN, f"cannot listen on {listen.host}:{listen.port}: {reason}{hint}"
    return EXIT_UNEXPECTED, f"unexpected error: {type(exc).__name__}: {exc} (run `relayd --debug run` for the traceback)"


def _readable_key(path: Path) -> bool:
    if not path.exists():
        return True  # generated at start
    try:
        asyncssh.read_private_key(path)
    except (OSError, ValueError, asyncssh.KeyImportError):
        return False
    return True

"""What systemd offers a service, from the standard library: sd_notify, the watchdog, and socket activation.

The protocol is small enough that no binding is needed: datagrams of ``KEY=value`` lines to
``$NOTIFY_SOCKET`` (sd_notify(3)), ``$WATCHDOG_USEC`` for the watchdog period, and
``$LISTEN_FDS`` for sockets that systemd bound for us (sd_listen_fds(3)). Outside systemd
every call is a no-op, so the daemon runs the same in a terminal.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger("relayd.systemd")

#: the first inherited descriptor (SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; does nothing when the service manager gave no socket."""

    def __init__(self, address: str | None):
        self.address = address
        self._sock: socket.socket | None = None
        if address:
            # "@name" is an abstract socket; the kernel spells it with a leading NUL.
            self._target = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET``; the variable is removed so that child processes do not inherit it."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens."""
        return self._sock is not None

    def send(self, **fields: str) -> bool:
        """Send one message of ``KEY=value`` lines; False if it could not be sent (logged, never raised)."""
        if self._sock is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode("utf-8", "replace"), self._target)
        except OSError as exc:
            log.warning("systemd.notify_failed", error=exc.strerror)
            return False
        return True

    def ready(self, status: str) -> None:
        """Start-up is complete."""
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        """A short live summary, shown by ``systemctl status``."""
        self.send(STATUS=status)

    def watchdog(self, status: str | None = None) -> None:
        """Everything checked is healthy: push the watchdog deadline back."""
        if status is None:
            self.send(WATCHDOG="1")
        else:
            self.send(WATCHDOG="1", STATUS=status)

    def reloading(self) -> None:
        """A reload has begun; ``ready`` ends it. MONOTONIC_USEC lets Type=notify-reload match the two."""
        self.send(RELOADING="1", MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000),
                  STATUS="reloading the configuration")

    def stopping(self, status: str) -> None:
        """Shutdown has begun."""
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_seconds() -> float | None:
    """The watchdog period systemd asks for (``WatchdogSec=``), or None when there is none for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1_000_000
    except ValueError:
        return None
    return seconds if seconds > 0 else None


def listen_sockets() -> list[socket.socket]:
    """Sockets that systemd bound for this process (``relayd.socket``), in order; empty without socket activation."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not count or pid != str(os.getpid()):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets

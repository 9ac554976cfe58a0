"""``relayd fingerprints``: the host keys as the platform's technical contact pins them.

The output is itself a ``known_hosts`` file: one line per key, ``[host]:port keytype base64``
(``host keytype base64`` on port 22), each after comment lines with its SHA256 fingerprint (what
OpenSSH shows) and its MD5 one (what JSch and older tools show).
"""

from __future__ import annotations

import socket
import sys

from relayd.config import Config
from relayd.inbound.host_keys import HostKey, planned_host_keys
from relayd.logs import configure_logging

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def known_hosts_pattern(host: str, port: int) -> str:
    """How ``known_hosts`` names a server: the bare host on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def addresses(config: Config, host: str | None = None) -> list[str]:
    """The ``known_hosts`` patterns of every listener; ``host`` replaces the listening address."""
    out = []
    for listen in config.server.listeners():
        name = host or (socket.getfqdn() if listen.host in _WILDCARDS else listen.host)
        pattern = known_hosts_pattern(name, listen.port)
        if pattern not in out:
            out.append(pattern)
    return out


def render(host_keys: list[HostKey], patterns: list[str]) -> str:
    """The ``known_hosts`` text for these keys, with their fingerprints as comments."""
    hosts = ",".join(patterns)
    lines = []
    for host_key in host_keys:
        assert host_key.key is not None
        key = host_key.key
        public = key.export_public_key().decode().split()
        lines += [f"# {host_key.type} host key {host_key.path}",
                  f"#   {key.get_fingerprint('sha256')}",
                  f"#   {key.get_fingerprint('md5')}",
                  f"{hosts} {public[0]} {public[1]}"]
    return "\n".join(lines) + "\n"


def run_command(config: Config, host: str | None = None) -> int:
    """Print every served host key; exit 1 if one is not made yet (relayd makes it at its next start)."""
    # The output is a known_hosts file: the log's warnings go to stderr, away from it.
    configure_logging(config.logging.format, "warning", stream=sys.stderr)
    try:
        planned = planned_host_keys(config)
    except OSError as exc:
        print(f"relayd: cannot read the host keys: {exc}", file=sys.stderr)
        return 2
    present = [k for k in planned if k.key is not None]
    sys.stdout.write(render(present, addresses(config, host)))
    missing = [k for k in planned if k.key is None]
    for host_key in missing:
        print(f"relayd: the {host_key.type} host key {host_key.path} is not made yet: relayd makes it at its next "
              "start; run this again then", file=sys.stderr)
    return 1 if missing else 0

"""``relayd keygen``: the key relayd logs in to the platform's return server with.

It writes an Ed25519 private key where ``platform.private_key`` points (mode 0600, owned by the
service's user so that relayd, and only relayd, can read it) and prints the public line to send
to the platform. An existing key is kept unless ``--force``: the platform has it on file.
"""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import sys
from pathlib import Path

import asyncssh

DEFAULT_KEY = Path("/etc/relayd/platform_ed25519")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``keygen`` to the ``relayd`` parser."""
    from relayd.cli import add_config_argument

    p = sub.add_parser("keygen", help="make the platform client key and print the public line to send the platform",
                       description="Write an Ed25519 key for the return server login, at --out or else where "
                                   "platform.private_key points (else /etc/relayd/platform_ed25519), mode 0600, "
                                   "owned by --user; print its public line. Exit status: 0, 1 if the key exists "
                                   "(without --force), 2 on an error.")
    add_config_argument(p)
    p.add_argument("--out", type=Path, help="the private key file (the public one gets .pub)")
    p.add_argument("--user", default="relayd", help="the service's user, who owns the key (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing key (the platform must get the new line)")
    p.set_defaults(func=run)


def key_path(args: argparse.Namespace) -> Path:
    """Where the key goes: ``--out``, else the configuration's ``platform.private_key``, else the default."""
    if args.out is not None:
        return args.out
    from relayd.config import ConfigError, load_config

    try:
        platform = load_config(args.config).platform
    except ConfigError:
        platform = None
    return platform.private_key if platform is not None and platform.private_key is not None else DEFAULT_KEY


def write_key(path: Path, owner: pwd.struct_passwd | None) -> str:
    """Write a new key pair at ``path`` (private 0600, public 0644), owned by ``owner``; return the public line."""
    comment = f"relayd@{socket.gethostname()}"
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key())
    public = key.export_public_key().decode().strip()
    pub = path.with_name(path.name + ".pub")
    pub.write_text(public + "\n")
    pub.chmod(0o644)
    if owner is not None:
        os.chown(tmp, owner.pw_uid, owner.pw_gid)
        os.chown(pub, owner.pw_uid, owner.pw_gid)
    os.replace(tmp, path)
    return public


def run(args: argparse.Namespace) -> int:
    """``relayd keygen``."""
    path = key_path(args)
    if path.exists() and not args.force:
        print(f"relayd: {path} exists and is kept (the platform has its public line); --force replaces it",
              file=sys.stderr)
        return 1
    try:
        owner = pwd.getpwnam(args.user)
    except KeyError:
        print(f"relayd: there is no user {args.user!r} (install systemd/relayd.sysusers first, or give --user)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0 and owner.pw_uid != os.geteuid():
        print(f"relayd: only root can give the key to {args.user!r}; run it as root", file=sys.stderr)
        return 2
    try:
        public = write_key(path, owner)
    except OSError as exc:
        print(f"relayd: cannot write {exc.filename or path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"relayd: wrote {path} (mode 0600, owner {args.user}); send this line to the platform:", file=sys.stderr)
    print(public)
    return 0

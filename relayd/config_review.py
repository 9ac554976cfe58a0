"""``relayd check-config`` as a reviewer: what would stop or mislead relayd although the file validates.

pydantic checks each value; this looks at the file as a whole, as a colleague would before a
start: values left from the example (``REPLACE_WITH_…``, ``example.invalid``,
``example-replace-me``), keys written twice (YAML keeps the last one silently), folders under
``/proc``, ``/sys`` or ``/dev``, folders the service's user cannot write, secrets it cannot read,
and a return server whose name does not resolve (said, but not fatal: intake works without it).
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import re
import socket
import subprocess
from pathlib import Path

from relayd.config import Config, ConfigError
from relayd.config_source import Loc, Source

_PLACEHOLDER = re.compile(r"REPLACE_?WITH|example\.invalid|example-replace-me", re.IGNORECASE)
_SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))
_RESOLVE_SECONDS = 5.0


def review(config: Config, source: Source, *, as_user: str | None = None, resolve: bool = True) -> tuple[list[str], list[str]]:
    """Errors (each ``file: path (line N): sentence``) and warnings about a configuration that loaded."""
    errors: list[str] = []
    for loc, value in source.scalars:
        found = _PLACEHOLDER.search(value)
        if found:
            errors.append(f"{source.where(loc)}: still holds the example's placeholder {found[0]!r}: "
                          "put the real value here")
    for loc, first, again in source.duplicates:
        errors.append(f"{source.where(loc)}: this key is written twice (lines {first} and {again}); "
                      "YAML would keep only the last one")
    folders = writable_folders(config)
    for loc, folder in folders:
        tree = next((t for t in _SYSTEM_TREES if folder == t or t in folder.parents), None)
        if tree is not None:
            errors.append(f"{source.where(loc)}: {folder} is under {tree}, a system tree, not a place for files")
    errors += [f"{source.where(loc)}: {problem}" for loc, problem in _secrets(config)]
    for loc, problem in _unwritable(folders, as_user):
        errors.append(f"{source.where(loc)}: {problem}")
    warnings = []
    if resolve and config.platform is not None and not _PLACEHOLDER.search(config.platform.host):
        problem = _resolve(config.platform.host, config.platform.port)
        if problem is not None:
            warnings.append(f"{source.where(('platform', 'host'))}: {problem}; acks and returns will wait in the "
                            "outbox until it resolves")
    return errors, warnings


def writable_folders(config: Config) -> list[tuple[Loc, Path]]:
    """Every folder relayd writes in, with the key that names it (a host key that is absent is made at start)."""
    folders: list[tuple[Loc, Path]] = [(("storage", "root"), config.storage.root)]
    folders += [(("server", "host_keys", i), key.parent) for i, key in enumerate(config.server.host_keys)
                if not key.exists()]
    for i, account in enumerate(config.accounts):
        if account.drop_dir is not None:
            folders.append((("accounts", i, "drop_dir"), account.drop_dir))
    for i, commune in enumerate(config.communes):
        folders.append((("communes", i, "inbox"), commune.inbox))
        if commune.returns is not None:
            folders.append((("communes", i, "returns"), commune.returns))
            folders.append((("communes", i, "rejected"), commune.rejected_dir))
    return folders


def _secrets(config: Config) -> list[tuple[Loc, str]]:
    from relayd.inbound.server import resolve_auth

    problems: list[tuple[Loc, str]] = []
    try:
        resolve_auth(config)
    except ConfigError as exc:
        problems.append((("accounts",), str(exc)))
    if config.mail is not None:
        try:
            config.mail.password()
        except ConfigError as exc:
            problems.append((("mail",), str(exc)))
    if config.platform is not None:
        from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient

        try:
            ReturnServerClient(config.platform).check_settings()
        except DeliveryError as exc:
            problems.append((("platform",), f"platform: {exc.message}"))
    return problems


def _unwritable(folders: list[tuple[Loc, Path]], as_user: str | None) -> list[tuple[Loc, str]]:
    """The folders that ``as_user`` (by default, whoever runs this) could not create or write in."""
    paths = [str(folder) for _loc, folder in folders]
    who = "relayd"
    if as_user is None or _is_me(as_user):
        denied = set(unwritable(paths))
    else:
        who = as_user
        try:
            user = pwd.getpwnam(as_user)
        except KeyError:
            return [((), f"--as-user: there is no user {as_user!r} on this machine")]
        if os.geteuid() != 0:
            return [((), f"--as-user {as_user}: only root can check as another user; run it as root or as {as_user}")]
        # The shell's `test`, not Python: the interpreter may sit where that user cannot read (under /root).
        existing = {text: str(_existing(Path(text))) for text in paths}
        result = subprocess.run(["/bin/sh", "-c", 'for d; do [ -w "$d" ] && [ -x "$d" ] || echo "$d"; done', "sh",
                                 *sorted(set(existing.values()))], capture_output=True, text=True,
                                user=user.pw_uid, group=user.pw_gid, extra_groups=os.getgrouplist(as_user, user.pw_gid),
                                cwd="/", timeout=60)
        refused = set(result.stdout.splitlines())
        denied = {text for text, where in existing.items() if where in refused}
    out = []
    for loc, folder in folders:
        if str(folder) in denied:
            out.append((loc, f"{who} cannot write in {folder} ({_existing(folder)} is read-only or not writable by "
                             f"{'this user' if as_user is None else as_user})"))
    return out


def unwritable(paths: list[str]) -> list[str]:
    """Those of ``paths`` that this process could neither write in nor create."""
    return [text for text in paths if not os.access(_existing(Path(text)), os.W_OK | os.X_OK)]


def _existing(folder: Path) -> Path:
    """The folder, or its nearest ancestor that exists (where relayd would create it)."""
    return next(p for p in (folder, *folder.parents) if p.exists())


def _is_me(name: str) -> bool:
    try:
        return pwd.getpwnam(name).pw_uid == os.geteuid()
    except KeyError:
        return False


def _resolve(host: str, port: int) -> str | None:
    """None when ``host`` resolves; otherwise a sentence saying why not."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout=_RESOLVE_SECONDS)
    except socket.gaierror as exc:
        return f"the return server's name {host!r} does not resolve ({exc.strerror})"
    except concurrent.futures.TimeoutError:
        return f"the return server's name {host!r} did not resolve within {_RESOLVE_SECONDS:g} s"
    finally:
        pool.shutdown(wait=False)
    return None


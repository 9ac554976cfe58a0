"""The server's host keys: which files hold them, making the missing ones, and what each listener offers.

The platform pins a host key, so a key on disk is never replaced. What ``server.host_key_types``
asks for and no file holds yet is made at start, beside the first of ``server.host_keys``
(``<storage.root>/host_keys/`` by default) as ``ssh_host_<type>_key``: a fresh installation gets
Ed25519, ECDSA P-256 and RSA 3072, and one that started with only Ed25519 gains the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import structlog

from relayd.config import HOST_KEY_TYPES, Config
from relayd.fsutil import ensure_dir, write_durably
from relayd.ssh_algorithms import Profile

log = structlog.get_logger("relayd.sftp")

_RSA_BITS = 3072
_NAMED = re.compile(r"ssh_host_(ed25519|ecdsa|rsa)_key$")


@dataclass
class HostKey:
    """One host key file, and the key once it exists."""

    path: Path
    type: str  # ed25519, ecdsa or rsa
    key: asyncssh.SSHKey | None = None

    @property
    def public_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pub")


def _type_of(key: asyncssh.SSHKey) -> str | None:
    algorithm = key.algorithm.decode()
    if algorithm.startswith("ecdsa-sha2-"):
        return "ecdsa"
    return next((name for name, alg in HOST_KEY_TYPES.items() if alg == algorithm), None)


def _read_public(path: Path) -> asyncssh.SSHKey | None:
    """The key in ``path``: its private half where this user may read it, else the ``.pub`` beside it."""
    try:
        return asyncssh.read_private_key(path)
    except PermissionError:
        pub = path.with_name(path.name + ".pub")
        return asyncssh.read_public_key(pub) if pub.exists() else None  # type: ignore[return-value]


def planned_host_keys(config: Config, *, read: bool = True) -> list[HostKey]:
    """The host key files relayd serves, in order: those listed that exist, then one per missing type.

    A listed key of a type left out of ``server.host_key_types`` is not served (and logged).
    With ``read``, each existing key is read (``.key``); an absent one has ``key`` None.
    """
    server = config.server
    wanted = list(server.host_key_types)
    folder = server.host_keys[0].parent if server.host_keys else config.storage.root / "host_keys"
    planned: list[HostKey] = []
    for path in server.host_keys:
        if path.exists():
            key = _read_public(path)
            if key is None:
                raise PermissionError(f"cannot read host key {path} nor {path}.pub")
            kind = _type_of(key)
        else:
            # Made at first start; its name says its type (Ed25519, as earlier releases made, otherwise).
            key, match = None, _NAMED.search(path.name)
            kind = match.group(1) if match else "ed25519"
        if kind not in wanted:
            if key is None:
                continue  # a default path, or a key never made: nothing is left out
            log.warning("sftp.host_key_not_served", path=str(path), type=kind, host_key_types=wanted)
            continue
        if any(p.type == kind for p in planned):
            # asyncssh offers one key per algorithm; a second one of a type would never be used.
            log.warning("sftp.host_key_not_served", path=str(path), type=kind, reason="another key of this type comes first")
            continue
        planned.append(HostKey(path, kind, key if read else None))
    for kind in wanted:
        if not any(p.type == kind for p in planned):
            path = folder / f"ssh_host_{kind}_key"
            key = _read_public(path) if read and path.exists() else None
            planned.append(HostKey(path, kind, key))
    return planned


def _generate(kind: str) -> asyncssh.SSHKey:
    if kind == "rsa":
        return asyncssh.generate_private_key("ssh-rsa", key_size=_RSA_BITS)
    return asyncssh.generate_private_key(HOST_KEY_TYPES[kind])


def read_or_make_key(path: Path, kind: str) -> asyncssh.SSHKey:
    """The private key in ``path``, made first (of type ``kind``) where the file is absent."""
    if not path.exists():
        _write_key(path, _generate(kind))
        log.info("sftp.host_key_generated", path=str(path), type=kind,
                 fingerprint=asyncssh.read_private_key(path).get_fingerprint())
    return asyncssh.read_private_key(path)


def _write_key(path: Path, key: asyncssh.SSHKey) -> None:
    ensure_dir(path.parent)
    write_durably(path, key.export_private_key(), mode=0o600)
    write_durably(path.with_name(path.name + ".pub"), key.export_public_key(), mode=0o644)


def ensure_host_keys(config: Config) -> list[asyncssh.SSHKey]:
    """Read the host keys to serve, making each one that is absent; the log says which were made."""
    planned = planned_host_keys(config, read=False)
    existing = [p for p in planned if p.path.exists()]
    keys = []
    for host_key in planned:
        if not host_key.path.exists():
            key = _generate(host_key.type)
            try:
                _write_key(host_key.path, key)
            except OSError as exc:
                if not existing:
                    raise
                # An upgrade must not stop a relay that serves today: it goes on with the keys it has.
                log.error("sftp.host_key_not_made", path=str(host_key.path), type=host_key.type, error=str(exc),
                          served=[p.type for p in existing])
                continue
            made = {"path": str(host_key.path), "type": host_key.type, "fingerprint": key.get_fingerprint()}
            if existing:
                # The platform pins the current key, which is kept; it can add this one to what it trusts.
                log.info("sftp.host_key_added", **made, hint="hand it to the platform: relayd fingerprints")
            else:
                log.info("sftp.host_key_generated", **made)
        keys.append(asyncssh.read_private_key(host_key.path))
    return keys


def keypairs_for(keys: list[asyncssh.SSHKey], profile: Profile) -> list[asyncssh.SSHKeyPair]:
    """The host keys as one listener offers them: each key under the signature algorithms its profile allows.

    asyncssh offers an RSA key under every algorithm it knows (``ssh-rsa`` with SHA-1 included);
    the profile narrows that list, so ``ssh-rsa`` is on offer only under ``legacy``.
    """
    out = []
    for keypair in asyncssh.load_keypairs(keys):
        algs = tuple(a.encode() for a in profile.signatures_for(keypair.algorithm.decode()))
        if algs:
            keypair.host_key_algorithms = algs
            out.append(keypair)
    return out

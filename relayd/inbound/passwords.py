"""Password hashes for SFTP accounts: scrypt from the standard library.

The format is ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``, so that the cost can
be raised later without breaking existing hashes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

_PREFIX = "scrypt$"
_LOG2_N, _R, _P = 14, 8, 1


def hash_password(password: str) -> str:
    """Hash a password with a fresh random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**_LOG2_N, r=_R, p=_P, dklen=32)
    return f"{_PREFIX}{_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def is_password_hash(value: str) -> bool:
    """Whether ``value`` has the shape of a hash made by :func:`hash_password`."""
    parts = value.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(parts[1:])


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a hash, in constant time."""
    try:
        _, log2_n, r, p, salt, expected = encoded.split("$")
        digest = hashlib.scrypt(
            password.encode(), salt=_unb64(salt), n=2 ** int(log2_n), r=int(r), p=int(p), dklen=len(_unb64(expected))
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, _unb64(expected))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))

"""The SSH algorithms relayd negotiates: as the server the platform pushes to, and as the client of its return server.

One home for every list, so that a hardening decision is made once:

- AES-GCM first: the fastest in asyncssh on CPUs with AES-NI (bench/ has the figures). As a
  server the client's order decides (RFC 4253 §7.1), so a stock OpenSSH client still picks
  chacha20-poly1305; as a client, relayd's own order decides.
- No GSS key exchange (it authenticates the server through Kerberos and no host key, which
  would bypass host-key pinning).

Two profiles for the inbound server, chosen per listener (``server.profile``, or the
``profile`` of ``server.listen`` or of an ``server.extra_listen`` entry):

- ``modern`` (the default): no SHA-1 anywhere. It covers OpenSSH, PuTTY, libssh2 (curl,
  lftp's ssh), paramiko and JSch 0.1.55 with its default settings, which offers
  ecdh-sha2-nistp256, aes128-ctr and hmac-sha2-256, and knows only ECDSA and ``ssh-rsa``
  (SHA-1) host keys: it meets relayd on the ECDSA host key. diffie-hellman-group-exchange-sha256
  is there for Java stacks whose JRE has no elliptic curves.
- ``legacy``: adds SHA-1 key exchange (diffie-hellman-group14-sha1,
  diffie-hellman-group-exchange-sha1), hmac-sha1 and ``ssh-rsa`` host-key signatures, for
  older Java stacks (JSch before 0.1.53, ganymed-ssh2, trilead-ssh2). diffie-hellman-group1-sha1
  stays out even there: a 1024-bit group is within reach of a state-level attacker (Logjam),
  and every stack that knows it also knows group14-sha1 or group-exchange-sha1.

The algorithms are negotiated before authentication, so a profile belongs to a listener: an
account that needs ``legacy`` is given the port of a legacy listener.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProfileName = Literal["modern", "legacy"]

CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)

KEX_ALGS = (
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)

MAC_ALGS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "umac-128@openssh.com",
)

# How each host key type may sign the key exchange. RSA signs with SHA-2 (RFC 8332) unless legacy.
HOST_KEY_SIGNATURES = {
    "ssh-ed25519": ("ssh-ed25519",),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
}

_LEGACY_KEX = ("diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1")
_LEGACY_MACS = ("hmac-sha1",)
_LEGACY_SIGNATURES = {"ssh-rsa": ("ssh-rsa",)}


@dataclass(frozen=True)
class Profile:
    """The algorithms one inbound listener offers."""

    name: ProfileName
    ciphers: tuple[str, ...]
    kex_algs: tuple[str, ...]
    mac_algs: tuple[str, ...]
    #: host key algorithm (``SSHKey.algorithm``) -> the signature algorithms it is offered with
    host_key_signatures: dict[str, tuple[str, ...]]

    def signatures_for(self, key_algorithm: str) -> tuple[str, ...]:
        """The host-key algorithms a key of this type is offered under; empty if this profile serves none."""
        return self.host_key_signatures.get(key_algorithm, ())


MODERN = Profile(
    name="modern",
    ciphers=CIPHERS,
    kex_algs=(*KEX_ALGS, "diffie-hellman-group-exchange-sha256"),
    mac_algs=MAC_ALGS,
    host_key_signatures=HOST_KEY_SIGNATURES,
)

LEGACY = Profile(
    name="legacy",
    ciphers=CIPHERS,
    kex_algs=(*MODERN.kex_algs, *_LEGACY_KEX),
    mac_algs=(*MAC_ALGS, *_LEGACY_MACS),
    host_key_signatures={k: v + _LEGACY_SIGNATURES.get(k, ()) for k, v in HOST_KEY_SIGNATURES.items()},
)

PROFILES: dict[str, Profile] = {"modern": MODERN, "legacy": LEGACY}

# What `legacy` adds, as check-config and the log name it.
LEGACY_ADDITIONS = (*_LEGACY_KEX, *_LEGACY_MACS, "ssh-rsa (SHA-1 host-key signatures)")


def legacy_warning(addresses: list[str]) -> str:
    """What check-config and the log say when a listener offers ``legacy``."""
    return (f"server: legacy profile on {', '.join(addresses)}: it also offers {', '.join(LEGACY_ADDITIONS)}; "
            "keep it for a platform whose SSH stack cannot do better, on a listener of its own")

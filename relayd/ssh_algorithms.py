"""The SSH algorithms relayd negotiates: as the server the platform pushes to, and as the client of its return server.

One list for both sides, so that a hardening decision is made once:

- AES-GCM first: the fastest in asyncssh on CPUs with AES-NI (bench/ has the figures). As a
  server the client's order decides (RFC 4253 §7.1), so a stock OpenSSH client still picks
  chacha20-poly1305; as a client, relayd's own order decides.
- No SHA-1 key exchange or MAC, and no GSS key exchange (it authenticates the server through
  Kerberos and no host key, which would bypass host-key pinning).
"""

from __future__ import annotations

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

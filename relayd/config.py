"""relayd's YAML configuration, validated by pydantic.

A configuration error names the file, the key path (counting list entries from 1) and the line, e.g.
``relayd.yaml: accounts[1].password_hash (line 9): ...`` (see :mod:`relayd.config_source`). Secrets never sit in the file in clear:
an account has a password *hash*, or names a file or a systemd credential that holds one.
Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import os
import re
from datetime import time
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Literal

import asyncssh
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relayd.config_source import Source, SourceError, explain, leading_loc, read_source
from relayd.inbound.passwords import hash_password, is_password_hash
from relayd.pec.envelope import DEFAULT_NUMERO_REGEX, NUMERO_PATTERN
from relayd.pec.zipcheck import PackageLimits
from relayd.ssh_algorithms import ProfileName

INSEE_PATTERN = r"^(?:[0-9]{5}|2[AB][0-9]{3})$"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key path."""


def read_secret(owner: str, file: Path | None, credential: str | None) -> str | None:
    """A secret from a file, or from a systemd credential (``LoadCredential=``); None when neither is named."""
    path = file
    if credential is not None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds:
            raise ConfigError(f"{owner}: password_credential needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
        path = Path(creds) / credential
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{owner}: cannot read its password file ({exc.strerror})") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=0, le=65535)


class SFTPListen(Listen):
    """One address the SFTP server listens on, with the algorithm profile it offers there."""

    profile: ProfileName | None = Field(
        default=None, description="modern or legacy; default: server.profile. Negotiated before login, so per listener"
    )


#: The host key types relayd can make and serve, by their name in the configuration.
HOST_KEY_TYPES: dict[str, str] = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "ssh-rsa"}
HostKeyType = Literal["ed25519", "ecdsa", "rsa"]


class Limits(PackageLimits):
    """Package bounds (see :class:`PackageLimits`) plus the server's own."""

    max_sessions: int = Field(default=32, gt=0, description="concurrent logged-in SSH connections, all accounts")
    max_sessions_per_ip: int = Field(
        default=8, gt=0, description="concurrent logged-in SSH connections from one address (defender prefix)"
    )
    max_startups: str = Field(
        default="10:30:100", pattern=r"^\d+(:\d+:\d+)?$",
        description="unauthenticated connections, as OpenSSH's MaxStartups start:rate:full (random early drops)",
    )
    max_startups_per_ip: int = Field(
        default=8, gt=0, description="unauthenticated connections from one address (defender prefix)"
    )
    min_free_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=0, description="uploads are refused while less than this is free on any file system relayd writes to"
    )
    max_upload_bytes_per_session: int = Field(default=4 * 1024 * 1024 * 1024, gt=0)
    login_timeout_seconds: float = Field(default=10.0, gt=0, description="to authenticate, from the TCP accept")

    @field_validator("max_startups")
    @classmethod
    def _startups_in_order(cls, value: str) -> str:
        start, rate, full = startups(value)
        if not (0 < start <= full and rate <= 100):
            raise ValueError("must read start:rate:full with 0 < start <= full and rate <= 100, e.g. 10:30:100")
        return value

    def startup_budget(self) -> tuple[int, int, int]:
        """``max_startups`` as (start, rate, full)."""
        return startups(self.max_startups)


def startups(value: str) -> tuple[int, int, int]:
    """OpenSSH's MaxStartups ``start:rate:full`` (a single number N means N:100:N: no random drops before N)."""
    parts = [int(p) for p in value.split(":")]
    if len(parts) == 1:
        return parts[0], 100, parts[0]
    return parts[0], parts[1], parts[2]


class Account(_Strict):
    """A platform account allowed to push packages."""

    username: str = Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")
    password_hash: str | None = Field(default=None, description="an scrypt hash from `relayd hash-password`")
    password_file: Path | None = Field(default=None, description="a file holding the hash (or the password)")
    password_credential: str | None = Field(default=None, description="a systemd credential holding it")
    authorized_keys: list[str] = Field(default_factory=list, description="OpenSSH public key lines")
    authorized_keys_file: Path | None = None
    communes: list[str] = Field(min_length=1, description="INSEE codes this account may deliver for")
    drop_dir: Path | None = Field(default=None, description="default: <storage.root>/drop/<username>")
    directory: str | None = Field(
        default=None, description="the directory the platform was given (e.g. /depot): an alias of the drop folder"
    )
    allowed_ips: list[IPv4Network | IPv6Network] = Field(
        default_factory=list, description="addresses or networks this account may log in from; empty: any"
    )

    @field_validator("password_hash")
    @classmethod
    def _must_be_a_hash(cls, value: str | None) -> str | None:
        if value is not None and not is_password_hash(value):
            raise ValueError("must be a hash made by `relayd hash-password`, never a clear password")
        return value

    @field_validator("authorized_keys")
    @classmethod
    def _keys_parse(cls, value: list[str]) -> list[str]:
        for i, line in enumerate(value):
            try:
                asyncssh.import_authorized_keys(line)
            except (ValueError, asyncssh.KeyImportError):
                raise ValueError(f"entry {i} is not an OpenSSH public key line") from None
        return value

    @field_validator("directory")
    @classmethod
    def _absolute_directory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = [p for p in value.split("/") if p]
        if not value.startswith("/") or not parts or any(p in (".", "..") or "\x00" in p for p in parts):
            raise ValueError("must be an absolute SFTP path below / such as /depot, without '.' or '..'")
        return "/" + "/".join(parts)

    @model_validator(mode="after")
    def _needs_a_credential(self) -> Account:
        sources = [self.password_hash, self.password_file, self.password_credential]
        if sum(s is not None for s in sources) > 1:
            raise ValueError("give only one of password_hash, password_file, password_credential")
        if not any(sources) and not self.authorized_keys and self.authorized_keys_file is None:
            raise ValueError("an account needs a password hash or an authorized key")
        return self

    def resolved_password_hash(self) -> str | None:
        """The password hash, read from the file or credential where one is named."""
        if self.password_hash is not None:
            return self.password_hash
        secret = read_secret(f"account {self.username}", self.password_file, self.password_credential)
        if secret is None:
            return None
        # A credential store may hold the clear password; it is hashed here and never kept.
        return secret if is_password_hash(secret) else hash_password(secret)

    def public_keys(self) -> list[str]:
        """Every authorized key line, from the list and the file."""
        keys = list(self.authorized_keys)
        if self.authorized_keys_file is not None:
            try:
                text = self.authorized_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"account {self.username}: cannot read authorized_keys_file ({exc.strerror})") from None
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            try:
                asyncssh.import_authorized_keys("\n".join(keys))
            except (ValueError, asyncssh.KeyImportError) as exc:
                raise ConfigError(f"account {self.username}: authorized_keys_file: {exc}") from None
        return keys


class Commune(_Strict):
    """A commune served by this relay, and where its dossiers go."""

    insee: str = Field(pattern=INSEE_PATTERN)
    name: str
    inbox: Path
    siret: str | None = Field(default=None, pattern=r"^[0-9]{14}$",
                              description="the service's SIRET: routes envelopes without CodeINSEE, and must agree with it")
    demarches: list[str] = Field(
        min_length=1,
        description="démarche codes accepted, matched exactly (case counts), e.g. recensementCitoyen, DAUA; "
                    "list every spelling (alias) the platform may use",
    )
    delivery: Literal["zip", "extracted"] = "zip"
    file_mode: str = Field(default="0640", pattern=r"^0?[0-7]{3}$")
    group: str | None = Field(default=None, description="group owning what lands in the inbox")
    returns: Path | None = Field(default=None, description="where the business software drops status files")
    rejected: Path | None = Field(default=None, description="refused drops and their reasons; default: <returns>/../rejected")
    auto_receipt: bool = Field(default=False, description="send \"reçu\" by itself once a dossier is handed over")
    allow_unknown_dossiers: bool = Field(default=False, description="accept returns for dossiers this relay never received")
    emails: list[str] = Field(default_factory=list, description="the service's addresses, told of every new dossier")

    @field_validator("emails")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return _check_addresses(value)

    @property
    def mode(self) -> int:
        return int(self.file_mode, 8)

    @property
    def rejected_dir(self) -> Path | None:
        """Where refused return drops go, beside the return directory unless configured."""
        if self.returns is None:
            return None
        return self.rejected or self.returns.parent / "rejected"


class Retry(_Strict):
    """How the outbox retries a delivery: exponential backoff with jitter, a cap, then dead-letter."""

    initial_seconds: float = Field(default=10.0, gt=0)
    factor: float = Field(default=2.0, ge=1)
    max_seconds: float = Field(default=900.0, gt=0, description="the cap on one wait")
    jitter: float = Field(default=0.2, ge=0, le=1, description="each wait varies by up to this fraction")
    max_attempts: int = Field(
        default=200, gt=0, description="then an entry the server keeps refusing goes to dead-letter (never for an outage)"
    )
    max_age_hours: float = Field(default=72.0, gt=0, description="or once it is this old (never for an outage)")


class ReturnServer(_Strict):
    """The platform's SFTP server that receives acks and returns."""

    host: str
    port: int = Field(default=22, gt=0, le=65535)
    username: str
    private_key: Path | None = Field(default=None, description="OpenSSH private key file (no passphrase)")
    password_file: Path | None = Field(default=None, description="a file holding the account's password")
    password_credential: str | None = Field(default=None, description="a systemd credential holding it")
    known_hosts: Path | None = Field(default=None, description="an OpenSSH known_hosts file pinning the server's key")
    host_key_fingerprints: list[str] = Field(
        default_factory=list, description="pinned SHA256 fingerprints: the current key, and the next one during a rotation"
    )
    remote_dir: str = Field(default=".", description="where returns go on the server")
    acks_dir: str | None = Field(default=None, description="where acks go; default: remote_dir")
    connect_timeout_seconds: float = Field(default=15.0, gt=0)
    login_timeout_seconds: float = Field(default=30.0, gt=0)
    operation_timeout_seconds: float = Field(default=120.0, gt=0)
    idle_seconds: float = Field(default=60.0, ge=0, description="an idle connection is kept this long for reuse")
    retry: Retry = Retry()
    alert_after_hours: float = Field(
        default=1.0, gt=0, description="an outage of the return server this long alerts the administrator (it still waits)"
    )
    reply_style: Literal["mirror", "relayd"] = Field(
        default="mirror",
        description="mirror: a reply is the incoming envelope with Sender and Recipient swapped, MessageId kept "
                    "(the real replier's way); relayd: the same, with a MessageId of relayd's own",
    )
    acks: Literal["AVL+ANL", "ANL", "none"] = Field(default="AVL+ANL", description="which acks relayd sends")

    @field_validator("host_key_fingerprints")
    @classmethod
    def _fingerprints(cls, value: list[str]) -> list[str]:
        for i, fp in enumerate(value):
            if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fp):
                raise ValueError(f"entry {i} is not an OpenSSH SHA256 fingerprint (SHA256: and 43 base64 characters)")
        return value

    @model_validator(mode="after")
    def _pinned_and_authenticated(self) -> ReturnServer:
        if self.known_hosts is None and not self.host_key_fingerprints:
            raise ValueError("pin the server's host key: give known_hosts or host_key_fingerprints")
        secrets = [self.private_key, self.password_file, self.password_credential]
        if sum(s is not None for s in secrets) != 1:
            raise ValueError("give exactly one of private_key, password_file, password_credential")
        return self

    def password(self) -> str | None:
        """The account's password, read from its file or credential; None with a key."""
        return read_secret("platform", self.password_file, self.password_credential)


class Returns(_Strict):
    """How return drops from the business software are picked up and checked."""

    settle_seconds: float = Field(default=2.0, ge=0, description="a directly written file must not change for this long")
    rescan_seconds: float = Field(default=30.0, gt=0, description="full rescan period; file events are only hints")
    max_attachment_bytes: int = Field(default=1024 * 1024, gt=0, description="1024 Ko, the platform's limit")
    max_attachments: int = Field(default=10, gt=0)
    max_status_bytes: int = Field(default=1024 * 1024, gt=0)
    attachment_types: list[str] = Field(
        default_factory=lambda: ["pdf", "png", "jpg", "jpeg"], description="file extensions, checked against content"
    )


class IntakeRetry(_Strict):
    """How intake tries a package again while relayd runs, after a failure that is not the package's fault."""

    initial_seconds: float = Field(default=5.0, gt=0, description="first wait; doubles at each failure")
    max_seconds: float = Field(default=300.0, gt=0, description="the cap on one wait")
    max_attempts: int = Field(
        default=5, gt=0,
        description="an unexpected error this many times sends the package to quarantine as internal_error; "
                    "a full or failing disk (ENOSPC, EIO) is retried until space is back",
    )


class Storage(_Strict):
    root: Path
    ledger_lock_timeout_seconds: float = Field(
        default=30.0, gt=0, description="at start, how long to wait for a ledger another process holds, then give up"
    )

    @property
    def drop(self) -> Path:
        return self.root / "drop"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.sqlite"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"


class Mail(_Strict):
    """The SMTP server that carries the agents' and the administrator's e-mail."""

    host: str
    port: int = Field(default=25, gt=0, le=65535)
    starttls: bool = Field(default=False, description="upgrade the connection with STARTTLS before anything is sent")
    username: str | None = Field(default=None, description="log in with this user (needs password_file or password_credential)")
    password_file: Path | None = None
    password_credential: str | None = None
    sender: str = Field(description="the From address")
    admin: list[str] = Field(default_factory=list, description="told of dead letters, host-key mismatches, low disk, repeated rejections")
    timeout_seconds: float = Field(default=30.0, gt=0)
    retry_seconds: float = Field(default=60.0, gt=0, description="first wait after a failed send; doubles up to an hour")
    max_age_hours: float = Field(default=168.0, gt=0, description="a mail still unsent after this long is given up and logged")
    digest_at: time = Field(default=time(8, 0), description="local time of the daily digest of late dossiers")
    rejection_alert_count: int = Field(default=5, gt=0, description="this many refused packages...")
    rejection_alert_minutes: float = Field(default=60.0, gt=0, description="...within this window alerts the administrator")

    @field_validator("digest_at", mode="before")
    @classmethod
    def _digest_at(cls, value: object) -> object:
        # YAML reads an unquoted 18:30 as the number 1110, which would become 00:18:30.
        if isinstance(value, int | float):
            raise ValueError('write the time in quotes, e.g. "08:00" (unquoted, YAML reads it as a number)')
        return value

    @field_validator("digest_at")
    @classmethod
    def _digest_at_local(cls, value: time) -> time:
        if value.tzinfo is not None:
            raise ValueError("a local time without a zone, e.g. \"08:00\"")
        return value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return _check_addresses([value])[0]

    @field_validator("admin")
    @classmethod
    def _admin(cls, value: list[str]) -> list[str]:
        return _check_addresses(value)

    @model_validator(mode="after")
    def _login(self) -> Mail:
        if sum(s is not None for s in (self.password_file, self.password_credential)) > 1:
            raise ValueError("give only one of password_file, password_credential")
        has_password = self.password_file is not None or self.password_credential is not None
        if (self.username is None) != (not has_password):
            raise ValueError("username and a password (file or credential) go together")
        return self

    def password(self) -> str | None:
        """The SMTP password, read from its file or credential; None without a login."""
        return read_secret("mail", self.password_file, self.password_credential)


class Deadlines(_Strict):
    """The platform's limit: a dossier not processed within 30 days must be filed again."""

    warn_days: float = Field(default=20.0, gt=0, description="a dossier still open this long is late")
    overdue_days: float = Field(default=30.0, gt=0, description="past this, the citizen must start over")

    @model_validator(mode="after")
    def _order(self) -> Deadlines:
        if self.warn_days >= self.overdue_days:
            raise ValueError("warn_days must be less than overdue_days")
        return self


class Defender(_Strict):
    """Bans a network prefix that fails to log in too often; each new ban lasts longer. Kept in the ledger."""

    enabled: bool = True
    max_failures: int = Field(default=5, gt=0, description="failed logins within window_seconds that bring a ban")
    window_seconds: float = Field(default=600.0, gt=0)
    ban_seconds: float = Field(default=900.0, gt=0, description="the first ban")
    ban_factor: float = Field(default=2.0, ge=1, description="each later ban of the same address lasts this much longer")
    max_ban_seconds: float = Field(default=86400.0, gt=0)
    allowlist: list[IPv4Network | IPv6Network] = Field(
        default_factory=list, description="never banned, never dropped early, never held by the global budget"
    )
    ipv4_prefix: int = Field(default=32, ge=8, le=32, description="IPv4 addresses are counted and banned by this prefix")
    ipv6_prefix: int = Field(default=64, ge=16, le=128, description="IPv6 addresses are counted and banned by this prefix")
    unauthenticated_weight: float = Field(
        default=0.25, ge=0, le=1, description="what a connection that ends without trying to log in counts"
    )
    global_failures_per_minute: int | None = Field(
        default=None, gt=0,
        description="past this many failures a minute, all addresses together, only allowlisted and known-good "
                    "addresses may connect; none: no global budget",
    )
    known_good_days: float = Field(
        default=30.0, ge=0, description="an address that logged in within this many days is known-good"
    )


class Metrics(_Strict):
    """The Prometheus endpoint."""

    enabled: bool = False
    listen: Listen = Listen(port=9464)


class Retention(_Strict):
    """How long what holds personal data is kept."""

    archive_days: float = Field(default=365.0, gt=0, description="archived packages and sent replies")
    quarantine_days: float = Field(default=90.0, gt=0, description="refused packages and drops, with their reasons")
    scrub_after_close_days: float = Field(
        default=90.0, ge=0, description="then a closed dossier's personal data leaves the ledger; its reference stays"
    )
    check_hours: float = Field(default=6.0, gt=0, description="how often the purge runs")


class Logging(_Strict):
    format: Literal["auto", "journal", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, the journal's form (priority prefixes) otherwise")
    level: Literal["debug", "info", "warning", "error"] = "info"


class Server(_Strict):
    listen: SFTPListen = SFTPListen()
    extra_listen: list[SFTPListen] = Field(
        default_factory=list, description="more addresses to listen on, each with its own profile (e.g. one legacy port)"
    )
    profile: ProfileName = Field(default="modern", description="the algorithms offered: modern, or legacy (SHA-1)")

    host_keys: list[Path] = Field(
        default_factory=lambda: [Path("host_keys/ssh_host_ed25519_key")],
        description="default: <storage.root>/host_keys/ssh_host_ed25519_key, where the service may write it",
    )
    host_key_types: list[HostKeyType] = Field(
        default_factory=lambda: ["ed25519", "ecdsa", "rsa"],
        min_length=1,
        description="the host key types served; one missing from host_keys is made beside the first of them",
    )
    # Which upload names are temporary: a rename from one of these to a package name commits. Matched
    # without regard to case, and before the package suffixes: `.in.X.zip.` or `inprogress.X.zip` is temporary.
    temporary_prefixes: list[str] = Field(
        default_factory=lambda: [".", "inprogress."],
        description="a name starting with one of these is temporary (`.` covers lftp's `.in.X.zip.`)",
    )
    temporary_suffixes: list[str] = Field(
        default_factory=lambda: [".tmp", ".part", ".filepart", ".partial", ".writing", ".inprogress", ".upload"],
        description="a name ending with one of these is temporary",
    )
    package_suffixes: list[str] = Field(default_factory=lambda: [".zip"], description="matched without regard to case")
    stop_grace_seconds: float = Field(
        default=30.0, ge=0, description="on SIGTERM, uploads in flight have this long to finish before they are cut"
    )

    @field_validator("temporary_prefixes", "temporary_suffixes", "package_suffixes")
    @classmethod
    def _plain_affixes(cls, value: list[str]) -> list[str]:
        for affix in value:
            if not affix or "/" in affix or "\x00" in affix:
                raise ValueError(f"{affix!r}: must be a non-empty name fragment without '/'")
        return value

    @field_validator("host_key_types")
    @classmethod
    def _distinct_types(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a host key type appears more than once")
        return value

    def listeners(self) -> list[SFTPListen]:
        """Every address to listen on (``listen`` first, then ``extra_listen``), each with its profile resolved."""
        entries = [self.listen, *self.extra_listen]
        return [e if e.profile is not None else e.model_copy(update={"profile": self.profile}) for e in entries]


class Validation(_Strict):
    """What relayd takes for well-formed, where the platform's own rule is not published."""

    dossier_number: str = Field(
        default=DEFAULT_NUMERO_REGEX,
        description="regular expression of a dossier number; the default takes A-<digit>-<6 to 12 letters or digits>",
    )

    @field_validator("dossier_number")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return value


class Config(_Strict):
    """The whole file."""

    server: Server = Server()
    storage: Storage
    limits: Limits = Limits()
    accounts: list[Account] = Field(min_length=1)
    communes: list[Commune] = Field(min_length=1)
    platform: ReturnServer | None = Field(default=None, description="without it, acks and returns wait in the outbox")
    returns: Returns = Returns()
    intake: IntakeRetry = IntakeRetry()
    mail: Mail | None = Field(default=None, description="without it, nobody is told by e-mail")
    deadlines: Deadlines = Deadlines()
    defender: Defender = Defender()
    metrics: Metrics = Metrics()
    retention: Retention = Retention()
    logging: Logging = Logging()
    validation: Validation = Validation()

    @property
    def reply_style(self) -> Literal["mirror", "relayd"]:
        """How replies are built (``platform.reply_style``; mirror without a platform section)."""
        return self.platform.reply_style if self.platform is not None else "mirror"

    @property
    def ack_kinds(self) -> frozenset[str]:
        """The acks relayd sends (``platform.acks``)."""
        setting = self.platform.acks if self.platform is not None else "AVL+ANL"
        return frozenset() if setting == "none" else frozenset(setting.split("+"))

    def commune_by_siret(self, siret: str) -> Commune | None:
        """The commune whose ``siret`` this is, if configured."""
        return next((c for c in self.communes if c.siret == siret), None)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        codes = [c.insee for c in self.communes]
        dup = {c for c in codes if codes.count(c) > 1}
        if dup:
            raise ValueError(f"communes: INSEE code(s) {sorted(dup)} appear more than once")
        sirets = [c.siret for c in self.communes if c.siret]
        if len(set(sirets)) != len(sirets):
            raise ValueError("communes: two communes share a SIRET; each needs its own")
        names = [a.username for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError("accounts: a username appears more than once")
        returns = [c.returns for c in self.communes if c.returns is not None]
        if len(set(returns)) != len(returns):
            raise ValueError("communes: two communes share a return directory; each needs its own")
        for i, commune in enumerate(self.communes):
            if commune.returns is not None and commune.returns in (commune.inbox, commune.rejected_dir):
                raise ValueError(f"communes[{i + 1}].returns: must differ from the inbox and from the rejected folder")
        for i, account in enumerate(self.accounts):
            for code in account.communes:
                if code not in codes:
                    raise ValueError(f"accounts[{i + 1}].communes: {code} is not a configured commune")
        return self

    def commune(self, insee: str) -> Commune | None:
        """The commune with this INSEE code, if configured."""
        return next((c for c in self.communes if c.insee == insee), None)

    def account(self, username: str) -> Account | None:
        """The account with this username, if configured."""
        return next((a for a in self.accounts if a.username == username), None)

    def drop_dir(self, account: Account) -> Path:
        """Where this account's uploads land: its chroot."""
        return account.drop_dir or self.storage.drop / account.username



_ADDRESS = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")


def _check_addresses(values: list[str]) -> list[str]:
    for i, value in enumerate(values):
        if not _ADDRESS.fullmatch(value):
            raise ValueError(f"entry {i} is not an e-mail address (name@domain)")
    return values


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve a configuration file. Raises :class:`ConfigError`."""
    return load_config_source(path)[0]


def load_config_source(path: str | Path) -> tuple[Config, Source]:
    """:func:`load_config`, also giving the file as written (lines, duplicated keys) for ``check-config``."""
    path = Path(path)
    try:
        source = read_source(path)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    raw = source.data
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings (storage:, accounts:, communes:...)")
    _resolve_paths(raw, path.resolve().parent)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            message = explain(err, Config)
            loc = tuple(err["loc"]) or leading_loc(message)
            if err["loc"] or loc is None:
                lines.append(f"{source.where(tuple(err['loc']))}: {message}")
            else:
                # A cross-check of the whole file names its key path at the start of the message.
                lines.append(f"{source.where(loc)}: {message.split(': ', 1)[1]}")
        raise ConfigError("\n".join(lines)) from None
    # Every reader and writer of dossier numbers in this process follows the loaded rule.
    NUMERO_PATTERN.use(config.validation.dossier_number)
    return config, source


def _resolve_paths(raw: dict, base: Path) -> None:
    """Make relative paths relative to the configuration file, not the working directory."""

    def fix(value: object) -> object:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str(base / value)
        return value

    storage = raw.get("storage")
    if isinstance(storage, dict) and "root" in storage:
        storage["root"] = fix(storage["root"])
    server = raw.setdefault("server", {})
    if isinstance(server, dict):
        if "host_keys" in server:
            keys = server["host_keys"]
            if isinstance(keys, list):
                server["host_keys"] = [fix(k) for k in keys]
        elif isinstance(storage, dict) and isinstance(storage.get("root"), str):
            # Generated on first start, so it goes where relayd may write (the service's state
            # directory), not beside the configuration; a key made there by an earlier release stays.
            default = Server().host_keys[0]
            legacy = base / default
            server["host_keys"] = [str(legacy if legacy.exists() else Path(storage["root"]) / default)]
    for commune in raw.get("communes") or []:
        if isinstance(commune, dict):
            for key in ("inbox", "returns", "rejected"):
                if key in commune:
                    commune[key] = fix(commune[key])
    platform = raw.get("platform")
    if isinstance(platform, dict):
        for key in ("private_key", "password_file", "known_hosts"):
            if key in platform:
                platform[key] = fix(platform[key])
    mail = raw.get("mail")
    if isinstance(mail, dict) and "password_file" in mail:
        mail["password_file"] = fix(mail["password_file"])
    for account in raw.get("accounts") or []:
        if isinstance(account, dict):
            for key in ("password_file", "authorized_keys_file", "drop_dir"):
                if key in account:
                    account[key] = fix(account[key])

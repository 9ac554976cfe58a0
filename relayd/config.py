"""relayd's YAML configuration, validated by pydantic.

A configuration error names the key path and the file, e.g.
``relayd.yaml: accounts.0.password_hash: ...``. Secrets never sit in the file in clear:
an account has a password *hash*, or names a file or a systemd credential that holds one.
Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import asyncssh
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from relayd.inbound.passwords import hash_password, is_password_hash
from relayd.pec.zipcheck import PackageLimits

INSEE_PATTERN = r"^(?:[0-9]{5}|2[AB][0-9]{3})$"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=0, le=65535)


class Limits(PackageLimits):
    """Package bounds (see :class:`PackageLimits`) plus the server's own."""

    max_sessions: int = Field(default=32, gt=0, description="concurrent SSH connections, all accounts")
    max_upload_bytes_per_session: int = Field(default=4 * 1024 * 1024 * 1024, gt=0)
    login_timeout_seconds: float = Field(default=30.0, gt=0)


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
        path = self.password_file
        if self.password_credential is not None:
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise ConfigError(f"account {self.username}: password_credential needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
            path = Path(creds) / self.password_credential
        if path is None:
            return None
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"account {self.username}: cannot read its password file ({exc.strerror})") from None
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
    demarches: list[str] = Field(min_length=1, description="démarche codes accepted, e.g. ILE, RCO, DAUA")
    delivery: Literal["zip", "extracted"] = "zip"
    file_mode: str = Field(default="0640", pattern=r"^0?[0-7]{3}$")
    group: str | None = Field(default=None, description="group owning what lands in the inbox")

    @property
    def mode(self) -> int:
        return int(self.file_mode, 8)


class Storage(_Strict):
    root: Path

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


class Logging(_Strict):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Server(_Strict):
    listen: Listen = Listen()
    host_keys: list[Path] = Field(default_factory=lambda: [Path("host_keys/ssh_host_ed25519_key")])
    # Which upload names are temporary: a rename from one of these to a package name commits.
    temporary_suffixes: list[str] = Field(default_factory=lambda: [".tmp", ".part", ".filepart", ".partial"])
    package_suffixes: list[str] = Field(default_factory=lambda: [".zip"])


class Config(_Strict):
    """The whole file."""

    server: Server = Server()
    storage: Storage
    limits: Limits = Limits()
    accounts: list[Account] = Field(min_length=1)
    communes: list[Commune] = Field(min_length=1)
    logging: Logging = Logging()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        codes = [c.insee for c in self.communes]
        dup = {c for c in codes if codes.count(c) > 1}
        if dup:
            raise ValueError(f"communes: INSEE code(s) {sorted(dup)} appear more than once")
        names = [a.username for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError("accounts: a username appears more than once")
        for i, account in enumerate(self.accounts):
            for code in account.communes:
                if code not in codes:
                    raise ValueError(f"accounts.{i}.communes: {code} is not a configured commune")
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



def load_config(path: str | Path) -> Config:
    """Read, validate and resolve a configuration file. Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    _resolve_paths(raw, path.resolve().parent)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                lines.append(f"{path}: {'.'.join(str(p) for p in err['loc'])}: {msg}")
            else:
                # Cross-checks of the whole file name their key path at the start of the message.
                lines.append(f"{path}: {msg}")
        raise ConfigError("\n".join(lines)) from None


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
        keys = server.get("host_keys", [str(p) for p in Server().host_keys])
        if isinstance(keys, list):
            server["host_keys"] = [fix(k) for k in keys]
    for commune in raw.get("communes") or []:
        if isinstance(commune, dict) and "inbox" in commune:
            commune["inbox"] = fix(commune["inbox"])
    for account in raw.get("accounts") or []:
        if isinstance(account, dict):
            for key in ("password_file", "authorized_keys_file", "drop_dir"):
                if key in account:
                    account[key] = fix(account[key])

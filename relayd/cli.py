"""The ``relayd`` command line: run, demo, check-config, hash-password, return, outbox."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import getpass
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

from relayd import __version__
from relayd.config import Config, ConfigError, load_config
from relayd.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relayd`` console script."""
    parser = argparse.ArgumentParser(prog="relayd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="run the relay with a configuration file")
    p_run.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))

    p_check = sub.add_parser("check-config", help="validate a configuration file and exit")
    p_check.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))

    p_demo = sub.add_parser("demo", help="build a self-contained demo setup on loopback and run it")
    p_demo.add_argument("--dir", type=Path, default=Path("demo"))
    p_demo.add_argument("--port", type=int, default=2222, help="0 picks a free port (written to demo.json)")
    p_demo.add_argument("--platform-port", type=int, default=2223,
                        help="the simulated platform's return server (0 picks a free port)")

    sub.add_parser("hash-password", help="read a password on stdin (or prompt) and print its hash for the YAML file")

    p_return = sub.add_parser("return", help="drop a status file for a dossier (for business software that cannot)")
    p_return.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))
    p_return.add_argument("numero", help="the dossier number, e.g. A-9-X3UGO4V7")
    p_return.add_argument("--state", required=True, choices=["recu", "clos"])
    p_return.add_argument("--comment", help="a comment for the citizen")
    p_return.add_argument("--attach", type=Path, action="append", default=[], help="an attachment (PDF, PNG, JPEG)")
    p_return.add_argument("--insee", help="the commune, for a dossier this relay never received")
    p_return.add_argument("--demarche", help="the démarche, for a dossier this relay never received")

    p_outbox = sub.add_parser("outbox", help="see and steer what waits to go to the platform")
    outbox_sub = p_outbox.add_subparsers(dest="action", required=True)
    p_list = outbox_sub.add_parser("list", help="pending and dead-letter entries (all with --all)")
    p_list.add_argument("--all", action="store_true")
    p_list.add_argument("--json", action="store_true")
    p_retry = outbox_sub.add_parser("retry", help="send entries again now, with a fresh attempt budget")
    p_retry.add_argument("ids", type=int, nargs="*")
    p_retry.add_argument("--dead", action="store_true", help="every dead-letter entry")
    p_purge = outbox_sub.add_parser("purge", help="abandon dead-letter entries (their files stay in the archive)")
    p_purge.add_argument("ids", type=int, nargs="+")
    for p in (p_list, p_retry, p_purge):
        p.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))

    p_status = sub.add_parser(
        "status", help="dossiers per commune, démarche and state; late and overdue ones; the outbox backlog",
        description="Counts of dossiers per commune, démarche and state, the open dossiers past deadlines.warn_days "
                    "(late) and deadlines.overdue_days (overdue), and the outbox backlog. Exit status: 0 when all "
                    "is well (late dossiers included), 1 when a dossier is overdue or an outbox entry is in "
                    "dead-letter (for monitoring), 2 on a configuration error.")
    p_status.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))
    p_status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_status.add_argument("--now", metavar="ISO8601", type=_moment,
                          help="compute the report as of this time, e.g. 2025-07-01 or 2025-07-01T08:00+02:00")

    p_retention = sub.add_parser(
        "retention", help="purge once what has outlived the retention periods, and print it",
        description="Remove archived files older than retention.archive_days, refused packages and drops older than "
                    "retention.quarantine_days, and the personal data of dossiers closed more than "
                    "retention.scrub_after_close_days ago (their reference stays in the ledger). The daemon does "
                    "this every retention.check_hours. Exit status: 0, 1 if a file could not be removed.")
    p_retention.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))
    p_retention.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p_retention.add_argument("--json", action="store_true", help="print JSON")
    p_retention.add_argument("--now", metavar="ISO8601", type=_moment, help="purge as if it were this time")

    p_fp = sub.add_parser("fingerprints", help="print the host keys as known_hosts lines, with SHA256 and MD5 fingerprints")
    p_fp.add_argument("-c", "--config", type=Path, default=Path("/etc/relayd/relayd.yaml"))
    p_fp.add_argument("--host", help="the name the platform connects to (default: the listening address)")

    from relayd.ledger_admin import register as register_ledger

    register_ledger(sub)

    from relayd.testkit.cli import register as register_testkit

    register_testkit(sub)

    from relayd.inbound.defender_commands import register as register_defender

    register_defender(sub, Path("/etc/relayd/relayd.yaml"))

    args = parser.parse_args(argv)
    # `kill -USR1` prints every thread's stack to stderr (the journal): the first look at a wedged daemon.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.command == "check-config":
        return _check_config(args.config)
    if args.command == "run":
        config = _load_or_exit(args.config)
        configure_logging(config.logging.format, config.logging.level)
        return _run(config, args.config)
    if args.command == "demo":
        return _demo(args.dir, args.port, args.platform_port)
    if args.command == "hash-password":
        return _hash_password()
    if args.command == "return":
        from relayd.outbound.commands import drop_status

        return drop_status(_load_or_exit(args.config), args.numero, args.state, comment=args.comment,
                           attachments=args.attach, insee=args.insee, demarche=args.demarche)
    if args.command == "outbox":
        from relayd.outbound import commands

        config = _load_or_exit(args.config)
        if args.action == "list":
            return commands.outbox_list(config, everything=args.all, as_json=args.json)
        if args.action == "retry":
            return commands.outbox_retry(config, args.ids, dead=args.dead)
        return commands.outbox_purge(config, args.ids)
    if args.command in ("status", "retention"):
        return _ledger_report(args)
    if args.command == "fingerprints":
        from relayd.fingerprints import run_command as fingerprints

        return fingerprints(_load_or_exit(args.config), args.host)
    if args.command == "defender":
        from relayd.inbound.defender_commands import run as run_defender

        return run_defender(args, _load_or_exit(args.config))
    if args.command == "ledger":
        from relayd.ledger_admin import run_command as ledger_command

        return ledger_command(_load_or_exit(args.config), args)
    if args.command == "testkit":
        from relayd.testkit.cli import run as run_testkit

        return run_testkit(args)
    return 2


def _ledger_report(args: argparse.Namespace) -> int:
    """``relayd status`` and ``relayd retention``: both read (or purge) the ledger of a relay that has run."""
    from contextlib import closing

    from relayd.clock import SYSTEM_CLOCK, Clock
    from relayd.ledger import Ledger, LedgerUnusable

    config = _load_or_exit(args.config)
    now = (Clock.at(args.now) if args.now is not None else SYSTEM_CLOCK).now()
    if not config.storage.ledger.exists():
        print(f"relayd: no ledger at {config.storage.ledger}: relayd has not run with this configuration",
              file=sys.stderr)
        return 2
    try:
        ledger = Ledger(config.storage.ledger)
    except LedgerUnusable as exc:
        print(f"relayd: {exc.message}", file=sys.stderr)
        return exc.exit_status
    with closing(ledger):
        if args.command == "status":
            from relayd.deadlines import run_command as status

            return status(ledger, config, now, as_json=args.json)
        from relayd.retention import run_command as retention

        # The printed list says what was done; logs only say trouble, on stderr, away from the output.
        configure_logging(config.logging.format, "warning", stream=sys.stderr)
        return retention(ledger, config, now, dry_run=args.dry_run, as_json=args.json)


def _moment(text: str) -> datetime:
    """An ISO 8601 date or time for ``--now``; without an offset it is local time."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: {text!r}") from None


def _config_problems(config: Config) -> list[str]:
    """What would stop relayd at start-up although the file is valid: secrets it cannot read, folders it cannot write.

    Run as the service's user (ExecStartPre= in relayd.service does), so that permissions and the
    sandbox's read-only paths are those relayd will have.
    """
    from relayd.inbound.server import resolve_auth

    problems = []
    try:
        resolve_auth(config)
    except ConfigError as exc:
        problems.append(str(exc))
    if config.mail is not None:
        try:
            config.mail.password()
        except ConfigError as exc:
            problems.append(str(exc))
    if config.platform is not None:
        from relayd.outbound.sftp_client import DeliveryError, ReturnServerClient

        try:
            ReturnServerClient(config.platform).check_settings()
        except DeliveryError as exc:
            problems.append(f"platform: {exc.message}")
    folders = [("storage.root", config.storage.root)]
    # A host key that is absent is generated at the first start, so its folder must be writable.
    folders += [("server.host_keys", key.parent) for key in config.server.host_keys if not key.exists()]
    for key, folder in folders:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            problems.append(f"{key}: relayd cannot write in {folder} ({existing} is read-only or not writable by this user)")
    return problems


def _load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"relayd: invalid configuration\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(path: Path) -> int:
    config = _load_or_exit(path)
    problems = _config_problems(config)
    if problems:
        print("relayd: invalid configuration\n" + "\n".join(f"{path}: {p}" for p in problems), file=sys.stderr)
        return 2
    legacy = [f"{listen.host}:{listen.port}" for listen in config.server.listeners() if listen.profile == "legacy"]
    if legacy:
        from relayd.ssh_algorithms import legacy_warning

        print(f"relayd: warning: {path}: {legacy_warning(legacy)}", file=sys.stderr)
    print(f"{path}: OK ({len(config.accounts)} account(s), {len(config.communes)} commune(s), "
          f"return server {'configured' if config.platform else 'not configured: acks and returns wait in the outbox'})")
    return 0


def _run(config: Config, path: Path) -> int:
    from relayd import daemon
    from relayd.ledger import LedgerUnusable

    try:
        asyncio.run(daemon.run(config, config_path=path))
    except KeyboardInterrupt:
        pass
    except LedgerUnusable as exc:
        # One line, no traceback: the journal shows what to do, and the unit does not restart on it.
        print(f"relayd: {exc.message}", file=sys.stderr)
        return exc.exit_status
    return 0


def _demo(folder: Path, port: int, platform_port: int) -> int:
    from relayd import daemon
    from relayd.demo import build_demo, relay_client_key, write_demo_json
    from relayd.testkit.platform import ReturnServer

    async def main() -> None:
        key = relay_client_key(folder)
        platform = ReturnServer(folder.resolve() / "platform", port=platform_port,
                                authorized_keys=[key.with_name(key.name + ".pub").read_text().strip()])
        await platform.start()
        info = build_demo(folder, port=port, platform=platform.relay_settings(key))
        config = _load_or_exit(Path(info["config"]))
        configure_logging(config.logging.format, config.logging.level)

        async def ready(server) -> None:
            where = {"received": str(platform.received), "host": platform.host, "port": platform.port,
                     "username": platform.username, "host_key_fingerprint": platform.fingerprint}
            path = write_demo_json(folder, info, server.port, where)
            print(f"relayd demo listening on 127.0.0.1:{server.port}; the platform receives in {platform.received}; "
                  f"details in {path}", file=sys.stderr, flush=True)

        try:
            await daemon.run(config, config_path=Path(info["config"]), on_ready=ready)
        finally:
            await platform.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


def _hash_password() -> int:
    from relayd.inbound.passwords import hash_password

    password = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("relayd: empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

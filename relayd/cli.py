"""The ``relayd`` command line."""

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

from relayd import __version__, dossiers
from relayd.config import Config, ConfigError, load_config
from relayd.logs import configure_logging

DEFAULT_CONFIG = Path("/etc/relayd/relayd.yaml")

_DESCRIPTION = """\
relayd receives the platform's télédossiers over SFTP, hands them to each commune's inbox, and
sends acknowledgements and return flows back through a durable outbox.

Run a relay with `relayd run -c FILE` (systemd does), or try it on loopback with `relayd demo`.
`relayd COMMAND --help` tells more about each command."""

_EPILOG = """\
exit status: 0 success; 1 the command ran and found trouble (see its help); 2 a configuration or
usage error; run also exits 3 when it cannot listen, 4 when it cannot read a key or secret, 5 when
it cannot write its storage, 65 or 75 when the ledger cannot be used, 1 on any other failure. Full documentation: README.md, man relayd."""


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The ``-c/--config`` option every command that reads the configuration takes."""
    parser.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                        help="the configuration file (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """relayd's whole argument parser (also the source of the shell completion and the man page)."""
    parser = argparse.ArgumentParser(prog="relayd", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a Python traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run the relay with a configuration file")
    add_config_argument(p_run)

    p_check = sub.add_parser("check-config", help="review a configuration file as the service would use it, and exit",
                             description="Validate a configuration file and review it: placeholders left from the "
                                         "example, duplicated keys, folders the service cannot write, a return "
                                         "server whose name does not resolve. Exit status: 0 OK, 2 a problem.")
    add_config_argument(p_check)
    p_check.add_argument("--as-user", metavar="USER",
                         help="check that this user (e.g. relayd, the service's) can write every folder")
    p_check.add_argument("--no-resolve", action="store_true", help="do not resolve the return server's name")

    p_demo = sub.add_parser("demo", help="build a self-contained demo setup on loopback and run it")
    p_demo.add_argument("--dir", type=Path, default=Path("demo"), help="where the demo lives (default: %(default)s)")
    p_demo.add_argument("--port", type=int, default=2222,
                        help="the relay's port (default: %(default)s); 0 picks free ports for everything the demo "
                             "binds (written to demo.json)")
    p_demo.add_argument("--platform-port", type=int, default=None,
                        help="the simulated platform's return server (default: 2223, or a free port with --port 0)")

    sub.add_parser("hash-password", help="read a password on stdin (or prompt) and print its hash for the YAML file")

    p_return = sub.add_parser("return", help="drop a status file for a dossier (for business software that cannot)")
    add_config_argument(p_return)
    p_return.add_argument("numero", help="the dossier number, e.g. A-9-X3UGO4V7")
    p_return.add_argument("--state", required=True, choices=dossiers.RETURN_STATES)
    p_return.add_argument("--comment", help="a comment for the citizen")
    p_return.add_argument("--attach", type=Path, action="append", default=[], help="an attachment (PDF, PNG, JPEG)")
    p_return.add_argument("--insee", help="the commune, for a dossier this relay never received")
    p_return.add_argument("--demarche", help="the démarche, for a dossier this relay never received")

    p_outbox = sub.add_parser("outbox", help="see and steer what waits to go to the platform")
    outbox_sub = p_outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    p_list = outbox_sub.add_parser("list", help="pending and dead-letter entries (all with --all), with their times")
    p_list.add_argument("--all", action="store_true", help="delivered and purged entries too")
    p_list.add_argument("--json", action="store_true", help="print JSON")
    p_retry = outbox_sub.add_parser("retry", help="send entries again now, with a fresh attempt budget")
    p_retry.add_argument("ids", type=int, nargs="*")
    p_retry.add_argument("--dead", action="store_true", help="every dead-letter entry")
    p_purge = outbox_sub.add_parser("purge", help="abandon dead-letter entries (their files stay in the archive)")
    p_purge.add_argument("ids", type=int, nargs="+")
    for p in (p_list, p_retry, p_purge):
        add_config_argument(p)

    p_status = sub.add_parser(
        "status", help="dossiers per commune, démarche and state; late and overdue ones; the outbox backlog",
        description="Counts of dossiers per commune, démarche and state, the open dossiers past deadlines.warn_days "
                    "(late) and deadlines.overdue_days (overdue), and the outbox backlog. Exit status: 0 when all "
                    "is well (late dossiers included), 1 when a dossier is overdue or an outbox entry is in "
                    "dead-letter (for monitoring), 2 on a configuration error.")
    add_config_argument(p_status)
    p_status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_status.add_argument("--now", metavar="ISO8601", type=_moment,
                          help="compute the report as of this time, e.g. 2025-07-01 or 2025-07-01T08:00+02:00")

    p_retention = sub.add_parser(
        "retention", help="purge once what has outlived the retention periods, and print it",
        description="Remove archived files older than retention.archive_days, refused packages and drops older than "
                    "retention.quarantine_days, and the personal data of dossiers closed more than "
                    "retention.scrub_after_close_days ago (their reference stays in the ledger). The daemon does "
                    "this every retention.check_hours. Exit status: 0, 1 if a file could not be removed.")
    add_config_argument(p_retention)
    p_retention.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p_retention.add_argument("--json", action="store_true", help="print JSON")
    p_retention.add_argument("--now", metavar="ISO8601", type=_moment, help="purge as if it were this time")

    p_fp = sub.add_parser("fingerprints", help="print the host keys as known_hosts lines, with SHA256 and MD5 fingerprints")
    add_config_argument(p_fp)
    p_fp.add_argument("--host", help="the name the platform connects to (default: the listening address)")

    from relayd.ledger_admin import register as register_ledger

    register_ledger(sub)

    # Commands in their own modules: each adds its parser and sets `func` (one line per module).
    from relayd import completion, dossier, keygen

    dossier.register(sub)
    keygen.register(sub)
    completion.register(sub)
    from relayd.testkit.cli import register as register_testkit

    register_testkit(sub)

    from relayd.inbound.defender_commands import register as register_defender

    register_defender(sub, DEFAULT_CONFIG)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``relayd`` console script."""
    args = build_parser().parse_args(argv)
    # `kill -USR1` prints every thread's stack to stderr (the journal): the first look at a wedged daemon.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # `relayd outbox list | head`: the reader has gone, which is no error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if callable(getattr(args, "func", None)):
        return int(args.func(args))
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "run":
        config = _load_for_start(args.config)
        configure_logging(config.logging.format, config.logging.level)
        return _run(config, args.config, args.debug)
    if args.command == "demo":
        return _demo(args.dir, args.port, args.platform_port, args.debug)
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


def _config_problems(config: Config, source, *, as_user: str | None = None, resolve: bool = True) -> tuple[list[str], list[str]]:
    """What would stop relayd at start-up although the file is valid (errors), and what it should know (warnings).

    ExecStartPre= in relayd.service runs check-config as the service's user, so that permissions and
    the sandbox's read-only paths are those relayd will have; ``--as-user`` checks the same by hand.
    """
    from relayd.config_review import review

    return review(config, source, as_user=as_user, resolve=resolve)


def _load_for_start(path: Path) -> Config:
    """The configuration for ``run``: a file that does not load is one line (for the journal) and exit status 2."""
    from relayd.logs import error_line
    from relayd.start_failure import EXIT_CONFIG

    try:
        return load_config(path)
    except ConfigError as exc:
        error_line("relayd: invalid configuration: " + "; ".join(str(exc).splitlines()))
        raise SystemExit(EXIT_CONFIG) from None


def _load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"relayd: invalid configuration\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_config(args: argparse.Namespace) -> int:
    from relayd.config import load_config_source
    from relayd.logs import error_line

    path = args.config
    try:
        config, source = load_config_source(path)
    except ConfigError as exc:
        problems, warnings = str(exc).splitlines(), []
    else:
        problems, warnings = _config_problems(config, source, as_user=args.as_user, resolve=not args.no_resolve)
    # Under ExecStartPre= these lines go to the journal: each carries its priority there.
    for warning in warnings:
        error_line(f"relayd: warning: {warning}", level="warning")
    if problems:
        error_line("relayd: invalid configuration")
        for problem in problems:
            error_line(problem)
        return 2
    legacy = [f"{listen.host}:{listen.port}" for listen in config.server.listeners() if listen.profile == "legacy"]
    if legacy:
        from relayd.ssh_algorithms import legacy_warning

        print(f"relayd: warning: {path}: {legacy_warning(legacy)}", file=sys.stderr)
    print(f"{path}: OK ({len(config.accounts)} account(s), {len(config.communes)} commune(s), "
          f"return server {'configured' if config.platform else 'not configured: acks and returns wait in the outbox'})")
    return 0


def _start(config: Config, debug: bool, main) -> int:
    """Run ``main()`` (the daemon's loop); a failed start is one line and an exit status, not a traceback."""
    from relayd.logs import error_line
    from relayd.start_failure import explain

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        if debug:
            raise
        status, message = explain(exc, config)
        error_line(f"relayd: {message}")
        return status
    return 0


def _run(config: Config, path: Path, debug: bool = False) -> int:
    from relayd import daemon

    return _start(config, debug, lambda: daemon.run(config, config_path=path))


def _demo(folder: Path, port: int, platform_port: int | None, debug: bool = False) -> int:
    from relayd import daemon
    from relayd.logs import error_line
    from relayd.start_failure import ListenError
    from relayd.demo import DEMO_PLATFORM_PORT, build_demo, relay_client_key, write_demo_json, write_known_hosts
    from relayd.testkit.platform import ReturnServer

    if platform_port is None:
        # `--port 0` means "bind nothing fixed", so that a demo never collides with another one.
        platform_port = 0 if port == 0 else DEMO_PLATFORM_PORT
    key = relay_client_key(folder)
    info = build_demo(folder, port=port)
    config = _load_for_start(Path(info["config"]))
    configure_logging(config.logging.format, config.logging.level)

    async def main() -> None:
        nonlocal config
        platform = ReturnServer(folder.resolve() / "platform", port=platform_port,
                                authorized_keys=[key.with_name(key.name + ".pub").read_text().strip()])
        try:
            await platform.start()
        except OSError as exc:
            raise ListenError("127.0.0.1", platform_port, exc) from None
        try:
            build_demo(folder, port=port, platform=platform.relay_settings(key))
            config = _load_for_start(Path(info["config"]))

            async def ready(server) -> None:
                where = {"received": str(platform.received), "host": platform.host, "port": platform.port,
                         "username": platform.username, "host_key_fingerprint": platform.fingerprint}
                known_hosts = write_known_hosts(folder, server.port, config.server.host_keys)
                path = write_demo_json(folder, {**info, "known_hosts": str(known_hosts)}, server.port, where)
                error_line(f"relayd demo listening on 127.0.0.1:{server.port}; the platform receives in "
                           f"{platform.received}; details in {path}", level="notice")

            await daemon.run(config, config_path=Path(info["config"]), on_ready=ready)
        finally:
            await platform.close()

    return _start(config, debug, main)


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

"""``relayd testkit``: the integration tester's commands (sample, push, platform).

``sample`` writes valid or broken télédossier packages, ``push`` sends packages to a relay over
SFTP and reports what it answered. ``platform`` (the platform's side) is registered by
:mod:`relayd.testkit.platform` when that module provides ``register``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.samples import CENSUS, DEMARCHES, ILE_CODE, SampleSpec, build_package, package_filename, random_numero

__all__ = ["register", "run", "write_samples"]

#: Environment variable holding the push password when neither ``--key`` nor ``--password-file`` is given.
PASSWORD_ENV = "RELAYD_PUSH_PASSWORD"

_INSEE_RE = re.compile(r"^(?:\d{5}|2[AB]\d{3})$")
# Deposits spread over the 30 days after the default one (April 2019), so every date stays in
# Paris summer time like the +02:00 offset that SampleSpec stamps.
_SPREAD_SECONDS = 30 * 24 * 3600

_PUSH_EPILOG = """\
exit status:
  0  every file was accepted (or was a resend of one already accepted: duplicate)
  1  the relay refused at least one file (and every other file was accepted)
  2  usage error, or at least one file could not be delivered (cannot connect,
     authentication failed, host key unknown or changed, connection lost, I/O error)

The password comes from --password-file (its first line) or from the environment
variable RELAYD_PUSH_PASSWORD; it is never printed.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``testkit`` and its subcommands to the ``relayd`` parser."""
    testkit = sub.add_parser("testkit", help="samples, a push client and a platform simulator for integration tests",
                             description="Tools for integration testers: 'sample' writes valid or broken packages, "
                                         "'push' sends packages to a relay and reports what it answered.")
    testkit_sub = testkit.add_subparsers(dest="testkit_command", required=True)
    _register_sample(testkit_sub)
    _register_push(testkit_sub)
    # The platform simulator lives in its own module, which may not be there (or not finished) yet.
    try:
        from relayd.testkit import platform
    except ImportError:
        return
    register_platform = getattr(platform, "register", None)
    if callable(register_platform):
        register_platform(testkit_sub)


def run(args: argparse.Namespace) -> int:
    """Run the chosen testkit subcommand; return the exit status.

    A subcommand registered elsewhere (``platform``) either sets ``testkit_run`` through
    ``set_defaults`` or its module provides ``run(args)``.
    """
    handler = getattr(args, "testkit_run", None)
    if callable(handler):
        return int(handler(args))
    if args.testkit_command == "platform":
        try:
            from relayd.testkit import platform
        except ImportError:
            platform = None  # type: ignore[assignment]
        run_platform = getattr(platform, "run", None)
        if callable(run_platform):
            return int(run_platform(args))
    print(f"relayd testkit: no handler for {args.testkit_command!r}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------------- sample


def _register_sample(testkit_sub: argparse._SubParsersAction) -> None:
    p = testkit_sub.add_parser(
        "sample", help="write sample télédossier packages, valid or broken",
        description="Write packages that follow the platform's real layout and naming. The same --seed "
                    "always gives byte-identical files. With --broken KIND, each package is wrong in the "
                    "one way that KIND names (see --list-broken).",
    )
    p.add_argument("--demarche", type=_demarche_code, default=CENSUS, metavar="CODE",
                   help=f"the démarche code, exactly as the platform spells it (default {CENSUS}); real codes: "
                        f"{', '.join(d for d in DEMARCHES if d != ILE_CODE)}; {ILE_CODE} is a placeholder, the real code is unknown")
    p.add_argument("--layout", choices=["nested", "plain"], default="nested",
                   help="attachments in one nested -pj- zip (as in the DAUA package, the default), "
                        "or as plain files -ji-0.pdf, -jf-1.pdf... (as in DILA's data)")
    p.add_argument("--count", type=_positive_int, default=1, metavar="N", help="how many packages (default 1)")
    p.add_argument("--insee", default="90017", metavar="CODE", help="the commune's INSEE code in the routing (default 90017)")
    p.add_argument("--seed", type=int, metavar="S", help="make the output reproducible (default: a random seed, printed on stderr); "
                        "the same seed gives the same dossier numbers, so give each batch for one relay its own seed")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="the folder to write into (created if missing; default .)")
    p.add_argument("--broken", metavar="KIND", help="write broken packages of this kind instead")
    p.add_argument("--list-broken", action="store_true", help="list the broken kinds with their reason codes, and exit")
    p.add_argument("--json", action="store_true", help="with --list-broken: a JSON list for programs")
    p.set_defaults(testkit_run=_run_sample)


def _demarche_code(text: str) -> str:
    # Matching is exact on the relay, so the code is taken as typed: no case folding.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"not a démarche code (letters, digits, '.', '_', '-'): {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def write_samples(
    out: Path,
    *,
    demarche: str = CENSUS,
    count: int = 1,
    insee: str = "90017",
    seed: int = 0,
    broken: str | None = None,
    layout: str = "nested",
) -> list[Path]:
    """Write ``count`` packages (valid, or of broken kind ``broken``) into ``out``; return their paths.

    Everything derives from ``seed``: the dossier numbers, the deposit times and each package's own
    seed, so the same arguments give byte-identical files. Raises KeyError for an unknown broken kind.
    """
    if broken is not None and broken not in BROKEN_KINDS:
        raise KeyError(broken)
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    numeros: set[str] = set()
    base = SampleSpec().deposit
    while len(written) < count:
        numero = random_numero(rng)
        deposit = base + timedelta(seconds=rng.randrange(_SPREAD_SECONDS), microseconds=rng.randrange(1_000_000))
        package_seed = rng.randrange(2**32)
        if numero in numeros:  # one dossier per number, or the relay would see a conflict
            continue
        numeros.add(numero)
        spec = SampleSpec(numero=numero, demarche=demarche, insee=insee, deposit=deposit,
                          layout="plain" if layout == "plain" else "nested")
        if broken is None:
            data, name = build_package(spec, seed=package_seed), package_filename(spec)
        else:
            # The kind leads the name, so a tester sees at once which defect a file carries.
            data, name = build_broken(broken, spec), f"broken-{broken}-{package_filename(spec)}"
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a watcher of the folder never sees half a file
        written.append(path)
    return written


def _run_sample(args: argparse.Namespace) -> int:
    if args.list_broken:
        _list_broken(sys.stdout, as_json=args.json)
        return 0
    if args.json:
        print("relayd testkit sample: --json goes with --list-broken", file=sys.stderr)
        return 2
    if args.broken is not None and args.broken not in BROKEN_KINDS:
        print(f"relayd testkit sample: unknown broken kind {args.broken!r}; known kinds:", file=sys.stderr)
        for name in sorted(BROKEN_KINDS):
            print(f"  {name}", file=sys.stderr)
        return 2
    if not _INSEE_RE.match(args.insee):
        print(f"relayd testkit sample: {args.insee!r} is not an INSEE code (5 characters, e.g. 90017 or 2A004)",
              file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    try:
        written = write_samples(args.out, demarche=args.demarche, count=args.count, insee=args.insee,
                                seed=seed, broken=args.broken, layout=args.layout)
    except OSError as exc:
        print(f"relayd testkit sample: cannot write into {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    what = f"broken ({args.broken})" if args.broken else "valid"
    print(f"wrote {len(written)} {what} {args.demarche} package(s) for INSEE {args.insee} into {args.out} "
          f"(seed {seed}; --seed {seed} writes the same files again)", file=sys.stderr)
    return 0


def _list_broken(out: TextIO, *, as_json: bool) -> None:
    kinds = [BROKEN_KINDS[name] for name in sorted(BROKEN_KINDS)]
    if as_json:
        json.dump([{"kind": k.name, "code": k.reason.value, "description": k.description} for k in kinds], out, indent=2,
                  ensure_ascii=False)
        out.write("\n")
        return
    kind_w = max(len("KIND"), *(len(k.name) for k in kinds))
    code_w = max(len("CODE"), *(len(k.reason.value) for k in kinds))
    out.write(f"{'KIND':<{kind_w}}  {'CODE':<{code_w}}  DESCRIPTION\n")
    for k in kinds:
        out.write(f"{k.name:<{kind_w}}  {k.reason.value:<{code_w}}  {k.description}\n")


# --------------------------------------------------------------------------- push


def _register_push(testkit_sub: argparse._SubParsersAction) -> None:
    p = testkit_sub.add_parser(
        "push", help="push packages to a relay over SFTP and report what it answered",
        description="Upload packages the way the platform does and print one line per file: "
                    "'accepted', 'duplicate' (a resend the relay already had), 'refused' with the relay's reason, "
                    "or 'error'.",
        epilog=_PUSH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="a package, or a folder (every *.zip in it, sorted)")
    p.add_argument("--host", required=True, help="the relay's address")
    p.add_argument("--port", type=int, default=22, help="the relay's SSH port (default 22)")
    p.add_argument("--user", required=True, help="the account to log in as")
    cred = p.add_mutually_exclusive_group()
    cred.add_argument("--key", type=Path, metavar="FILE", help="a private key file (OpenSSH format, no passphrase)")
    cred.add_argument("--password-file", type=Path, metavar="FILE", help=f"a file whose first line is the password (else ${PASSWORD_ENV})")
    p.add_argument("--style", choices=["direct", "rename"], default="rename",
                   help="rename: upload <name>.part then rename it to <name> (default); direct: upload <name>, the close commits")
    # The bound is push.MAX_CONCURRENCY; it is checked there, so that ``relayd`` starts without paramiko.
    p.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                   help="parallel SSH connections, one thread each (default 1)")
    p.add_argument("--remote-dir", default=".", metavar="DIR", help="the folder on the server (default: the login folder)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="seconds to wait for any answer (default 120)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {file, status, code, message, bytes}")
    hostkey = p.add_mutually_exclusive_group()
    hostkey.add_argument("--known-hosts", type=Path, metavar="FILE",
                         help="check the host key against this file (default ~/.ssh/known_hosts)")
    hostkey.add_argument("--insecure-host-key", action="store_true",
                         help="accept any host key (only for a test relay on loopback)")
    p.set_defaults(testkit_run=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from relayd.testkit import push

    def usage(message: str) -> int:
        print(f"relayd testkit push: {message}", file=sys.stderr)
        return 2

    if not 0 < args.port < 65536:
        return usage(f"--port {args.port} is not a TCP port")
    password: str | None = None
    if args.password_file is not None:
        try:
            lines = args.password_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            return usage(f"cannot read the password file {args.password_file}: {getattr(exc, 'strerror', None) or exc}")
        password = lines[0] if lines else ""
        if not password:
            return usage(f"the password file {args.password_file} is empty")
    elif args.key is None:
        password = os.environ.get(PASSWORD_ENV) or None
        if password is None:
            return usage(f"no credential: give --key FILE or --password-file FILE, or set {PASSWORD_ENV}")
    if args.insecure_host_key:
        print(f"relayd testkit push: WARNING: --insecure-host-key: the host key of {args.host}:{args.port} is not checked; "
              "use this only with a test relay on loopback", file=sys.stderr)

    bar = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    try:
        results = push.push_files(
            args.paths, host=args.host, port=args.port, username=args.user, key_path=args.key, password=password,
            style=args.style, concurrency=args.concurrency, remote_dir=args.remote_dir, known_hosts=args.known_hosts,
            insecure_host_key=args.insecure_host_key, progress=bar.update if bar else None, timeout=args.timeout,
        )
    except push.PushError as exc:
        return usage(str(exc))
    finally:
        if bar is not None:
            bar.finish()

    if args.json:
        json.dump([r.as_dict() for r in results], sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        for r in results:
            name = Path(r.file).name
            if r.status in ("accepted", "duplicate"):
                print(f"{r.status:<9} {name}")
            elif r.status == "refused":
                print(f"refused   {name}  {r.message}")
            else:
                print(f"error     {name}  {r.message}")
    counts = {s: sum(r.status == s for r in results) for s in ("accepted", "duplicate", "refused", "error")}
    print(f"{len(results)} file(s): {counts['accepted']} accepted, {counts['duplicate']} duplicate, "
          f"{counts['refused']} refused, {counts['error']} error(s)", file=sys.stderr)
    errors = {r.message for r in results if r.status == "error" and r.message}
    if counts["error"] and len(errors) == 1:
        # One cause for every failure (typically the connection): say it once where people look.
        print(f"relayd testkit push: {errors.pop()}", file=sys.stderr)
    return push.exit_code(results)


class _ProgressBar:
    """Files done/total and bytes on one terminal line, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO, width: int = 24):
        self.stream = stream
        self.width = width
        self._last = 0.0
        self._drawn = False

    def update(self, files_done: int, files_total: int, bytes_done: int, bytes_total: int) -> None:
        now = time.monotonic()
        if files_done < files_total and now - self._last < 0.1:
            return
        self._last = now
        filled = self.width * bytes_done // bytes_total if bytes_total else self.width
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {files_done}/{files_total} files  {_size(bytes_done)}/{_size(bytes_total)} ")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"

"""What the argument parser says of itself: shell completion scripts (shtab) and the man page (argparse-manpage).

Both are generated from :func:`relayd.cli.build_parser`, so they cannot drift from the commands.
The README's Debian section installs them; ``relayd completion bash`` and ``relayd manpage`` print them.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``completion`` and ``manpage`` to the ``relayd`` parser."""
    p = sub.add_parser("completion", help="print a shell completion script (bash, zsh or tcsh)",
                       description="Print a completion script generated from relayd's arguments, e.g. "
                                   "`relayd completion bash > /usr/share/bash-completion/completions/relayd`.")
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    p.set_defaults(func=run_completion)
    m = sub.add_parser("manpage", help="print relayd(8), the man page, in roff",
                       description="Print the man page generated from relayd's arguments, e.g. "
                                   "`relayd manpage | gzip > /usr/share/man/man8/relayd.8.gz`.")
    m.set_defaults(func=run_manpage)


def completion_script(shell: str) -> str:
    """The completion script for ``shell``."""
    import shtab

    from relayd.cli import build_parser

    return shtab.complete(build_parser(), shell=shell)


def manpage() -> str:
    """relayd(8) in roff, every command and option with its help."""
    from build_manpages.manpage import Manpage

    from relayd import __version__
    from relayd.cli import build_parser

    parser = build_parser()
    page = Manpage(parser, _data={"manual_section": "8", "manual_title": "relayd manual", "project_name": "relayd", "version": __version__,
                                  "description": "relay between mon.service-public.fr and a commune's software"})
    return str(page)


def run_completion(args: argparse.Namespace) -> int:
    """``relayd completion SHELL``."""
    sys.stdout.write(completion_script(args.shell))
    return 0


def run_manpage(args: argparse.Namespace) -> int:
    """``relayd manpage``."""
    sys.stdout.write(manpage())
    return 0

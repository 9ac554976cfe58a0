"""The crash campaign's short run: about ten SIGKILLs of relayd and the return server, and nothing goes wrong."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_program
from platform_sshd import SSHD

#: what bench/crash.py audits, each of which must be 0
FAULTS = ("lost", "duplicated_in_inbox", "partials", "ledger_vs_inbox", "acks_missing", "anl", "returns_missing",
          "returns_duplicated", "acks_duplicated", "order_violations", "undelivered")


def test_a_short_crash_campaign_loses_duplicates_and_reorders_nothing(tmp_path):
    require_program(SSHD)
    result = subprocess.run(
        [sys.executable, "-m", "bench.crash", "--seed", "12", "--kills", "10", "--packages", "25",
         "--max-seconds", "85", "--gap", "0.5", "2.5", "--work", str(tmp_path / "run"), "--json"],
        capture_output=True, text=True, timeout=150, cwd=REPO)
    assert result.stdout.strip(), result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["settled"], (figures, (tmp_path / "run" / "relay" / "relayd.log").read_text()[-4000:])
    # On a loaded machine the time limit may cut the campaign short; it still crashed both sides, several times.
    assert figures["relayd_kills"] >= 1 and figures["server_kills"] >= 1, figures
    assert figures["relayd_kills"] + figures["server_kills"] >= 5, figures
    assert figures["packages_confirmed"] >= 10, figures
    assert {key: figures[key] for key in FAULTS} == dict.fromkeys(FAULTS, 0), figures
    assert result.returncode == 0

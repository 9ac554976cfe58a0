"""docs/formats.md's walkthrough, run word for word against a demo: a status file written by hand reaches the platform."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, require_program


def _walkthrough() -> tuple[list[str], dict[str, str]]:
    """The walkthrough's shell steps, and the status files of section 8 it asks the reader to save."""
    text = (REPO / "docs" / "formats.md").read_text()
    walk = text[text.index("## Walkthrough"):]
    steps = re.findall(r"```sh\n(.+?)\n```", walk, flags=re.S)
    section8 = text[text.index("## 8."):text.index("## 9.")]
    smallest, closing = re.findall(r"```xml\n(.+?)\n```", section8, flags=re.S)[:2]
    return steps, {"recu.xml": smallest + "\n", "clos.xml": closing + "\n"}


def test_the_walkthrough_works_as_written(demo, tmp_path):
    for program in ("bash", "sftp", "unzip"):
        require_program(program)
    steps, saved = _walkthrough()
    assert steps[0].strip().startswith(".venv/bin/relayd demo --dir demo")  # step 1: the fixture runs it
    # The reader is at the repository root with the README's .venv and the demo in ./demo.
    root = demo.folder.parent
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    for name, content in saved.items():
        (root / name).write_text(content, encoding="utf-8")
    # Word for word, but with three times the reader's patience: CI machines can be slow.
    script = "set -euo pipefail\n" + re.sub(r"sleep (\d+)", lambda m: f"sleep {3 * int(m[1])}", "\n".join(steps[1:]))
    # An empty HOME: the demo's own known_hosts is all OpenSSH needs, and ~/.ssh is never written.
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "A-9-K7Q2M4XT-recensementCitoyen.zip" in out                                  # step 3: in the inbox
    assert ".AVL." in out                                                  # step 3: the ack came back
    assert '<Etat code="recu">Dossier reçu par le service traitant</Etat>' in out   # step 4
    assert "A-9-K7Q2M4XT-recensementCitoyen-retour-1-attestation.pdf" in out             # step 5
    assert '"code": "transition_invalid"' in out                          # step 6
    assert not (home / ".ssh").exists()

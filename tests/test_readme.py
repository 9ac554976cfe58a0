"""The README's two commands stay true: CI runs the test one, word for word."""

from __future__ import annotations

import re

from conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", text)


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = _commands()[:2]
    assert "relayd demo" in demo and demo.startswith("python3 -m venv .venv")
    assert "pytest" in tests and "'.[test]'" in tests


def test_ci_runs_the_readme_test_command():
    tests = _commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_the_status_file_example_is_valid():
    from relayd.pec.status import read_status_file

    text = (REPO / "README.md").read_text()
    (example,) = re.findall(r"```xml\n(.+?)\n\s*```", text, flags=re.S)
    document = "\n".join(line.strip() for line in example.splitlines()).encode()
    status = read_status_file(document, max_bytes=1 << 20)
    assert (status.numero, status.state) == ("A-9-X3UGO4V7", "clos")
    assert [a.file for a in status.attachments] == ["attestation.pdf"]

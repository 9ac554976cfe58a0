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
    assert tests == "./scripts/test"
    # The script makes the same virtualenv, with the test extras, and runs pytest.
    script = (REPO / "scripts" / "test").read_text()
    assert "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && exec .venv/bin/pytest" in script


def test_ci_runs_the_readme_test_command():
    tests = _commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_scripts_test_knows_every_package_the_suite_needs():
    script = (REPO / "scripts" / "test").read_text()
    readme = (REPO / "README.md").read_text()
    for package in ("openssh-client", "openssh-server", "unzip", "zip", "systemd", "default-jdk-headless", "libjsch-java",
                    "lftp", "curl", "putty-tools", "libarchive-tools", "prometheus", "postgresql", "haproxy"):
        assert f"={package}" in script, package
        assert package in readme, package


def test_scripts_test_names_what_is_missing_when_it_cannot_install(tmp_path):
    """Not root (or no apt-get): it says which Debian packages to install, then runs pytest anyway."""
    import shutil
    import subprocess

    # A PATH with bash but none of the test tools.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    # Someone who is not root, and a python3 that stops before the virtualenv is made.
    for name, body in (("id", "echo 1000"), ("python3", "exit 1")):
        (bin_dir / name).write_text(f"#!{shutil.which('sh')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    result = subprocess.run([str(bin_dir / "bash"), str(REPO / "scripts" / "test")], capture_output=True,
                            text=True, timeout=60, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, stdin=subprocess.DEVNULL)
    assert "scripts/test: missing Debian packages:" in result.stderr, result.stderr
    assert "openssh-client" in result.stderr and "prometheus" in result.stderr
    assert "sudo apt-get install" in result.stderr


def test_the_status_file_example_is_valid():
    from relayd.pec.status import read_status_file

    text = (REPO / "README.md").read_text()
    (example,) = re.findall(r"```xml\n(.+?)\n\s*```", text, flags=re.S)
    document = "\n".join(line.strip() for line in example.splitlines()).encode()
    status = read_status_file(document, max_bytes=1 << 20)
    assert (status.numero, status.state) == ("A-9-X3UGO4V7", "clos")
    assert [a.file for a in status.attachments] == ["attestation.pdf"]

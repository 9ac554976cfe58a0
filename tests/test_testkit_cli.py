"""``relayd testkit sample`` and ``relayd testkit push`` against a real relay process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import PASSWORD, REPO, free_port, write_key_pair
from relayd.cli import main as relayd_main
from relayd.rejections import Reason
from relayd.testkit.broken import BROKEN_KINDS
from relayd.testkit.push import PushResult, push_files
from test_broken_packages import SMALL_LIMITS

FILENAME_RE = re.compile(
    r"^RitaGS\.\d{4}-\d\d-\d\dT\d\d_\d\d_\d\d\.\d{9}\.(A-\d-[A-Z0-9]{8,9})-(ILE|recensementCitoyen)-2\.ADER\.ftp\.zip$"
)
SECRET_FREE_ENV = {k: v for k, v in os.environ.items() if k != "RELAYD_PUSH_PASSWORD"}


def relayd(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m relayd ARGS`` as a tester would."""
    return subprocess.run([sys.executable, "-m", "relayd", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env if env is not None else SECRET_FREE_ENV)


def push(relay, *paths: Path | str, auth: list[str] | None = None, hostkey: list[str] | None = None,
         env: dict[str, str] | None = None, port: int | None = None) -> subprocess.CompletedProcess:
    """``relayd testkit push`` to ``relay`` (by key, any host key unless ``hostkey`` says otherwise)."""
    return relayd("testkit", "push", "--host", "127.0.0.1", "--port", str(port or relay.port), "--user", "plateforme",
                  *(auth if auth is not None else ["--key", str(relay.key)]),
                  *(hostkey if hostkey is not None else ["--insecure-host-key"]),
                  *map(str, paths), env=env)


def sample(out: Path, *args: str) -> list[Path]:
    """``relayd testkit sample`` through the ``relayd`` entry point, in this process (quick); the files it wrote."""
    before = set(out.glob("*.zip"))
    assert relayd_main(["testkit", "sample", "--out", str(out), *args]) == 0
    return sorted(set(out.glob("*.zip")) - before)


def numero_and_demarche(path: Path) -> tuple[str, str]:
    match = FILENAME_RE.match(path.name)
    assert match, path.name
    return match.group(1), match.group(2)


def inbox_entries(folder: Path) -> list[Path]:
    """What the business software sees: every entry but the hidden temporary ones."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def result_lines(stdout: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"accepted": [], "duplicate": [], "refused": [], "error": []}
    for line in stdout.splitlines():
        status = line.split(" ", 1)[0]
        out[status].append(line)
    return out


# --------------------------------------------------------------------------- sample


def test_sample_is_deterministic_and_lands_in_the_chosen_commune(make_relay, tmp_path):
    first = sample(tmp_path / "a", "--demarche", "ILE", "--count", "5", "--insee", "75056", "--seed", "42")
    again = sample(tmp_path / "b", "--demarche", "ILE", "--count", "5", "--insee", "75056", "--seed", "42")
    other = sample(tmp_path / "c", "--demarche", "ILE", "--count", "5", "--insee", "75056", "--seed", "43")
    assert len(first) == 5
    assert [p.name for p in first] == [p.name for p in again]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert not {p.name for p in first} & {p.name for p in other}
    assert not {p.read_bytes() for p in first} & {p.read_bytes() for p in other}
    for path in first:
        assert numero_and_demarche(path)[1] == "ILE"
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None and "message.xml" in zf.namelist()

    relay = make_relay()
    result = push(relay, tmp_path / "a")
    assert result.returncode == 0, result.stdout + result.stderr
    # 75056 delivers extracted folders named <numero>-<demarche>.
    expected = {"-".join(numero_and_demarche(p)) for p in first}
    assert {p.name for p in inbox_entries(relay.inbox("75056"))} == expected
    assert all(p.is_dir() for p in inbox_entries(relay.inbox("75056")))
    assert inbox_entries(relay.inbox("90017")) == []


def test_sample_subprocess_prints_what_it_wrote(tmp_path):
    result = relayd("testkit", "sample", "--demarche", "recensementCitoyen", "--count", "2", "--seed", "7", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    printed = [Path(line) for line in result.stdout.splitlines()]
    assert sorted(printed) == sorted(tmp_path.glob("*.zip")) and len(printed) == 2
    assert "seed 7" in result.stderr


def test_list_broken_lists_every_kind_with_its_code():
    table = relayd("testkit", "sample", "--list-broken")
    assert table.returncode == 0, table.stderr
    for kind in BROKEN_KINDS.values():
        [line] = [line for line in table.stdout.splitlines() if line.split()[0] == kind.name]
        assert line.split()[1] == kind.reason.value
        assert kind.description in line
    as_json = relayd("testkit", "sample", "--list-broken", "--json")
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert {k["kind"]: k["code"] for k in listed} == {k.name: k.reason.value for k in BROKEN_KINDS.values()}
    assert all(Reason(k["code"]) and k["description"] for k in listed)


def test_unknown_broken_kind_exits_2_with_the_known_kinds(tmp_path):
    result = relayd("testkit", "sample", "--broken", "no-such-kind", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no-such-kind" in result.stderr
    assert all(name in result.stderr for name in BROKEN_KINDS)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- push: acceptance


@pytest.mark.timeout(180)
def test_acceptance_200_packages_with_4_connections(demo, tmp_path):
    out = tmp_path / "packages"
    seed = 100
    for demarche in ("ILE", "recensementCitoyen"):
        for insee in ("90017", "75056"):
            seed += 1
            sample(out, "--demarche", demarche, "--insee", insee, "--count", "50", "--seed", str(seed))
    files = sorted(out.glob("*.zip"))
    assert len(files) == 200
    sftp = demo.info["sftp"]  # a demo relay, as a tester would start one

    result = relayd("testkit", "push", "--host", "127.0.0.1", "--port", str(sftp["port"]), "--user", sftp["username"],
                    "--key", sftp["private_key"], "--insecure-host-key", "--concurrency", "4", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result_lines(result.stdout)
    assert len(lines["accepted"]) == 200 and not lines["refused"] and not lines["error"]
    assert {line.split()[1] for line in lines["accepted"]} == {p.name for p in files}
    assert "--insecure-host-key" in result.stderr  # said so

    # Each commune got exactly its own dossiers: 90017 as zips (the very bytes), 75056 as folders.
    by_insee: dict[str, set[str]] = {"90017": set(), "75056": set()}
    for path in files:
        with zipfile.ZipFile(path) as zf:
            insee = re.search(rb"<Valeur>(\d+)</Valeur>", zf.read("message.xml")).group(1).decode()
        by_insee[insee].add("-".join(numero_and_demarche(path)))
    assert len(by_insee["90017"]) == len(by_insee["75056"]) == 100
    zips = inbox_entries(Path(demo.info["communes"]["90017"]["inbox"]))
    assert {p.name for p in zips} == {f"{base}.zip" for base in by_insee["90017"]}
    folders = inbox_entries(Path(demo.info["communes"]["75056"]["inbox"]))
    assert {p.name for p in folders} == by_insee["75056"] and all(p.is_dir() for p in folders)
    local = {"-".join(numero_and_demarche(p)): p for p in files}
    assert all(z.read_bytes() == local[z.name.removesuffix(".zip")].read_bytes() for z in zips)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("style", ["rename", "direct"])
def test_acceptance_every_broken_kind_is_refused_with_its_code(make_relay, tmp_path, style):
    out = tmp_path / "broken"
    for i, kind in enumerate(sorted(BROKEN_KINDS)):
        assert sample(out, "--broken", kind, "--seed", str(i))
    files = sorted(out.glob("*.zip"))
    assert len(files) == len(BROKEN_KINDS)
    relay = make_relay(limits=SMALL_LIMITS)

    result = relayd("testkit", "push", "--host", "127.0.0.1", "--port", str(relay.port), "--user", "plateforme",
                    "--key", str(relay.key), "--insecure-host-key", "--style", style, "--concurrency", "2", "--json",
                    str(out))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert len(report) == len(BROKEN_KINDS)
    for entry in report:
        kind = re.match(r"broken-(.+?)-RitaGS\.", Path(entry["file"]).name).group(1)
        expected = BROKEN_KINDS[kind].reason.value
        assert entry["status"] == "refused", (kind, entry)
        assert entry["code"] == expected, (kind, entry)
        assert entry["message"].startswith(f"refused ({expected}): "), (kind, entry)
        assert entry["bytes"] > 0
    # The relay agrees: every one is quarantined with that code, nothing reached an inbox.
    assert sorted(q["code"] for q in relay.quarantined()) == sorted(k.reason.value for k in BROKEN_KINDS.values())
    assert inbox_entries(relay.inbox("90017")) == []


# --------------------------------------------------------------------------- push: styles, logins, failures


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_both_styles_accept_and_refuse_with_the_servers_sentence(make_relay, tmp_path, style):
    good = sample(tmp_path / "good", "--count", "2", "--seed", "1")
    [bad] = sample(tmp_path / "bad", "--broken", "xxe", "--seed", "2")
    relay = make_relay()
    result = relayd("testkit", "push", "--host", "127.0.0.1", "--port", str(relay.port), "--user", "plateforme",
                    "--key", str(relay.key), "--insecure-host-key", "--style", style, *map(str, good), str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result_lines(result.stdout)
    assert [line.split()[1] for line in lines["accepted"]] == [p.name for p in good]
    assert lines["refused"] == [f"refused   {bad.name}  refused (xml_forbidden): {Reason.XML_FORBIDDEN.summary}"]
    assert {p.name for p in inbox_entries(relay.inbox("90017"))} == {"-".join(numero_and_demarche(p)) + ".zip" for p in good}
    # Nothing left behind in the drop folder under a temporary or final name.
    assert not [p for p in relay.drop().iterdir() if not p.name.startswith(".")]


def test_password_login_from_a_file_or_the_environment(make_relay, tmp_path):
    [first] = sample(tmp_path / "one", "--seed", "11")
    [second] = sample(tmp_path / "two", "--seed", "12")
    relay = make_relay()
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    by_file = push(relay, first, auth=["--password-file", str(password_file)])
    assert by_file.returncode == 0, by_file.stdout + by_file.stderr
    by_env = push(relay, second, auth=[], env={**SECRET_FREE_ENV, "RELAYD_PUSH_PASSWORD": PASSWORD})
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    assert len(inbox_entries(relay.inbox("90017"))) == 2

    password_file.write_text("not the password\n")
    wrong = push(relay, first, auth=["--password-file", str(password_file)])
    assert wrong.returncode == 2
    assert "authentication failed" in wrong.stderr
    for output in (by_file, by_env, wrong):
        assert PASSWORD not in output.stdout + output.stderr
        assert "not the password" not in output.stdout + output.stderr

    no_credential = push(relay, first, auth=[])
    assert no_credential.returncode == 2 and "RELAYD_PUSH_PASSWORD" in no_credential.stderr


def test_closed_port_exits_2_with_a_readable_error(tmp_path):
    [package] = sample(tmp_path / "p", "--seed", "3")
    port = free_port()  # nothing listens there
    result = relayd("testkit", "push", "--host", "127.0.0.1", "--port", str(port), "--user", "plateforme",
                    "--key", str(write_key_pair(tmp_path, "k")), "--insecure-host-key", str(package))
    assert result.returncode == 2
    assert f"cannot connect to 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.startswith(f"error     {package.name}  cannot connect")


def test_host_key_is_checked_unless_told_otherwise(make_relay, tmp_path):
    [package] = sample(tmp_path / "p", "--seed", "4")
    relay = make_relay()
    host_pub = (relay.root / "host_keys" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    other_pub = write_key_pair(tmp_path, "other").with_name("other.pub").read_text().split()[:2]
    entry = f"[127.0.0.1]:{relay.port}"

    # Default: ~/.ssh/known_hosts, where this host is unknown.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    unknown = push(relay, package, hostkey=[], env={**SECRET_FREE_ENV, "HOME": str(home)})
    assert unknown.returncode == 2
    assert "not known" in unknown.stderr and "--insecure-host-key" in unknown.stderr

    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"{entry} {' '.join(other_pub)}\n")
    mismatch = push(relay, package, hostkey=["--known-hosts", str(wrong)])
    assert mismatch.returncode == 2 and "HOST KEY MISMATCH" in mismatch.stderr
    assert inbox_entries(relay.inbox("90017")) == []

    (home / ".ssh" / "known_hosts").write_text(f"{entry} {' '.join(host_pub)}\n")
    known = push(relay, package, hostkey=[], env={**SECRET_FREE_ENV, "HOME": str(home)})
    assert known.returncode == 0, known.stdout + known.stderr
    assert "insecure" not in known.stderr.lower()
    assert len(inbox_entries(relay.inbox("90017"))) == 1


def test_usage_errors_exit_2(tmp_path, make_relay):
    relay = make_relay(start=False)
    missing = push(relay, tmp_path / "nowhere.zip")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    [one] = sample(tmp_path / "a", "--seed", "5")
    (tmp_path / "b" / one.name).write_bytes(one.read_bytes())
    twice = push(relay, tmp_path / "a", tmp_path / "b")
    assert twice.returncode == 2 and "same name" in twice.stderr
    help_text = relayd("testkit", "push", "--help")
    assert help_text.returncode == 0
    assert all(f"  {code}  " in help_text.stdout for code in "012")


# --------------------------------------------------------------------------- Python API


def test_python_api_reports_each_file_and_progress(make_relay, tmp_path):
    good = sample(tmp_path / "in", "--count", "3", "--seed", "8")
    [bad] = sample(tmp_path / "in", "--broken", "foreign-insee", "--seed", "9")
    relay = make_relay()
    seen: list[tuple[int, int, int, int]] = []
    results = push_files([tmp_path / "in"], host="127.0.0.1", port=relay.port, username="plateforme",
                         key_path=relay.key, style="direct", concurrency=2, insecure_host_key=True,
                         progress=lambda *counts: seen.append(counts))
    assert all(isinstance(r, PushResult) for r in results)
    by_name = {Path(r.file).name: r for r in results}
    assert [by_name[p.name].status for p in good] == ["accepted"] * 3
    assert all(by_name[p.name].bytes == p.stat().st_size and by_name[p.name].code is None for p in good)
    refused = by_name[bad.name]
    assert (refused.status, refused.code) == ("refused", Reason.INSEE_UNKNOWN.value)
    assert refused.message == f"refused (insee_unknown): {Reason.INSEE_UNKNOWN.summary}"
    total_bytes = sum(p.stat().st_size for p in [*good, bad])
    assert seen[-1] == (4, 4, total_bytes, total_bytes)
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)

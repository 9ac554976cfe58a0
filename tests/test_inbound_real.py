"""The real PEC package, pushed by two independent SSH stacks, lands in the inbox intact."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from conftest import REAL_MOTDEPASSE, REAL_PACKAGE, paramiko_put, sftp_put

NUMERO = "A-9-X3UGO4V7"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(package: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(package) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _retarget(tmp_path: Path, insee: str) -> Path:
    """The real package with only its INSEE code changed, to route it to another commune."""
    out = tmp_path / f"real-{insee}.zip"
    with zipfile.ZipFile(REAL_PACKAGE) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "message.xml" or "-ent-" in info.filename:
                data = data.replace(b"<Valeur>90017</Valeur>", f"<Valeur>{insee}</Valeur>".encode())
            dst.writestr(info, data)
    return out


def _assert_zip_delivery(relay, package: Path) -> None:
    delivered = relay.inbox("90017") / f"{NUMERO}-DAUA.zip"
    assert delivered.read_bytes() == package.read_bytes()
    assert delivered.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in relay.inbox("90017").iterdir()] == [delivered.name]


def _assert_extracted_delivery(relay, insee: str, package: Path) -> None:
    folder = relay.inbox(insee) / f"{NUMERO}-DAUA"
    assert [p.name for p in relay.inbox(insee).iterdir()] == [folder.name]
    members = _members(package)
    for name, data in members.items():
        if name.endswith(".zip"):
            continue
        assert (folder / name).read_bytes() == data, name
        assert (folder / name).stat().st_mode & 0o777 == 0o640
    nested_name = next(n for n in members if "-pj-" in n)
    with zipfile.ZipFile(io.BytesIO(members[nested_name])) as nested:
        for name in nested.namelist():
            assert (folder / Path(nested_name).stem / name).read_bytes() == nested.read(name)
    summary = json.loads((folder / "relayd.json").read_text())
    assert summary["numero"] == NUMERO
    assert summary["demarche"] == "DAUA"
    assert summary["insee"] == insee
    assert summary["email"] == "asoasogm@gmail.com"
    assert summary["deposited_at"].startswith("2019-04-03T16:26:20")
    for entry in summary["files"]:
        assert _sha((folder / entry["path"]).read_bytes()) == entry["sha256"]
    assert len(summary["files"]) == len(members) - 1 + 2  # the nested zip became its two files
    assert REAL_MOTDEPASSE not in json.dumps(summary)


def _assert_ledger(relay, package: Path, insee: str) -> None:
    rows = relay.ledger_rows("SELECT * FROM packages WHERE outcome = 'accepted'")
    assert len(rows) == 1
    row = rows[0]
    assert row["numero"] == NUMERO
    assert row["demarche"] == "DAUA"
    assert row["insee"] == insee
    assert row["message_id"] == "A-9-X3UGO4V7 5808773 Principal 2019-04-03T16:26:40"
    assert row["sha256"] == _sha(package.read_bytes())
    assert row["account"] == "plateforme"
    dossier = relay.ledger_rows("SELECT * FROM dossiers WHERE numero = ?", (NUMERO,))
    assert dossier and dossier[0]["state"] == "transmis"


def _no_secret_logged(relay) -> None:
    assert REAL_MOTDEPASSE not in relay.log_text()


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_openssh_sftp_zip_delivery(relay, style):
    result = sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, style=style)
    assert result.returncode == 0, result.stderr
    _assert_zip_delivery(relay, REAL_PACKAGE)
    _assert_ledger(relay, REAL_PACKAGE, "90017")
    assert not any(relay.drop().iterdir())
    _no_secret_logged(relay)


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_openssh_sftp_extracted_delivery(relay, tmp_path, style):
    package = _retarget(tmp_path, "75056")
    result = sftp_put(relay, package, package.name, style=style)
    assert result.returncode == 0, result.stderr
    _assert_extracted_delivery(relay, "75056", package)
    _assert_ledger(relay, package, "75056")
    _no_secret_logged(relay)


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_paramiko_zip_delivery(relay, style):
    paramiko_put(relay, REAL_PACKAGE, REAL_PACKAGE.name, style=style)
    _assert_zip_delivery(relay, REAL_PACKAGE)
    _assert_ledger(relay, REAL_PACKAGE, "90017")
    _no_secret_logged(relay)


@pytest.mark.parametrize("style", ["direct", "rename"])
def test_paramiko_password_extracted_delivery(relay, tmp_path, style):
    from conftest import PASSWORD

    package = _retarget(tmp_path, "75056")
    paramiko_put(relay, package, package.name, style=style, password=PASSWORD)
    _assert_extracted_delivery(relay, "75056", package)
    _assert_ledger(relay, package, "75056")
    _no_secret_logged(relay)
    assert PASSWORD not in relay.log_text()


def test_resend_gives_one_inbox_entry(relay, tmp_path):
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    # The platform resends (Rejeu) under another name, in the other style, with the other client.
    paramiko_put(relay, REAL_PACKAGE, "resend.zip", style="rename")
    _assert_zip_delivery(relay, REAL_PACKAGE)
    outcomes = [r["outcome"] for r in relay.ledger_rows("SELECT outcome FROM packages ORDER BY id")]
    assert outcomes == ["accepted", "duplicate"]
    assert len(list((relay.root / "var" / "archive").rglob("*.zip"))) == 1


def test_archive_keeps_a_copy(relay):
    assert sftp_put(relay, REAL_PACKAGE, REAL_PACKAGE.name).returncode == 0
    archived = list((relay.root / "var" / "archive").rglob("*.zip"))
    assert len(archived) == 1
    assert archived[0].read_bytes() == REAL_PACKAGE.read_bytes()
    # The business software may delete its copy; the archive stays.
    (relay.inbox("90017") / f"{NUMERO}-DAUA.zip").unlink()
    assert archived[0].exists()


def test_parallel_uploads_all_land(relay, tmp_path):
    """Four clients pushing at once each get their dossier into the right inbox, whole."""
    from concurrent.futures import ThreadPoolExecutor

    from relayd.testkit.samples import SampleSpec, build_package

    specs = [SampleSpec(numero=f"A-4-PARALL{i:03d}", demarche="recensementCitoyen" if i % 2 else "ILE",
                        insee="90017" if i < 4 else "75056") for i in range(8)]
    files = []
    for spec in specs:
        path = tmp_path / f"{spec.numero}.zip"
        path.write_bytes(build_package(spec))
        files.append(path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda p: paramiko_put(relay, p, p.name, style="rename"), files))
    for spec, path in zip(specs, files, strict=True):
        if spec.insee == "90017":
            assert (relay.inbox("90017") / f"{spec.numero}-{spec.demarche}.zip").read_bytes() == path.read_bytes()
        else:
            assert (relay.inbox("75056") / f"{spec.numero}-{spec.demarche}" / "relayd.json").exists()
    assert len(relay.ledger_rows("SELECT * FROM dossiers WHERE state = 'transmis'")) == 8

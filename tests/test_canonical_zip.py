"""One canonical zip: what relayd accepts, every reader sees the same way; what it refuses, it says why.

The second reader is ``bsdtar`` fed through a pipe, so that it cannot seek to the central
directory and streams the local headers one after the other, as Java's ``ZipInputStream``
does. For an accepted package it must list exactly the members that relayd checked (names
and digests from ``relayd.json``), nested attachments zip included.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REAL_PACKAGE, paramiko_put, require_program
from relayd.pec.package import inspect_package
from relayd.pec.zipcheck import PackageLimits
from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.samples import SampleSpec, build_package, package_filename

#: kinds whose fault is in the zip's structure or names (the envelope may be readable or not)
CANONICAL_KINDS = [
    "prepended-package", "leading-junk", "trailing-data", "comment-end-record", "zip64-member",
    "overlapping-members", "hidden-gap", "central-offset-lie", "local-name-mismatch", "local-crc-mismatch",
    "deflate-slack", "unicode-path-extra", "unicode-comment-extra", "case-collision", "unicode-collision",
    "control-char-name", "backslash-name", "undeclared-name-encoding", "summary-name-member", "file-and-folder",
    "file-marked-folder", "member-in-pj-folder", "stored-data-descriptor", "descriptor-mismatch",
    "pj-nested-zip", "pj-disguised-zip", "pj-file-and-folder", "pj-dot-member", "pj-trailing-data",
    "pj-unicode-path-extra", "mode-extra-xl", "mode-extra-asi", "short-timestamp-extra", "reserved-flag",
    "setuid-member", "pj-version-collision", "pj-device-name",
]
#: kinds refused after the envelope was read, so the platform gets a negative ack
ADDRESSABLE_KINDS = [
    "case-collision", "unicode-collision", "summary-name-member", "file-and-folder", "member-in-pj-folder",
    "pj-nested-zip",
    "pj-disguised-zip", "pj-file-and-folder", "pj-dot-member", "pj-trailing-data", "pj-unicode-path-extra",
    "pj-version-collision", "pj-device-name",
]


def streaming_list(data: bytes) -> list[str]:
    """The member names a streaming reader sees, in order (folders left out)."""
    bsdtar = require_program("bsdtar")
    result = subprocess.run([bsdtar, "-tf", "-"], input=data, capture_output=True, timeout=60)
    return [n for n in result.stdout.decode("utf-8", "replace").splitlines() if not n.endswith("/")]


def streaming_read(data: bytes, name: str) -> bytes:
    """One member's bytes as a streaming reader extracts them."""
    bsdtar = require_program("bsdtar")
    result = subprocess.run([bsdtar, "-xOf", "-", name], input=data, capture_output=True, timeout=60, check=True)
    return result.stdout


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec(i: int, **kw) -> SampleSpec:
    return SampleSpec(numero=f"A-1-CANON{i:03d}", demarche="recensementCitoyen", insee="75056", **kw)


def test_accepted_packages_read_the_same_by_a_streaming_reader(make_relay, tmp_path):
    relay = make_relay()
    specs = [_spec(1, scans=3), replace(_spec(2, scans=1), demarche="DAUA"), replace(_spec(3), demarche="ILE")]
    for spec in specs:
        local = tmp_path / package_filename(spec)
        local.write_bytes(build_package(spec))
        paramiko_put(relay, local, local.name)
    for spec in specs:
        folder = relay.inbox("75056") / f"{spec.numero}-{spec.demarche}"
        checked = {f["path"]: f["sha256"] for f in json.loads((folder / "relayd.json").read_text())["files"]}
        [row] = relay.ledger_rows("SELECT archive_path FROM dossiers WHERE numero = ?", (spec.numero,))
        package = Path(row["archive_path"]).read_bytes()
        listed = streaming_list(package)
        nested = [n for n in listed if "-pj-" in n and n.endswith(".zip")]
        assert sorted(set(listed) - set(nested)) == sorted(p for p in checked if "/" not in p)
        for name in set(listed) - set(nested):
            assert _sha(streaming_read(package, name)) == checked[name], name
        for zip_name in nested:
            inner = streaming_read(package, zip_name)
            stem = zip_name.removesuffix(".zip")
            assert sorted(f"{stem}/{n}" for n in streaming_list(inner)) == sorted(
                p for p in checked if p.startswith(f"{stem}/"))
            for name in streaming_list(inner):
                assert _sha(streaming_read(inner, name)) == checked[f"{stem}/{name}"]
        assert spec.scans == 0 or nested


def test_the_real_package_is_canonical_and_both_readers_agree(tmp_path):
    # The platform's own zip (Java, data descriptors, sizes only after the data) must still pass.
    package = inspect_package(REAL_PACKAGE, PackageLimits())
    data = REAL_PACKAGE.read_bytes()
    assert streaming_list(data) == [m.name for m in package.members]
    for member in package.members:
        assert _sha(streaming_read(data, member.name)) == member.sha256
    [(zip_name, inner)] = package.nested.items()
    assert streaming_list(streaming_read(data, zip_name)) == [m.name for m in inner]


def test_a_streamed_zip_with_data_descriptors_is_accepted(tmp_path):
    # Sizes after the data, as streaming writers (the platform's Java, zipfile on a pipe) make them.
    from relayd.testkit.broken import build_streamed

    path = tmp_path / "streamed.zip"
    path.write_bytes(build_streamed(_spec(4, scans=2)))
    package = inspect_package(path, PackageLimits())
    assert streaming_list(path.read_bytes()) == [m.name for m in package.members]


@pytest.mark.parametrize("kind", ["prepended-package", "hidden-gap", "unicode-path-extra", "comment-end-record"])
def test_the_refused_layouts_do_fool_one_reader_or_the_other(kind):
    # Why they are refused: the central directory and the local headers tell two stories.
    data = build_broken(kind, _spec(0))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            central = [i.filename for i in zf.infolist() if not i.is_dir()]
    except zipfile.BadZipFile:
        central = []
    assert streaming_list(data) != central


@pytest.mark.parametrize("kind, shown", [("mode-extra-xl", "-> /etc/passwd"), ("setuid-member", "-rwsrws")])
def test_a_mode_relayd_refuses_is_what_libarchive_would_extract(kind, shown, tmp_path):
    # Why they are refused: zipfile sees a plain file, bsdtar a link to /etc/passwd or a setuid file.
    data = build_broken(kind, _spec(0))
    (tmp_path / "p.zip").write_bytes(data)
    listing = subprocess.run([require_program("bsdtar"), "-tvf", str(tmp_path / "p.zip")], capture_output=True,
                             text=True, timeout=60).stdout
    recap = next(line for line in listing.splitlines() if "recapPDF" in line)
    assert shown in recap
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert not any(stat.S_ISLNK(i.external_attr >> 16) for i in zf.infolist())


def test_a_file_marked_as_folder_is_a_folder_for_libarchive(tmp_path):
    data = build_broken("file-marked-folder", _spec(0))
    (tmp_path / "p.zip").write_bytes(data)
    seekable = subprocess.run([require_program("bsdtar"), "-tf", str(tmp_path / "p.zip")], capture_output=True,
                              text=True, timeout=60).stdout.splitlines()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(n + "/" if "recapPDF" in n else n for n in zf.namelist()) == sorted(seekable)


def test_every_canonical_kind_is_refused_with_its_code(make_relay, tmp_path):
    relay = make_relay(limits={"max_package_bytes": 2 * 1024 * 1024})
    for i, kind in enumerate(CANONICAL_KINDS):
        local = tmp_path / f"{kind}.zip"
        spec = SampleSpec(numero=f"A-1-KIND{i:04d}", demarche="recensementCitoyen", insee="90017")
        local.write_bytes(build_broken(kind, spec))
        with pytest.raises(OSError) as refused:
            paramiko_put(relay, local, f"{kind}.zip")
        assert BROKEN_KINDS[kind].reason.value in str(refused.value), kind
    quarantined = {q["upload_name"]: q for q in relay.quarantined()}
    for kind in CANONICAL_KINDS:
        entry = quarantined[f"{kind}.zip"]
        assert entry["code"] == BROKEN_KINDS[kind].reason.value, (kind, entry)
        if BROKEN_KINDS[kind].cause is not None:
            assert entry["cause"] == BROKEN_KINDS[kind].cause.value, (kind, entry)
        assert entry["_file"].read_bytes() == (tmp_path / f"{kind}.zip").read_bytes()
    assert not any(relay.inbox("90017").iterdir())
    # Those refused after the envelope was read are answered with a negative ack.
    anl = {row["numero"] for row in relay.outbox() if row["kind"] == "ANL"}
    for i, kind in enumerate(CANONICAL_KINDS):
        if kind in ADDRESSABLE_KINDS:
            assert f"A-1-KIND{i:04d}" in anl, kind


@pytest.mark.parametrize("insee", ["75056", "90017"])  # extracted delivery, zip delivery
def test_names_that_collide_once_extracted_are_refused_whatever_the_delivery(make_relay, tmp_path, insee):
    relay = make_relay()
    kinds = ["summary-name-member", "file-and-folder", "pj-file-and-folder", "pj-dot-member", "case-collision"]
    for i, kind in enumerate(kinds):
        spec = SampleSpec(numero=f"A-1-COLL{i:04d}", demarche="recensementCitoyen", insee=insee)
        local = tmp_path / f"{kind}.zip"
        local.write_bytes(build_broken(kind, spec))
        with pytest.raises(OSError, match=BROKEN_KINDS[kind].reason.value):
            paramiko_put(relay, local, f"{kind}.zip")
    assert sorted(q["code"] for q in relay.quarantined()) == sorted(BROKEN_KINDS[k].reason.value for k in kinds)
    # Nothing stranded in staging waiting for a restart, nothing half-extracted in the inbox.
    staging = relay.root / "var" / "staging"
    assert not staging.exists() or not [p for p in staging.rglob("*") if p.is_file()]
    assert not relay.inbox(insee).exists() or not any(relay.inbox(insee).iterdir())
    anl = sorted(row["numero"] for row in relay.outbox() if row["kind"] == "ANL")
    assert anl == [f"A-1-COLL{i:04d}" for i in range(len(kinds))]
    # The relay still serves.
    spec = SampleSpec(numero="A-1-COLLGOOD", demarche="recensementCitoyen", insee=insee, scans=2)
    good = tmp_path / "good.zip"
    good.write_bytes(build_package(spec))
    paramiko_put(relay, good, package_filename(spec))
    assert any(relay.inbox(insee).iterdir())


def test_a_package_zipped_by_info_zip_keeps_its_extra_fields_and_is_accepted(tmp_path):
    # Info-ZIP's zip writes timestamps (0x5455) and the owner (0x7875) on every member: fields that say
    # nothing of a name, a type or a mode, and that the allow-list must keep accepting.
    from relayd.testkit.samples import build_members

    spec = _spec(20)
    folder = tmp_path / "members"
    folder.mkdir()
    for name, data in build_members(spec).items():
        (folder / name).write_bytes(data)
    path = tmp_path / "infozip.zip"
    subprocess.run([require_program("zip"), "-q", "-X-", str(path), *sorted(build_members(spec))], cwd=folder,
                   check=True, timeout=60)
    with zipfile.ZipFile(path) as zf:
        assert all(b"UT" in i.extra and b"ux" in i.extra for i in zf.infolist())
    package = inspect_package(path, PackageLimits())
    assert streaming_list(path.read_bytes()) == [m.name for m in package.members]


@pytest.mark.parametrize("names, reason", [
    (["ı.pdf", "I.pdf"], "zip_name_collision"),  # Windows upper-cases the dotless i to I
    (["a.pdf;1", "a.pdf"], "zip_name_collision"),  # unzip strips a VMS version
    (["a\u2028b.pdf"], "zip_name_invalid"),  # a line separator: a line break in a log
    (["a.pdf "], "zip_name_invalid"),  # Windows drops the trailing space
    (["CONIN$.pdf"], "zip_name_invalid"),
    (["LPT²"], "zip_name_invalid"),
])
def test_names_that_another_reader_or_windows_changes_are_refused(names, reason):
    from relayd.pec.zipcheck import check_extraction_names, check_member_name
    from relayd.rejections import Rejection

    with pytest.raises(Rejection) as refused:
        for name in names:
            check_member_name(name)
        check_extraction_names(names)
    assert refused.value.reason.value == reason


def test_deflate_level_bits_stay_accepted(tmp_path):
    # Bits 1 and 2 only say how hard the deflater worked (zip -9 sets them): no reader reads the data differently.
    from relayd.testkit.broken import _patch_headers, _victim

    spec = _spec(21)
    path = tmp_path / "level.zip"
    path.write_bytes(_patch_headers(build_package(spec), _victim(spec), flag_or=0x2))
    assert inspect_package(path, PackageLimits()).numero == spec.numero

"""Return drops in-process: every way a drop can be wrong gets its code, and nothing is queued for it.

The wire is in ``test_return_path.py``; here each drop goes through :class:`ReturnDrops` on a
real ledger and real folders, so the whole list of refusals runs in a second.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml

from relayd.config import load_config
from relayd.inbound.passwords import hash_password
from relayd.ledger import Ledger, PackageRecord
from relayd.outbound.outbox import Outbox
from relayd.outbound.returns import ReturnDrops
from relayd.pec.package import inspect_package
from relayd.pec.replies import build_retour
from relayd.pec.status import StatusAttachment, StatusFile, write_status_file
from relayd.pec.zipcheck import PackageLimits
from relayd.testkit.samples import SampleSpec, build_package, pdf_bytes, png_bytes

NUMERO = "A-1-DROPTEST"
OTHER_COMMUNE_NUMERO = "A-1-DROPPARIS"


@pytest.fixture
def drops(tmp_path: Path):
    config_path = tmp_path / "relayd.yaml"
    config_path.write_text(yaml.safe_dump({
        "storage": {"root": "var"},
        "accounts": [{"username": "p", "password_hash": hash_password("x"), "communes": ["90017", "75056"]}],
        "communes": [
            {"insee": "90017", "name": "A", "inbox": "inbox/a", "demarches": ["RCO"], "returns": "ret/a"},
            {"insee": "75056", "name": "B", "inbox": "inbox/b", "demarches": ["RCO"], "returns": "ret/b"},
        ],
    }))
    config = load_config(config_path)
    ledger = Ledger(config.storage.ledger)
    for numero, insee in ((NUMERO, "90017"), (OTHER_COMMUNE_NUMERO, "75056")):
        package = tmp_path / f"{numero}.zip"
        package.write_bytes(build_package(SampleSpec(numero=numero, insee=insee)))
        message = inspect_package(package, PackageLimits()).message
        ledger.record_accepted(
            PackageRecord(sha256=numero, size=1, message_id=message.message_id, numero=numero, demarche="RCO", insee=insee),
            deposited_at=None, inbox_path="-", archive_path="-", routing=message.header.routing.to_xml(encoding="unicode"),
        )
    for commune in config.communes:
        commune.returns.mkdir(parents=True)
    yield ReturnDrops(config, ledger, Outbox.from_config(ledger, config)), config
    ledger.close()


def status(state: str = "recu", *, numero: str = NUMERO, files: tuple[str, ...] = ()) -> bytes:
    return write_status_file(StatusFile(numero=numero, state=state,
                                        attachments=[StatusAttachment(file=f) for f in files]))


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


PDF = pdf_bytes(["attestation"])
_CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
#: JavaScript run when the document opens, its name spelt with a #xx escape as an evasion
JS_PDF = PDF.replace(_CATALOG, b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /J#61vaScript /JS (app.alert(1)) >> >>")
LAUNCH_PDF = PDF.replace(_CATALOG, b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /Launch /F (cmd.exe) >> >>")
#: JavaScript on a page's open action: only walking the objects finds it
PAGE_JS_PDF = PDF.replace(b"/Contents 4 0 R >>", b"/Contents 4 0 R /AA << /O << /S /Foo /JS (app.alert(1)) >> >> >>")
HTML_PDF = b"%PDF-1.7\n<html><body><script>document.location='https://evil.example/'</script></body></html>\n"

CASES = {
    "attachment missing beside": ({"s.xml": status(files=("absent.pdf",))}, "attachment_missing"),
    "attachment missing in zip": ({"s.zip": zipped({"s.xml": status(files=("absent.pdf",))})}, "attachment_missing"),
    "two status files in a zip": ({"s.zip": zipped({"a.xml": status(), "b.xml": status()})}, "status_invalid"),
    "unlisted member in a zip": ({"s.zip": zipped({"s.xml": status(), "extra.pdf": PDF})}, "status_invalid"),
    "a zip that is not one": ({"s.zip": b"PK\x03\x04 not really"}, "zip_invalid"),
    "a status file naming a path": ({"s.xml": status(files=("a.pdf",)).replace(b"a.pdf", b"../a.pdf")}, "status_invalid"),
    "a zip climbing out": ({"s.zip": zipped({"s.xml": status(), "../a.pdf": PDF})}, "zip_path_traversal"),
    "PDF name, PNG content": ({"a.pdf": png_bytes(), "s.xml": status(files=("a.pdf",))}, "attachment_type"),
    "a type not accepted": ({"a.docx": b"PK..", "s.xml": status(files=("a.docx",))}, "attachment_type"),
    "too many attachments": ({**{f"{i}.pdf": PDF for i in range(11)},
                              "s.xml": status(files=tuple(f"{i}.pdf" for i in range(11)))}, "too_many_attachments"),
    "another commune's dossier": ({"s.xml": status(numero=OTHER_COMMUNE_NUMERO)}, "return_wrong_commune"),
    "a DOCTYPE": ({"s.xml": b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "x">]><Statut/>'}, "xml_forbidden"),
    "an unknown element": ({"s.xml": status().replace(b"</Statut>", b"<Urgent>oui</Urgent></Statut>")}, "status_invalid"),
    "a bad dossier number": ({"s.xml": status().replace(NUMERO.encode(), b"B-12-xyz")}, "dossier_number_invalid"),
    "an ack dropped as a return": (None, "return_package_invalid"),
    "HTML behind a PDF header": ({"a.pdf": HTML_PDF, "s.xml": status(files=("a.pdf",))}, "attachment_type"),
    "a PDF with JavaScript": ({"a.pdf": JS_PDF, "s.xml": status(files=("a.pdf",))}, "attachment_active_content"),
    "a PDF with a launch action": ({"a.pdf": LAUNCH_PDF, "s.xml": status(files=("a.pdf",))}, "attachment_active_content"),
    "a PDF with JavaScript on a page": ({"a.pdf": PAGE_JS_PDF, "s.xml": status(files=("a.pdf",))},
                                        "attachment_active_content"),
    "a PDF with JavaScript in a zip": ({"s.zip": zipped({"s.xml": status(files=("a.pdf",)), "a.pdf": JS_PDF})},
                                       "attachment_active_content"),
    "a PDF that does not open": ({"a.pdf": b"%PDF-1.4\n" + bytes(500), "s.xml": status(files=("a.pdf",))},
                                 "attachment_unreadable"),
    "a broken PNG": ({"a.png": png_bytes()[:-20], "s.xml": status(files=("a.png",))}, "attachment_unreadable"),
    "HTML after a PNG": ({"a.png": png_bytes() + b"<html><script>x</script></html>", "s.xml": status(files=("a.png",))},
                         "attachment_type"),
    "a zip with names differing by case": ({"s.zip": zipped({"s.xml": status(files=("a.pdf",)), "a.pdf": PDF,
                                                             "A.pdf": PDF})}, "zip_name_collision"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_drop_is_set_aside_with_its_code(drops, case):
    returns_drops, config = drops
    files, code = CASES[case]
    folder = config.communes[0].returns
    if files is None:  # a complete PEC package, but an AVL rather than a Retour
        from relayd.pec.replies import build_ack

        routing = returns_drops.routing_of(returns_drops.ledger.dossier(NUMERO))
        files = {"ack.zip": build_ack(routing, kind="AVL", numero=NUMERO, demarche="RCO").data}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    drop = folder / next(n for n in files if n.endswith((".xml", ".zip")))
    outcome = returns_drops.process(drop, config.communes[0])
    assert outcome.status == "rejected"
    assert outcome.rejection.reason.value == code, outcome.rejection.detail
    reason = json.loads(outcome.location.with_name(outcome.location.name + ".reason.json").read_text())
    assert reason["code"] == code and reason["sent"] is False
    assert returns_drops.outbox.entries(("pending",)) == []
    assert not drop.exists()


def test_a_forwarded_package_may_not_reuse_a_message_id(drops):
    returns_drops, config = drops
    folder = config.communes[0].returns
    routing = returns_drops.routing_of(returns_drops.ledger.dossier(NUMERO))
    package = build_retour(routing, numero=NUMERO, demarche="RCO", state="recu", comment=None, attachments=[])
    (folder / "first.zip").write_bytes(package.data)
    assert returns_drops.process(folder / "first.zip", config.communes[0]).status == "queued"
    # Business software that reuses its MessageId for the next return.
    again = build_retour(routing, numero=NUMERO, demarche="RCO", state="clos", comment="x", attachments=[])
    with zipfile.ZipFile(io.BytesIO(again.data)) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["message.xml"] = members["message.xml"].replace(again.message_id.encode(), package.message_id.encode())
    (folder / "second.zip").write_bytes(zipped(members))
    outcome = returns_drops.process(folder / "second.zip", config.communes[0])
    assert outcome.status == "rejected" and outcome.rejection.reason.value == "return_package_invalid"
    assert "MessageId" in outcome.rejection.detail
    assert [e.target_state for e in returns_drops.outbox.entries(("pending",))] == ["recu"]
    # The refused "clos" left the dossier where it was: a proper "clos" still goes.
    (folder / "third.zip").write_bytes(again.data)
    assert returns_drops.process(folder / "third.zip", config.communes[0]).status == "queued"


def test_clos_waits_for_a_recu_still_settling_then_goes(drops):
    returns_drops, config = drops
    folder = config.communes[0].returns
    (folder / "clos.xml").write_bytes(status("clos"))
    assert returns_drops.process(folder / "clos.xml", config.communes[0], others_waiting=True).status == "deferred"
    assert (folder / "clos.xml").exists()
    (folder / "recu.xml").write_bytes(status("recu"))
    assert returns_drops.process(folder / "recu.xml", config.communes[0]).status == "queued"
    assert returns_drops.process(folder / "clos.xml", config.communes[0]).status == "queued"
    states = [e.target_state for e in returns_drops.outbox.entries(("pending",))]
    assert states == ["recu", "clos"]


def test_a_drop_taken_back_before_it_is_read_is_let_go(drops):
    returns_drops, config = drops
    outcome = returns_drops.process(config.communes[0].returns / "gone.xml", config.communes[0])
    assert outcome.status == "vanished"
    assert list((config.communes[0].returns.parent / "rejected").glob("*")) == []


# --------------------------------------------------------------------------- links and other names


def _outside(tmp_path: Path, data: bytes) -> tuple[Path, tuple]:
    """A file outside the return directory, and what must stay the same about it."""
    outside = tmp_path / "outside" / "private.pdf"
    outside.parent.mkdir(exist_ok=True)
    outside.write_bytes(data)
    outside.chmod(0o604)
    return outside, _state(outside)


def _state(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), oct(st.st_mode), st.st_uid, st.st_gid


def _refused(returns_drops, config, drop: Path, code: str) -> dict:
    outcome = returns_drops.process(drop, config.communes[0])
    assert outcome.status == "rejected" and outcome.rejection.reason.value == code, outcome.rejection.detail
    reason = json.loads(outcome.location.with_name(outcome.location.name + ".reason.json").read_text())
    assert reason["code"] == code and reason["sent"] is False
    assert returns_drops.outbox.entries(("pending",)) == []
    # Nothing is left behind in the return directory: the refused names went beside their reason.
    assert list(config.communes[0].returns.iterdir()) == []
    return reason


def test_a_hard_linked_attachment_is_refused_and_the_outside_file_untouched(drops, tmp_path):
    returns_drops, config = drops
    folder = config.communes[0].returns
    outside, before = _outside(tmp_path, PDF)
    (folder / "a.pdf").hardlink_to(outside)
    (folder / "s.xml").write_bytes(status(files=("a.pdf",)))
    reason = _refused(returns_drops, config, folder / "s.xml", "drop_hard_link")
    assert reason["attachments"] == ["a.pdf"]
    assert _state(outside) == before


def test_a_hard_linked_drop_is_refused_and_the_outside_file_untouched(drops, tmp_path):
    returns_drops, config = drops
    folder = config.communes[0].returns
    outside, before = _outside(tmp_path, status())
    (folder / "s.xml").hardlink_to(outside)
    _refused(returns_drops, config, folder / "s.xml", "drop_hard_link")
    assert _state(outside) == before


@pytest.mark.parametrize("what", ["drop", "attachment"])
def test_a_symbolic_link_is_refused_and_its_target_untouched(drops, tmp_path, what):
    returns_drops, config = drops
    folder = config.communes[0].returns
    outside, before = _outside(tmp_path, status() if what == "drop" else PDF)
    if what == "drop":
        (folder / "s.xml").symlink_to(outside)
    else:
        (folder / "a.pdf").symlink_to(outside)
        (folder / "s.xml").write_bytes(status(files=("a.pdf",)))
    _refused(returns_drops, config, folder / "s.xml", "drop_not_regular")
    assert _state(outside) == before


def test_a_fifo_is_refused_without_blocking(drops):
    returns_drops, config = drops
    folder = config.communes[0].returns
    os.mkfifo(folder / "s.xml")
    _refused(returns_drops, config, folder / "s.xml", "drop_not_regular")


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_what_is_taken_is_copied_and_the_original_removed(drops):
    # relayd never changes the mode of a file it did not create: the archive holds a copy of its own.
    returns_drops, config = drops
    folder = config.communes[0].returns
    (folder / "a.pdf").write_bytes(PDF)
    (folder / "a.png").write_bytes(png_bytes())
    (folder / "a.jpg").write_bytes(_jpeg())
    (folder / "s.xml").write_bytes(status(files=("a.pdf", "a.png", "a.jpg")))
    for name in ("a.pdf", "a.png", "a.jpg", "s.xml"):
        (folder / name).chmod(0o664)
    kept = {name: os.stat(folder / name).st_ino for name in ("a.pdf", "a.png", "a.jpg", "s.xml")}
    outcome = returns_drops.process(folder / "s.xml", config.communes[0])
    assert outcome.status == "queued"
    assert list(folder.iterdir()) == []
    archived = {p.name.split("-", 2)[-1]: p for p in outcome.location.parent.iterdir()}
    assert archived["a.pdf"].read_bytes() == PDF
    for name, inode in kept.items():
        st = archived[name].stat()
        assert st.st_ino != inode and oct(st.st_mode & 0o777) == "0o600"

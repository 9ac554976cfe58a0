"""Return drops in-process: every way a drop can be wrong gets its code, and nothing is queued for it.

The wire is in ``test_return_path.py``; here each drop goes through :class:`ReturnDrops` on a
real ledger and real folders, so the whole list of refusals runs in a second.
"""

from __future__ import annotations

import io
import json
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
from relayd.pec.replies import build_retour, read_reply
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
            {"insee": "90017", "name": "A", "inbox": "inbox/a", "demarches": ["recensementCitoyen"], "returns": "ret/a"},
            {"insee": "75056", "name": "B", "inbox": "inbox/b", "demarches": ["recensementCitoyen"], "returns": "ret/b"},
        ],
    }))
    config = load_config(config_path)
    ledger = Ledger(config.storage.ledger)
    for numero, insee in ((NUMERO, "90017"), (OTHER_COMMUNE_NUMERO, "75056")):
        package = tmp_path / f"{numero}.zip"
        package.write_bytes(build_package(SampleSpec(numero=numero, insee=insee)))
        message = inspect_package(package, PackageLimits()).message
        ledger.record_accepted(
            PackageRecord(sha256=numero, size=1, message_id=message.message_id, numero=numero, demarche="recensementCitoyen", insee=insee),
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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_drop_is_set_aside_with_its_code(drops, case):
    returns_drops, config = drops
    files, code = CASES[case]
    folder = config.communes[0].returns
    if files is None:  # a complete PEC package, but an AVL rather than a Retour
        from relayd.pec.replies import build_ack

        routing = returns_drops.routing_of(returns_drops.ledger.dossier(NUMERO))
        files = {"ack.zip": build_ack(routing, kind="AVL", numero=NUMERO, demarche="recensementCitoyen").data}
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
    # Business software that mints its own MessageIds (reply_style relayd), then reuses one for the next return.
    package = build_retour(routing, numero=NUMERO, demarche="recensementCitoyen", state="recu", comment=None, attachments=[],
                           style="relayd")
    (folder / "first.zip").write_bytes(package.data)
    assert returns_drops.process(folder / "first.zip", config.communes[0]).status == "queued"
    again = build_retour(routing, numero=NUMERO, demarche="recensementCitoyen", state="clos", comment="x", attachments=[],
                         style="relayd")
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


def test_forwarded_packages_in_the_real_repliers_style_may_share_the_answered_message_id(drops):
    # The real replier keeps the Aller's MessageId in every reply: "reçu" then "clos" both go.
    returns_drops, config = drops
    folder = config.communes[0].returns
    routing = returns_drops.routing_of(returns_drops.ledger.dossier(NUMERO))
    for i, state in enumerate(("recu", "clos")):
        package = build_retour(routing, numero=NUMERO, demarche="recensementCitoyen", state=state, comment=None, attachments=[])
        assert read_reply(package.data).message_id == routing.message_id
        (folder / f"{i}.zip").write_bytes(package.data)
        assert returns_drops.process(folder / f"{i}.zip", config.communes[0]).status == "queued"
    assert [e.target_state for e in returns_drops.outbox.entries(("pending",))] == ["recu", "clos"]


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

"""Broken and hostile packages: each is quarantined with its own reason, and the relay keeps serving."""

from __future__ import annotations

import json

import pytest

from conftest import paramiko_put, sftp_put
from relayd.rejections import Reason
from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.samples import SampleSpec, build_members, build_package, package_filename, write_zip

SMALL_LIMITS = {"max_package_bytes": 2 * 1024 * 1024}


def _spec(i: int, **kw) -> SampleSpec:
    return SampleSpec(numero=f"A-1-BRKN{i:04d}", demarche="recensementCitoyen", insee="90017", **kw)


def test_every_broken_kind_is_quarantined_with_its_reason(make_relay, tmp_path):
    relay = make_relay(limits=SMALL_LIMITS)
    kinds = sorted(BROKEN_KINDS)
    assert len(kinds) >= 15
    for i, kind in enumerate(kinds):
        local = tmp_path / f"{kind}.zip"
        local.write_bytes(build_broken(kind, _spec(i)))
        expected = BROKEN_KINDS[kind].reason.value
        style = ("direct", "rename")[(i // 2) % 2]
        if i % 2 == 0:
            # OpenSSH's sftp shows only the status ("Failure"), not the server's message.
            result = sftp_put(relay, local, f"{kind}.zip", style=style)
            assert result.returncode != 0, f"{kind} was accepted"
            assert "Failure" in result.stderr, f"{kind}: {result.stderr}"
        else:
            # paramiko shows the server's message: the machine code is in it.
            with pytest.raises(OSError) as refused:
                paramiko_put(relay, local, f"{kind}.zip", style=style)
            assert expected in str(refused.value), f"{kind}: {refused.value}"
    # An upload refused while still under its temporary name is quarantined under that name.
    reasons = {q["upload_name"].removesuffix(".part"): q for q in relay.quarantined()}
    for kind in kinds:
        entry = reasons[f"{kind}.zip"]
        assert entry["code"] == BROKEN_KINDS[kind].reason.value, kind
        assert entry["message"] and entry["message"][-1] == "."
        # Nothing is lost: the refused bytes sit beside their reason (the oversized upload as far as it got).
        assert entry["_file"].exists()
        if kind != "oversized":
            assert entry["_file"].read_bytes() == (tmp_path / f"{kind}.zip").read_bytes()
    assert not any(relay.inbox("90017").iterdir())
    rows = relay.ledger_rows("SELECT outcome, reason FROM packages")
    assert len(rows) == len(kinds) and all(r["outcome"] == "rejected" for r in rows)

    # The relay still serves: the next good package goes through, with the other client.
    good = tmp_path / "good.zip"
    spec = _spec(9999)
    good.write_bytes(build_package(spec))
    paramiko_put(relay, good, package_filename(spec))
    assert (relay.inbox("90017") / f"{spec.numero}-recensementCitoyen.zip").read_bytes() == good.read_bytes()


def test_commune_the_account_does_not_serve(make_relay, tmp_path):
    relay = make_relay()
    spec = SampleSpec(numero="A-2-NOTMINE1", demarche="recensementCitoyen", insee="2A004")  # served by account "autre" only
    local = tmp_path / "p.zip"
    local.write_bytes(build_package(spec))
    with pytest.raises(OSError, match=Reason.INSEE_NOT_ALLOWED.value):
        paramiko_put(relay, local, "p.zip", style="rename")
    assert [q["code"] for q in relay.quarantined()] == [Reason.INSEE_NOT_ALLOWED.value]
    assert not relay.inbox("2A004").exists() or not any(relay.inbox("2A004").iterdir())


def test_demarche_not_accepted_by_that_commune(make_relay, tmp_path):
    relay = make_relay()
    spec = SampleSpec(numero="A-2-DAUANOK1", demarche="DAUA", insee="2A004")  # 2A004 takes ILE and RCO only
    local = tmp_path / "p.zip"
    local.write_bytes(build_package(spec))
    from conftest import OTHER_PASSWORD

    with pytest.raises(OSError, match=Reason.DEMARCHE_NOT_ACCEPTED.value):
        paramiko_put(relay, local, "p.zip", user="autre", password=OTHER_PASSWORD)
    assert [q["code"] for q in relay.quarantined()] == [Reason.DEMARCHE_NOT_ACCEPTED.value]


def test_same_dossier_with_other_content_is_a_conflict(make_relay, tmp_path):
    relay = make_relay()
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    first.write_bytes(build_package(_spec(1)))
    second.write_bytes(build_package(_spec(1), seed=7))  # same dossier, other bytes
    assert first.read_bytes() != second.read_bytes()
    assert sftp_put(relay, first, "a.zip").returncode == 0
    with pytest.raises(OSError, match=Reason.DOSSIER_CONFLICT.value):
        paramiko_put(relay, second, "b.zip")
    # The business software's copy is untouched.
    assert (relay.inbox("90017") / "A-1-BRKN0001-recensementCitoyen.zip").read_bytes() == first.read_bytes()


def test_reason_file_is_readable_by_people_and_programs(make_relay, tmp_path):
    relay = make_relay()
    local = tmp_path / "x.zip"
    local.write_bytes(build_broken("xxe", _spec(3)))
    sftp_put(relay, local, "x.zip")
    [entry] = relay.quarantined()
    reason_path = entry["_file"].with_name(entry["_file"].name + ".reason.json")
    data = json.loads(reason_path.read_text())
    assert data["code"] == "xml_forbidden"
    assert "DOCTYPE" in data["message"]
    assert data["account"] == "plateforme" and data["upload_name"] == "x.zip"
    assert len(data["sha256"]) == 64
    # The XXE target was never read into anything relayd wrote.
    assert "root:" not in reason_path.read_text() and "root:" not in relay.log_text()


def test_single_line_values_refuse_every_unicode_control_and_invisible_character(make_relay, tmp_path):
    """NEL and the other C1 controls, bidi overrides and zero-width characters are refused like CR and LF.

    They were let through: the check knew only C0 controls and U+2028/U+2029. NEL (U+0085) is a
    line break to Unicode-aware readers (Python's splitlines, XML 1.1), CSI (U+009B) starts a
    terminal escape sequence, and a bidi override makes a mail subject or a log line read
    otherwise than it is; all reached the log, the reason file, the ANL and the agents' mail.
    """
    relay = make_relay()
    cases = {
        "nel-message-id": ("Principal 2019", "Principal\u00852019"),
        "csi-insee": ("<Valeur>90017</Valeur>", "<Valeur>90017\u009b2J</Valeur>"),
        "rlo-subject": (" : dossier à traiter</ns2:Subject>", " : dossier \u202efdp.exe</ns2:Subject>"),
        "zero-width-email": ("@example.org</Email>", "@exa\u200bmple.org</Email>"),
    }
    for i, (case, (old, new)) in enumerate(cases.items()):
        spec = _spec(100 + i, message_id=f"A-1-BRKN{100 + i:04d} 5808773 Principal 2019-04-03T16:26:40")
        members = build_members(spec)
        xml = members["message.xml"].decode("utf-8")
        assert old in xml, case
        members["message.xml"] = xml.replace(old, new, 1).encode("utf-8")
        local = tmp_path / f"{case}.zip"
        local.write_bytes(write_zip(members, date_time=spec.zip_date_time))
        with pytest.raises(OSError, match=Reason.ENVELOPE_UNSAFE_VALUE.value):
            paramiko_put(relay, local, f"{case}.zip", style="rename")
    reasons = relay.quarantined()
    assert [q["code"] for q in reasons] == [Reason.ENVELOPE_UNSAFE_VALUE.value] * len(cases)
    for q in reasons:  # the sentence names the element, never the value
        assert not any(c in q["message"] for c in "\u0085\u009b\u202e\u200b"), q["message"]
    assert not any(relay.inbox("90017").iterdir())

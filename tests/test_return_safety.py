"""Return drops against a real relayd and a real sshd: links and fake attachments never reach the platform.

A hard link or a symbolic link in the return directory could make relayd send a file of the
attacker's choosing, and a refused one used to have its target's mode changed. The file
outside must stay exactly as it was: content, mode, owner.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from conftest import wait_for
from platform_sshd import platform_sshd_fixture  # noqa: F401 - registers the fixture
from relayd.pec.status import StatusAttachment, StatusFile, write_status_file
from relayd.testkit.samples import pdf_bytes, png_bytes
from test_return_path import drop, linked, one_dossier, platform, published, wait_received  # noqa: F401 - fixtures

PDF = pdf_bytes(["Attestation de recensement"])
HTML_PDF = b"%PDF-1.7\n<html><body><script>document.location='https://evil.example/'</script></body></html>\n"
JS_PDF = PDF.replace(b"<< /Type /Catalog /Pages 2 0 R >>",
                     b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /JavaScript /JS (app.alert(1)) >> >>")


def _status(numero: str, *files: str) -> bytes:
    return write_status_file(StatusFile(numero=numero, state="recu", attachments=[StatusAttachment(file=f) for f in files]))


def _state(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), oct(st.st_mode), st.st_uid, st.st_gid


def _place(folder: Path, name: str, make) -> None:
    # Made under a hidden name, then renamed in, as the drop contract asks (a rename keeps the link a link).
    tmp = folder / f".{name}.tmp"
    make(tmp)
    tmp.rename(folder / name)


def test_links_and_fake_attachments_are_refused_and_good_ones_reach_the_platform(linked, tmp_path):
    relay, platform, spec = one_dossier(linked, tmp_path, seed=77)
    folder = relay.returns()
    outside_pdf = tmp_path / "outside" / "private.pdf"
    outside_pdf.parent.mkdir()
    outside_pdf.write_bytes(pdf_bytes(["private"]))
    outside_status = tmp_path / "outside" / "status.xml"
    outside_status.write_bytes(_status(spec.numero))
    for outside in (outside_pdf, outside_status):
        outside.chmod(0o604)
    before = {p: _state(p) for p in (outside_pdf, outside_status)}

    def refused(count: int) -> list[str]:
        wait_for(lambda: len(relay.rejected()) >= count, what=f"{count} refusals")
        return [r["code"] for r in relay.rejected()]

    _place(folder, "attestation.pdf", lambda p: p.hardlink_to(outside_pdf))
    drop(relay, spec.numero, "recu", raw=_status(spec.numero, "attestation.pdf"), name="hardlinked-attachment.xml")
    refused(1)
    _place(folder, "hardlinked-status.xml", lambda p: p.hardlink_to(outside_status))
    refused(2)
    _place(folder, "symlinked-status.xml", lambda p: p.symlink_to(outside_status))
    refused(3)
    _place(folder, "linked.pdf", lambda p: p.symlink_to(outside_pdf))
    drop(relay, spec.numero, "recu", raw=_status(spec.numero, "linked.pdf"), name="symlinked-attachment.xml")
    refused(4)
    drop(relay, spec.numero, "recu", attachments={"fake.pdf": HTML_PDF}, name="fake-pdf.xml")
    refused(5)
    drop(relay, spec.numero, "recu", attachments={"script.pdf": JS_PDF}, name="javascript.xml")
    refused(6)
    drop(relay, spec.numero, "recu", attachments={"scan.png": png_bytes()[:-20]}, name="broken-png.xml")
    codes = refused(7)

    assert sorted(codes) == sorted(["drop_hard_link", "drop_hard_link", "drop_not_regular", "drop_not_regular",
                                    "attachment_type", "attachment_active_content", "attachment_unreadable"])
    by_drop = {r["drop"]: r["code"] for r in relay.rejected()}
    assert by_drop["hardlinked-attachment.xml"] == "drop_hard_link"
    assert by_drop["symlinked-status.xml"] == "drop_not_regular"
    assert by_drop["fake-pdf.xml"] == "attachment_type"
    # The files outside are exactly as they were, and nothing went to the platform but the AVL.
    assert {p: _state(p) for p in before} == before
    assert len(published(platform)) == 1
    assert [name for name in os.listdir(folder)] == []

    # The good case still goes through: a real PDF and a real PNG reach the platform as they were.
    drop(relay, spec.numero, "recu", attachments={"attestation.pdf": PDF, "scan.png": png_bytes()})
    replies = wait_received(platform, 2)
    assert [r.kind for r in replies] == ["AVL", "Retour"]
    assert sorted(replies[1].members.values()) == sorted([PDF, png_bytes()])


def _jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, data)
    return buffer.getvalue()


HTML = b"<html><body><script>document.location='https://evil.example/'</script></body></html>"
_IEND = b"\0\0\0\0IEND\xaeB`\x82"


def _refusals_by_drop(relay, count: int) -> dict[str, tuple[str, str]]:
    """Once ``count`` refusals are in rejected/: each drop's name with its code and message."""
    wait_for(lambda: len(relay.rejected()) >= count, what=f"{count} refusals")
    return {r["drop"]: (r["code"], r["message"]) for r in relay.rejected()}


def test_an_image_with_a_second_file_after_its_end_is_refused(relay):
    # A zip or a web page after the image's end rides along unseen by Pillow: a polyglot file. A PNG that
    # repeats its last chunk after the payload ends as a PNG should, and its first end is still the real one.
    numero = "A-1-POLYGLOT1"  # no dossier needed: attachments are checked first
    drop(relay, numero, "recu", attachments={"photo.jpg": _jpeg() + _zip_with("run.exe", b"MZ" * 64)}, name="jpeg-zip.xml")
    drop(relay, numero, "recu", attachments={"scan.jpg": _jpeg() + HTML}, name="jpeg-html.xml")
    drop(relay, numero, "recu", attachments={"scan.png": png_bytes() + HTML + _IEND}, name="png-html.xml")
    assert _refusals_by_drop(relay, 3) == {
        "jpeg-zip.xml": ("attachment_type", "'photo.jpg' has data after the end of its JPEG image."),
        "jpeg-html.xml": ("attachment_type", "'scan.jpg' has data after the end of its JPEG image."),
        "png-html.xml": ("attachment_type", "'scan.png' has data after the end of its PNG image."),
    }
    # The same images without their passengers pass the checks (and meet the unknown dossier).
    drop(relay, numero, "recu", attachments={"clean.jpg": _jpeg(), "clean.png": png_bytes()}, name="clean.xml")
    wait_for(lambda: len(relay.rejected()) >= 4, what="4 refusals")
    assert {r["drop"]: r["code"] for r in relay.rejected()}["clean.xml"] == "dossier_unknown"


def test_names_that_are_not_utf8_or_very_long_are_set_aside_and_sent(linked, tmp_path):
    # The business software picks the bytes of its names: Latin-1 "reçu.xml", or 240 characters. relayd puts
    # them into its own file names (a stamp before, ".reason.json" after), JSON and the ledger: such a name
    # used to fail there, the drop stayed in the return directory unexplained, and the drops after it waited.
    relay, platform, spec = one_dossier(linked, tmp_path, seed=78)
    latin1 = os.fsdecode("reçu-illisible.xml".encode("latin-1"))
    drop(relay, spec.numero, "recu", raw=b"<Statut><NumeroTeledemarche>oops</Statut", name=latin1)
    long_pdf = "attestation-" + "x" * 228 + ".pdf"
    drop(relay, spec.numero, "recu", attachments={long_pdf: PDF}, name="recu-" + "y" * 236 + ".xml")
    wait_for(lambda: relay.rejected(), what="the Latin-1 drop's refusal")
    (reason,) = relay.rejected()
    assert reason["code"] == "xml_malformed" and reason["drop"] == "re\\xe7u-illisible.xml"
    replies = wait_received(platform, 2)
    assert [r.kind for r in replies] == ["AVL", "Retour"] and list(replies[1].members.values()) == [PDF]
    wait_for(lambda: not os.listdir(relay.returns()), what="the return directory to be emptied")
    kept = [p for p in (relay.root / "var" / "archive" / "returns").rglob("*") if p.is_file()]
    assert sorted(p.suffix for p in kept) == [".pdf", ".xml"]  # both taken, under names that fit


_CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
#: a link that runs JavaScript when the document opens: the JavaScript rule, by another door
URI_JS_PDF = PDF.replace(_CATALOG, b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /URI /URI (javascript:app.alert(1)) >> >>")
#: a program inside the PDF, and an embedded PDF opened (with whatever JavaScript it holds) by a /GoToE action
EXE_PDF = pdf_bytes(["facture"], padding=b"MZ\x90\x00" * 64).replace(
    _CATALOG, b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(facture.exe) "
              b"<< /Type /Filespec /F (facture.exe) /EF << /F 6 0 R >> >>] >> >> >>")
GOTOE_PDF = PDF.replace(_CATALOG, b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /GoToE /T << /R /C /N (x.pdf) >> >> >>")


def test_pdf_attachments_with_script_links_or_embedded_files_are_refused(relay):
    numero = "A-1-EMBEDDED1"  # no dossier needed: attachments are checked first
    drop(relay, numero, "recu", attachments={"lien.pdf": URI_JS_PDF}, name="uri.xml")
    drop(relay, numero, "recu", attachments={"facture.pdf": EXE_PDF}, name="embedded.xml")
    drop(relay, numero, "recu", attachments={"ouvre.pdf": GOTOE_PDF}, name="gotoe.xml")
    assert _refusals_by_drop(relay, 3) == {
        "uri.xml": ("attachment_active_content", "'lien.pdf' carries a javascript: link."),
        "embedded.xml": ("attachment_active_content", "'facture.pdf' carries /EmbeddedFiles."),
        "gotoe.xml": ("attachment_active_content", "'ouvre.pdf' carries /GoToE."),
    }


def _with_unreferenced_object_stream(pdf: bytes, hidden: bytes) -> bytes:
    """``pdf`` with a compressed object stream that no cross-reference names, holding ``hidden`` as object 6."""
    import zlib

    body = zlib.compress(b"6 0 " + hidden)
    extra = (b"7 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode /Length %d >>\nstream\n" % len(body)
             + body + b"\nendstream\nendobj\n")
    head, tail = pdf.split(b"xref\n", 1)
    return head + extra + b"xref\n" + tail.rsplit(b"startxref\n", 1)[0] + b"startxref\n%d\n%%%%EOF\n" % (len(head) + len(extra))


def test_a_launch_action_compressed_where_no_reference_reaches_is_refused(relay):
    # The raw scan looks for actions in objects the cross-reference does not reach (a viewer that rebuilds the
    # table finds them), but could not read inside a compressed object stream; the object walk never gets there.
    hidden = _with_unreferenced_object_stream(PDF, b"<< /Type /Catalog /Pages 2 0 R /OpenAction << /S /Launch /F (cmd.exe) >> >>")
    drop(relay, "A-1-OBJSTREAM1", "recu", attachments={"cache.pdf": hidden}, name="objstm.xml")
    wait_for(lambda: relay.rejected(), what="a refusal")
    (reason,) = relay.rejected()
    assert (reason["code"], reason["message"]) == ("attachment_active_content", "'cache.pdf' carries /Launch.")


def test_an_attachment_name_too_long_for_a_file_is_a_status_error(relay):
    # 200 "é" and ".pdf" are 204 characters, within the XSD's 255, but 404 bytes: no file can have that name,
    # and looking for it beside the status file failed inside relayd (internal_error, with a traceback).
    name = "é" * 200 + ".pdf"
    raw = _status("A-1-LONGNAME1", "a.pdf").replace(b"a.pdf", name.encode())
    drop(relay, "A-1-LONGNAME1", "recu", raw=raw, name="long-attachment.xml")
    wait_for(lambda: relay.rejected(), what="a refusal")
    (reason,) = relay.rejected()
    assert reason["code"] == "status_invalid", reason
    assert "is 404 bytes long in UTF-8; a file name holds at most 255" in reason["message"]

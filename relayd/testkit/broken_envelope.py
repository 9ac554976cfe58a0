"""Broken packages about the envelope's meaning: what a second reader would route differently.

Each builder returns the zip bytes of a package that is sound as a zip and well-formed XML, but
says one thing twice, carries a value that would reach a file name, a log line or a mail header
unescaped, or lets a business program pull in files through XInclude. Registered in
:data:`relayd.testkit.broken.BROKEN_KINDS` (its last block).
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import replace

from relayd.testkit.samples import SampleSpec, build_members, dia_envelope, ent_member_name, write_zip

#: A SIRET that no commune declares (14 digits, but no real establishment's).
STRAY_SIRET = "99999999999999"


def _edited(spec: SampleSpec, member: str, edit: Callable[[str], str]) -> bytes:
    members = build_members(spec)
    before = members[member].decode("utf-8")
    after = edit(before)
    if after == before:
        raise ValueError(f"the edit of {member} changed nothing")
    members[member] = after.encode("utf-8")
    return write_zip(members, date_time=spec.zip_date_time)


def duplicate_codeinsee(spec: SampleSpec) -> bytes:
    """Two ``Donnee`` with ``Id`` CodeINSEE, the second for another commune."""
    other = "75056" if spec.insee != "75056" else "90017"

    def edit(xml: str) -> str:
        first = f"<Donnee><Id>CodeINSEE</Id><Valeur>{spec.insee}</Valeur></Donnee>"
        return xml.replace(first, first + f"<Donnee><Id>CodeINSEE</Id><Valeur>{other}</Valeur></Donnee>", 1)

    return _edited(spec, "message.xml", edit)


def duplicate_message_id(spec: SampleSpec) -> bytes:
    """Two ``MessageId`` in Routing: which one would a reply name?"""

    def edit(xml: str) -> str:
        end = xml.index("</ns2:MessageId>") + len("</ns2:MessageId>")
        return xml[:end] + "<ns2:MessageId>autre-message</ns2:MessageId>" + xml[end:]

    return _edited(spec, "message.xml", edit)


def xinclude_ent(spec: SampleSpec) -> bytes:
    """The ``-ent-`` business header pulls ``/etc/passwd`` in through XInclude."""

    def edit(xml: str) -> str:
        return xml.replace(
            "<Suivi></Suivi>",
            '<Suivi><xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd" parse="text"/></Suivi>',
            1,
        )

    return _edited(spec, ent_member_name(spec), edit)


def path_ack_to(spec: SampleSpec) -> bytes:
    """``AckTo``'s Service is a path (``../../../etc/cron.d/x``)."""

    def edit(xml: str) -> str:
        start = xml.index("<ns2:AckTo>")
        head, tail = xml[:start], xml[start:]
        return head + tail.replace(f"<ns2:Service>{spec.sender_service}</ns2:Service>",
                                   "<ns2:Service>../../../etc/cron.d/x</ns2:Service>", 1)

    return _edited(spec, "message.xml", edit)


def subject_header_injection(spec: SampleSpec) -> bytes:
    """The notification ``Subject`` carries a line break and a ``Bcc:`` header."""

    def edit(xml: str) -> str:
        return xml.replace(" : dossier à traiter</ns2:Subject>", " : dossier à traiter\r\nBcc: victime@example.org</ns2:Subject>", 1)

    return _edited(spec, "message.xml", edit)


def siret_unknown(spec: SampleSpec) -> bytes:
    """No CodeINSEE, and a recipient SIRET that no commune declares: nothing to route to."""
    stray = replace(spec, code_insee=False, recipient_siret=STRAY_SIRET)
    return write_zip(build_members(stray), date_time=stray.zip_date_time)


def not_a_dossier(spec: SampleSpec) -> bytes:
    """``message.xml`` shaped like the DIA flow's: an opaque ``Content``, no ``Aller``."""
    members = build_members(spec)
    members["message.xml"] = dia_envelope(spec)
    return write_zip(members, date_time=spec.zip_date_time)


def comment_split_subject(spec: SampleSpec) -> bytes:
    """A comment splits the ``Subject``: relayd's reader stops at it, a DOM reader reads a ``Bcc:`` line after it."""

    def edit(xml: str) -> str:
        return xml.replace(" : dossier à traiter</ns2:Subject>",
                           "<!---->&#13;&#10;Bcc: victime@example.org</ns2:Subject>", 1)

    return _edited(spec, "message.xml", edit)


def nested_codeinsee(spec: SampleSpec) -> bytes:
    """A second ``Donnee`` CodeINSEE, for another commune, hidden in ``Suivi`` before the real ``Routage``.

    A reader that searches the document (``//Donnee[Id='CodeINSEE']``) finds this one first.
    """
    other = "75056" if spec.insee != "75056" else "90017"

    def edit(xml: str) -> str:
        return xml.replace("<Suivi></Suivi>",
                           f"<Suivi><Donnee><Id>CodeINSEE</Id><Valeur>{other}</Valeur></Donnee></Suivi>", 1)

    return _edited(spec, "message.xml", edit)


def foreign_namespace_numero(spec: SampleSpec) -> bytes:
    """A second ``NumeroTeledemarche`` in another namespace, before the real one: two for a namespace-blind reader."""

    def edit(xml: str) -> str:
        return xml.replace("<NumeroTeledemarche>",
                           '<o:NumeroTeledemarche xmlns:o="urn:other">B-1-OTHER0001</o:NumeroTeledemarche>'
                           "<NumeroTeledemarche>", 1)

    return _edited(spec, "message.xml", edit)

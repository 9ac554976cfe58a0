"""What relayd sends back to the platform: acks (AVL, ANL) and return flows (Retour).

Both formats live here and only here, so that the official specification, should it ever be
published, replaces this module and ``schemas/relayd-accuse.xsd`` / ``schemas/relayd-retour.xsd``
without touching the rest of relayd (docs/domain.md §4).

- The **envelope** is the platform's PEC ``message.xml``. Its ``Routing`` is a copy of the
  message being answered, as the one real replier found does it (docs/formats.md): every
  element kept (``FlowType``, ``ConversationId``, ``WriteMode``, ``Attention``, elements relayd
  does not know), Sender and Recipient swapped (the Recipient is the ``AckTo`` when there is
  one), and no ack asked for in return (``AckRequired`` false, no ``AckType`` nor ``AckTo``).
  Its ``MessageId`` is the original's under ``platform.reply_style: mirror`` (the default, as
  the real replier), or one of relayd's own under ``relayd``; either way the body names the
  original in ``MessageIdOrigine``, and the package's file name is what is unique. It never
  carries ``Extras`` (the agents' notification e-mail) nor anything from ``Aller`` (so never a
  ``MotDePasse``).
- The **bodies** are ours, versioned by namespace and by a ``version="1"`` attribute::

    <Accuse xmlns="urn:relayd:pec:accuse:1" version="1">
      <Type>AVL | ANL</Type>
      <MessageIdOrigine>the MessageId answered</MessageIdOrigine>
      <NumeroTeledemarche>A-9-X3UGO4V7</NumeroTeledemarche>    0..1
      <NumeroDemarche>DAUA</NumeroDemarche>                    0..1
      <DateAccuse>2026-11-26T14:03:05+01:00</DateAccuse>
      <Code>xml_forbidden</Code>                               ANL only
      <Motif>message.xml declares a DOCTYPE...</Motif>         ANL only
    </Accuse>

    <Retour xmlns="urn:relayd:pec:retour:1" version="1">
      <NumeroDemarche>DAUA</NumeroDemarche>
      <NumeroTeledemarche>A-9-X3UGO4V7</NumeroTeledemarche>
      <MessageIdOrigine>the Aller's MessageId</MessageIdOrigine>
      <Etat code="recu | clos">the platform's label</Etat>
      <DateEtat>2026-11-26T14:03:05+01:00</DateEtat>
      <Commentaire>...</Commentaire>                           0..1, at most 4000 characters
      <PieceJointe>                                            0..n
        <Intitule>Attestation</Intitule>                       0..1
        <Fichier>A-9-X3UGO4V7-DAUA-retour-1-attestation.pdf</Fichier>
        <TypeMime>application/pdf</TypeMime>
        <Taille>300000</Taille>
        <Sha256>64 hex digits</Sha256>
      </PieceJointe>
    </Retour>

- The **package** is a flat zip: ``message.xml``, then for a Retour each attachment as the member
  ``<numero>-<demarche>-retour-<i>-<safe name>`` (i from 1, in order; the safe name keeps ASCII
  letters, digits, ``.``, ``_`` and ``-`` of the file's name), in the style of the platform's
  ``<numero>-<demarche>-doc-...`` members. Its file name on the platform's server is
  ``relayd.<local time>.<numero>-<demarche>.<kind>.<12 hex>.zip``.

Everything built is a function of its inputs and ``now``: building the same reply twice gives
the same bytes, name and MessageId, so a reply resent after a crash is recognisably the same one.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import secrets
import unicodedata
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from lxml import etree
from pydantic import ConfigDict, ValidationError, field_serializer, field_validator, model_validator
from pydantic_xml import BaseXmlModel, attr, element

from relayd import dossiers
from relayd.pec.envelope import KNOWN_PEC_ELEMENTS, NS_PEC, NUMERO_PATTERN, Party, Recipients, Routing
from relayd.pec.package import ENVELOPE_NAME
from relayd.pec.status import describe_element, explain_schema_errors, explain_validation_error
from relayd.pec.xml import XML_UNSAFE_CHARS, free_text, load_schema, parse_xml
from relayd.pec.zipcheck import PackageLimits, check_directory, open_zip, stream_member
from relayd.rejections import Reason, Rejection

ACK_NS = "urn:relayd:pec:accuse:1"
RETOUR_NS = "urn:relayd:pec:retour:1"
BODY_VERSION = "1"
ENVELOPE_XSD = "pec-envelope.xsd"
ACK_XSD = "relayd-accuse.xsd"
RETOUR_XSD = "relayd-retour.xsd"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

MAX_COMMENT_CHARS = 4000
MAX_MOTIF_CHARS = 2000
MAX_TITLE_CHARS = 255

#: What :func:`read_reply` accepts by default. A reply is small (attachments of at most 1024 Ko
#: each on the platform), and it is held in memory whole, so the bounds are far below an Aller's.
REPLY_LIMITS = PackageLimits(
    max_package_bytes=64 * 1024 * 1024,
    max_members=201,
    max_total_uncompressed_bytes=256 * 1024 * 1024,
    max_xml_bytes=1024 * 1024,
)

ReplyKind = Literal["AVL", "ANL", "Retour"]
#: ``mirror``: the reply's MessageId is the original's (the real replier); ``relayd``: one of relayd's.
ReplyStyle = Literal["mirror", "relayd"]

_DEMARCHE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MEMBER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,199}")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+\-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+\-]{0,126}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

#: What a value must look like, per element, for the messages of :func:`read_reply`.
REPLY_HINTS = {
    "NumeroTeledemarche": "must be of the form A-<digit>-<6 to 12 letters or digits>",
    "NumeroDemarche": "must be a démarche code (letters, digits, '.', '_' or '-', at most 64)",
    "Fichier": "must be a member name of letters, digits, '.', '_' and '-', starting with a letter or a digit",
    "TypeMime": "must be a media type such as application/pdf",
    "Sha256": "must be 64 lowercase hexadecimal digits",
    "Code": "must be a reason code such as xml_forbidden",
    "DateAccuse": "must be an ISO 8601 date and time with its offset, e.g. 2026-11-26T14:03:05+01:00",
    "DateEtat": "must be an ISO 8601 date and time with its offset, e.g. 2026-11-26T14:03:05+01:00",
}


# ----------------------------------------------------------------------------- what callers hold


@dataclass(frozen=True)
class Attachment:
    """A file sent back with a Retour.

    ``name`` is the file's own name (e.g. the status file's ``Fichier``); :func:`build_retour`
    derives the member name in the package from it with :func:`retour_member_name`.
    """

    name: str
    data: bytes
    media_type: str
    title: str | None = None


@dataclass(frozen=True)
class ReplyPackage:
    """A reply ready to publish on the platform's server under ``name``.

    ``message_id`` is relayd's own identifier of this reply, unique (the outbox keys by it, and
    its token is in ``name``); ``envelope_message_id`` is what the envelope's MessageId says,
    which under the ``mirror`` style is the answered message's (None: the same as ``message_id``).
    """

    message_id: str
    name: str
    kind: str
    data: bytes
    envelope_message_id: str | None = None


# ----------------------------------------------------------------------------- body models


class _Accuse(BaseXmlModel, ns="", nsmap={"": ACK_NS}):
    # The format is ours: an unknown element or attribute is an error, not something to skip.
    model_config = ConfigDict(extra="forbid")


class _Retour(BaseXmlModel, ns="", nsmap={"": RETOUR_NS}):
    model_config = ConfigDict(extra="forbid")


def _stripped(value: object) -> object:
    # xs:token values: the XSD ignores surrounding whitespace, so the models do too.
    return value.strip() if isinstance(value, str) else value


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("a date in a reply must carry its UTC offset")
    return value


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


class AckBody(_Accuse, tag="Accuse"):
    """The body of an ack: AVL (accepted) or ANL (refused, with the reason's code and sentence)."""

    version: Literal["1"] = attr(name="version", default=BODY_VERSION)
    kind: Literal["AVL", "ANL"] = element(tag="Type")
    message_id_origine: str = element(tag="MessageIdOrigine")
    numero: str | None = element(tag="NumeroTeledemarche", default=None)
    demarche: str | None = element(tag="NumeroDemarche", default=None)
    date: datetime = element(tag="DateAccuse")
    code: str | None = element(tag="Code", default=None)
    motif: str | None = element(tag="Motif", default=None)

    _strip = field_validator("kind", "numero", "demarche", "code", mode="before")(_stripped)
    _tz = field_validator("date")(_aware)

    @field_serializer("date")
    def _date_out(self, value: datetime) -> str:
        return _iso(value)

    @model_validator(mode="after")
    def _anl_says_why(self) -> AckBody:
        if self.kind == "ANL" and not (self.code and self.motif):
            raise ValueError("an ANL must carry Code and Motif")
        if self.kind == "AVL" and (self.code is not None or self.motif is not None):
            raise ValueError("an AVL carries neither Code nor Motif")
        return self


class RetourState(_Retour, tag="Etat"):
    """``<Etat code="recu">Dossier reçu par le service traitant</Etat>``."""

    code: dossiers.ReturnState = attr(name="code")
    label: str

    _strip = field_validator("code", "label", mode="before")(_stripped)

    @model_validator(mode="after")
    def _label_matches(self) -> RetourState:
        if self.label != dossiers.LABELS[self.code]:
            raise ValueError(f"Etat code {self.code!r} goes with the label {dossiers.LABELS[self.code]!r}, not {self.label[:60]!r}")
        return self


class RetourAttachment(_Retour, tag="PieceJointe"):
    """One attachment as the Retour lists it; the bytes are the zip member ``file``."""

    title: str | None = element(tag="Intitule", default=None)
    file: str = element(tag="Fichier")
    media_type: str = element(tag="TypeMime")
    size: int = element(tag="Taille", ge=0)
    sha256: str = element(tag="Sha256")

    _strip = field_validator("media_type", "sha256", mode="before")(_stripped)

    @field_validator("file")
    @classmethod
    def _member(cls, value: str) -> str:
        if not _MEMBER.fullmatch(value) or value == ENVELOPE_NAME:
            raise ValueError(f"Fichier {value[:60]!r} {REPLY_HINTS['Fichier']}, and not message.xml")
        return value

    @field_validator("media_type")
    @classmethod
    def _media(cls, value: str) -> str:
        if not _MEDIA_TYPE.fullmatch(value):
            raise ValueError(f"TypeMime {value[:60]!r} {REPLY_HINTS['TypeMime']}")
        return value

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _SHA256.fullmatch(value):
            raise ValueError(f"Sha256 {REPLY_HINTS['Sha256']}")
        return value

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return free_text(value, label="Intitule", limit=MAX_TITLE_CHARS)


class RetourBody(_Retour, tag="Retour"):
    """The body of a return flow: the dossier's new state, a comment and the attachments' list."""

    version: Literal["1"] = attr(name="version", default=BODY_VERSION)
    demarche: str = element(tag="NumeroDemarche")
    numero: str = element(tag="NumeroTeledemarche")
    message_id_origine: str = element(tag="MessageIdOrigine")
    etat: RetourState
    date: datetime = element(tag="DateEtat")
    comment: str | None = element(tag="Commentaire", default=None)
    attachments: list[RetourAttachment] = element(tag="PieceJointe", default_factory=list)

    _strip = field_validator("demarche", "numero", mode="before")(_stripped)
    _tz = field_validator("date")(_aware)

    @field_serializer("date")
    def _date_out(self, value: datetime) -> str:
        return _iso(value)

    @field_validator("numero")
    @classmethod
    def _numero(cls, value: str) -> str:
        if not NUMERO_PATTERN.match(value):
            raise ValueError(f"NumeroTeledemarche {value[:40]!r} {REPLY_HINTS['NumeroTeledemarche']}")
        return value

    @field_validator("demarche")
    @classmethod
    def _demarche(cls, value: str) -> str:
        if not _DEMARCHE.fullmatch(value):
            raise ValueError(f"NumeroDemarche {value[:70]!r} {REPLY_HINTS['NumeroDemarche']}")
        return value

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str | None) -> str | None:
        # An empty <Commentaire/> is how some software says "no comment".
        return free_text(value, label="Commentaire", limit=MAX_COMMENT_CHARS)

    @property
    def state(self) -> dossiers.ReturnState:
        """The new state's code, as a status file and the ledger name it."""
        return self.etat.code

    @property
    def label(self) -> str:
        """The new state's label, word for word as the platform shows it."""
        return self.etat.label

    @model_validator(mode="after")
    def _distinct_members(self) -> RetourBody:
        names = [a.file for a in self.attachments]
        if len(names) != len(set(names)):
            raise ValueError("two PieceJointe name the same Fichier")
        return self


@dataclass(frozen=True)
class Reply:
    """A reply package as :func:`read_reply` found it, checked."""

    kind: str
    routing: Routing
    message_id: str
    ack: AckBody | None
    retour: RetourBody | None
    #: every attachment, by member name (empty for an ack)
    members: dict[str, bytes]


# ----------------------------------------------------------------------------- building


class ReplyInvalid(ValueError):
    """A reply that the schemas refuse: it must not leave. ``problems`` says what is wrong, one sentence each."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"this reply would not be valid: {'; '.join(self.problems)}")


#: any fixed moment: :func:`check_answerable` builds a reply only to see whether the schemas take it
_CHECK_MOMENT = datetime(2000, 1, 1).astimezone()


def check_answerable(original: Routing) -> None:
    """Refuse a Routing that no reply could carry (``Rejection(envelope_invalid)``).

    Every reply (AVL, ANL, Retour) copies the Routing as received, and must pass
    ``schemas/pec-envelope.xsd`` before it leaves; the incoming envelope is read tolerantly and
    never validated. So an attribute, an element of no namespace, an ``xsi:nil`` or an unknown
    ``xsi:type`` in the Routing would let a dossier in that relayd could never answer: intake
    must refuse it up front, not fail to build its ack after deciding. A Routing that names no one
    to answer is not refused here (no reply is built for it at all).
    """
    try:
        build_ack(original, kind="AVL", numero=None, demarche=None, now=_CHECK_MOMENT)
    except Rejection:
        return
    except ReplyInvalid as exc:
        # Lines are the reply's, not message.xml's: leave them out. Bounded, since values may be quoted.
        said = "; ".join(re.sub(r"^line \d+: ", "", p)[:200] for p in exc.problems[:3])
        raise Rejection(
            Reason.ENVELOPE_INVALID,
            f"message.xml's Routing holds what no reply can carry, so relayd could never answer this dossier "
            f"(the reply's schema, pec-envelope.xsd, says: {said}).",
        ) from None


def new_message_id(numero: str | None, kind: str, now: datetime, *, token: str | None = None) -> str:
    """A MessageId in the style of the platform's ("A-9-X3UGO4V7 5808773 Principal 2019-04-03T16:26:40").

    Ours reads ``"A-9-X3UGO4V7 relayd-<12 hex> AVL 2026-11-26T14:03:05"`` (no number when it is not
    known). ``token`` is the 12 hex digits; the builders derive it from the reply's content, and
    without one it is random.
    """
    token = token or secrets.token_hex(6)
    parts = [numero] if numero else []
    parts += [f"relayd-{token}", kind, now.strftime("%Y-%m-%dT%H:%M:%S")]
    return " ".join(parts)


def reply_routing(original: Routing, *, message_id: str) -> Routing:
    """The Routing of a reply to ``original``: Sender and Recipient swapped.

    The new Sender is the original's first Recipient (the commune's service); the new Recipient
    is the original's ``AckTo`` when present, else its Sender. The FlowType, ConversationId and
    WriteMode are kept (and each party's Attention with it); the reply asks for no ack. Raises
    ``Rejection(envelope_invalid)`` when the original names no one to answer from or to.
    """
    recipients = original.recipients.recipients if original.recipients else []
    if not recipients:
        raise Rejection(Reason.ENVELOPE_INVALID, "the envelope names no Recipient, so a reply has no Sender.")
    back_to = original.ack_to or original.sender
    if back_to is None:
        raise Rejection(Reason.ENVELOPE_INVALID, "the envelope names neither AckTo nor Sender, so a reply has no Recipient.")
    return Routing(
        message_id=message_id,
        flow_type=original.flow_type,
        sender=recipients[0].model_copy(deep=True),
        recipients=Recipients(recipients=[back_to.model_copy(deep=True)]),
        ack_required=False,
        ack_types=[],
        ack_to=None,
        conversation_id=original.conversation_id,
        write_mode=original.write_mode,
    )


def reply_routing_element(original: Routing, *, message_id: str) -> etree._Element:
    """The ``Routing`` element of a reply: the original's as received, Sender and Recipient swapped.

    Works on the element the platform sent (``Routing.source``), so that everything in it,
    known to relayd or not, goes back as it came: only ``MessageId`` is set, the Sender becomes
    the original's Recipient, the Recipient its ``AckTo`` (else its Sender), and the reply asks
    for no ack. A Routing built by relayd (no source) is written from the model. Raises
    ``Rejection(envelope_invalid)`` as :func:`reply_routing` does.
    """
    swapped = reply_routing(original, message_id=message_id)  # checks there is someone to answer
    source = original.source
    if source is None:
        return _routing_element(swapped)
    message = source.find(_pec("MessageId"))
    if message is None:
        message = etree.Element(_pec("MessageId"))
        source.insert(0, message)
    message.text = message_id
    sender = source.find(_pec("Sender"))
    recipients = source.find(_pec("Recipients"))
    recipient = recipients.find(_pec("Recipient")) if recipients is not None else None
    ack_to = source.find(_pec("AckTo"))
    back_to = ack_to if ack_to is not None else sender
    assert recipient is not None and back_to is not None  # reply_routing checked both
    new_sender = _renamed(recipient, "Sender")
    new_recipient = _renamed(back_to, "Recipient")
    if sender is not None:
        source.replace(sender, new_sender)
    else:
        source.insert(source.index(message) + 1, new_sender)
    recipients.replace(recipient, new_recipient)  # type: ignore[union-attr]
    for extra in recipients.findall(_pec("Recipient"))[1:]:  # type: ignore[union-attr]
        recipients.remove(extra)  # type: ignore[union-attr]
    for el in source.findall(_pec("AckType")) + source.findall(_pec("AckTo")):
        source.remove(el)
    required = source.find(_pec("AckRequired"))
    if required is None:
        required = etree.Element(_pec("AckRequired"))
        source.insert(source.index(recipients) + 1, required)
    required.text = "false"
    # An element of the envelope's namespace that relayd does not know was tolerated on the way
    # in; the schema that every reply passes cannot admit it (XSD 1.0 determinism), so it stays out.
    for el in list(source.iter()):
        if isinstance(el.tag, str) and etree.QName(el).namespace == NS_PEC and etree.QName(el).localname not in KNOWN_PEC_ELEMENTS:
            el.getparent().remove(el)  # type: ignore[union-attr]
    return source


def _renamed(party: etree._Element, tag: str) -> etree._Element:
    """A deep copy of ``party``'s children under a new ``tag``, as the real replier swaps them."""
    out = etree.Element(_pec(tag), nsmap=party.nsmap)
    out.text, out.tail = party.text, party.tail
    for child in party:
        out.append(copy.deepcopy(child))
    return out


def _routing_element(routing: Routing) -> etree._Element:
    """A Routing relayd knows only as a model, written in the platform's order."""
    el = etree.Element(_pec("Routing"), nsmap={"ns2": NS_PEC})
    _text(el, "MessageId", routing.message_id)
    _text(el, "FlowType", routing.flow_type)
    _text(el, "ConversationId", routing.conversation_id)
    _text(el, "WriteMode", routing.write_mode)
    if routing.sender is not None:
        _party(el, "Sender", routing.sender)
    if routing.recipients is not None:
        recipients = etree.SubElement(el, _pec("Recipients"))
        for recipient in routing.recipients.recipients:
            _party(recipients, "Recipient", recipient)
    _text(el, "AckRequired", "true" if routing.ack_required else "false")
    for ack_type in routing.ack_types:
        _text(el, "AckType", ack_type)
    if routing.ack_to is not None:
        _party(el, "AckTo", routing.ack_to)
    return el


def build_ack(
    original: Routing,
    *,
    kind: Literal["AVL", "ANL"],
    numero: str | None,
    demarche: str | None,
    rejection: Rejection | None = None,
    now: datetime | None = None,
    style: ReplyStyle = "mirror",
) -> ReplyPackage:
    """The ack of the message routed by ``original``: AVL, or ANL with ``rejection``'s code and sentence.

    ``style`` says which MessageId the envelope carries (see :data:`ReplyStyle`).

    ``numero`` and ``demarche`` are named when known and well formed; a malformed one (the very
    reason of some ANLs) is left out, and the Motif says why. Raises ``ValueError`` for an ANL
    without a rejection or an AVL with one, and ``Rejection(envelope_invalid)`` as
    :func:`reply_routing` does.
    """
    if kind not in ("AVL", "ANL"):
        raise ValueError(f"an ack is AVL or ANL, not {kind!r}")
    if (kind == "ANL") != (rejection is not None):
        raise ValueError("an ANL needs the rejection it reports, and an AVL takes none")
    moment = _moment(now)
    origin = _origin(original)
    numero = numero.strip() if numero and NUMERO_PATTERN.match(numero.strip()) else None
    demarche = demarche.strip() if demarche and _DEMARCHE.fullmatch(demarche.strip()) else None
    code = rejection.reason.value if rejection else None
    motif = _motif(rejection.detail) if rejection else None
    token = _token("ack", origin, kind, numero, demarche, code, motif, moment.isoformat(), style)
    message_id = new_message_id(numero, kind, moment, token=token)
    envelope_id = _envelope_message_id(style, origin, message_id)
    body = AckBody(kind=kind, message_id_origine=origin, numero=numero, demarche=demarche, date=moment, code=code, motif=motif)
    message = _message_xml(reply_routing_element(original, message_id=envelope_id), body, moment)
    return ReplyPackage(
        message_id=message_id,
        name=_package_name(moment, numero, demarche, kind, token),
        kind=kind,
        data=_zip([(ENVELOPE_NAME, message)], moment),
        envelope_message_id=envelope_id,
    )


def build_retour(
    original: Routing,
    *,
    numero: str,
    demarche: str,
    state: dossiers.ReturnState,
    comment: str | None,
    attachments: Sequence[Attachment],
    now: datetime | None = None,
    style: ReplyStyle = "mirror",
) -> ReplyPackage:
    """The return flow of a dossier delivered by the Aller routed by ``original``.

    Sets the dossier to ``state`` (with the platform's exact label), with ``comment`` and the
    ``attachments`` as members of the zip (see :func:`retour_member_name`). Raises
    ``ValueError`` (a pydantic ``ValidationError`` among them) for what the format refuses: a
    malformed number or démarche, a comment over 4000 characters, a bad media type...
    """
    if state not in dossiers.RETURN_STATES:
        raise ValueError(f"a Retour sets the state {' or '.join(map(repr, dossiers.RETURN_STATES))}, not {state!r}")
    numero, demarche = numero.strip(), demarche.strip()
    if not NUMERO_PATTERN.match(numero):
        raise ValueError(f"NumeroTeledemarche {numero[:40]!r} {REPLY_HINTS['NumeroTeledemarche']}")
    if not _DEMARCHE.fullmatch(demarche):
        raise ValueError(f"NumeroDemarche {demarche[:70]!r} {REPLY_HINTS['NumeroDemarche']}")
    moment = _moment(now)
    origin = _origin(original)
    members: list[tuple[str, bytes]] = []
    pieces: list[RetourAttachment] = []
    for index, attachment in enumerate(attachments, start=1):
        member = retour_member_name(numero, demarche, index, attachment.name)
        pieces.append(
            RetourAttachment(
                title=attachment.title,
                file=member,
                media_type=attachment.media_type,
                size=len(attachment.data),
                sha256=hashlib.sha256(attachment.data).hexdigest(),
            )
        )
        members.append((member, attachment.data))
    body = RetourBody(
        demarche=demarche,
        numero=numero,
        message_id_origine=origin,
        etat=RetourState(code=state, label=dossiers.LABELS[state]),
        date=moment,
        comment=comment,
        attachments=pieces,
    )
    listing = [(p.file, p.media_type, p.size, p.sha256, p.title) for p in pieces]
    token = _token("retour", origin, numero, demarche, state, body.comment, listing, moment.isoformat(), style)
    message_id = new_message_id(numero, "Retour", moment, token=token)
    envelope_id = _envelope_message_id(style, origin, message_id)
    message = _message_xml(reply_routing_element(original, message_id=envelope_id), body, moment)
    return ReplyPackage(
        message_id=message_id,
        name=_package_name(moment, numero, demarche, "Retour", token),
        kind="Retour",
        data=_zip([(ENVELOPE_NAME, message), *members], moment),
        envelope_message_id=envelope_id,
    )


def _envelope_message_id(style: ReplyStyle, origin: str, own: str) -> str:
    if style not in ("mirror", "relayd"):
        raise ValueError(f"a reply style is mirror or relayd, not {style!r}")
    return origin if style == "mirror" else own


def retour_member_name(numero: str, demarche: str, index: int, name: str) -> str:
    """``<numero>-<demarche>-retour-<index>-<safe name>``: the member that holds attachment ``index``.

    The safe name is the file's base name reduced to ASCII letters, digits, ``.``, ``_`` and ``-``
    (accents dropped, anything else turned into ``_``, at most 100 characters, extension kept).
    The index keeps two files of the same name apart.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    ascii_name = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name)
    safe = re.sub(r"[_-]*\.[_-]*", ".", re.sub(r"\.{2,}", ".", safe)).strip("._-") or "piece"
    if len(safe) > 100:
        stem, dot, ext = safe.rpartition(".")
        safe = (stem[: 99 - len(ext)] + dot + ext) if dot and len(ext) <= 10 else safe[:100]
    return f"{numero}-{demarche}-retour-{index}-{safe}"


def _moment(now: datetime | None) -> datetime:
    # Local time with its offset, as the platform writes its own dates (…+02:00).
    if now is None:
        return datetime.now().astimezone()
    return now if now.tzinfo is not None else now.astimezone()


def _origin(original: Routing) -> str:
    origin = original.message_id.strip()
    if not origin:
        raise Rejection(Reason.ENVELOPE_INVALID, "the envelope has an empty MessageId, so a reply cannot name it.")
    return origin


def _motif(detail: str) -> str:
    text = XML_UNSAFE_CHARS.sub(" ", detail).strip() or "refused"
    return text if len(text) <= MAX_MOTIF_CHARS else text[: MAX_MOTIF_CHARS - 1] + "…"


def _token(*parts: object) -> str:
    """12 hex digits that depend on every input of a reply, and on nothing else."""
    canonical = json.dumps(parts, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def _package_name(moment: datetime, numero: str | None, demarche: str | None, kind: str, token: str) -> str:
    ident = numero or "sans-numero"
    if demarche:
        ident += "-" + re.sub(r"[^A-Za-z0-9_-]", "_", demarche)
    return f"relayd.{moment.strftime('%Y-%m-%dT%H_%M_%S')}.{ident}.{kind}.{token}.zip"


def _pec(tag: str) -> str:
    return f"{{{NS_PEC}}}{tag}"


def _text(parent: etree._Element, tag: str, value: str | None) -> None:
    if value is not None:
        etree.SubElement(parent, _pec(tag)).text = value


def _party(parent: etree._Element, tag: str, party: Party) -> None:
    el = etree.SubElement(parent, _pec(tag))
    _text(el, "Country", party.country)
    if party.location is not None:
        # The platform writes every Location as Location_FR, declaring xsi on the spot.
        location = etree.SubElement(el, _pec("Location"), {f"{{{XSI_NS}}}type": "ns2:Location_FR"}, nsmap={"xsi": XSI_NS})
        _text(location, "Siret", party.location.siret)
        _text(location, "Service", party.location.service)
        _text(location, "Guichet", party.location.guichet)
    _text(el, "Attention", party.attention)


def _message_xml(routing: etree._Element, body: AckBody | RetourBody, moment: datetime) -> bytes:
    """The PEC envelope around ``routing`` and ``body``, checked against the schemas before it leaves."""
    # The reply speaks with the prefix of the envelope it answers (ns2 in DAUA, pec in DIA), so
    # that the copied xsi:type="<prefix>:Location_FR" values still resolve.
    prefix = routing.prefix if routing.prefix and etree.QName(routing).namespace == NS_PEC else "ns2"
    root = etree.Element(_pec("Message"), nsmap={prefix: NS_PEC})
    header = etree.SubElement(root, _pec("Header"))
    routing.tail = None
    for el in routing.iter():
        # An xsi:type names a type by prefix: make it name it by the reply's prefix.
        kind = el.get(f"{{{XSI_NS}}}type") if isinstance(el.tag, str) else None
        if kind and ":" in kind and el.nsmap.get(kind.split(":", 1)[0]) == NS_PEC:
            el.set(f"{{{XSI_NS}}}type", f"{prefix}:{kind.split(':', 1)[1]}")
        elif kind and ":" not in kind and el.nsmap.get(None) == NS_PEC:
            el.set(f"{{{XSI_NS}}}type", f"{prefix}:{kind}")
    header.append(routing)
    security = etree.SubElement(header, _pec("Security"))
    _text(security, "DateTime", moment.isoformat(timespec="milliseconds"))
    content = etree.SubElement(etree.SubElement(root, _pec("Body")), _pec("Content"))
    content.append(body.to_xml_tree(skip_empty=True))
    # The copied Routing may declare the business namespace it no longer uses; keep what xsi:type names.
    etree.cleanup_namespaces(root, keep_ns_prefixes=[prefix, "xsi"])
    data = _XML_DECLARATION + etree.tostring(root, encoding="UTF-8", xml_declaration=False, pretty_print=True)
    problems = explain_schema_errors(load_schema(ENVELOPE_XSD), etree.fromstring(data), hints=REPLY_HINTS)
    if problems:
        raise ReplyInvalid(problems)
    return data


def _zip(members: list[tuple[str, bytes]], moment: datetime) -> bytes:
    """A flat zip whose bytes depend on the members and ``moment`` only."""
    buffer = io.BytesIO()
    stamp = moment.timetuple()[:6]
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- reading


def read_reply(data: bytes, *, limits: PackageLimits = REPLY_LIMITS) -> Reply:
    """Read and check a reply package (an ack or a Retour), as relayd or any other party built it.

    Checks the zip (with the same guards as for incoming packages), ``message.xml`` through the
    hardened parser, the envelope and its body against the schemas, that the envelope can be
    routed (a MessageId, a Sender, a Recipient), and that the zip holds exactly ``message.xml``
    and the listed attachments, each with its ``Taille`` and ``Sha256``. Raises
    ``Rejection(return_package_invalid)`` with a readable detail (the zip or envelope fault in
    ``cause``), or ``xml_malformed`` / ``xml_forbidden`` / ``xml_too_large`` for ``message.xml``.
    """
    try:
        return _read_reply(data, limits)
    except Rejection as exc:
        if exc.reason in (Reason.RETURN_PACKAGE_INVALID, Reason.XML_MALFORMED, Reason.XML_FORBIDDEN, Reason.XML_TOO_LARGE):
            raise
        raise Rejection(Reason.RETURN_PACKAGE_INVALID, exc.detail, cause=exc.reason) from None


def _invalid(detail: str, cause: Reason | None = None) -> Rejection:
    return Rejection(Reason.RETURN_PACKAGE_INVALID, detail, cause=cause)


def _read_reply(data: bytes, limits: PackageLimits) -> Reply:
    if len(data) > limits.max_package_bytes:
        raise _invalid(f"the package is {len(data)} bytes; the limit is {limits.max_package_bytes}.", Reason.PACKAGE_TOO_LARGE)
    with open_zip(io.BytesIO(data), label="the reply package") as zf:
        infos = {info.filename: info for info in check_directory(zf, limits, label="the reply package")}
        envelope = infos.get(ENVELOPE_NAME)
        if envelope is None:
            raise _invalid("the package has no message.xml.", Reason.ENVELOPE_MISSING)
        if envelope.file_size > limits.max_xml_bytes:
            raise Rejection(Reason.XML_TOO_LARGE, f"message.xml is {envelope.file_size} bytes; the limit is {limits.max_xml_bytes}.")
        root = parse_xml(_member_bytes(zf, envelope), name="message.xml", max_bytes=limits.max_xml_bytes)
        routing, ack, retour = _read_message(root)
        listed = {a.file: a for a in retour.attachments} if retour else {}
        for name in infos:
            if name != ENVELOPE_NAME and name not in listed:
                raise _invalid(f"the package holds {name[:100]!r}, which message.xml does not list.", Reason.MEMBER_UNEXPECTED)
        members: dict[str, bytes] = {}
        for name, piece in listed.items():
            info = infos.get(name)
            if info is None:
                raise _invalid(f"message.xml lists the attachment {name!r}, which is not in the package.", Reason.MEMBER_MISSING)
            if info.file_size != piece.size:
                raise _invalid(f"the attachment {name!r} is {info.file_size} bytes; message.xml says Taille {piece.size}.")
            content = _member_bytes(zf, info)
            if hashlib.sha256(content).hexdigest() != piece.sha256:
                raise _invalid(f"the attachment {name!r} does not match the Sha256 that message.xml gives for it.")
            members[name] = content
    kind = ack.kind if ack is not None else "Retour"
    return Reply(kind=kind, routing=routing, message_id=routing.message_id.strip(), ack=ack, retour=retour, members=members)


def _member_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    buffer = bytearray()
    stream_member(zf, info, buffer.extend, label="the reply package")
    return bytes(buffer)


_BODIES = {(ACK_NS, "Accuse"): AckBody, (RETOUR_NS, "Retour"): RetourBody}


def _read_message(root: etree._Element) -> tuple[Routing, AckBody | None, RetourBody | None]:
    """The envelope's Routing and its one body, or a refusal that says what is wrong and where."""
    qname = etree.QName(root)
    if (qname.namespace, qname.localname) != (NS_PEC, "Message"):
        raise _invalid(
            f"message.xml has root {describe_element(root)}; a PEC envelope is <Message> in {NS_PEC}.", Reason.ENVELOPE_WRONG_ROOT
        )
    content = root.find(f"{_pec('Body')}/{_pec('Content')}")
    if content is None:
        raise _invalid("message.xml has no Body/Content.", Reason.ENVELOPE_INVALID)
    bodies = [child for child in content if isinstance(child.tag, str)]
    if len(bodies) != 1:
        raise _invalid(
            f"line {content.sourceline}: message.xml's Content holds {len(bodies)} elements; a reply holds one, <Accuse> or <Retour>.",
            Reason.ENVELOPE_INVALID,
        )
    body = bodies[0]
    body_name = etree.QName(body)
    model = _BODIES.get((body_name.namespace, body_name.localname))
    if model is None:
        if (body_name.namespace, body_name.localname) == (NS_PEC, "Aller"):
            raise _invalid(f"line {body.sourceline}: message.xml carries a dossier (Aller), not a reply.", Reason.ENVELOPE_INVALID)
        raise _invalid(
            f"line {body.sourceline}: message.xml's Content holds {describe_element(body)}, a body relayd does not know; "
            f"a reply holds <Accuse> ({ACK_NS}) or <Retour> ({RETOUR_NS}).",
            Reason.ENVELOPE_INVALID,
        )
    problems = explain_schema_errors(load_schema(ENVELOPE_XSD), root, hints=REPLY_HINTS)
    if problems:
        raise _invalid("message.xml: " + "; ".join(problems) + ".", Reason.ENVELOPE_INVALID)
    routing_el = root.find(f"{_pec('Header')}/{_pec('Routing')}")
    assert routing_el is not None  # the schema requires it
    try:
        routing = Routing.from_xml_tree(routing_el)
    except ValidationError as exc:
        raise _invalid("message.xml: " + "; ".join(explain_validation_error(exc, routing_el)) + ".", Reason.ENVELOPE_INVALID) from None
    try:
        parsed = model.from_xml_tree(body)
    except ValidationError as exc:
        raise _invalid("message.xml: " + "; ".join(explain_validation_error(exc, body)) + ".", Reason.ENVELOPE_INVALID) from None
    if not routing.message_id.strip():
        raise _invalid(f"line {routing_el.sourceline}: message.xml's MessageId is empty.", Reason.ENVELOPE_INVALID)
    if routing.sender is None or not (routing.recipients and routing.recipients.recipients):
        raise _invalid(
            f"line {routing_el.sourceline}: message.xml's Routing must name a Sender and a Recipient, or the platform cannot route it.",
            Reason.ENVELOPE_INVALID,
        )
    if isinstance(parsed, AckBody):
        return routing, parsed, None
    assert isinstance(parsed, RetourBody)
    return routing, None, parsed

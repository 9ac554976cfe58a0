"""pydantic-xml models of the PEC envelope (``message.xml``) as the platform sends it.

The platform publishes no XSD, so these models are tolerant: they read elements by name,
accept empty elements and every element seen in real envelopes (the DAUA package and the DIA
flow's envelope, docs/formats.md), and note in the log what they do not know instead of
refusing it. Only what relayd needs is required. What is strict is what could hurt: an element
that must appear once appears once, and every value that ends up in a file name, a log line or
a mail header is a plain, single-line token (:func:`check_envelope_tree`). See
``schemas/pec-envelope.xsd`` for the outline.
"""

from __future__ import annotations

import re

import structlog
from lxml import etree
from pydantic import PrivateAttr, SecretStr, ValidationError, field_validator
from pydantic_xml import BaseXmlModel, element

from relayd.pec.xml import local_name
from relayd.pec.zipcheck import has_unsafe_character
from relayd.rejections import Reason, Rejection

NS_PEC = "http://finances.gouv.fr/dgme/pec/message/v1"
NS_METIER = "http://finances.gouv.fr/dgme/gf/composants/teledemarchexml/donnee/metier"
NSMAP = {"ns2": NS_PEC, "": NS_METIER}

log = structlog.get_logger("relayd.envelope")

#: The default of ``validation.dossier_number``: ``A-<digit>-<6 to 12 uppercase letters or digits>``.
#: Seen: ``A-1-BEKJED`` (6, the 2012 guide), ``A-9-NKT2G5KB`` (8), ``A-0-12SVIZTIW`` (9).
DEFAULT_NUMERO_REGEX = r"^A-[0-9]-[A-Z0-9]{6,12}$"
#: What any dossier number must also be, whatever the setting: it names files and folders.
_PLAIN_NUMERO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class DossierNumbers:
    """The dossier-number rule (``validation.dossier_number``), shared by every reader and writer.

    One process-wide rule, set from the configuration when it is loaded, so that intake, returns
    and the testkit agree on what a number is. A number must also be a plain token (it names
    files), whatever the pattern says.
    """

    def __init__(self, regex: str = DEFAULT_NUMERO_REGEX):
        self.use(regex)

    def use(self, regex: str) -> None:
        """Take ``regex`` as the rule from now on (raises ``re.error`` for a broken one)."""
        self.pattern = re.compile(regex)

    def match(self, value: str) -> bool:
        """Whether ``value`` is a dossier number under the rule."""
        return bool(_PLAIN_NUMERO.fullmatch(value) and self.pattern.search(value))

    @property
    def described(self) -> str:
        """The rule, for messages."""
        if self.pattern.pattern == DEFAULT_NUMERO_REGEX:
            return "A-<digit>-<6 to 12 letters or digits>"
        return f"matching {self.pattern.pattern}"


NUMERO_PATTERN = DossierNumbers()


class _Pec(BaseXmlModel, ns="ns2", nsmap=NSMAP, search_mode="unordered"):
    """Elements of the envelope namespace."""


class _Metier(BaseXmlModel, ns="", nsmap=NSMAP, search_mode="unordered"):
    """Elements of the business (``metier``) namespace."""


class Location(_Pec, tag="Location"):
    siret: str | None = element(tag="Siret", default=None)
    service: str | None = element(tag="Service", default=None)
    guichet: str | None = element(tag="Guichet", default=None)


class Party(_Pec):
    """A ``Sender``, ``Recipient`` or ``AckTo``: a country, a location, and whom it is for."""

    country: str | None = element(tag="Country", default=None)
    location: Location | None = None
    #: seen in the DIA flow's ``Sender``
    attention: str | None = element(tag="Attention", default=None)


class Recipients(_Pec, tag="Recipients"):
    recipients: list[Party] = element(tag="Recipient", default_factory=list)


class Routing(_Pec, tag="Routing"):
    message_id: str = element(tag="MessageId")
    flow_type: str | None = element(tag="FlowType", default=None)
    sender: Party | None = element(tag="Sender", default=None)
    recipients: Recipients | None = None
    ack_required: bool = element(tag="AckRequired", default=False)
    ack_types: list[str] = element(tag="AckType", default_factory=list)
    ack_to: Party | None = element(tag="AckTo", default=None)
    #: seen in the DIA flow; a reply keeps both, so that the platform can match it
    conversation_id: str | None = element(tag="ConversationId", default=None)
    write_mode: str | None = element(tag="WriteMode", default=None)
    # The Routing element exactly as received, unknown elements included: replies copy it.
    _source: bytes | None = PrivateAttr(default=None)

    @classmethod
    def from_xml_tree(cls, root, context=None, empty_as_string=False):  # type: ignore[no-untyped-def, override]
        """Read a Routing and remember the element it came from (replies copy it whole)."""
        routing = super().from_xml_tree(root, context=context, empty_as_string=empty_as_string)
        routing.remember(root)
        return routing

    def remember(self, element: etree._Element) -> None:
        """Keep ``element`` (the Routing as received) for replies and the ledger."""
        self._source = etree.tostring(element)

    @property
    def source(self) -> etree._Element | None:
        """A fresh copy of the Routing element as received, or None for one built by relayd."""
        return etree.fromstring(self._source) if self._source is not None else None

    def to_xml(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        """The Routing as received when known (unknown elements kept), else as modelled."""
        if self._source is not None and not args and set(kwargs) <= {"encoding"}:
            return self._source.decode("utf-8") if kwargs.get("encoding") == "unicode" else self._source
        return super().to_xml(*args, **kwargs)

    @field_validator("ack_required", mode="before")
    @classmethod
    def _tolerant_bool(cls, value: object) -> object:
        # The platform's XML may pad or leave empty; an empty flag means "no".
        if isinstance(value, str):
            return value.strip() or False
        return value


class EmailConfiguration(_Pec, tag="EmailConfiguration"):
    sender: str | None = element(tag="From", default=None)
    subject: str | None = element(tag="Subject", default=None)
    body: str | None = element(tag="Body", default=None)


class Extras(_Pec, tag="Extras"):
    email: EmailConfiguration | None = None


class Header(_Pec, tag="Header"):
    routing: Routing
    extras: Extras | None = None


class Teledemarche(_Metier, tag="Teledemarche"):
    numero: str = element(tag="NumeroTeledemarche")
    # A credential for the platform's follow-up tool: SecretStr keeps it out of reprs and logs.
    password: SecretStr | None = element(tag="MotDePasse", default=None)
    suivi: str | None = element(tag="Suivi", default=None)
    date: str | None = element(tag="Date", default=None)
    platform_id: str | None = element(tag="IdentifiantPlateforme", default=None)
    email: str | None = element(tag="Email", default=None)


class Donnee(_Metier, tag="Donnee"):
    id: str = element(tag="Id")
    value: str | None = element(tag="Valeur", default=None)


class Routage(_Metier, tag="Routage"):
    donnees: list[Donnee] = element(tag="Donnee", default_factory=list)


class PieceJointe(_Metier, tag="PieceJointe"):
    title: str | None = element(tag="Intitule", default=None)
    code: str | None = element(tag="Code", default=None)
    file: str = element(tag="Fichier")


class FichierFormulaire(_Metier, tag="FichierFormulaire"):
    data_file: str = element(tag="FichierDonnees")


class Document(_Metier, tag="Document"):
    code: str | None = element(tag="Code", default=None)
    name: str | None = element(tag="Nom", default=None)
    form: FichierFormulaire


class Aller(_Pec, tag="Aller"):
    demarche: str = element(tag="NumeroDemarche", ns="")
    teledemarche: Teledemarche
    routage: Routage = Routage()
    attachments: list[PieceJointe] = element(tag="PieceJointe", default_factory=list)
    documents: list[Document] = element(tag="Document", default_factory=list)


class Content(_Pec, tag="Content"):
    """A dossier (``Aller``), or in other flows (DIA) an opaque text typed by ``xsi:type``."""

    aller: Aller | None = None


class Body(_Pec, tag="Body"):
    content: Content


class Message(_Pec, tag="Message"):
    """The whole envelope. Use :func:`read_envelope` to build one from untrusted XML."""

    header: Header
    body: Body

    @property
    def aller(self) -> Aller:
        aller = self.body.content.aller
        if aller is None:  # read_envelope refuses such an envelope; only a caller of the models meets this
            raise ValueError("this envelope carries no dossier (Aller)")
        return aller

    @property
    def numero(self) -> str:
        return self.aller.teledemarche.numero.strip()

    @property
    def demarche(self) -> str:
        return self.aller.demarche.strip()

    @property
    def message_id(self) -> str:
        return self.header.routing.message_id.strip()

    @property
    def insee(self) -> str | None:
        """The commune's INSEE code from ``Routage``, where ``Id`` is ``CodeINSEE``."""
        for donnee in self.aller.routage.donnees:
            if donnee.id.strip() == "CodeINSEE" and donnee.value:
                return donnee.value.strip()
        return None

    @property
    def recipient_siret(self) -> str | None:
        """The recipient's SIRET (``Recipients/Recipient/Location/Siret``), which routes flows without CodeINSEE."""
        recipients = self.header.routing.recipients.recipients if self.header.routing.recipients else []
        for party in recipients:
            if party.location is not None and party.location.siret and party.location.siret.strip():
                return party.location.siret.strip()
        return None

    def listed_files(self) -> list[str]:
        """Every member that the envelope names: documents first, then attachments."""
        docs = [d.form.data_file.strip() for d in self.aller.documents]
        return docs + [p.file.strip() for p in self.aller.attachments]


def read_envelope(root: etree._Element) -> Message:
    """Build a :class:`Message` from the parsed ``message.xml`` root.

    Raises :class:`Rejection` (``envelope_wrong_root``, ``envelope_invalid``,
    ``envelope_duplicate_element``, ``envelope_unsafe_value``, ``envelope_not_a_dossier`` or
    ``dossier_number_invalid``). The error never quotes secret values.
    """
    if etree.QName(root).namespace != NS_PEC or local_name(root) != "Message":
        raise Rejection(
            Reason.ENVELOPE_WRONG_ROOT,
            f"message.xml has root <{local_name(root)}>; a PEC envelope is <Message> in {NS_PEC}.",
        )
    check_envelope_tree(root)
    try:
        message = Message.from_xml_tree(root)
    except (ValidationError, ValueError) as exc:
        raise Rejection(Reason.ENVELOPE_INVALID, f"message.xml: {_missing_fields(exc)}.") from None
    routing_el = root.find(f"{{{NS_PEC}}}Header/{{{NS_PEC}}}Routing")
    if routing_el is not None:
        message.header.routing.remember(routing_el)
    if message.body.content.aller is None:
        raise Rejection(
            Reason.ENVELOPE_NOT_A_DOSSIER,
            f"message.xml (FlowType {(message.header.routing.flow_type or '?').strip()[:64]!r}) carries no Aller: "
            "it is not a télédossier, and relayd delivers télédossiers only.",
        )
    if any(d.id.strip() == "CodeINSEE" and not (d.value or "").strip() for d in message.aller.routage.donnees):
        raise Rejection(Reason.ENVELOPE_INVALID, "message.xml has a Routage/Donnee CodeINSEE without a Valeur.")
    if not message.insee and not message.recipient_siret:
        raise Rejection(
            Reason.ENVELOPE_INVALID,
            "message.xml has neither a Routage/Donnee with Id CodeINSEE nor a Recipient with a Siret to route by.",
        )
    if not message.aller.documents:
        raise Rejection(Reason.ENVELOPE_INVALID, "message.xml lists no Document.")
    if not NUMERO_PATTERN.match(message.numero):
        raise Rejection(
            Reason.DOSSIER_NUMBER_INVALID,
            f"dossier number {_shown(message.numero)} is not of the form {NUMERO_PATTERN.described}.",
        )
    return message


# ----------------------------------------------------------------------------- checks on the tree

#: Elements that say one thing: a second one would make two readers route differently.
_ONCE = {
    NS_PEC: ("Header", "Routing", "MessageId", "FlowType", "Sender", "Recipients", "AckRequired", "AckTo",
             "ConversationId", "WriteMode", "Security", "Extras", "Body", "Content", "Aller", "Country",
             "Location", "Siret", "Service", "Guichet", "Attention", "EmailConfiguration", "From", "Subject"),
    NS_METIER: ("NumeroDemarche", "Teledemarche", "NumeroTeledemarche", "MotDePasse", "Email", "Date",
                "Routage", "Id", "Valeur", "FichierFormulaire", "FichierDonnees", "Fichier"),
}
#: Elements that appear once in the whole envelope, whatever their namespace and wherever they are:
#: a reader that searches the document (``//NumeroTeledemarche``) must find the one relayd read.
_ONCE_IN_DOCUMENT = ("Header", "Routing", "MessageId", "FlowType", "Sender", "Recipients", "AckTo", "ConversationId",
                     "Content", "Aller", "NumeroDemarche", "Teledemarche", "NumeroTeledemarche", "Routage",
                     "EmailConfiguration")
_ONCE_ANYWHERE = frozenset(name for names in _ONCE.values() for name in names)
#: Where several are normal: each Recipient, AckType, Donnee, PieceJointe and Document.
#: Values that name files, queues or services: a plain token, never a path.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,99}")
_TOKENS = {"FlowType", "NumeroDemarche", "AckType", "WriteMode", "Siret", "Service", "NumeroTeledemarche", "Id"}
#: Values that reach a log line, a mail header, a file name or a reply: one line, bounded. Other
#: values (titles, the mail's body, an opaque Content) are passed on as they are.
_SINGLE_LINE = _TOKENS | {"MessageId", "ConversationId", "Country", "Guichet", "Attention", "Subject", "From", "Email",
                          "Valeur", "Fichier", "FichierDonnees"}
MAX_VALUE_CHARS = 1000
#: Known elements of the envelope's namespace; any other is tolerated and noted in the log.
KNOWN_PEC_ELEMENTS = frozenset({
    "Message", "Header", "Routing", "MessageId", "FlowType", "Sender", "Recipients", "Recipient", "Country",
    "Location", "Siret", "Service", "Guichet", "Attention", "AckRequired", "AckType", "AckTo", "ConversationId",
    "WriteMode", "Security", "Horodatage", "DateTime", "Rejeu", "NbRejeu", "Delais", "Extras",
    "EmailConfiguration", "From", "Subject", "Body", "Content", "Aller",
})


def check_envelope_tree(root: etree._Element) -> None:
    """Refuse an envelope that says one thing twice or carries an unsafe value; log unknown elements.

    Two ``CodeINSEE`` (or two ``MessageId``, ``Sender``...) are ``envelope_duplicate_element``:
    relayd would route by one and another reader by the other. A value that becomes part of a
    file name, a log line or a mail header (``AckTo``'s Service, the démarche, the number...)
    must be a plain token, and no single-line value holds a line break or control character:
    ``envelope_unsafe_value``. Values are never quoted whole (one may be a password).
    """
    unknown: set[str] = set()
    _check_once_in_document(root)
    for parent in root.iter():
        if not isinstance(parent.tag, str):
            continue
        _check_no_mixed_content(parent)
        # By local name: a copy in another namespace (or none) is a second one to a namespace-blind reader.
        seen: dict[str, int] = {}
        for child in parent:
            if isinstance(child.tag, str):
                name = etree.QName(child).localname
                seen[name] = seen.get(name, 0) + 1
        for name, count in seen.items():
            if count > 1 and name in _ONCE_ANYWHERE:
                raise Rejection(
                    Reason.ENVELOPE_DUPLICATE_ELEMENT,
                    f"line {parent.sourceline}: <{local_name(parent)}> holds {count} <{name}>; it must hold one.",
                )
        if local_name(parent) == "Recipients" and seen.get("Recipient", 0) > 1:
            raise Rejection(
                Reason.ENVELOPE_DUPLICATE_ELEMENT,
                f"line {parent.sourceline}: Recipients holds {seen['Recipient']} Recipient; relayd answers one.",
            )
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        q = etree.QName(el)
        if q.namespace == NS_PEC and q.localname not in KNOWN_PEC_ELEMENTS:
            unknown.add(q.localname[:64])
        if len(el) or el.text is None:
            continue
        _check_value(q.localname, el.text, el.sourceline)
    if unknown:
        # Tolerated: the platform may add elements; the reply copies them back untouched.
        log.info("envelope.unknown_elements", elements=sorted(unknown))


def _check_once_in_document(root: etree._Element) -> None:
    """One of each routing element in the whole document, and one ``Donnee`` whose ``Id`` is ``CodeINSEE``."""
    counts: dict[str, list[int | None]] = {}
    insee: list[int | None] = []
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        name = etree.QName(el).localname
        if name in _ONCE_IN_DOCUMENT:
            counts.setdefault(name, []).append(el.sourceline)
        if name == "Donnee" and any(etree.QName(c).localname == "Id" and (c.text or "").strip() == "CodeINSEE"
                                    for c in el if isinstance(c.tag, str)):
            insee.append(el.sourceline)
    for name, lines in counts.items():
        if len(lines) > 1:
            raise Rejection(Reason.ENVELOPE_DUPLICATE_ELEMENT,
                            f"lines {', '.join(map(str, lines[:5]))}: the envelope holds {len(lines)} <{name}>; "
                            "it must hold one.")
    if len(insee) > 1:
        raise Rejection(Reason.ENVELOPE_DUPLICATE_ELEMENT,
                        f"lines {', '.join(map(str, insee[:5]))}: the envelope holds {len(insee)} Donnee with Id "
                        "CodeINSEE; it must hold one.")


def _check_no_mixed_content(el: etree._Element) -> None:
    """Text only in elements without children: a comment or an element inside a value splits it.

    relayd reads the text before the first child; a reader of the whole text content reads
    all of it, line breaks and paths included, past every check on the value.
    """
    if not len(el):
        return
    if (el.text or "").strip() or any((child.tail or "").strip() for child in el):
        raise Rejection(Reason.ENVELOPE_UNSAFE_VALUE,
                        f"line {el.sourceline}: <{local_name(el)}> mixes text with comments or elements.")


def _check_value(name: str, text: str, line: int | None) -> None:
    if name not in _SINGLE_LINE:
        return  # a password is never checked here (nor echoed); free text is passed on as it is
    value = text.strip()
    if not value:
        return
    where = f"line {line}: <{name}>"
    if len(value) > MAX_VALUE_CHARS:
        raise Rejection(Reason.ENVELOPE_UNSAFE_VALUE, f"{where} is {len(value)} characters long; the limit is {MAX_VALUE_CHARS}.")
    # What no member name may hold either (zipcheck.UNSAFE_CATEGORIES): controls, C1 included, and invisible ones.
    if has_unsafe_character(value):
        raise Rejection(Reason.ENVELOPE_UNSAFE_VALUE,
                        f"{where} holds a line break, a control character or an invisible one (a bidi override...).")
    if name in _TOKENS and (not _TOKEN.fullmatch(value) or ".." in value):
        raise Rejection(
            Reason.ENVELOPE_UNSAFE_VALUE,
            f"{where} is {_shown(value)}; it must be a plain token (letters, digits, '.', '_', '-', '@', '+'), never a path.",
        )


def _shown(value: str) -> str:
    """A value for a message: short, quoted, control characters escaped by repr."""
    return repr(value[:40])


def _missing_fields(exc: Exception) -> str:
    """Name the fields that failed, without echoing their values."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where or 'envelope'}: {err.get('msg', 'invalid')}")
        return "; ".join(parts[:5])
    return "the envelope does not have the expected structure"

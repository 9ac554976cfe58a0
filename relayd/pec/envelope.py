"""pydantic-xml models of the PEC envelope (``message.xml``) as the platform sends it.

The platform publishes no XSD, so these models are tolerant: they read elements by name,
ignore what they do not know and accept empty elements. Only what relayd needs is
required. See docs and ``schemas/pec-envelope.xsd`` for the outline.
"""

from __future__ import annotations

import re

from lxml import etree
from pydantic import SecretStr, ValidationError, field_validator
from pydantic_xml import BaseXmlModel, element

from relayd.pec.xml import local_name
from relayd.rejections import Reason, Rejection

NS_PEC = "http://finances.gouv.fr/dgme/pec/message/v1"
NS_METIER = "http://finances.gouv.fr/dgme/gf/composants/teledemarchexml/donnee/metier"
NSMAP = {"ns2": NS_PEC, "": NS_METIER}

#: ``A-<digit>-<8 or 9 uppercase letters or digits>``, as in ``A-9-X3UGO4V7``.
NUMERO_PATTERN = re.compile(r"^A-[0-9]-[A-Z0-9]{8,9}$")


class _Pec(BaseXmlModel, ns="ns2", nsmap=NSMAP, search_mode="unordered"):
    """Elements of the envelope namespace."""


class _Metier(BaseXmlModel, ns="", nsmap=NSMAP, search_mode="unordered"):
    """Elements of the business (``metier``) namespace."""


class Location(_Pec, tag="Location"):
    siret: str | None = element(tag="Siret", default=None)
    service: str | None = element(tag="Service", default=None)
    guichet: str | None = element(tag="Guichet", default=None)


class Party(_Pec):
    """A ``Sender``, ``Recipient`` or ``AckTo``: a country and a location."""

    country: str | None = element(tag="Country", default=None)
    location: Location | None = None


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
    routage: Routage
    attachments: list[PieceJointe] = element(tag="PieceJointe", default_factory=list)
    documents: list[Document] = element(tag="Document", default_factory=list)


class Content(_Pec, tag="Content"):
    aller: Aller


class Body(_Pec, tag="Body"):
    content: Content


class Message(_Pec, tag="Message"):
    """The whole envelope. Use :func:`read_envelope` to build one from untrusted XML."""

    header: Header
    body: Body

    @property
    def aller(self) -> Aller:
        return self.body.content.aller

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

    def listed_files(self) -> list[str]:
        """Every member that the envelope names: documents first, then attachments."""
        docs = [d.form.data_file.strip() for d in self.aller.documents]
        return docs + [p.file.strip() for p in self.aller.attachments]


def read_envelope(root: etree._Element) -> Message:
    """Build a :class:`Message` from the parsed ``message.xml`` root.

    Raises :class:`Rejection` (``envelope_wrong_root``, ``envelope_invalid`` or
    ``dossier_number_invalid``). The error never quotes element values, so no secret leaks.
    """
    if etree.QName(root).namespace != NS_PEC or local_name(root) != "Message":
        raise Rejection(
            Reason.ENVELOPE_WRONG_ROOT,
            f"message.xml has root <{local_name(root)}>; a PEC envelope is <Message> in {NS_PEC}.",
        )
    try:
        message = Message.from_xml_tree(root)
    except (ValidationError, ValueError) as exc:
        raise Rejection(Reason.ENVELOPE_INVALID, f"message.xml: {_missing_fields(exc)}.") from None
    if not message.insee:
        raise Rejection(Reason.ENVELOPE_INVALID, "message.xml has no Routage/Donnee with Id CodeINSEE.")
    if not message.aller.documents:
        raise Rejection(Reason.ENVELOPE_INVALID, "message.xml lists no Document.")
    if not NUMERO_PATTERN.match(message.numero):
        raise Rejection(
            Reason.DOSSIER_NUMBER_INVALID,
            f"dossier number {message.numero[:40]!r} is not of the form A-<digit>-<8 or 9 letters or digits>.",
        )
    return message


def _missing_fields(exc: Exception) -> str:
    """Name the fields that failed, without echoing their values."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where or 'envelope'}: {err.get('msg', 'invalid')}")
        return "; ".join(parts[:5])
    return "the envelope does not have the expected structure"

"""relayd's status file: how the commune's business software asks for a state change.

The business software drops a small XML file (``schemas/relayd-statut.xsd``, ours, version 1)
in its return directory; relayd turns it into a PEC return flow (:mod:`relayd.pec.replies`).
People write these files by hand or in code, so every refusal names the line and says what is
wrong in a sentence. This module also holds :func:`explain_schema_errors`, which turns libxml2's
XSD messages into such sentences for every format of ours.

Outline (order matters, every element is in the ``urn:relayd:statut:1`` namespace)::

    <Statut xmlns="urn:relayd:statut:1" version="1">
      <NumeroTeledemarche>A-9-X3UGO4V7</NumeroTeledemarche>
      <Etat>recu | clos</Etat>
      <Commentaire>...</Commentaire>                      0..1, at most 4000 characters
      <PieceJointe>                                        0..n
        <Fichier>attestation.pdf</Fichier>                 a plain file name
        <Intitule>Attestation de recensement</Intitule>    0..1
      </PieceJointe>
      <NumeroDemarche>recensementCitoyen</NumeroDemarche>  0..1, for returns on unknown dossiers
      <CodeINSEE>75056</CodeINSEE>                         0..1, for returns on unknown dossiers
    </Statut>
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from lxml import etree
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic_xml import BaseXmlModel, attr, element

from relayd import dossiers
from relayd.pec.envelope import NUMERO_PATTERN
from relayd.pec.xml import free_text, load_schema, local_name, parse_xml
from relayd.rejections import Reason, Rejection

STATUT_NS = "urn:relayd:statut:1"
STATUT_XSD = "relayd-statut.xsd"
STATUT_VERSION = "1"
MAX_COMMENT_CHARS = 4000
MAX_TITLE_CHARS = 255
MAX_FILE_NAME_CHARS = 255
#: what file systems count: 255 "é" pass the XSD's 255 characters but name no file that can exist
MAX_FILE_NAME_BYTES = 255

XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'

# The same rules as the XSD's NomFichier, for status files built in Python.
_PLAIN_FILE_NAME = re.compile(r"[^/\\:\x00-\x1f\x7f-\x9f]*[^/\\:.\x00-\x1f\x7f-\x9f][^/\\:\x00-\x1f\x7f-\x9f]*")
_DEMARCHE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_INSEE = re.compile(r"[0-9][0-9AB][0-9]{3}")
# XML 1.0 cannot carry these at all; say so instead of failing in lxml.

#: What each element of a status file must look like, for the messages of a pattern failure.
STATUS_HINTS: Mapping[str, str] = {
    "Fichier": "must be the plain name of a file beside the status file (no '/', '\\' or ':', not '.' or '..')",
    "NumeroDemarche": "must be a démarche code (letters, digits, '.', '_' or '-', at most 64)",
    "CodeINSEE": "must be a 5-character INSEE code such as 75056 or 2A004",
}


class _Statut(BaseXmlModel, ns="", nsmap={"": STATUT_NS}):
    # The format is ours: anything unknown is an error, not something to skip.
    model_config = ConfigDict(extra="forbid")


class StatusAttachment(_Statut, tag="PieceJointe"):
    """One file to send back, named by its plain file name."""

    file: str = element(tag="Fichier")
    title: str | None = element(tag="Intitule", default=None)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if len(value) > MAX_FILE_NAME_CHARS or not _PLAIN_FILE_NAME.fullmatch(value):
            raise ValueError(f"Fichier {_quote(value)} {STATUS_HINTS['Fichier']}")
        if len(value.encode("utf-8")) > MAX_FILE_NAME_BYTES:
            raise ValueError(f"Fichier {_quote(value)} is {len(value.encode('utf-8'))} bytes long in UTF-8; "
                             f"a file name holds at most {MAX_FILE_NAME_BYTES}")
        return value

    @field_validator("title")
    @classmethod
    def _title(cls, value: str | None) -> str | None:
        return free_text(value, label="Intitule", limit=MAX_TITLE_CHARS)


class StatusFile(_Statut, tag="Statut"):
    """A parsed status file. Build one in Python and write it with :func:`write_status_file`."""

    version: Literal["1"] = attr(name="version", default=STATUT_VERSION)
    numero: str = element(tag="NumeroTeledemarche")
    state: dossiers.ReturnState = element(tag="Etat")
    comment: str | None = element(tag="Commentaire", default=None)
    attachments: list[StatusAttachment] = element(tag="PieceJointe", default_factory=list)
    demarche: str | None = element(tag="NumeroDemarche", default=None)
    insee: str | None = element(tag="CodeINSEE", default=None)

    @field_validator("numero", "state", mode="before")
    @classmethod
    def _token(cls, value: object) -> object:
        # The XSD types them as xs:token, which ignores surrounding whitespace: so does the model.
        return value.strip() if isinstance(value, str) else value

    @field_validator("numero")
    @classmethod
    def _numero(cls, value: str) -> str:
        if not NUMERO_PATTERN.match(value):
            raise ValueError(f"NumeroTeledemarche {_quote(value)} is not of the form {NUMERO_PATTERN.described}")
        return value

    @field_validator("comment")
    @classmethod
    def _comment(cls, value: str | None) -> str | None:
        # An empty <Commentaire/> is how some software says "no comment".
        return free_text(value, label="Commentaire", limit=MAX_COMMENT_CHARS)

    @field_validator("demarche", "insee", mode="before")
    @classmethod
    def _optional_token(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip() or None
        return value

    @field_validator("demarche")
    @classmethod
    def _demarche(cls, value: str | None) -> str | None:
        if value is not None and not _DEMARCHE.fullmatch(value):
            raise ValueError(f"NumeroDemarche {_quote(value)} {STATUS_HINTS['NumeroDemarche']}")
        return value

    @field_validator("insee")
    @classmethod
    def _insee(cls, value: str | None) -> str | None:
        if value is not None and not _INSEE.fullmatch(value):
            raise ValueError(f"CodeINSEE {_quote(value)} {STATUS_HINTS['CodeINSEE']}")
        return value


def read_status_file(data: bytes, *, max_bytes: int) -> StatusFile:
    """Read a status file dropped by the business software.

    Raises :class:`Rejection`: ``xml_too_large`` (checked before parsing), ``xml_malformed`` or
    ``xml_forbidden`` (the hardened parser), ``status_invalid`` (not our format; the detail names
    the line and the fault) or ``dossier_number_invalid``.
    """
    root = parse_xml(data, name="the status file", max_bytes=max_bytes)
    if etree.QName(root).namespace != STATUT_NS or local_name(root) != "Statut":
        raise Rejection(
            Reason.STATUS_INVALID,
            f"line {root.sourceline}: the root element is {describe_element(root)}; "
            f'a status file is <Statut xmlns="{STATUT_NS}" version="{STATUT_VERSION}">.',
        )
    problems = explain_schema_errors(load_schema(STATUT_XSD), root, hints=STATUS_HINTS)
    if problems:
        raise Rejection(Reason.STATUS_INVALID, _sentence(problems))
    # Checked apart from the XSD so that a bad number has its own reason code.
    numero = root.find(f"{{{STATUT_NS}}}NumeroTeledemarche")
    if numero is not None and not NUMERO_PATTERN.match((numero.text or "").strip()):
        raise Rejection(
            Reason.DOSSIER_NUMBER_INVALID,
            f"line {numero.sourceline}: NumeroTeledemarche {_quote((numero.text or '').strip())} "
            f"is not of the form {NUMERO_PATTERN.described}.",
        )
    try:
        return StatusFile.from_xml_tree(root)
    except ValidationError as exc:
        raise Rejection(Reason.STATUS_INVALID, _sentence(explain_validation_error(exc, root))) from None


def write_status_file(status: StatusFile) -> bytes:
    """Serialize ``status`` as a UTF-8 status file with an XML declaration.

    What it writes, :func:`read_status_file` reads back equal. Raises ``ValueError`` if the
    result would not validate (which the model's own checks should already prevent).
    """
    body = status.to_xml(skip_empty=True, encoding="UTF-8", xml_declaration=False, pretty_print=True)
    assert isinstance(body, bytes)
    data = XML_DECLARATION + body
    problems = explain_schema_errors(load_schema(STATUT_XSD), etree.fromstring(data), hints=STATUS_HINTS)
    if problems:
        raise ValueError(f"this status would not be valid: {_sentence(problems)}")
    return data


# ----------------------------------------------------------------------------- messages


def explain_schema_errors(
    schema: etree.XMLSchema, root: etree._Element, *, hints: Mapping[str, str] | None = None, limit: int = 3
) -> list[str]:
    """Validate ``root`` and return what is wrong, one sentence per fault ("line 3: ..."); ``[]`` if valid.

    ``hints`` says, per element local name, what a value must look like ("must be ..."), for
    pattern failures, whose raw message only quotes a regular expression.
    """
    if schema.validate(root):
        return []
    out: list[str] = []
    for error in schema.error_log:
        text = _explain(error.type_name, error.message, hints or {})
        if text is None:
            continue
        line = f"line {error.line}: {text}"
        if line not in out:
            out.append(line)
        if len(out) >= limit:
            break
    return out or ["the document does not follow its schema"]


def explain_validation_error(exc: ValidationError, root: etree._Element) -> list[str]:
    """Sentences for a model's ``ValidationError`` (what the XSD cannot say), with lines.

    ``root`` is the element the model was read from; its line stands in for checks that span
    several elements, which pydantic-xml does not place.
    """
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        ctx = err.get("ctx") or {}
        line = ctx.get("sourceline") if isinstance(ctx.get("sourceline"), int) and ctx["sourceline"] > 0 else root.sourceline
        message = str(ctx.get("orig") or err.get("msg", "invalid"))
        message = re.sub(r"^\[line -?\d+\]: ", "", message).removeprefix("Value error, ")
        where = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("{"))
        if err.get("type") not in ("value_error", "assertion_error") and where:
            message = f"{where}: {message}"
        out.append(f"line {line}: {message}")
    return out[:3] or [f"line {root.sourceline}: the document does not have the expected structure"]


def describe_element(el: etree._Element) -> str:
    """``<Name>``, with its namespace when it has one, for messages."""
    namespace = etree.QName(el).namespace
    return f"<{local_name(el)}> (namespace {namespace})" if namespace else f"<{local_name(el)}> (no namespace)"


def _sentence(problems: list[str]) -> str:
    return "; ".join(problems) + "."


def _quote(value: str, limit: int = 60) -> str:
    shown = value if len(value) <= limit else value[:limit] + "…"
    return "'" + shown.replace("\n", "\\n") + "'"


# Elements whose values a message must never repeat.
_SECRET_ELEMENTS = frozenset({"MotDePasse", "Password", "password"})

_WHERE = re.compile(r"^Element '(?:\{[^}]*\})?(?P<el>[^']+)'(?:, attribute '(?P<attr>[^']+)')?: ")
_QNAME = re.compile(r"\{[^}]*\}")


def _names(listing: str) -> str:
    names = [f"<{_QNAME.sub('', n.strip())}>" for n in listing.split(",") if n.strip()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _choices(listing: str) -> str:
    values = [f"'{v}'" for v in re.findall(r"'([^']*)'", listing)]
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def _explain(type_name: str, message: str, hints: Mapping[str, str]) -> str | None:
    """One libxml2 schema error as a sentence, or None for follow-on noise."""
    where_match = _WHERE.match(message)
    element_name = where_match.group("el") if where_match else ""
    attribute = where_match.group("attr") if where_match else None
    rest = message[where_match.end():] if where_match else message
    where = f"the attribute {attribute} of <{element_name}>" if attribute else element_name
    secret = element_name in _SECRET_ELEMENTS

    def value_of(pattern: str) -> str:
        found = re.search(pattern, rest)
        if secret:
            return "(value not shown)"
        return _quote(found.group(1)) if found else "this value"

    if type_name == "SCHEMAV_CVC_IDC":
        if rest.startswith("Warning"):
            return None
        dup = re.search(r"Duplicate key-sequence \['(.*)'\]", rest)
        if dup:
            return f"two <{element_name}> name the same file {_quote(dup.group(1))}"
    if type_name == "SCHEMAV_CVC_ENUMERATION_VALID":
        allowed = re.search(r"set \{(.*)\}", rest)
        choices = _choices(allowed.group(1)) if allowed else "one of the allowed values"
        return f"{where} must be {choices}, not {value_of(_ENUM_VALUE)}"
    if type_name == "SCHEMAV_CVC_PATTERN_VALID":
        hint = hints.get(attribute or element_name, "is not of the expected form")
        return f"{where} {hint}, not {value_of(_PATTERN_VALUE)}"
    if type_name == "SCHEMAV_CVC_MAXLENGTH_VALID":
        sizes = re.findall(r"'(\d+)'", rest)
        if len(sizes) == 2:
            return f"{where} is {sizes[0]} characters long; the limit is {sizes[1]}"
    if type_name == "SCHEMAV_CVC_MINLENGTH_VALID":
        return f"{where} must not be empty"
    if type_name.startswith("SCHEMAV_CVC_DATATYPE_VALID"):
        hint = hints.get(attribute or element_name)
        kind = re.search(r"atomic type '([^']*)'", rest)
        if hint:
            return f"{where} {hint}, not {value_of(_TYPED_VALUE)}"
        type_label = _TYPE_NAMES.get(kind.group(1) if kind else "", "value")
        return f"{where}: {value_of(_TYPED_VALUE)} is not a valid {type_label}"
    if type_name == "SCHEMAV_ELEMENT_CONTENT":
        expected = re.search(r"Expected is (?:one of )?\( (.*) \)", rest)
        if "not expected" in rest:
            if expected:
                return f"found <{element_name}> where {_names(expected.group(1))} was expected (missing, misspelt or out of order)"
            return f"<{element_name}> is not expected here (unknown, repeated or out of order)"
        if "Missing child" in rest and expected:
            return f"<{element_name}> lacks {_names(expected.group(1))}"
    if type_name == "SCHEMAV_CVC_COMPLEX_TYPE_4":
        missing = re.search(r"attribute '([^']*)' is required", rest)
        return f"<{element_name}> lacks the attribute {missing.group(1) if missing else ''}".rstrip()
    if type_name.startswith("SCHEMAV_CVC_COMPLEX_TYPE_3_2"):
        return f"<{element_name}> may not have the attribute {attribute or ''}".rstrip()
    if type_name == "SCHEMAV_CVC_COMPLEX_TYPE_2_3":
        return f"<{element_name}> may hold only elements, not text"
    if type_name in ("SCHEMAV_CVC_TYPE_3_1_2", "SCHEMAV_CVC_COMPLEX_TYPE_2_1"):
        return f"<{element_name}> may hold only text, not elements"
    if type_name == "SCHEMAV_CVC_ELT_1":
        return f"<{element_name}> is not a root element of this format"
    if secret:
        return f"<{element_name}> is not valid"
    return _QNAME.sub("", message).rstrip(".")


_ENUM_VALUE = r"value '(.*)' is not an element"
_PATTERN_VALUE = r"value '(.*)' is not accepted"
_TYPED_VALUE = r"^'(.*)' is not a valid"

_TYPE_NAMES = {
    "xs:unsignedLong": "whole number",
    "xs:dateTime": "date and time (ISO 8601, e.g. 2026-11-26T14:03:05+01:00)",
    "xs:boolean": "boolean (true or false)",
}

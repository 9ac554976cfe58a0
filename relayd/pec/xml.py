"""The one hardened XML parser that relayd uses for everything it reads.

Packages come from the network and are handed to the business software, so no XML that
relayd passes on may carry a DOCTYPE: it is how XXE and billion-laughs attacks travel,
and nothing in the platform's formats needs one.
"""

from __future__ import annotations

import codecs
import re
import sys
import threading
from pathlib import Path

from lxml import etree

from relayd.rejections import Reason, Rejection

DEFAULT_MAX_XML_BYTES = 4 * 1024 * 1024

# A DOCTYPE may hide behind a BOM, comments or processing instructions; this looks for the
# declaration anywhere in the prolog, in ASCII-compatible encodings.
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


_DOCTYPE_TEXT = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)

# UTF-16 and UTF-32 hide a DOCTYPE from the byte scan; these are the ways such a document starts.
_WIDE_STARTS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
    (b"<\x00\x00\x00", "utf-32-le"), (b"\x00\x00\x00<", "utf-32-be"),
    (b"<\x00?\x00", "utf-16-le"), (b"\x00<\x00?", "utf-16-be"),
)


def _wide_prolog(data: bytes) -> str:
    """The start of a UTF-16 or UTF-32 document as text, or "" for any other encoding."""
    for start, codec in _WIDE_STARTS:
        if data.startswith(start):
            return data[:65536].decode(codec, errors="ignore")
    return ""


def _parser() -> etree.XMLParser:
    # A fresh parser per call: lxml parsers are not safe to share across threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
    )


def parse_xml(data: bytes, *, name: str, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> etree._Element:
    """Parse untrusted XML bytes and return the root element.

    Raises :class:`Rejection` with ``xml_too_large``, ``xml_forbidden`` (any DOCTYPE or
    entity declaration), ``xml_xinclude`` (the XInclude namespace anywhere) or ``xml_malformed``. ``name`` only labels the error.
    """
    if len(data) > max_bytes:
        raise Rejection(Reason.XML_TOO_LARGE, f"{name} is {len(data)} bytes; the limit is {max_bytes}.")
    if _DOCTYPE.search(data) or _DOCTYPE_TEXT.search(_wide_prolog(data)):
        raise Rejection(Reason.XML_FORBIDDEN, f"{name} declares a DOCTYPE or an entity.")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise Rejection(Reason.XML_MALFORMED, f"{name} is not well-formed XML ({_first_line(exc)}).") from None
    tree = root.getroottree()
    # UTF-16 or other encodings slip past the byte scan above; the parsed tree cannot.
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise Rejection(Reason.XML_FORBIDDEN, f"{name} declares a DOCTYPE or an entity.")
    _check_xinclude(root, name)
    return root


#: XInclude's namespaces (1.0 and the 2003 draft): a business program that processes XInclude
#: would pull in files relayd never checked, so no XML member may mention them.
XINCLUDE_NAMESPACES = ("http://www.w3.org/2001/XInclude", "http://www.w3.org/2003/XInclude")


def _check_xinclude(root: etree._Element, name: str) -> None:
    for el in root.iter():
        if not isinstance(el.tag, str):
            continue
        if etree.QName(el).namespace in XINCLUDE_NAMESPACES or any(
            uri in XINCLUDE_NAMESPACES for uri in el.nsmap.values()
        ) or any(etree.QName(a).namespace in XINCLUDE_NAMESPACES for a in el.attrib):
            raise Rejection(Reason.XML_XINCLUDE, f"{name} uses XInclude (line {el.sourceline}).")


def local_name(element: etree._Element) -> str:
    """The element's tag without its namespace."""
    return etree.QName(element).localname


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# ----------------------------------------------------------------------------- schemas

#: Where the XSDs live: the repository's ``schemas/`` in a checkout, else the installed copy.
SCHEMA_DIRS = (
    Path(__file__).resolve().parents[2] / "schemas",
    Path(sys.prefix) / "share" / "relayd" / "schemas",
)

_XSD = "http://www.w3.org/2001/XMLSchema"
_PLAIN_XSD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.xsd")
# A compiled XMLSchema keeps its error log on itself, so two threads validating with one object
# would read each other's errors: each thread compiles and keeps its own.
_compiled = threading.local()
# libxml2 sets up its built-in schema types lazily and without a lock: two threads compiling their first
# XSD at once get "the given type 'anyURI' is not a built-in type". Compiling is rare (once per thread
# and schema), so it is done one at a time; validating with a compiled schema needs no lock.
_compiling = threading.Lock()


def load_schema(name: str) -> etree.XMLSchema:
    """The compiled XSD ``name`` (e.g. ``"relayd-statut.xsd"``) from relayd's ``schemas/`` folder.

    Looks in the repository's top-level ``schemas/``, then in ``<sys.prefix>/share/relayd/schemas``.
    Cached per thread. Loading never touches the network: the XSDs are parsed like any untrusted
    XML, and every ``xs:import``/``xs:include`` must name a file beside its schema, which is checked
    before libxml2 follows it. Raises ``FileNotFoundError`` or ``ValueError``.
    """
    cache: dict[str, etree.XMLSchema] | None = getattr(_compiled, "cache", None)
    if cache is None:
        cache = _compiled.cache = {}
    key = name if name.endswith(".xsd") else f"{name}.xsd"
    schema = cache.get(key)
    if schema is None:
        path = _schema_path(key)
        _check_schema_locations(path, seen=set())
        with _compiling:
            schema = cache[key] = etree.XMLSchema(_parse_schema_file(path))
    return schema


def _schema_path(name: str) -> Path:
    if not _PLAIN_XSD_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not the plain file name of an XSD.")
    for folder in SCHEMA_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is in none of {', '.join(str(d) for d in SCHEMA_DIRS)}.")


def _parse_schema_file(path: Path) -> etree._ElementTree:
    return etree.parse(str(path), parser=_parser())


def _check_schema_locations(path: Path, *, seen: set[Path]) -> None:
    """Refuse a schema that would make libxml2 fetch anything but a file beside it."""
    if path in seen:
        return
    seen.add(path)
    root = _parse_schema_file(path).getroot()
    for ref in root.iter(f"{{{_XSD}}}import", f"{{{_XSD}}}include", f"{{{_XSD}}}redefine"):
        location = ref.get("schemaLocation")
        if location is None:
            continue
        if not _PLAIN_XSD_NAME.fullmatch(location):
            raise ValueError(f"{path.name} refers to {location!r}; a schema may only refer to a file beside it.")
        _check_schema_locations(path.parent / location, seen=seen)


#: characters that XML 1.0 cannot carry, even escaped
XML_UNSAFE_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def free_text(value: str | None, *, label: str, limit: int) -> str | None:
    """Check a free-text field of relayd's own formats: empty means absent; bounded; XML-safe.

    Raises ValueError with a sentence naming ``label``, for pydantic validators.
    """
    if not value:
        return None
    if len(value) > limit:
        raise ValueError(f"{label} is {len(value)} characters long; the limit is {limit}")
    if XML_UNSAFE_CHARS.search(value):
        raise ValueError(f"{label} holds a control character, which XML cannot carry")
    return value

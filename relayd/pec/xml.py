"""The one hardened XML parser that relayd uses for everything it reads.

Packages come from the network and are handed to the business software, so no XML that
relayd passes on may carry a DOCTYPE: it is how XXE and billion-laughs attacks travel,
and nothing in the platform's formats needs one.
"""

from __future__ import annotations

import re

from lxml import etree

from relayd.rejections import Reason, Rejection

DEFAULT_MAX_XML_BYTES = 4 * 1024 * 1024

# A DOCTYPE may hide behind a BOM, comments or processing instructions; this looks for the
# declaration anywhere in the prolog, in ASCII-compatible encodings.
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


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
    entity declaration) or ``xml_malformed``. ``name`` only labels the error.
    """
    if len(data) > max_bytes:
        raise Rejection(Reason.XML_TOO_LARGE, f"{name} is {len(data)} bytes; the limit is {max_bytes}.")
    if _DOCTYPE.search(data):
        raise Rejection(Reason.XML_FORBIDDEN, f"{name} declares a DOCTYPE or an entity.")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise Rejection(Reason.XML_MALFORMED, f"{name} is not well-formed XML ({_first_line(exc)}).") from None
    tree = root.getroottree()
    # UTF-16 or other encodings slip past the byte scan above; the parsed tree cannot.
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise Rejection(Reason.XML_FORBIDDEN, f"{name} declares a DOCTYPE or an entity.")
    return root


def local_name(element: etree._Element) -> str:
    """The element's tag without its namespace."""
    return etree.QName(element).localname


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__

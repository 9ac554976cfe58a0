"""What a return attachment holds, checked with real parsers before it reaches the platform.

A name and a magic number prove little: ``%PDF-`` followed by HTML is a web page that a
browser will run. A PDF must open with ``pypdf`` and carry no JavaScript, no launch action,
no script link and no embedded file; an image must decode whole with Pillow, in the format its
name says, and end where its image ends.
"""

from __future__ import annotations

import bisect
import io
import logging
import re
import warnings

from relayd.rejections import Reason, Rejection

#: markers that make a browser take the bytes for a web page, whatever they start with
_HTML_MARKERS = (b"<html", b"<!doctype", b"<head", b"<body", b"<script", b"<iframe", b"<svg", b"<meta")
#: PDF names that run code or programs: JavaScript actions and name trees, launch actions, the two
#: containers that carry scripts of their own (XFA forms, rich media), and embedded files, which relayd
#: cannot check: an embedded PDF runs its own JavaScript once a /GoToE action opens it, and an embedded
#: program is one click from running
_ACTIVE_NAMES = frozenset({"/JS", "/JavaScript", "/Launch", "/XFA", "/RichMedia", "/RichMediaExecute",
                           "/EmbeddedFile", "/EmbeddedFiles", "/EF", "/FileAttachment", "/GoToE"})
_RAW_ACTIVE_NAMES = _ACTIVE_NAMES - {"/JS", "/XFA", "/EF"}
#: URI schemes that run a script or open a local file or program rather than a web page
_ACTIVE_URI = re.compile(r"\s*(javascript|vbscript|data|file):", re.IGNORECASE)
#: a PDF name token in the raw bytes; ``#xx`` escapes are decoded before comparing
_NAME_TOKEN = re.compile(rb"/[^\s/\[\]()<>{}%]+")
_MAX_PDF_OBJECTS = 100_000
#: an attachment is at most a few MB: more pixels than this is a decompression bomb
MAX_IMAGE_PIXELS = 40_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: what Pillow calls each accepted image type
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}


def check_content(name: str, ext: str, content: bytes) -> None:
    """Refuse an attachment whose content does not parse as its type, or that carries active content."""
    if ext == "pdf":
        check_pdf(name, content)
    elif ext in IMAGE_FORMATS:
        check_image(name, content, IMAGE_FORMATS[ext])


def check_pdf(name: str, content: bytes) -> None:
    """A PDF that opens with pypdf, has pages, is not HTML behind a PDF header, and runs nothing."""
    head = content[:1024].lower()
    if any(marker in head for marker in _HTML_MARKERS) or b"<script" in content.lower():
        raise Rejection(Reason.ATTACHMENT_TYPE, f"{name!r} starts like a PDF but holds HTML.")
    # Even objects no cross-reference reaches: a lenient viewer may rebuild the table and find them.
    # Not /JS nor /XFA: a few bytes that random image data holds by chance; the object walk below finds them.
    for token in _NAME_TOKEN.findall(content):
        if _decode_name(token) in _RAW_ACTIVE_NAMES:
            raise Rejection(Reason.ATTACHMENT_ACTIVE_CONTENT, f"{name!r} carries {_decode_name(token)}.")
    from pypdf import PdfReader  # imported here: only return drops need it, and it is slow to import

    # pypdf logs what it repairs; the refusal, if any, says what matters.
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    try:
        reader = PdfReader(io.BytesIO(content), strict=False)
        if reader.is_encrypted:
            raise Rejection(Reason.ATTACHMENT_UNREADABLE, f"{name!r} is an encrypted PDF, which cannot be checked.")
        if len(reader.pages) < 1:
            raise Rejection(Reason.ATTACHMENT_UNREADABLE, f"{name!r} is a PDF without pages.")
        found = _active_content(reader) or _hidden_in_object_streams(reader, content)
    except Rejection:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises many kinds for a broken file
        raise Rejection(Reason.ATTACHMENT_UNREADABLE, f"{name!r} does not open as a PDF ({type(exc).__name__}).") from None
    if found:
        raise Rejection(Reason.ATTACHMENT_ACTIVE_CONTENT, f"{name!r} carries {found}.")


def _decode_name(token: bytes) -> str:
    return re.sub(rb"#([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), token).decode("latin-1")


#: where an indirect object starts in the raw bytes: "12 0 obj"
_OBJECT_START = re.compile(rb"\d+\s+\d+\s+obj\b\s*")


def _hidden_in_object_streams(reader, content: bytes) -> str | None:
    """The first active name inside any object stream of the file, reachable or not.

    The raw scan cannot read inside compressed object streams, and the object walk sees only what
    the cross-reference reaches: an object stream nothing refers to is found where it starts, and
    decoded as a viewer rebuilding the table would decode it.
    """
    from pypdf.generic import StreamObject, read_object

    starts = [m.end() for m in _OBJECT_START.finditer(content)]
    streams = {starts[i - 1] for token in _NAME_TOKEN.finditer(content) if _decode_name(token.group()) == "/ObjStm"
               if (i := bisect.bisect_right(starts, token.start())) > 0}
    for start in sorted(streams):
        reader.stream.seek(start)
        obj = read_object(reader.stream, reader)
        if not isinstance(obj, StreamObject):
            continue
        for token in _NAME_TOKEN.findall(obj.get_data()):
            if _decode_name(token) in _RAW_ACTIVE_NAMES:
                return _decode_name(token)
    return None


def _active_content(reader) -> str | None:
    """Walk every object reachable from the trailer (object streams included); name the first active one."""
    from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject, NameObject

    stack: list[object] = [reader.trailer]
    seen: set[tuple[int, int]] = set()
    while stack:
        obj = stack.pop()
        if isinstance(obj, IndirectObject):
            key = (obj.idnum, obj.generation)
            if key in seen:
                continue
            seen.add(key)
            if len(seen) > _MAX_PDF_OBJECTS:
                raise ValueError("too many objects")
            obj = obj.get_object()
        if isinstance(obj, DictionaryObject):
            for key, value in obj.items():
                if str(key) in _ACTIVE_NAMES:
                    return str(key)
                if isinstance(value, NameObject) and str(value) in _ACTIVE_NAMES:  # /S /GoToE, /Type /EmbeddedFile...
                    return f"an action of type {value}" if str(key) == "/S" else f"{key} {value}"
                if str(key) == "/URI" and (scheme := _active_uri(value)):
                    return f"a {scheme}: link"
                if str(key) not in ("/Parent", "/P"):  # back links: reached from above anyway
                    stack.append(value)
        elif isinstance(obj, ArrayObject):
            stack.extend(obj)
    return None


def _active_uri(value: object) -> str | None:
    """The scheme of a URI action's target when it runs a script or opens a local file, else None."""
    target = value.get_object() if hasattr(value, "get_object") else value
    if isinstance(target, bytes):
        target = target.decode("latin-1")
    found = _ACTIVE_URI.match(target) if isinstance(target, str) else None
    return found.group(1).lower() if found else None


def check_image(name: str, content: bytes, expected: str) -> None:
    """An image that Pillow decodes whole, in the format its name says, of a sane pixel count."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                found = image.format
                width, height = image.size
                if found != expected:
                    raise Rejection(Reason.ATTACHMENT_TYPE, f"{name!r} is named as {expected} but is {found}.")
                if width * height > MAX_IMAGE_PIXELS:
                    raise Rejection(Reason.ATTACHMENT_UNREADABLE,
                                    f"{name!r} has {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS}.")
                image.verify()
            # verify() checks the structure only; decoding every pixel finds a truncated or corrupt body.
            with Image.open(io.BytesIO(content)) as image:
                image.load()
        # Bytes after the image's end are no image: a second file (HTML, a zip) riding along. Pillow stops
        # at the first end, so the end is found by walking the file's own structure, not by its last bytes.
        if _image_end(content, expected) != len(content):
            raise Rejection(Reason.ATTACHMENT_TYPE, f"{name!r} has data after the end of its {expected} image.")
    except Rejection:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise Rejection(Reason.ATTACHMENT_UNREADABLE,
                        f"{name!r} does not decode as {expected} ({type(exc).__name__}).") from None


def _image_end(content: bytes, kind: str) -> int | None:
    """Where the first image of ``content`` ends (after PNG's IEND chunk, JPEG's EOI marker); None if never."""
    return _png_end(content) if kind == "PNG" else _jpeg_end(content)


def _png_end(content: bytes) -> int | None:
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(content):
        length = int.from_bytes(content[pos:pos + 4], "big")
        kind = content[pos + 4:pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return pos
    return None


#: JPEG markers that stand alone, without a length: TEM and the restart markers
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_end(content: bytes) -> int | None:
    pos = 2  # after SOI
    while pos + 1 < len(content):
        if content[pos] != 0xFF:
            return None
        marker = content[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return pos + 2
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(content[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not stuffing or a restart
            while (pos := content.find(b"\xff", pos)) != -1 and pos + 1 < len(content):
                following = content[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                elif following == 0xFF:
                    pos += 1
                else:
                    break
            if pos == -1:
                return None
    return None

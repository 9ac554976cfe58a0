"""Why an input is refused: one stable code for programs, one sentence for people.

Inputs are the platform's packages and the business software's return drops. Every
refusal in relayd goes through :class:`Rejection`. The code (a :class:`Reason`) is
what the quarantine reason file, the log event and, later, the negative ack carry; the
sentence is what a person reads. The codes are part of relayd's contract with integration
testers: never rename one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable machine codes for a refused package."""

    PACKAGE_TOO_LARGE = "package_too_large"
    SESSION_UPLOAD_LIMIT = "session_upload_limit"
    DISK_LOW = "disk_low"
    ZIP_INVALID = "zip_invalid"
    ZIP_CRC_MISMATCH = "zip_crc_mismatch"
    ZIP_PATH_TRAVERSAL = "zip_path_traversal"
    ZIP_ABSOLUTE_PATH = "zip_absolute_path"
    ZIP_SYMLINK = "zip_symlink"
    ZIP_DUPLICATE_MEMBER = "zip_duplicate_member"
    ZIP_TOO_MANY_MEMBERS = "zip_too_many_members"
    ZIP_UNCOMPRESSED_TOO_LARGE = "zip_uncompressed_too_large"
    ZIP_BOMB_RATIO = "zip_bomb_ratio"
    ZIP_ENCRYPTED = "zip_encrypted"
    ZIP_UNSUPPORTED = "zip_unsupported"
    PJ_ZIP_UNSAFE = "pj_zip_unsafe"
    # One canonical zip: every reader (central directory or streaming) must see the same members.
    ZIP_LEADING_DATA = "zip_leading_data"
    ZIP_TRAILING_DATA = "zip_trailing_data"
    ZIP_MULTIPLE_END_RECORDS = "zip_multiple_end_records"
    ZIP_ZIP64 = "zip_zip64"
    ZIP_LAYOUT = "zip_layout"
    ZIP_HEADER_MISMATCH = "zip_header_mismatch"
    ZIP_SIZE_MISMATCH = "zip_size_mismatch"
    ZIP_EXTRA_FIELD = "zip_extra_field"
    ZIP_NAME_INVALID = "zip_name_invalid"
    ZIP_NAME_COLLISION = "zip_name_collision"
    ZIP_NESTED_TOO_DEEP = "zip_nested_too_deep"
    ZIP_ENTRY_TYPE = "zip_entry_type"
    EXTRACT_COLLISION = "extract_collision"
    ENVELOPE_MISSING = "envelope_missing"
    XML_FORBIDDEN = "xml_forbidden"
    XML_MALFORMED = "xml_malformed"
    XML_TOO_LARGE = "xml_too_large"
    ENVELOPE_WRONG_ROOT = "envelope_wrong_root"
    ENVELOPE_INVALID = "envelope_invalid"
    DOSSIER_NUMBER_INVALID = "dossier_number_invalid"
    MEMBER_MISSING = "member_missing"
    MEMBER_UNEXPECTED = "member_unexpected"
    DEMARCHE_NOT_ACCEPTED = "demarche_not_accepted"
    INSEE_UNKNOWN = "insee_unknown"
    INSEE_NOT_ALLOWED = "insee_not_allowed"
    DOSSIER_CONFLICT = "dossier_conflict"
    UPLOAD_INCOMPLETE = "upload_incomplete"
    UPLOAD_HOLE = "upload_hole"
    INTERNAL_ERROR = "internal_error"
    # Return drops from the business software (status files and PEC return packages).
    STATUS_INVALID = "status_invalid"
    RETURN_PACKAGE_INVALID = "return_package_invalid"
    DOSSIER_UNKNOWN = "dossier_unknown"
    RETURN_WRONG_COMMUNE = "return_wrong_commune"
    TRANSITION_INVALID = "transition_invalid"
    ATTACHMENT_MISSING = "attachment_missing"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    ATTACHMENT_TYPE = "attachment_type"
    ATTACHMENT_UNREADABLE = "attachment_unreadable"
    ATTACHMENT_ACTIVE_CONTENT = "attachment_active_content"
    DROP_NOT_REGULAR = "drop_not_regular"
    DROP_HARD_LINK = "drop_hard_link"
    TOO_MANY_ATTACHMENTS = "too_many_attachments"
    # Real-world fidelity: envelopes that say one thing twice, carry unsafe values, or route two ways.
    ENVELOPE_DUPLICATE_ELEMENT = "envelope_duplicate_element"
    ENVELOPE_UNSAFE_VALUE = "envelope_unsafe_value"
    ENVELOPE_NOT_A_DOSSIER = "envelope_not_a_dossier"
    XML_XINCLUDE = "xml_xinclude"
    SIRET_UNKNOWN = "siret_unknown"
    ROUTING_CONFLICT = "routing_conflict"

    @property
    def summary(self) -> str:
        """The generic sentence for this code, used when no detail is known."""
        return _SUMMARIES[self]


_SUMMARIES: dict[Reason, str] = {
    Reason.PACKAGE_TOO_LARGE: "The package is larger than this relay accepts.",
    Reason.SESSION_UPLOAD_LIMIT: "This session has uploaded more than this relay accepts in one session.",
    Reason.DISK_LOW: "The relay is short of disk space and takes no upload for now; send it again later.",
    Reason.ZIP_INVALID: "The file is not a complete zip archive (truncated or not a zip).",
    Reason.ZIP_CRC_MISMATCH: "A member of the zip does not match its checksum: the file is corrupt.",
    Reason.ZIP_PATH_TRAVERSAL: "A member name climbs out of the archive with '..'.",
    Reason.ZIP_ABSOLUTE_PATH: "A member name is an absolute path.",
    Reason.ZIP_SYMLINK: "A member of the zip is a symbolic link.",
    Reason.ZIP_DUPLICATE_MEMBER: "Two members of the zip have the same name.",
    Reason.ZIP_TOO_MANY_MEMBERS: "The zip has more members than this relay accepts.",
    Reason.ZIP_UNCOMPRESSED_TOO_LARGE: "The zip unpacks to more data than this relay accepts.",
    Reason.ZIP_BOMB_RATIO: "A member compresses suspiciously well (a zip bomb).",
    Reason.ZIP_ENCRYPTED: "A member of the zip is encrypted.",
    Reason.ZIP_UNSUPPORTED: "A member of the zip uses a compression method this relay does not read.",
    Reason.PJ_ZIP_UNSAFE: "The nested attachments zip is broken or unsafe.",
    Reason.ZIP_LEADING_DATA: "The zip has bytes before its first member (another archive, or junk).",
    Reason.ZIP_TRAILING_DATA: "The zip has bytes after its end record.",
    Reason.ZIP_MULTIPLE_END_RECORDS: "The zip holds more than one end record, so readers may see different archives.",
    Reason.ZIP_ZIP64: "The zip uses zip64 records, which no package of this size needs.",
    Reason.ZIP_LAYOUT: "The zip's members overlap, leave gaps, or are not where its central directory says.",
    Reason.ZIP_HEADER_MISMATCH: "A member's local header disagrees with its central directory entry.",
    Reason.ZIP_SIZE_MISMATCH: "A member's data does not have the sizes its headers declare.",
    Reason.ZIP_EXTRA_FIELD: "A member carries an extra field that renames it or is malformed.",
    Reason.ZIP_NAME_INVALID: "A member name holds control characters, backslashes, empty or '.' parts, or bad encoding.",
    Reason.ZIP_NAME_COLLISION: "Two member names are the same once case and Unicode normalisation are ignored.",
    Reason.ZIP_NESTED_TOO_DEEP: "A zip inside the nested attachments zip: only one level of nesting is accepted.",
    Reason.ZIP_ENTRY_TYPE: "A member is a device or a pipe, or a folder and a file at once, which readers take differently.",
    Reason.EXTRACT_COLLISION: "Two members would collide once extracted (a file and a folder of one name, or relayd.json).",
    Reason.ENVELOPE_MISSING: "The package has no message.xml envelope.",
    Reason.XML_FORBIDDEN: "An XML file declares a DOCTYPE or entities, which are refused.",
    Reason.XML_MALFORMED: "An XML file is not well-formed.",
    Reason.XML_TOO_LARGE: "An XML file is larger than this relay parses.",
    Reason.ENVELOPE_WRONG_ROOT: "message.xml is not a PEC Message envelope.",
    Reason.ENVELOPE_INVALID: "message.xml lacks a field the relay needs.",
    Reason.DOSSIER_NUMBER_INVALID: (
        "The dossier number is not of the form A-<digit>-<6 to 12 letters or digits> (or the configured pattern)."
    ),
    Reason.MEMBER_MISSING: "A file that the envelope lists is not in the package.",
    Reason.MEMBER_UNEXPECTED: "The package holds a file that the envelope does not list.",
    Reason.DEMARCHE_NOT_ACCEPTED: "The commune does not accept this démarche.",
    Reason.INSEE_UNKNOWN: "No commune with this INSEE code is configured on this relay.",
    Reason.INSEE_NOT_ALLOWED: "This account may not deliver for the commune with this INSEE code.",
    Reason.DOSSIER_CONFLICT: "This dossier or message was already received with different content.",
    Reason.UPLOAD_INCOMPLETE: "The upload was cut off before it was committed.",
    Reason.UPLOAD_HOLE: "A write left a gap in the file (beyond its end, or bytes never sent): uploads are written in order.",
    Reason.INTERNAL_ERROR: "relayd failed to process the package; it is kept for an operator.",
    Reason.STATUS_INVALID: "The status file does not follow relayd's status format (schemas/relayd-statut.xsd).",
    Reason.RETURN_PACKAGE_INVALID: "The return package is not a PEC package with a Retour body for one dossier.",
    Reason.DOSSIER_UNKNOWN: "This relay never received a dossier with this number.",
    Reason.RETURN_WRONG_COMMUNE: "The dossier belongs to another commune than this return directory's.",
    Reason.TRANSITION_INVALID: "The dossier cannot move to this state from its current one.",
    Reason.ATTACHMENT_MISSING: "An attachment named by the status file is not there.",
    Reason.ATTACHMENT_TOO_LARGE: "An attachment is larger than the platform accepts (1024 Ko unless configured).",
    Reason.ATTACHMENT_TYPE: "An attachment is not of an accepted type, or its content does not match its name.",
    Reason.TOO_MANY_ATTACHMENTS: "The return carries more attachments than this relay accepts.",
    Reason.ATTACHMENT_UNREADABLE: "An attachment does not open as the PDF or image its name says.",
    Reason.ATTACHMENT_ACTIVE_CONTENT: "A PDF attachment carries JavaScript, a launch action, a script link or an embedded file.",
    Reason.DROP_NOT_REGULAR: "A drop or attachment is a symbolic link or another non-regular file.",
    Reason.DROP_HARD_LINK: "A drop or attachment is a hard link to a file that has other names.",
    Reason.ENVELOPE_DUPLICATE_ELEMENT: "message.xml gives an element twice that must appear once (two CodeINSEE, two Sender...).",
    Reason.ENVELOPE_UNSAFE_VALUE: "A value of message.xml that names files or goes into logs is not a plain single-line token.",
    Reason.ENVELOPE_NOT_A_DOSSIER: "message.xml carries no Aller: it is not a télédossier.",
    Reason.XML_XINCLUDE: "An XML file uses XInclude, which is refused.",
    Reason.SIRET_UNKNOWN: "No commune with the recipient's SIRET is configured on this relay.",
    Reason.ROUTING_CONFLICT: "The envelope's CodeINSEE and its recipient's SIRET name different communes.",
}


class Rejection(Exception):
    """A package is refused: ``reason`` for programs, ``detail`` for people.

    ``detail`` must never hold a secret (no password, no ``MotDePasse``).
    """

    def __init__(self, reason: Reason, detail: str | None = None, *, cause: Reason | None = None):
        self.reason = reason
        self.detail = detail or reason.summary
        self.cause = cause
        #: the parsed envelope, when the refusal came after it was read (to address a negative ack)
        self.envelope: object | None = None
        super().__init__(f"{reason.value}: {self.detail}")

    def client_message(self) -> str:
        """What an SFTP client is told: the code and the generic sentence, never the detail."""
        return f"refused ({self.reason.value}): {self.reason.summary}"

    def as_dict(self) -> dict[str, str]:
        """The reason as the quarantine reason file and the log carry it."""
        out = {"code": self.reason.value, "message": self.detail}
        if self.cause is not None:
            out["cause"] = self.cause.value
        return out

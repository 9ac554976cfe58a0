"""Valid PEC packages (télédossiers) built to the real platform layout, for tests and testers.

The layout copies the real package in ``fixtures/real/`` and DILA's test data (see
``docs/formats.md``): a flat zip holding ``message.xml`` (the PEC envelope),
``<num>-<dem>-ent-2.xml`` (business header, not listed in the envelope), one
``-doc-<Code>-1-2.<ext>`` member per ``Document`` (the démarche's data XML is the Document coded
``flux``: ``-doc-flux-1-2.xml``), and the attachments either as one ``-pj-<Code>-1-2.zip`` nested
zip (``layout="nested"``, as in the DAUA package) or as plain files ``-<code>-<i>.<ext>``
(``layout="plain"``: ``-ji-0.pdf``, ``-jf-1.pdf``, ``-an-0.pdf``, ``-anp-1.pdf``, as in DILA's
data). Démarche codes are the real ones (``recensementCitoyen``, ``DAUA``, ``depotDossierPACS``...);
the ILE code is not known and stays :data:`ILE_CODE`. Everything is deterministic for a given
spec and seed, so a package's sha256 is stable across runs (idempotency tests rely on it).
"""

from __future__ import annotations

import io
import random
import stat
import string
import struct
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal, TypeAlias
from xml.sax.saxutils import escape

__all__ = [
    "CENSUS",
    "DEMARCHES",
    "ILE_CODE",
    "METIER_NS",
    "PEC_NS",
    "SampleSpec",
    "build_members",
    "build_package",
    "data_xml",
    "doc_member_name",
    "ent_member_name",
    "listed_members",
    "package_filename",
    "pdf_bytes",
    "dia_conversation_id",
    "dia_envelope",
    "pj_member_name",
    "plain_member_name",
    "png_bytes",
    "random_numero",
    "scan_files",
    "write_zip",
    "zip_entry",
]

PEC_NS = "http://finances.gouv.fr/dgme/pec/message/v1"
METIER_NS = "http://finances.gouv.fr/dgme/gf/composants/teledemarchexml/donnee/metier"
_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
_XS_NS = "http://www.w3.org/2001/XMLSchema"

# The real package carries "+02:00" (Paris summer time); keep the same offset by default.
_PARIS_SUMMER = timezone(timedelta(hours=2))
_DEFAULT_DEPOSIT = datetime(2019, 4, 3, 16, 26, 20, 790000, tzinfo=_PARIS_SUMMER)
# In the real package the envelope is stamped ~19.4 s after the citizen's deposit.
_SEND_DELAY = timedelta(seconds=19, milliseconds=385)

# The "-1-2" / "-ent-2" / "-2.ADER" suffixes are constant in every public sample.
_VERSION = 2

_NUMERO_CHARS = string.ascii_uppercase + string.digits
# No '&' or '<': the password must survive naive string handling in third-party tools.
_PASSWORD_CHARS = string.ascii_letters + string.digits + "@#$%*!?"

_EMAIL_BODY = """Bonjour,

Un usager a déposé un dossier destiné à votre service dans le cadre d'une démarche en ligne.

Vous pouvez trouver en pièces jointes la déclaration au format PDF, ses éventuelles pièces justificatives et le contenu de la déclaration au format XML.

Pour modifier l'état d'avancement du dossier, et transmettre d'éventuelles pièces jointes, veuillez vous connecter à l'url suivante : https://mdel.mon.service-public.fr/gsServiceInstructeur/suiviNoLogin.do
Le mot de passe nécessaire à la connexion est présent dans le fichier {numeroTeledossier}-{nomDemarche}-ent-{i}.xml.

Cordialement,
L'équipe "Suivi des démarches en ligne"

PS : ce message a été envoyé automatiquement. Merci de ne pas y répondre.
"""

#: The census démarche's code on the platform (DILA's test data).
CENSUS = "recensementCitoyen"
#: The electoral-roll démarche's code: NOT KNOWN (no public material shows it). A placeholder;
#: a commune lists the code the platform gives it.
ILE_CODE = "ILE"
#: The démarche codes seen in real material, and the placeholder for ILE. Matching is exact.
DEMARCHES = (CENSUS, "DAUA", "depotDossierPACS", "certificat-non-pacs", "EtatCivil", "JeChangeDeCoordonnees", ILE_CODE)

# The CERFA form's Document code per démarche ("12819-PDF" is real, for certificat-non-pacs;
# "cerfa_13703_DPMI" is the DAUA package's); any other démarche gets a generic form code.
_CERFA_CODES = {
    CENSUS: "10870-PDF",
    ILE_CODE: "12669-PDF",
    "DAUA": "cerfa_13703_DPMI",
    "certificat-non-pacs": "12819-PDF",
    "depotDossierPACS": "15725-PDF",
}
# The démarche data XML's Document is coded "flux", as in DILA's data.
DATA_DOCUMENT_CODE = "flux"
# Plain-file attachment codes seen in DILA's data, per démarche (others use "pj").
_PLAIN_CODES = {CENSUS: ("ji", "jf"), "depotDossierPACS": ("an", "anp"), "certificat-non-pacs": ("an", "anp")}


@dataclass(frozen=True)
class SampleSpec:
    """What varies between sample télédossiers.

    ``message_id`` and ``sent`` are optional overrides; read the resolved values through
    :attr:`effective_message_id` and :attr:`sent_at`. They stay derived under
    ``dataclasses.replace`` (so replacing ``numero`` also changes the MessageId).
    """

    numero: str = "A-9-ABCD1234"
    demarche: str = CENSUS
    insee: str = "90017"
    email: str = "usager@example.org"
    deposit: datetime = _DEFAULT_DEPOSIT
    message_id: str | None = None
    sent: datetime | None = None
    ack_required: bool = True
    ack_types: tuple[str, ...] = ("AVL", "ANL")
    #: Number of attachments (0: no PieceJointe at all).
    scans: int = 2
    #: ``nested``: the attachments in one ``-pj-`` zip; ``plain``: each a listed file ``-<code>-<i>.<ext>``.
    layout: Literal["nested", "plain"] = "nested"
    #: ``daua``: the envelope as in the real DAUA package (prefix ns2, AckTo, Security, Extras);
    #: ``dia``: with the DIA flow's routing elements (prefix pec, Sender/Attention, ConversationId,
    #: WriteMode, AckType AND/ANL/AVL, no AckTo, empty Security and Extras).
    envelope: Literal["daua", "dia"] = "daua"
    #: ``Routing/ConversationId`` (the ``dia`` envelope always has one; this overrides it).
    conversation_id: str | None = None
    #: False: no ``Routage/Donnee`` CodeINSEE, so the dossier routes by ``recipient_siret``.
    code_insee: bool = True
    #: Add the démarche data XML document (census and ILE only), coded ``flux``.
    data_document: bool = True
    #: >0 adds a listed ``Annexe`` PDF document carrying this many padding bytes.
    annex_bytes: int = 0
    #: ``random`` pads with incompressible bytes, ``zeros`` with a highly compressible run.
    annex_fill: Literal["random", "zeros"] = "random"
    sender_siret: str = "13000210800012"
    sender_service: str = "flux_GS_PEC_AVL"
    recipient_siret: str = "00000000012011"
    platform_id: str = "PSL_PART"
    email_from: str = "ne-pas-repondre@service-public.fr"

    @property
    def sent_at(self) -> datetime:
        """When the platform stamped the envelope (``Security/DateTime``)."""
        return self.sent if self.sent is not None else self.deposit + _SEND_DELAY

    @property
    def effective_message_id(self) -> str:
        """``MessageId``: the override, or one shaped like the real ``"<num> <n> Principal <time>"``."""
        if self.message_id is not None:
            return self.message_id
        n = 1_000_000 + zlib.crc32(self.numero.encode()) % 9_000_000
        return f"{self.numero} {n} Principal {self.sent_at:%Y-%m-%dT%H:%M:%S}"

    @property
    def zip_date_time(self) -> tuple[int, int, int, int, int, int]:
        """The fixed modification time given to every zip member (local time of sending)."""
        t = self.sent_at
        return (max(t.year, 1980), t.month, t.day, t.hour, t.minute, t.second)

    @property
    def prefix(self) -> str:
        """``<numero>-<demarche>``, the start of every member name but ``message.xml``."""
        return f"{self.numero}-{self.demarche}"


# --------------------------------------------------------------------------- names


def ent_member_name(spec: SampleSpec) -> str:
    """The business header member, ``<num>-<dem>-ent-2.xml``."""
    return f"{spec.prefix}-ent-{_VERSION}.xml"


def doc_member_name(spec: SampleSpec, code: str, ext: str) -> str:
    """A ``Document`` member, ``<num>-<dem>-doc-<Code>-1-2.<ext>``."""
    return f"{spec.prefix}-doc-{code}-1-{_VERSION}.{ext}"


def pj_member_name(spec: SampleSpec, code: str | None = None) -> str:
    """The nested attachments zip, ``<num>-<dem>-pj-<Code>-1-2.zip``."""
    return f"{spec.prefix}-pj-{code or _pj_code(spec)}-1-{_VERSION}.zip"


def package_filename(spec: SampleSpec) -> str:
    """The outer file name, like ``RitaGS.2019-04-03T16_26_40.674661355.A-9-X3UGO4V7-DAUA-2.ADER.ftp.zip``."""
    t = spec.sent_at
    # Nanoseconds: the real name has 9 digits; pad microseconds with stable pseudo-random ones.
    nanos = t.microsecond * 1000 + zlib.crc32(spec.numero.encode()) % 1000
    return f"RitaGS.{t:%Y-%m-%dT%H_%M_%S}.{nanos:09d}.{spec.prefix}-{_VERSION}.ADER.ftp.zip"


def plain_member_name(spec: SampleSpec, code: str, index: int, ext: str) -> str:
    """A plain-file attachment, ``<num>-<dem>-<code>-<index>.<ext>`` (e.g. ``-ji-0.pdf``)."""
    return f"{spec.prefix}-{code}-{index}.{ext}"


def random_numero(rng: random.Random) -> str:
    """A valid dossier number, ``A-<digit>-<8 uppercase letters or digits>``."""
    return f"A-{rng.randrange(10)}-{''.join(rng.choice(_NUMERO_CHARS) for _ in range(8))}"


def _pj_code(spec: SampleSpec) -> str:
    return f"Pieces_Jointes_{spec.demarche}"


# --------------------------------------------------------------------------- zip


def zip_entry(
    name: str,
    date_time: tuple[int, int, int, int, int, int],
    *,
    stored: bool = False,
) -> zipfile.ZipInfo:
    """A ZipInfo for a regular file with a fixed date, deflated unless ``stored``."""
    info = zipfile.ZipInfo(name, date_time=date_time)
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    # The real package has MS-DOS origin and zero attributes, but zipfile turns a zero
    # external_attr into 0o600: say "Unix regular file 0644" explicitly, the same on every OS.
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def write_zip(
    members: Mapping[str, bytes] | Iterable[tuple[str | zipfile.ZipInfo, bytes]],
    *,
    date_time: tuple[int, int, int, int, int, int] = (2019, 4, 3, 16, 26, 40),
    stored: Collection[str] = (),
) -> bytes:
    """Zip ``members`` (a mapping, or ``(name or ZipInfo, data)`` pairs) deterministically.

    Members are deflated unless named in ``stored``. Pairs may repeat a name on purpose
    (broken packages), so zipfile's duplicate-name warning is silenced here.
    """
    items = members.items() if isinstance(members, Mapping) else members
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in items:
                info = name if isinstance(name, zipfile.ZipInfo) else zip_entry(
                    name, date_time, stored=name in stored
                )
                zf.writestr(info, data)
    return buf.getvalue()


# --------------------------------------------------------------------------- files


def _ascii(text: str) -> str:
    # Type1 Helvetica with no encoding dictionary only shows ASCII reliably.
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _pdf_string(text: str) -> str:
    return "(" + _ascii(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def pdf_bytes(lines: Sequence[str], *, padding: bytes = b"") -> bytes:
    """A minimal valid one-page PDF 1.4 showing ``lines``, with a correct xref table.

    ``padding`` goes into an extra stream object (a "scanned image" stand-in), to make a
    large or highly compressible PDF that is still well-formed.
    """
    text_ops = ["BT", "/F1 12 Tf", "14 TL", "72 770 Td"]
    for i, line in enumerate(lines):
        text_ops.append(f"{_pdf_string(line)} Tj" if i == 0 else f"T* {_pdf_string(line)} Tj")
    text_ops.append("ET")
    content = "\n".join(text_ops).encode("ascii")

    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if padding:
        objects.append(b"<< /Length %d >>\nstream\n" % len(padding) + padding + b"\nendstream")

    # The second line's high bytes tell transfer tools the file is binary.
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def png_bytes(width: int = 16, height: int = 16, *, shade: int = 0) -> bytes:
    """A tiny valid grayscale PNG (a gradient), standing in for a phone-camera scan."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + bytes((x * 255 // max(width - 1, 1) + y * 7 + shade) % 256 for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def scan_files(spec: SampleSpec, *, seed: int = 0) -> dict[str, bytes]:
    """The attachments inside the nested ``-pj-`` zip: ``spec.scans`` small PDFs/PNGs."""
    rng = _rng(spec, seed, "scans")
    files: dict[str, bytes] = {}
    # Real inner names look like "P5PB1_Plan-Metro.pdf": a short code then a title.
    catalogue = [
        ("P5PA1_Justificatif_identite.pdf", "pdf"),
        ("P5PB1_Justificatif_domicile.png", "png"),
        ("P5PC1_Livret_de_famille.pdf", "pdf"),
        ("P5PD1_Attestation.png", "png"),
    ]
    for i in range(spec.scans):
        name, kind = catalogue[i % len(catalogue)]
        if i >= len(catalogue):
            name = f"{i:02d}_{name}"
        if kind == "pdf":
            files[name] = pdf_bytes([f"Scan {name}", f"Dossier {spec.numero}", f"ref {rng.randrange(10**6):06d}"])
        else:
            files[name] = png_bytes(shade=rng.randrange(256))
    return files


# --------------------------------------------------------------------------- démarche data XML


_Tree: TypeAlias = tuple[str, "str | Sequence[_Tree]"]


def _render(node: _Tree, depth: int = 0) -> str:
    tag, value = node
    pad = "  " * depth
    if isinstance(value, str):
        return f"{pad}<{tag}>{escape(value)}</{tag}>\n"
    inner = "".join(_render(child, depth + 1) for child in value)
    return f"{pad}<{tag}>\n{inner}{pad}</{tag}>\n"


_SURNAMES = ["MARTIN", "BERNARD", "DUBOIS", "THOMAS", "ROBERT", "RICHARD", "PETIT", "DURAND", "LEROY", "MOREAU"]
_FIRST_M = ["ALAIN", "LUCAS", "HUGO", "LOUIS", "JULES", "ADAM", "GABRIEL", "THEO"]
_FIRST_F = ["EMMA", "JADE", "LOUISE", "ALICE", "CHLOE", "LINA", "LEA", "MANON"]
_STREETS = [("RUE", "DE LA REPUBLIQUE"), ("AVENUE", "JEAN JAURES"), ("ALLEE", "DES TILLEULS"), ("PLACE", "DU MARCHE")]


def _person(rng: random.Random, *, years: int, deposit: datetime) -> dict[str, str]:
    sex = rng.choice("12")
    birth = deposit.date() - timedelta(days=365 * years + rng.randrange(300))
    return {
        "sexe": sex,
        "civilite": "M" if sex == "1" else "MME",
        "nom": rng.choice(_SURNAMES),
        "prenom": rng.choice(_FIRST_M if sex == "1" else _FIRST_F),
        "naissance": f"{birth:%d/%m/%Y}",
    }


def _address(spec: SampleSpec, rng: random.Random) -> list[_Tree]:
    kind, street = rng.choice(_STREETS)
    return [
        ("PointDeRemise", ""),
        ("Complement", ""),
        ("NumeroVoie", str(rng.randrange(1, 120))),
        ("Extension", ""),
        ("TypeVoie", kind),
        ("NomVoie", street),
        ("LieuDit", ""),
        # A plausible postal code: INSEE and postal codes differ, but share the département.
        ("CodePostal", f"{spec.insee[:2]}000"),
        ("Localite", "COMMUNE"),
        ("CodeINSEE", spec.insee),
    ]


def _birthplace(code_insee: str, name: str) -> list[_Tree]:
    return [
        ("CodeINSEENaissance", code_insee),
        ("LieuNaissance", [("Code", "COMMUNE"), ("Nom", name)]),
        ("LieuNaissance", [("Code", "AUTRE"), ("Nom", "")]),
    ]


def _filiation(tag: str) -> _Tree:
    # Parents are usually left empty in real RCO data: keep the shape, not the content.
    return (
        tag,
        [
            ("NomFamille", ""),
            ("PrenomUsuel", ""),
            ("Prenom", ""),
            ("DateNaissance", ""),
            ("PaysNaissance", ""),
            ("Nationalite", ""),
            *_birthplace("", ""),
        ],
    )


def _rco_tree(spec: SampleSpec, rng: random.Random) -> _Tree:
    p = _person(rng, years=16, deposit=spec.deposit)
    return (
        "RecensementCitoyen",
        [
            ("Convention", ""),
            (
                "Formalite",
                [
                    ("Identifiant", ""),
                    ("FormaliteType", "DECL"),
                    ("DateSoumission", f"{spec.deposit:%Y-%m-%dT%H:%M:%S}"),
                    ("FormaliteMotifCode", "RECENSEMENT"),
                    # The real file repeats the element, the second one empty.
                    ("FormaliteMotifCode", ""),
                    ("FormaliteModeCode", "AJOUT"),
                ],
            ),
            (
                "Personne",
                [
                    ("Civilite", p["civilite"]),
                    ("Sexe", p["sexe"]),
                    ("NomFamille", p["nom"]),
                    ("NomUsage", ""),
                    ("PrenomUsuel", p["prenom"]),
                    ("Prenom", ""),
                    ("DateNaissance", p["naissance"]),
                    ("PaysNaissance", "FRA"),
                    ("Nationalite", ""),
                    *_birthplace(spec.insee, "COMMUNE"),
                    ("AdresseDomicile", _address(spec, rng)),
                    (
                        "AdresseResidence",
                        [(tag, "") for tag, _ in _address(spec, rng) if tag != "CodeINSEE"],
                    ),
                    (
                        "SituationFamille",
                        [
                            ("SituationMatrimoniale", "Célibataire"),
                            ("NombreEnfants", "0"),
                            ("Pupille", ""),
                            ("NombreFrereSoeur", str(rng.randrange(4))),
                        ],
                    ),
                    ("MethodeContact", [("URI", spec.email), ("CanalCode", "EMAIL")]),
                    ("MethodeContact", [("URI", f"06{rng.randrange(10**8):08d}"), ("CanalCode", "TEL")]),
                ],
            ),
            _filiation("FiliationPere"),
            _filiation("FiliationMere"),
        ],
    )


def _ile_tree(spec: SampleSpec, rng: random.Random) -> _Tree:
    # No real ILE data XML is public: the fields follow CERFA 12669, in the RCO file's style.
    p = _person(rng, years=rng.randrange(18, 80), deposit=spec.deposit)
    return (
        "InscriptionListeElectorale",
        [
            (
                "Formalite",
                [
                    ("Identifiant", ""),
                    ("FormaliteType", "DECL"),
                    ("DateSoumission", f"{spec.deposit:%Y-%m-%dT%H:%M:%S}"),
                    ("FormaliteMotifCode", "INSCRIPTION"),
                ],
            ),
            # LG: liste générale; LCE/LCM: listes complémentaires (européennes / municipales).
            ("TypeListe", "LG"),
            (
                "Identite",
                [
                    ("Sexe", p["sexe"]),
                    ("NomFamille", p["nom"]),
                    ("NomUsage", ""),
                    ("Prenoms", p["prenom"]),
                ],
            ),
            (
                "Naissance",
                [
                    ("DateNaissance", p["naissance"]),
                    ("CommuneNaissance", "COMMUNE"),
                    ("CodeINSEENaissance", spec.insee),
                    ("DepartementNaissance", spec.insee[:2]),
                    ("PaysNaissance", "FRA"),
                ],
            ),
            ("Nationalite", [("Code", "FRA"), ("Libelle", "Française")]),
            ("Adresse", _address(spec, rng)),
            ("Contact", [("Email", spec.email), ("Telephone", "")]),
            (
                "CommunePrecedente",
                [("Nom", ""), ("CodeINSEE", ""), ("Departement", ""), ("Pays", ""), ("Consulat", "")],
            ),
            (
                "Justificatifs",
                [
                    ("JustificatifIdentite", [("Type", "CNI"), ("Numero", "")]),
                    ("JustificatifDomicile", [("Type", "FACTURE"), ("Date", "")]),
                ],
            ),
        ],
    )


def data_xml(spec: SampleSpec, *, seed: int = 0) -> bytes | None:
    """The démarche data XML (census: ``RecensementCitoyen``, ILE: ``InscriptionListeElectorale``), else None."""
    rng = _rng(spec, seed, "data")
    if spec.demarche == CENSUS:
        tree = _rco_tree(spec, rng)
    elif spec.demarche == ILE_CODE:
        tree = _ile_tree(spec, rng)
    else:
        return None
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + _render(tree)).encode("utf-8")


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class _Doc:
    code: str
    member: str
    data: bytes


def _rng(spec: SampleSpec, seed: int, purpose: str) -> random.Random:
    # String seeds hash with sha512 in random.Random: stable across processes (unlike hash()).
    return random.Random(f"relayd-sample:{seed}:{spec.numero}:{spec.demarche}:{purpose}")


def _password(spec: SampleSpec, seed: int) -> str:
    rng = _rng(spec, seed, "password")
    return "".join(rng.choice(_PASSWORD_CHARS) for _ in range(10))


def _documents(spec: SampleSpec, seed: int) -> list[_Doc]:
    cerfa = _CERFA_CODES.get(spec.demarche, f"formulaire_{spec.demarche}")
    stamp = f"{spec.deposit:%d/%m/%Y %H:%M}"
    docs = [
        _Doc(
            cerfa,
            doc_member_name(spec, cerfa, "pdf"),
            pdf_bytes([f"CERFA {cerfa}", f"Demarche {spec.demarche} - dossier {spec.numero}", f"Depose le {stamp}"]),
        ),
        _Doc(
            "recapPDF",
            doc_member_name(spec, "recapPDF", "pdf"),
            pdf_bytes([f"Recapitulatif du dossier {spec.numero}", f"Commune {spec.insee}", f"Contact {spec.email}"]),
        ),
    ]
    data = data_xml(spec, seed=seed) if spec.data_document else None
    if data is not None:
        docs.append(_Doc(DATA_DOCUMENT_CODE, doc_member_name(spec, DATA_DOCUMENT_CODE, "xml"), data))
    if spec.annex_bytes > 0:
        if spec.annex_fill == "zeros":
            padding = bytes(spec.annex_bytes)
        else:
            padding = _rng(spec, seed, "annex").randbytes(spec.annex_bytes)
        annex = pdf_bytes([f"Annexe {spec.numero}"], padding=padding)
        docs.append(_Doc("Annexe", doc_member_name(spec, "Annexe", "pdf"), annex))
    return docs


def _el(tag: str, value: str) -> str:
    return f"<{tag}>{escape(value)}</{tag}>"


def _location(siret: str, service: str, *, guichet: bool) -> str:
    return (
        f'<ns2:Location xsi:type="ns2:Location_FR" xmlns:xsi="{_XSI_NS}">'
        + _el("ns2:Siret", siret)
        + _el("ns2:Service", service)
        + ("<ns2:Guichet></ns2:Guichet>" if guichet else "")
        + "</ns2:Location>"
    )


@dataclass(frozen=True)
class _Plain:
    code: str
    title: str
    member: str
    data: bytes


def _plain_attachments(spec: SampleSpec, seed: int) -> list[_Plain]:
    """The attachments as plain listed PDF files (``layout="plain"``), codes as in DILA's data."""
    if spec.layout != "plain":
        return []
    rng = _rng(spec, seed, "plain")
    codes = _PLAIN_CODES.get(spec.demarche, ("pj",))
    out = []
    for index in range(spec.scans):
        code = codes[index % len(codes)]
        data = pdf_bytes([f"Piece {code} {index}", f"Dossier {spec.numero}", f"ref {rng.randrange(10**6):06d}"])
        out.append(_Plain(code, f"{code}-{index}", plain_member_name(spec, code, index, "pdf"), data))
    return out


def _aller_content(spec: SampleSpec, password: str, docs: Sequence[_Doc], plain: Sequence[_Plain] = ()) -> str:
    """The children shared by ``Aller`` (message.xml) and ``EnteteMetierEnveloppe`` (-ent-)."""
    parts = [
        _el("NumeroDemarche", spec.demarche),
        "<Teledemarche>",
        _el("NumeroTeledemarche", spec.numero),
        _el("MotDePasse", password),
        "<Suivi></Suivi>",
        _el("Date", spec.deposit.isoformat(timespec="milliseconds")),
        _el("IdentifiantPlateforme", spec.platform_id),
        _el("Email", spec.email),
        "</Teledemarche>",
    ]
    if spec.code_insee:
        parts += ["<Routage><Donnee>", _el("Id", "CodeINSEE"), _el("Valeur", spec.insee), "</Donnee></Routage>"]
    for piece in plain:
        parts += [
            "<PieceJointe>",
            _el("Intitule", piece.title),
            _el("Code", piece.code),
            _el("Fichier", piece.member),
            "</PieceJointe>",
        ]
    if spec.scans > 0 and spec.layout == "nested":
        code = _pj_code(spec)
        parts += [
            "<PieceJointe>",
            _el("Intitule", f"{code}_{spec.numero}.zip"),
            _el("Code", code),
            _el("Fichier", pj_member_name(spec)),
            "</PieceJointe>",
        ]
    for doc in docs:
        parts += [
            "<Document>",
            _el("Code", doc.code),
            _el("Nom", doc.code),
            "<FichierFormulaire>",
            _el("FichierDonnees", doc.member),
            "</FichierFormulaire>",
            "</Document>",
        ]
    return "".join(parts)


def _message_xml(spec: SampleSpec, aller: str) -> bytes:
    if spec.envelope == "dia":
        return _dia_message_xml(spec, aller)
    sender = _location(spec.sender_siret, spec.sender_service, guichet=True)
    acks = "".join(_el("ns2:AckType", t) for t in spec.ack_types)
    conversation = _el("ns2:ConversationId", spec.conversation_id) if spec.conversation_id else ""
    xml = (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<ns2:Message xmlns:ns2="{PEC_NS}" xmlns="{METIER_NS}">'
        "<ns2:Header><ns2:Routing>"
        + _el("ns2:MessageId", spec.effective_message_id)
        + _el("ns2:FlowType", spec.demarche)
        + conversation
        + "<ns2:Sender><ns2:Country>FR</ns2:Country>"
        + sender
        + "</ns2:Sender>"
        + "<ns2:Recipients><ns2:Recipient><ns2:Country>FR</ns2:Country>"
        + _location(spec.recipient_siret, spec.demarche, guichet=False)
        + "</ns2:Recipient></ns2:Recipients>"
        + _el("ns2:AckRequired", "true" if spec.ack_required else "false")
        + acks
        + "<ns2:AckTo><ns2:Country>FR</ns2:Country>"
        + sender
        + "</ns2:AckTo>"
        + "</ns2:Routing>"
        + "<ns2:Security>"
        + _el("ns2:Horodatage", "true")
        + _el("ns2:DateTime", spec.sent_at.isoformat(timespec="milliseconds"))
        + "<ns2:Rejeu><ns2:NbRejeu>3</ns2:NbRejeu><ns2:Delais>1</ns2:Delais></ns2:Rejeu>"
        + "</ns2:Security>"
        + "<ns2:Extras><ns2:EmailConfiguration>"
        + _el("ns2:From", spec.email_from)
        + _el("ns2:Subject", f"{spec.demarche} - {spec.numero} : dossier à traiter")
        + f'<ns2:Body xsi:type="xs:string" xmlns:xs="{_XS_NS}" xmlns:xsi="{_XSI_NS}">'
        + escape(_EMAIL_BODY)
        + "</ns2:Body>"
        + "</ns2:EmailConfiguration></ns2:Extras>"
        + "</ns2:Header>"
        + "<ns2:Body><ns2:Content><ns2:Aller>"
        + aller
        + "</ns2:Aller></ns2:Content></ns2:Body></ns2:Message>"
    )
    return xml.encode("utf-8")


def dia_conversation_id(spec: SampleSpec) -> str:
    """The ``ConversationId`` of a ``dia`` envelope: the override, or one derived from the number."""
    return spec.conversation_id or f"conv-{zlib.crc32(spec.numero.encode()):08x}-{spec.sent_at:%Y%m%d%H%M%S}"


def _dia_routing(spec: SampleSpec) -> str:
    """The DIA flow's Routing: prefix pec, Attention, ConversationId, WriteMode, AckType AND/ANL/AVL, no AckTo."""
    location = (
        f'<pec:Location xsi:type="pec:Location_FR" xmlns:xsi="{_XSI_NS}">'
        + _el("pec:Siret", "{siret}")
        + _el("pec:Service", "{service}")
        + "</pec:Location>"
    )
    return (
        "<pec:Routing>"
        + _el("pec:MessageId", spec.effective_message_id)
        + _el("pec:FlowType", spec.demarche)
        + _el("pec:ConversationId", dia_conversation_id(spec))
        + "<pec:Sender><pec:Country>FR</pec:Country>"
        + location.format(siret=spec.sender_siret, service=spec.sender_service)
        + _el("pec:Attention", "Service instructeur")
        + "</pec:Sender>"
        + "<pec:Recipients><pec:Recipient><pec:Country>FR</pec:Country>"
        + location.format(siret=spec.recipient_siret, service=spec.demarche)
        + "</pec:Recipient></pec:Recipients>"
        + _el("pec:AckRequired", "true" if spec.ack_required else "false")
        + "".join(_el("pec:AckType", t) for t in ("AND", *spec.ack_types))
        + _el("pec:WriteMode", "CREATE")
        + "</pec:Routing>"
    )


def _dia_message_xml(spec: SampleSpec, aller: str) -> bytes:
    """A dossier in an envelope with every routing element of the DIA flow."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<pec:Message xmlns:pec="{PEC_NS}" xmlns="{METIER_NS}">'
        "<pec:Header>" + _dia_routing(spec) + "<pec:Security/><pec:Extras/></pec:Header>"
        "<pec:Body><pec:Content><pec:Aller>" + aller + "</pec:Aller></pec:Content></pec:Body></pec:Message>"
    )
    return xml.encode("utf-8")


def dia_envelope(spec: SampleSpec, *, body: str = "DIA_DDI_opaque_content") -> bytes:
    """A ``message.xml`` shaped like the real DIA flow's: no Aller, a Content ``xsi:type="xs:string"``.

    Not a télédossier (relayd refuses it with ``envelope_not_a_dossier``); the schema admits it.
    """
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<pec:Message xmlns:pec="{PEC_NS}">'
        "<pec:Header>" + _dia_routing(spec) + "<pec:Security/><pec:Extras/></pec:Header>"
        f'<pec:Body><pec:Content xsi:type="xs:string" xmlns:xs="{_XS_NS}" xmlns:xsi="{_XSI_NS}">'
        + escape(body)
        + "</pec:Content></pec:Body></pec:Message>"
    )
    return xml.encode("utf-8")


def _ent_xml(aller: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        f'<EnteteMetierEnveloppe xmlns="{METIER_NS}">{aller}</EnteteMetierEnveloppe>'
    ).encode()


def build_members(spec: SampleSpec, *, seed: int = 0) -> dict[str, bytes]:
    """The package's members, in order: ``message.xml``, the ``-ent-`` header, documents, attachments.

    Every ``Fichier``/``FichierDonnees`` of ``message.xml`` names one of these members; the
    ``-ent-`` member is not listed, as in the real package. ``MotDePasse`` is random from ``seed``.
    """
    docs = _documents(spec, seed)
    plain = _plain_attachments(spec, seed)
    aller = _aller_content(spec, _password(spec, seed), docs, plain)
    members: dict[str, bytes] = {
        "message.xml": _message_xml(spec, aller),
        ent_member_name(spec): _ent_xml(aller),
    }
    for doc in docs:
        members[doc.member] = doc.data
    for piece in plain:
        members[piece.member] = piece.data
    if spec.scans > 0 and spec.layout == "nested":
        members[pj_member_name(spec)] = write_zip(scan_files(spec, seed=seed), date_time=spec.zip_date_time)
    return members


def listed_members(spec: SampleSpec, *, seed: int = 0) -> list[str]:
    """The member names that ``message.xml`` lists: every member but itself and ``-ent-``, in zip order."""
    return [n for n in build_members(spec, seed=seed) if n not in ("message.xml", ent_member_name(spec))]


def _stored_names(spec: SampleSpec) -> set[str]:
    # Random padding does not compress: store it, as a real zipper would after trying.
    if spec.annex_bytes > 0 and spec.annex_fill == "random":
        return {doc_member_name(spec, "Annexe", "pdf")}
    return set()


def build_package(spec: SampleSpec, *, seed: int = 0) -> bytes:
    """The package zip bytes (deflated, fixed dates): identical for the same spec and seed."""
    return write_zip(build_members(spec, seed=seed), date_time=spec.zip_date_time, stored=_stored_names(spec))

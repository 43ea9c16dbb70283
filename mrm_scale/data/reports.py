"""Report cleaning: keep FINDINGS + IMPRESSION, drop headers, collapse white space, keep
de-identification placeholders (``___``, ``XXXX``) as one token each.

Works on MIMIC-CXR free text (sections introduced by ``NAME:`` at a line start) and on Open-i XML
(``<AbstractText Label="FINDINGS">``). When neither section is present the whole text is kept, minus the
administrative header sections listed in :data:`HEADER_SECTIONS`.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

KEEP_SECTIONS = ("FINDINGS", "IMPRESSION")
HEADER_SECTIONS = (
    "FINAL REPORT", "EXAMINATION", "EXAM", "INDICATION", "INDICATIONS", "HISTORY", "CLINICAL HISTORY",
    "TECHNIQUE", "COMPARISON", "COMPARISONS", "REASON FOR EXAM", "REASON FOR EXAMINATION", "CLINICAL INFORMATION",
    "WET READ", "NOTIFICATION", "RECOMMENDATION(S)", "RECOMMENDATIONS", "PROCEDURE", "TYPE OF EXAMINATION",
)

# A section header: upper-case words at a line start followed by a colon, or a known section name anywhere
# (one-line reports such as "FINDINGS: ... IMPRESSION: ...").
_KNOWN = "|".join(re.escape(s) for s in sorted(KEEP_SECTIONS + HEADER_SECTIONS, key=len, reverse=True))
_SECTION_RE = re.compile(rf"(?:(?:^|\n)[ \t]*([A-Z][A-Z /()&-]{{2,40}}?)|\b({_KNOWN}))[ \t]*:", re.MULTILINE)
_TITLE_LINE_RE = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)  # MIMIC's title line, no colon
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")
_UNDERSCORES_RE = re.compile(r"_{2,}")
_XXXX_RE = re.compile(r"\b[Xx]{2,}\b")
_SPACE_RE = re.compile(r"\s+")


class ReportError(ValueError):
    """A report that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalise_placeholders(text: str) -> str:
    """``____``/``__`` → ``___`` and ``xxxx``/``XXXXX`` → ``XXXX`` so each becomes a single word."""
    text = _UNDERSCORES_RE.sub(" ___ ", text)
    return _XXXX_RE.sub("XXXX", text)


def collapse(text: str) -> str:
    return _SPACE_RE.sub(" ", text).strip()


def split_sections(text: str) -> list[tuple[str, str]]:
    """Split free text into ``(HEADER, body)`` pairs; text before the first header gets header ``""``."""
    parts: list[tuple[str, str]] = []
    matches = list(_SECTION_RE.finditer(text))
    start, name = 0, ""
    for m in matches:
        parts.append((name, text[start:m.start()]))
        name, start = (m.group(1) or m.group(2)).strip().upper(), m.end()
    parts.append((name, text[start:]))
    return [(n, b) for n, b in parts if b.strip()]


def clean_free_text(text: str) -> str:
    """Clean a free-text report (MIMIC-CXR style)."""
    sections = split_sections(_TITLE_LINE_RE.sub("", text))
    kept = [body for name, body in sections if name in KEEP_SECTIONS]
    if not kept:
        # A header section ends at its first blank line: an unlabelled body written after, say, INDICATION is
        # the report itself, not part of the header.
        kept = [_after_first_paragraph(body) if name in HEADER_SECTIONS else body for name, body in sections]
        kept = [body for body in kept if body.strip()]
        if not kept:  # only header sections: keep everything rather than nothing
            kept = [body for _, body in sections]
    return collapse(normalise_placeholders(" ".join(kept)))


def _after_first_paragraph(body: str) -> str:
    parts = _PARAGRAPH_RE.split(body.strip("\n"), maxsplit=1)
    return parts[1] if len(parts) == 2 else ""


def sections_to_text(sections: dict[str, str]) -> str:
    """Clean a report given as ``{SECTION: text}`` (Open-i XML, structured CSVs)."""
    upper = {k.upper(): (v or "") for k, v in sections.items()}
    kept = [upper[s] for s in KEEP_SECTIONS if upper.get(s, "").strip()]
    if not kept:
        kept = [v for k, v in upper.items() if k not in HEADER_SECTIONS and v.strip()]
    return collapse(normalise_placeholders(" ".join(kept)))


def decode_report_bytes(data: bytes, origin: str) -> str:
    """Decode report bytes as UTF-8 (BOM tolerated), raising :class:`ReportError` naming ``origin``."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReportError("non-utf8-report", f"{origin}: byte {e.start} is not UTF-8; re-encode the report as UTF-8") from None


def check_report(text: str | None, origin: str) -> str:
    """Return the cleaned report or raise :class:`ReportError` for an empty/missing one."""
    if text is None or (isinstance(text, float)):  # NaN from a spreadsheet export
        raise ReportError("missing-report", f"{origin}: no report text")
    if not isinstance(text, str):
        raise ReportError("non-text-report", f"{origin}: report is {type(text).__name__}, expected text")
    cleaned = clean_free_text(text)
    if not cleaned:
        raise ReportError("empty-report", f"{origin}: report is empty after cleaning")
    return cleaned


def parse_openi_xml(data: bytes, origin: str) -> tuple[str, dict[str, str], list[str]]:
    """Parse one Open-i ``ecgen-radiology`` XML: ``(report id, {SECTION: text}, [parentImage ids])``."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ReportError("corrupt-report-xml", f"{origin}: {e}") from None
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None else origin
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        sections[label] = "".join(node.itertext())
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    return report_id, sections, images

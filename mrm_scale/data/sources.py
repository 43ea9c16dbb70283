"""Corpus sources: each lists :class:`Candidate` records — an image reference, the cleaned
report and metadata — in a stable order. Images are read later, in parallel, by :mod:`mrm_scale.data.prep`.

A candidate whose report is unusable carries ``reject=(reason, detail)`` and is listed in the manifest's
``rejected`` entries instead of being dropped silently.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from .reports import ReportError, check_report, decode_report_bytes, parse_openi_xml, sections_to_text

FRONTAL_VIEWS = ("PA", "AP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
MAX_KEY = 80


class SourceError(ValueError):
    """The corpus as a whole cannot be read (missing folder, wrong columns, ...)."""


@dataclass
class Candidate:
    key: str
    image: str | None  # a file path; None for the synthetic corpus
    report: str  # cleaned report ("" when rejected)
    meta: dict = field(default_factory=dict)  # source ids, view, labels, ...
    split: str = ""  # "train" | "val" | "test" from the source; "" = assign by --val-fraction
    synthetic: tuple[int, int, int] | None = None  # (index, seed, size)
    reject: tuple[str, str] | None = None  # (reason, detail)

    @property
    def origin(self) -> str:
        return self.image or f"synthetic:{self.key}"


def make_key(text: str) -> str:
    """A WebDataset key from a path or id: no dots or slashes, at most :data:`MAX_KEY` characters."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"
    if len(key) > MAX_KEY:
        key = key[: MAX_KEY - 17] + "_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    return key


def path_key(path: str) -> str:
    """Key from the last three path components without extension (``p10000032/s5041/abc.jpg`` →
    ``p10000032_s5041_abc``); prep makes colliding keys unique."""
    parts = os.path.normpath(os.path.splitext(path)[0]).split(os.sep)
    return make_key("_".join(parts[-3:]))


def _with_report(c: Candidate, raw) -> Candidate:
    try:
        c.report = check_report(raw, c.origin)
    except ReportError as e:
        c.reject = (e.reason, e.detail)
    return c


def _split_name(value: str) -> str:
    v = (value or "").strip().lower()
    return {"validate": "val", "validation": "val", "valid": "val", "dev": "val"}.get(v, v)


# ---------------------------------------------------------------------------------------------- synthetic

def list_synthetic(num: int, seed: int, size: int) -> list[Candidate]:
    from . import synthetic

    out = []
    for i in range(num):
        report, labels, meta = synthetic.make_report(i, seed)
        c = Candidate(key=synthetic.record_key(i), image=None, report="", synthetic=(i, seed, size),
                      meta={"source": {"synthetic_index": i, "seed": seed}, "view": meta.get("view", "PA"),
                            "labels": labels, "findings": meta.get("findings", [])})
        out.append(_with_report(c, report))
    return out


# ---------------------------------------------------------------------------------------------- csv/jsonl

def _resolve(path: str, root: str) -> str:
    path = os.path.expanduser(str(path).strip())
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(root, path))


def _table_rows(path: str, kind: str) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if kind == "csv":
        for n, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2):
            yield n, row
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{n}: not a JSON object ({e}); each line of a .jsonl file must be one") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def list_table(path: str, kind: str, image_column: str, report_column: str, image_root: str | None) -> list[Candidate]:
    """A CSV or JSONL manifest with an image path column and a report text column."""
    if not os.path.isfile(path):
        raise SourceError(f"{path}: --input file not found")
    root = image_root or os.path.dirname(os.path.abspath(path))
    out = []
    for n, row in _table_rows(path, kind):
        if n <= 2 and (image_column not in row or report_column not in row):
            raise SourceError(
                f"{path}: columns {sorted(row)} lack {image_column!r} or {report_column!r}; "
                "name them with --image-column / --report-column")
        bad = _malformed_row(row, path, n, kind, report_column)
        if bad:
            out.append(Candidate(key=make_key(f"row{n}"), image=f"{path}:{n}", report="", reject=bad))
            continue
        img = row.get(image_column)
        if img is None or str(img).strip() == "":
            out.append(Candidate(key=make_key(f"row{n}"), image=f"{path}:{n}", report="",
                                 reject=("missing-image-path", f"{path}:{n}: empty {image_column!r}")))
            continue
        image = _resolve(img, root)
        extra = {k: v for k, v in row.items() if k not in (image_column, report_column)}
        c = Candidate(key=path_key(image), image=image, report="",
                      split=_split_name(str(extra.pop("split", "") or "")),
                      meta={"source": {"table": os.path.basename(path), "row": n, "image_path": str(img)},
                            "view": str(extra.pop("view", "") or "")})
        if extra:
            c.meta["columns"] = extra
        raw = row.get(report_column)
        if isinstance(raw, str) and raw.strip().lower() in ("nan", "none", "null"):
            raw = ""
        out.append(_with_report(c, raw))
    return out


def _not_utf8(value) -> bool:
    """True for text that came from bytes that are not UTF-8 (decoded with ``surrogateescape``)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _malformed_row(row: dict, path: str, n: int, kind: str, report_column: str) -> tuple[str, str] | None:
    """Why a table row cannot be read faithfully, or None. A CSV row with more fields than the header (an
    unquoted comma in a report) would otherwise cut the report at the comma."""
    if kind == "csv" and None in row:
        return ("malformed-row", f"{path}:{n}: {len(row) - 1 + len(row[None])} fields but the header names "
                                 f"{len(row) - 1}; quote fields that contain commas (e.g. the report) and re-run")
    for col, value in row.items():
        if _not_utf8(col) or _not_utf8(value):
            if col == report_column:
                return ("non-utf8-report", f"{path}:{n}: report is not valid UTF-8; re-encode the file as UTF-8")
            name = col.encode("utf-8", "replace").decode() if isinstance(col, str) else col
            return ("non-utf8-field", f"{path}:{n}: column {name!r} is not valid UTF-8; re-encode the file as UTF-8")
    return None


# ---------------------------------------------------------------------------------------------- mimic-cxr

def _open_maybe_gz(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def _find(root: str, names: list[str]) -> str | None:
    for name in names:
        for p in (os.path.join(root, name), os.path.join(root, name + ".gz")):
            if os.path.isfile(p):
                return p
    return None


def list_mimic(root: str, report_root: str | None, views: str) -> tuple[list[Candidate], dict]:
    """MIMIC-CXR-JPG: ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``, reports ``files/pXX/pSUBJECT/sSTUDY.txt``."""
    if not os.path.isdir(root):
        raise SourceError(f"{root}: --input folder not found (expected the MIMIC-CXR-JPG root with files/)")
    split_csv = _find(root, ["mimic-cxr-2.0.0-split.csv"])
    if split_csv is None:
        raise SourceError(f"{root}: mimic-cxr-2.0.0-split.csv(.gz) not found in the MIMIC-CXR-JPG root")
    views_by_dicom = {}
    meta_csv = _find(root, ["mimic-cxr-2.0.0-metadata.csv"])
    if meta_csv:
        with _open_maybe_gz(meta_csv) as f:
            views_by_dicom = {r["dicom_id"]: (r.get("ViewPosition") or "") for r in csv.DictReader(f)}
    report_root = report_root or root
    out, excluded = [], {"test-split": 0, "non-frontal": 0}
    with _open_maybe_gz(split_csv) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        dicom, study, subject = r["dicom_id"], r["study_id"], r["subject_id"]
        split = _split_name(r.get("split", ""))
        if split == "test":
            excluded["test-split"] += 1
            continue
        view = views_by_dicom.get(dicom, "")
        if views == "frontal" and view and view.upper() not in FRONTAL_VIEWS:
            excluded["non-frontal"] += 1
            continue
        sub_dir = os.path.join("files", f"p{subject[:2]}", f"p{subject}")
        image = os.path.join(root, sub_dir, f"s{study}", f"{dicom}.jpg")
        c = Candidate(key=make_key(f"s{study}_{dicom}"), image=image, report="", split=split,
                      meta={"source": {"subject_id": subject, "study_id": study, "dicom_id": dicom}, "view": view})
        report_path = os.path.join(report_root, sub_dir, f"s{study}.txt")
        try:
            with open(report_path, "rb") as rf:
                raw = decode_report_bytes(rf.read(), report_path)
            out.append(_with_report(c, raw))
        except FileNotFoundError:
            c.reject = ("missing-report", f"{report_path}: report file not found; pass --report-root")
            out.append(c)
        except ReportError as e:
            c.reject = (e.reason, e.detail)
            out.append(c)
    return out, excluded


# ---------------------------------------------------------------------------------------------- open-i

def _openi_xml_files(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every report XML in a folder (``ecgen-radiology/*.xml`` or ``*.xml``) or a .tgz."""
    if os.path.isfile(path) and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar if m.isreg() and m.name.endswith(".xml")), key=lambda m: m.name)
            for m in members:
                yield m.name, tar.extractfile(m).read()
        return
    if not os.path.isdir(path):
        raise SourceError(f"{path}: --input must be the Open-i report folder (ecgen-radiology/) or its .tgz")
    files = sorted(glob.glob(os.path.join(path, "ecgen-radiology", "*.xml")) or glob.glob(os.path.join(path, "*.xml")))
    if not files:
        raise SourceError(f"{path}: no ecgen-radiology/*.xml report files found")
    for p in files:
        with open(p, "rb") as f:
            yield p, f.read()


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_openi(path: str, image_root: str | None, metadata: str | None, views: str) -> tuple[list[Candidate], dict]:
    """Open-i / IU X-ray: one candidate per ``parentImage`` of every report XML."""
    if image_root is None or not os.path.isdir(image_root):
        raise SourceError(f"--image-root {image_root!r}: folder of the Open-i PNG images not found")
    view_of = {}
    if metadata:
        with _open_maybe_gz(metadata) as f:
            view_of = {r["imageid"]: (r.get("View Position") or "") for r in csv.DictReader(f)}
    available = {}
    for name in sorted(os.listdir(image_root)):  # sorted: with X.jpg and X.png both there, the same one wins on every machine
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_SUFFIXES:
            available.setdefault(stem, os.path.join(image_root, name))
    out, excluded = [], {"non-frontal": 0, "no-images-in-report": 0}
    for name, data in sorted(_openi_xml_files(path), key=lambda t: _natural(t[0])):
        try:
            report_id, sections, images = parse_openi_xml(data, name)
            text = sections_to_text(sections)
        except ReportError as e:
            out.append(Candidate(key=make_key(os.path.basename(name)), image=name, report="", reject=(e.reason, e.detail)))
            continue
        if not images:
            excluded["no-images-in-report"] += 1
        for image_id in images:
            view = view_of.get(image_id, "")
            if views == "frontal" and view and view.upper() not in FRONTAL_VIEWS:
                excluded["non-frontal"] += 1
                continue
            image = available.get(image_id, os.path.join(image_root, image_id + ".png"))
            c = Candidate(key=make_key(image_id), image=image, report="",
                          meta={"source": {"report_id": report_id, "image_id": image_id, "xml": os.path.basename(name)},
                                "view": view})
            out.append(_with_report(c, text))
    return out, excluded

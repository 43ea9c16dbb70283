"""Corpus sources: each lists :class:`Candidate` records — an image reference, the cleaned
report and metadata — in a stable order. Images are read later, in parallel, by :mod:`mrm_scale.data.prep`.

A candidate whose report is unusable carries ``reject=(reason, detail)`` and is listed in the manifest's
``rejected`` entries instead of being dropped silently.
"""

from __future__ import annotations

import ast
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
    group: str = ""  # records that must share a split (the patient); "" = the key alone
    pixel: dict | None = None  # how to window a 16-bit image: {"center", "width"} from its DICOM fields

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


def _empty_image_column(path: str, n: int, column: str) -> Candidate:
    """The rejected candidate of table row ``n`` whose image column is empty."""
    return Candidate(key=make_key(f"row{n}"), image=f"{path}:{n}", report="",
                     reject=("missing-image-path", f"{path}:{n}: empty {column!r}"))


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


def table_rows(path: str, kind: str) -> Iterator[tuple[int, dict]]:
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
    for n, row in table_rows(path, kind):
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
            out.append(_empty_image_column(path, n, image_column))
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


# ---------------------------------------------------------------------------------------------- helpers of
# the tabular corpora below (CheXpert Plus, PadChest, ReXGradient)

def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or \
        (isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null"))


def _text(value) -> str:
    return "" if _blank(value) else str(value)


def _read_csv(path: str, what: str, need: tuple[str, ...]) -> list[dict]:
    if not os.path.isfile(path):
        raise SourceError(f"{path}: --input {what} not found")
    with _open_maybe_gz(path) as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise SourceError(f"{path}: columns {', '.join(missing)} missing (found {', '.join(reader.fieldnames or [])}); "
                              f"--input must be the {what}")
        return list(reader)


def _first_existing(paths: list[str]) -> str:
    for p in paths:
        if os.path.isfile(p):
            return p
    return paths[0]


def _is_frontal(view: str) -> bool | None:
    """True/False for a known view, None when unknown (kept by ``--views frontal``)."""
    v = view.strip().upper().replace("-", "_")
    if not v or v in ("UNK", "UNKNOWN", "NONE", "NAN"):
        return None
    return v.split()[0] in ("PA", "AP", "AP_HORIZONTAL", "POSTERO_ANTERIOR", "ANTERO_POSTERIOR", "FRONTAL")


def _window_hint(row: dict, center_col: str, width_col: str) -> dict | None:
    """The first DICOM window (``WindowCenter`` / ``WindowWidth``, maybe ``[a, b]`` lists) of a row."""
    def first(v):
        if _blank(v):
            return None
        try:
            x = ast.literal_eval(str(v).strip())
        except (ValueError, SyntaxError):
            return None
        x = x[0] if isinstance(x, (list, tuple)) and x else x
        return float(x) if isinstance(x, (int, float)) else None
    c, w = first(row.get(center_col)), first(row.get(width_col))
    return {"center": c, "width": w} if c is not None and w and w > 0 else None


# ---------------------------------------------------------------------------------------------- chexpert plus

CHEXPERT_PLUS_COLUMNS = ("path_to_image", "report")


def list_chexpert_plus(path: str, image_root: str | None, views: str) -> tuple[list[Candidate], dict]:
    """CheXpert Plus: ``df_chexpert_plus_240401.csv`` (one row per image: ``path_to_image``, ``path_to_dcm``,
    ``frontal_lateral``, ``ap_pa``, ``deid_patient_id``, ``report`` and its ``section_*`` columns, ``split``) and the
    PNG release (the CSV names ``.jpg``; the files are ``.png``, under ``PNG/PNG/`` once unzipped) or the DICOMs."""
    rows = _read_csv(path, "CheXpert Plus report CSV (df_chexpert_plus_*.csv)", CHEXPERT_PLUS_COLUMNS)
    root = image_root or os.path.dirname(os.path.abspath(path))
    bases = [root, os.path.join(root, "PNG", "PNG"), os.path.join(root, "PNG")]
    out, excluded = [], {"non-frontal": 0}
    for n, r in enumerate(rows, start=2):
        rel = _text(r.get("path_to_image")).strip()
        if not rel:
            out.append(_empty_image_column(path, n, "path_to_image"))
            continue
        frontal_lateral, ap_pa = _text(r.get("frontal_lateral")).strip(), _text(r.get("ap_pa")).strip()
        if views == "frontal" and frontal_lateral.lower() == "lateral":
            excluded["non-frontal"] += 1
            continue
        stem = os.path.splitext(rel)[0]
        tries = [os.path.join(b, stem + ext) for b in bases for ext in (".png", os.path.splitext(rel)[1] or ".jpg")]
        dcm = _text(r.get("path_to_dcm")).strip()
        if dcm:
            tries += [os.path.join(root, dcm)]
        image = _first_existing(tries)
        c = Candidate(key=path_key(stem), image=image, report="", split=_split_name(_text(r.get("split"))),
                      group=_text(r.get("deid_patient_id")),
                      meta={"source": {"table": os.path.basename(path), "row": n, "path_to_image": rel,
                                       "deid_patient_id": _text(r.get("deid_patient_id"))},
                            "view": ap_pa or frontal_lateral})
        sections = {"FINDINGS": _text(r.get("section_findings")), "IMPRESSION": _text(r.get("section_impression"))}
        if any(v.strip() for v in sections.values()):
            out.append(_with_report(c, sections_to_text(sections)))
        else:  # no sections split out: clean the full report (its FINDINGS/IMPRESSION, else the body)
            out.append(_with_report(c, None if _blank(r.get("report")) else r.get("report")))
    return out, excluded


# ---------------------------------------------------------------------------------------------- padchest

PADCHEST_COLUMNS = ("ImageID", "ImageDir", "PatientID", "Projection", "Report")


def _padchest_labels(value) -> dict:
    if _blank(value):
        return {}
    try:
        items = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        items = str(value).strip("[]").split(",")
    names = [str(x).strip().strip("'\"").strip() for x in (items if isinstance(items, (list, tuple)) else [items])]
    return {name: 1 for name in names if name}


def list_padchest(path: str, image_root: str | None, views: str) -> tuple[list[Candidate], dict]:
    """PadChest: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)`` (``ImageID``, ``ImageDir``,
    ``StudyID``, ``PatientID``, ``Projection``, ``Report``, ``Labels``, the ``*_DICOM`` fields) and the 16-bit PNGs
    in numbered folders ``ImageDir/ImageID``. Reports (pre-processed Spanish) are kept as they are."""
    rows = _read_csv(path, "PadChest label CSV (PADCHEST_chest_x_ray_images_labels_160K_*.csv)", PADCHEST_COLUMNS)
    root = image_root or os.path.dirname(os.path.abspath(path))
    out, excluded = [], {"non-frontal": 0}
    for n, r in enumerate(rows, start=2):
        image_id = _text(r.get("ImageID")).strip()
        if not image_id:
            out.append(_empty_image_column(path, n, "ImageID"))
            continue
        projection = _text(r.get("Projection")).strip()
        if views == "frontal" and _is_frontal(projection) is False:
            excluded["non-frontal"] += 1
            continue
        folder = _text(r.get("ImageDir")).strip()
        try:
            folder = str(int(float(folder)))
        except ValueError:
            pass
        image = _first_existing([os.path.join(root, folder, image_id), os.path.join(root, image_id)])
        photometric = _text(r.get("PhotometricInterpretation_DICOM")).strip().upper()
        c = Candidate(key=make_key(os.path.splitext(image_id)[0]), image=image, report="",
                      group=_text(r.get("PatientID")),
                      pixel=_window_hint(r, "WindowCenter_DICOM", "WindowWidth_DICOM"),
                      meta={"source": {"image_id": image_id, "image_dir": folder, "study_id": _text(r.get("StudyID")),
                                       "patient_id": _text(r.get("PatientID"))},
                            "view": projection, "language": "es"})
        if photometric:
            c.meta["photometric"] = photometric
        labels = _padchest_labels(r.get("Labels"))
        if labels:
            c.meta["labels"] = labels
        out.append(_with_report(c, None if _blank(r.get("Report")) else r.get("Report")))
    return out, excluded


# ---------------------------------------------------------------------------------------------- rexgradient

REXGRADIENT_SPLITS = ("train", "valid", "test")


def _rexgradient_files(path: str) -> list[tuple[str, str]]:
    """(split, metadata JSON) of a ReXGradient-160K root, its ``metadata/`` folder or one metadata file."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        split = next((s for s in REXGRADIENT_SPLITS if name.startswith(s + "_")), "")
        return [(split, path)]
    meta = os.path.join(path, "metadata") if os.path.isdir(os.path.join(path, "metadata")) else path
    if not os.path.isdir(meta):
        raise SourceError(f"{path}: --input must be the ReXGradient-160K folder (with metadata/), its metadata/ "
                          "folder or one {train,valid,test}_metadata(_view_position).json")
    out = []
    for split in REXGRADIENT_SPLITS:
        for name in (f"{split}_metadata_view_position.json", f"{split}_metadata.json"):
            p = os.path.join(meta, name)
            if os.path.isfile(p):
                out.append((split, p))
                break
    if not out:
        raise SourceError(f"{meta}: no {{train,valid,test}}_metadata(_view_position).json found")
    return out


def _as_list(value) -> list:
    if isinstance(value, list):
        return value
    if _blank(value):
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return list(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            pass
    return [value]


def list_rexgradient(path: str, image_root: str | None, views: str) -> tuple[list[Candidate], dict]:
    """ReXGradient-160K: ``metadata/{train,valid,test}_metadata(_view_position).json`` (one entry per study:
    ``ImagePath`` and ``ImageViewPosition`` lists, ``PatientID``, ``Indication``, ``Comparison``, ``Findings``,
    ``Impression``) and the PNGs under ``deid_png/`` (the paths start ``../deid_png/``). Reports keep FINDINGS +
    IMPRESSION; the test split is left out as for MIMIC."""
    base = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.normpath(base)) == "metadata":
        base = os.path.dirname(os.path.normpath(base))
    root = image_root or os.path.join(base, "deid_png")
    out, excluded = [], {"test-split": 0, "non-frontal": 0, "no-images-in-study": 0}
    for split, meta_file in _rexgradient_files(path):
        try:
            with open(meta_file, encoding="utf-8") as f:
                studies = json.load(f)
        except json.JSONDecodeError as e:
            raise SourceError(f"{meta_file}: not valid JSON ({e})") from None
        if isinstance(studies, list):
            studies = {str(s.get("id") or i): s for i, s in enumerate(studies)}
        if not isinstance(studies, dict):
            raise SourceError(f"{meta_file}: expected a mapping of study id to study, got {type(studies).__name__}")
        for study_id, st in studies.items():
            if not isinstance(st, dict):
                out.append(Candidate(key=make_key(str(study_id)), image=f"{meta_file}:{study_id}", report="",
                                     reject=("malformed-row", f"{meta_file}: study {study_id} is not an object")))
                continue
            if split == "test":
                excluded["test-split"] += len(_as_list(st.get("ImagePath"))) or 1
                continue
            images = _as_list(st.get("ImagePath"))
            positions = _as_list(st.get("ImageViewPosition"))
            if not images:
                excluded["no-images-in-study"] += 1
                continue
            sections = {k.upper(): _text(st.get(k)) for k in ("Indication", "Comparison", "Findings", "Impression")}
            text = sections_to_text(sections)
            patient = _text(st.get("PatientID")) or str(study_id).split("_")[0]
            for i, img in enumerate(images):
                rel = str(img).replace("\\", "/")
                for prefix in ("../deid_png/", "deid_png/", "../"):
                    if rel.startswith(prefix):
                        rel = rel[len(prefix):]
                        break
                view = _text(positions[i]) if i < len(positions) else ""
                if views == "frontal" and _is_frontal(view) is False:
                    excluded["non-frontal"] += 1
                    continue
                image = os.path.normpath(os.path.join(root, rel))
                c = Candidate(key=path_key(image), image=image, report="", split=_split_name(split), group=patient,
                              meta={"source": {"study_id": str(study_id), "patient_id": patient, "image_path": str(img),
                                               "metadata": os.path.basename(meta_file)}, "view": view})
                out.append(_with_report(c, text))
    return out, excluded

"""Prep and verify on corpora the tests build themselves (CSV/JSONL, Open-i XML, MIMIC layout, DICOM)."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from mrm_scale.formats import shards as sf
from mrm_scale.data.prep import PrepError, PrepOptions, run_prep
from mrm_scale.data.tokenizer import decode_ids, load_tokenizer
from mrm_scale.data.verify import verify_dir

from image_fixtures import write_dicom

REPORT = "FINDINGS: The heart size is normal. No pleural effusion or pneumothorax. IMPRESSION: No acute process."


def _chest(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 200 - 120 * np.exp(-(((x - w * 0.3) / (w * 0.15)) ** 2 + ((y - h / 2) / (h * 0.3)) ** 2))
    img -= 120 * np.exp(-(((x - w * 0.7) / (w * 0.15)) ** 2 + ((y - h / 2) / (h * 0.3)) ** 2))
    return np.clip(img + rng.normal(0, 8, (h, w)), 0, 255).astype(np.uint8)


def make_images(folder):
    """Valid radiographs in the modes real collections have, plus broken files. Returns (good, broken)."""
    os.makedirs(folder, exist_ok=True)
    good = []
    for i, (mode, fmt, size) in enumerate([("L", "JPEG", (300, 360)), ("RGB", "JPEG", (320, 280)),
                                           ("RGB", "PNG", (256, 256)), ("RGBA", "PNG", (200, 240)),
                                           ("P", "PNG", (220, 200)), ("I;16", "PNG", (240, 240)),
                                           ("L", "PNG", (1500, 1200)), ("L", "JPEG", (64, 80))]):
        arr = _chest(*size, seed=i)
        if mode == "I;16":
            img = Image.fromarray(arr.astype(np.uint16) * 256)  # 16-bit grayscale
        else:
            img = Image.fromarray(arr, "L").convert(mode)
        p = os.path.join(folder, f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}")
        img.save(p, fmt)
        good.append(p)
    data = open(good[0], "rb").read()
    broken = {}
    broken["truncated-image"] = os.path.join(folder, "trunc.jpg")
    open(broken["truncated-image"], "wb").write(data[: len(data) // 2])
    broken["zero-byte"] = os.path.join(folder, "zero.png")
    open(broken["zero-byte"], "wb").close()
    broken["not-an-image"] = os.path.join(folder, "text.png")
    open(broken["not-an-image"], "w").write("not an image at all\n")
    broken["missing-file"] = os.path.join(folder, "nowhere.png")
    return good, broken


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "report_content"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    good, broken = make_images(root / "images")
    rows = [[os.path.relpath(p, root), f"{REPORT} Case {i}."] for i, p in enumerate(good)]
    rows += [[os.path.relpath(p, root), REPORT] for p in broken.values()]
    rows.append([os.path.relpath(good[0], root).replace("img0", "img0"), REPORT])  # listed twice
    write_csv(root / "train.csv", rows)
    return root, good, broken


def opts(**kw):
    base = dict(source="csv", shard_size=3, val_fraction=0.25, tokenizer="train", vocab_size=200, progress=False)
    base.update(kw)
    return PrepOptions(**base)


def test_csv_accepts_valid_rejects_broken_with_distinct_reasons(corpus, tmp_path):
    root, good, broken = corpus
    res = run_prep(opts(input=str(root / "train.csv"), out=str(tmp_path / "out"), max_side=512))
    assert res.accepted == len(good)
    reasons = sorted(r["reason"] for r in res.rejected)
    assert reasons == sorted(list(broken) + ["duplicate-image"])
    for r in res.rejected:
        assert r["path"] and r["detail"]
    problems, counts = verify_dir(str(tmp_path / "out"))
    assert problems == [] and counts["samples"] == len(good)
    m = res.manifest
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == len(good)
    assert m["splits"]["val"]["samples"] >= 1
    # The counts in the manifest equal the tar contents; stored images are grayscale JPEGs, never upscaled.
    sizes = {}
    for split in ("train", "val"):
        for sh in m["splits"][split]["shards"]:
            tar = tmp_path / "out" / sh["tar"]
            names = subprocess.run(["tar", "-tf", str(tar)], capture_output=True, text=True, check=True).stdout.split()
            assert len(names) == 5 * sh["samples"]
            for key, parts in sf.iter_tar_samples(str(tar)):
                img = Image.open(io.BytesIO(parts["jpg"]))
                meta = json.loads(parts["json"])
                assert img.format == "JPEG" and img.mode == "L"
                assert max(img.size) <= 512
                assert img.size[0] <= meta["orig_size"][0] and img.size[1] <= meta["orig_size"][1]
                sizes[meta["source"]["image_path"]] = (img.size, meta["orig_size"])
    big = sizes["images/img6.png"]
    assert big == ((512, 410), [1500, 1200])
    small = sizes["images/img7.jpg"]
    assert small[0] == (64, 80)  # not upscaled


def test_same_input_gives_byte_identical_shards(corpus, tmp_path):
    root, _, _ = corpus
    a = run_prep(opts(input=str(root / "train.csv"), out=str(tmp_path / "a"), workers=2))
    b = run_prep(opts(input=str(root / "train.csv"), out=str(tmp_path / "b")))
    files = sorted(f for f in os.listdir(tmp_path / "a") if not f.startswith("."))
    assert files == sorted(f for f in os.listdir(tmp_path / "b") if not f.startswith("."))
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a.manifest["splits"] == b.manifest["splits"]


def test_rerun_rebuilds_only_missing_or_damaged_shards(corpus, tmp_path):
    root, _, _ = corpus
    o = opts(input=str(root / "train.csv"), out=str(tmp_path / "out"))
    first = run_prep(o)
    shards = first.manifest["splits"]["train"]["shards"]
    assert len(shards) >= 2
    victim = tmp_path / "out" / shards[1]["tar"]
    original = victim.read_bytes()
    victim.unlink()
    problems, _ = verify_dir(str(tmp_path / "out"))
    assert any(shards[1]["tar"] in p and "missing" in p for p in problems)
    second = run_prep(o)
    assert second.built_shards == [shards[1]["tar"]]
    assert victim.read_bytes() == original
    # A damaged shard is found by verify (naming it) and rebuilt by the next prep.
    data = bytearray(original)
    data[700:720] = b"\xff" * 20
    victim.write_bytes(bytes(data))
    problems, _ = verify_dir(str(tmp_path / "out"))
    assert problems and all(shards[1]["tar"] in p for p in problems)
    third = run_prep(o)
    assert third.built_shards == [shards[1]["tar"]] and victim.read_bytes() == original
    assert verify_dir(str(tmp_path / "out"))[0] == []


def test_index_files_match_dali_wds2idx(corpus, tmp_path):
    root, _, _ = corpus
    res = run_prep(opts(input=str(root / "train.csv"), out=str(tmp_path / "out")))
    sh = res.manifest["splits"]["train"]["shards"][0]
    tool = shutil.which("wds2idx")
    if tool is None:
        pytest.fail("wds2idx (shipped with nvidia-dali) is not on PATH; install the project's dependencies")
    subprocess.run([tool, str(tmp_path / "out" / sh["tar"]), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert (tmp_path / "ref.idx").read_text() == (tmp_path / "out" / sh["idx"]).read_text()


def test_stored_tokens_decode_back_to_report(corpus, tmp_path):
    root, _, _ = corpus
    res = run_prep(opts(input=str(root / "train.csv"), out=str(tmp_path / "out"), max_tokens=12))
    tok, _ = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    t = res.manifest["tokenizer"]
    for sh in res.manifest["splits"]["train"]["shards"]:
        for key, parts in sf.iter_tar_samples(str(tmp_path / "out" / sh["tar"])):
            ids, att, ws = sf.decode_tokens(parts["ids"], parts["flags"])
            assert len(ids) == 12 and ids[0] == t["cls_id"] and ids[att.sum() - 1] == t["sep_id"]
            text = decode_ids(tok, ids, att).replace(" ", "")
            full = parts["txt"].decode().lower().replace(" ", "")
            assert full.startswith(text.replace("##", ""))  # truncated to max_tokens, same text
            assert json.loads(parts["json"])["truncated"] is True


def test_jsonl_and_bad_reports(tmp_path):
    good, _ = make_images(tmp_path / "images")
    lines = [{"img": good[0], "text": REPORT}, {"img": good[1], "text": "   "}, {"img": good[2], "text": None},
             {"img": good[3], "text": "nan"}, {"img": good[4], "text": "IMPRESSION: ___ stable XXXX."}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    res = run_prep(opts(source="jsonl", input=str(tmp_path / "c.jsonl"), out=str(tmp_path / "out"),
                        image_column="img", report_column="text", val_fraction=0.0))
    assert res.accepted == 2
    assert sorted(r["reason"] for r in res.rejected) == ["empty-report", "empty-report", "missing-report"]
    texts = sorted(p["txt"].decode() for sh in res.manifest["splits"]["train"]["shards"]
                   for _, p in sf.iter_tar_samples(str(tmp_path / "out" / sh["tar"])))
    assert texts[0] == "The heart size is normal. No pleural effusion or pneumothorax. No acute process."
    assert texts[1] == "___ stable XXXX."
    tok, _ = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("___ xxxx", add_special_tokens=False).tokens == ["___", "xxxx"]  # one token each


def test_non_utf8_report_in_csv_is_rejected(tmp_path):
    good, _ = make_images(tmp_path / "images")
    with open(tmp_path / "c.csv", "wb") as f:
        f.write(b"image_path,report_content\n")
        f.write(f"{good[0]},Heart normal.\n".encode())
        f.write(f"{good[1]},".encode() + "Cœur normal.".encode("latin-1", errors="replace") + b"\xe9\xff\n")
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 1 and [r["reason"] for r in res.rejected] == ["non-utf8-report"]


def test_malformed_and_non_utf8_rows_are_rejected_not_cut_or_fatal(tmp_path):
    """An unquoted comma must not cut the report at the comma, and a non-UTF-8 byte in any column (not only the
    report) rejects that row with its reason while prep goes on."""
    good, _ = make_images(tmp_path / "images")
    with open(tmp_path / "c.csv", "wb") as f:
        f.write(b"image_path,report_content,site\n")
        f.write(f"{good[0]},Heart normal.,A\n".encode())
        f.write(f"{good[1]},Heart normal, no effusion, lungs clear.,B\n".encode())  # 5 fields, header has 3
        f.write(f"{good[2]},Heart normal.,".encode() + "Hôpital".encode("latin-1") + b"\n")
        f.write(good[3].encode()[:-4] + b"\xe9.png,Heart normal.,C\n")  # the image path itself
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 1
    assert sorted(r["reason"] for r in res.rejected) == ["malformed-row", "non-utf8-field", "non-utf8-field"]
    why = {r["reason"]: r["detail"] for r in res.rejected}
    assert "c.csv:3" in why["malformed-row"] and "quote" in why["malformed-row"]
    details = [r["detail"] for r in res.rejected if r["reason"] == "non-utf8-field"]
    assert any("'site'" in d and "c.csv:4" in d for d in details)
    assert any("'image_path'" in d and "c.csv:5" in d for d in details)
    assert verify_dir(str(tmp_path / "out"))[0] == []


@pytest.mark.parametrize("text, expected", [
    # no FINDINGS/IMPRESSION: the body after the header paragraphs is the report (MIMIC's title line dropped)
    ("     FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: ___ with cough\n\n Lungs clear. No effusion.\n",
     "Lungs clear. No effusion."),
    ("FINAL REPORT\nHISTORY: fall\nCOMPARISON: none\n\nThe heart is normal.\n\nNo pneumothorax.",
     "The heart is normal. No pneumothorax."),
    ("FINAL REPORT\n INDICATION: cough\n\n FINDINGS:\n Lungs clear.\n\n IMPRESSION:\n Normal.", "Lungs clear. Normal."),
    ("Lungs are clear, no effusion.", "Lungs are clear, no effusion."),
])
def test_report_cleaning_fallback_keeps_the_body(text, expected):
    from mrm_scale.data.reports import clean_free_text

    assert clean_free_text(text) == expected


def test_wrong_columns_and_nothing_accepted_are_errors(tmp_path):
    (tmp_path / "c.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(PrepError, match="--image-column"):
        run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "o")))
    write_csv(tmp_path / "d.csv", [["missing.png", "Heart normal."]])
    with pytest.raises(PrepError, match="nothing was accepted"):
        run_prep(opts(input=str(tmp_path / "d.csv"), out=str(tmp_path / "o2")))


OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough {n}</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
{images}
</eCitation>"""


def test_openi_reports_are_findings_plus_impression(tmp_path):
    xml_dir = tmp_path / "reports" / "ecgen-radiology"
    xml_dir.mkdir(parents=True)
    img_dir = tmp_path / "png"
    img_dir.mkdir()
    expected = {}
    for n in (1, 2, 10):
        ids = [f"CXR{n}_IM-000{n}-1001", f"CXR{n}_IM-000{n}-2001"]
        findings, impression = f"Heart size normal in case {n}. No XXXX effusion.", f"No acute disease {n}."
        images = "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in ids)
        (xml_dir / f"{n}.xml").write_text(OPENI_XML.format(n=n, findings=findings, impression=impression, images=images))
        for i in ids:
            Image.fromarray(_chest(200, 240, n), "L").convert("RGB").save(img_dir / f"{i}.png")
            expected[i] = f"{findings} {impression}"
    os.remove(img_dir / "CXR2_IM-0002-2001.png")
    res = run_prep(opts(source="openi", input=str(tmp_path / "reports"), image_root=str(img_dir),
                        out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 5
    assert [(r["key"], r["reason"]) for r in res.rejected] == [("CXR2_IM-0002-2001", "missing-file")]
    for sh in res.manifest["splits"]["train"]["shards"]:
        for key, parts in sf.iter_tar_samples(str(tmp_path / "out" / sh["tar"])):
            assert parts["txt"].decode() == expected[key]
            assert json.loads(parts["json"])["source"]["report_id"].startswith("CXR")


def test_openi_real_reports(realdata, tmp_path):
    """The real Open-i archive: reports become FINDINGS + IMPRESSION of their XML."""
    import xml.etree.ElementTree as ET

    tgz = realdata / "iu-xray-reports" / "NLMCXR_reports.tgz"
    with tarfile.open(tgz) as t:
        member = next(m for m in t if m.name.endswith("/1.xml"))
        root = ET.fromstring(t.extractfile(member).read())
    ids = [n.get("id") for n in root.iter("parentImage")]
    sec = {n.get("Label"): "".join(n.itertext()) for n in root.iter("AbstractText")}
    img_dir = tmp_path / "png"
    img_dir.mkdir()
    for i in ids:
        Image.fromarray(_chest(200, 240, 1), "L").save(img_dir / f"{i}.png")
    res = run_prep(opts(source="openi", input=str(tgz), image_root=str(img_dir), out=str(tmp_path / "out"),
                        val_fraction=0.0, vocab_size=3000))
    assert res.accepted == len(ids)
    missing = [r for r in res.rejected if r["reason"] == "missing-file"]
    assert len(missing) > 7000  # every other report's images are absent here, each listed with its reason
    expect = " ".join(f"{sec['FINDINGS']} {sec['IMPRESSION']}".split())
    for sh in res.manifest["splits"]["train"]["shards"]:
        for _, parts in sf.iter_tar_samples(str(tmp_path / "out" / sh["tar"])):
            assert parts["txt"].decode() == expect


def test_mimic_layout_split_views_reports(tmp_path):
    root = tmp_path / "mimic"
    rows, meta = [], []
    specs = [("10000032", "50414267", "d1", "train", "PA"), ("10000032", "50414267", "d2", "train", "LATERAL"),
             ("10000764", "57375967", "d3", "validate", "AP"), ("10000898", "50771383", "d4", "test", "PA"),
             ("10000935", "51178377", "d5", "train", "PA")]
    for subject, study, dicom, split, view in specs:
        d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_chest(300, 300, int(subject[-2:])), "L").save(d / f"{dicom}.jpg")
        (d.parent / f"s{study}.txt").write_text(
            f"                 FINAL REPORT\n EXAMINATION: CHEST\n INDICATION: ___ with cough\n\n"
            f" FINDINGS:\n Lungs clear in {study}.\n\n IMPRESSION:\n No acute process.\n")
        rows.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": split})
        meta.append({"dicom_id": dicom, "ViewPosition": view})
    os.remove(root / "files" / "p10" / "p10000935" / "s51178377.txt")
    for name, data in (("mimic-cxr-2.0.0-split.csv", rows), ("mimic-cxr-2.0.0-metadata.csv", meta)):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    res = run_prep(opts(source="mimic-cxr", input=str(root), out=str(tmp_path / "out")))
    m = res.manifest
    assert m["splits"]["train"]["samples"] == 1 and m["splits"]["val"]["samples"] == 1
    assert m["stats"]["excluded"] == {"test-split": 1, "non-frontal": 1}
    assert [r["reason"] for r in res.rejected] == ["missing-report"]
    _, parts = next(sf.iter_tar_samples(str(tmp_path / "out" / m["splits"]["train"]["shards"][0]["tar"])))
    assert parts["txt"].decode() == "Lungs clear in 50414267. No acute process."
    meta0 = json.loads(parts["json"])
    assert meta0["source"] == {"subject_id": "10000032", "study_id": "50414267", "dicom_id": "d1"}
    assert meta0["view"] == "PA"


def test_dicom_monochrome1_is_inverted_and_windowed(tmp_path):
    arr = (_chest(128, 160, 3).astype(np.uint16) * 16)  # 12-bit, MONOCHROME2 orientation: lungs dark
    write_dicom(tmp_path / "m2.dcm", arr, "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", 4095 - arr, "MONOCHROME1")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    write_csv(tmp_path / "c.csv", [["m2.dcm", REPORT], ["m1.dcm", REPORT], ["bad.dcm", REPORT]])
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 2 and [r["reason"] for r in res.rejected] == ["unreadable-dicom"]
    imgs = {}
    for _, parts in sf.iter_tar_samples(str(tmp_path / "out" / res.manifest["splits"]["train"]["shards"][0]["tar"])):
        meta = json.loads(parts["json"])
        imgs[meta["source"]["image_path"]] = np.asarray(Image.open(io.BytesIO(parts["jpg"])), dtype=float)
        assert meta["view"] == "AP"
    assert np.abs(imgs["m1.dcm"] - imgs["m2.dcm"]).mean() < 3  # MONOCHROME1 came out the same way up
    assert imgs["m2.dcm"][:, 60:68].mean() > imgs["m2.dcm"][:, 30:40].mean() + 40  # centre bright, lung dark


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "MR_small_RLE.dcm"])
def test_compressed_dicom_transfer_syntaxes_decode(name, tmp_path):
    """pydicom's own sample files (shipped in its wheel) for the compressed syntaxes: each is accepted and stored
    as a grayscale JPEG of the right size."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = get_testdata_file(name)
    ds = pydicom.dcmread(src)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    write_csv(tmp_path / "c.csv", [[src, REPORT]])
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 1 and res.rejected == []
    _, parts = next(sf.iter_tar_samples(str(tmp_path / "out" / res.manifest["splits"]["train"]["shards"][0]["tar"])))
    img = Image.open(io.BytesIO(parts["jpg"]))
    assert img.mode == "L" and img.size == (ds.Columns, ds.Rows) and np.asarray(img).std() > 1


def test_real_dicom_is_a_plausible_radiograph(realdata, tmp_path):
    write_csv(tmp_path / "c.csv", [[str(realdata / "dicom" / "siim-acr-cxr-sample.dcm"), REPORT]])
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), val_fraction=0.0))
    assert res.accepted == 1 and res.rejected == []
    _, parts = next(sf.iter_tar_samples(str(tmp_path / "out" / res.manifest["splits"]["train"]["shards"][0]["tar"])))
    a = np.asarray(Image.open(io.BytesIO(parts["jpg"])), dtype=float)
    h, w = a.shape
    assert a.std() > 20  # not constant
    mediastinum = a[h // 3: 2 * h // 3, int(w * 0.45): int(w * 0.55)].mean()
    lungs = (a[h // 3: 2 * h // 3, int(w * 0.2): int(w * 0.3)].mean() + a[h // 3: 2 * h // 3, int(w * 0.7): int(w * 0.8)].mean()) / 2
    assert mediastinum > lungs + 30  # not inverted: bone/heart bright, aerated lung dark


def test_realdata_covid_collection_csv(realdata, tmp_path):
    """408 real images in messy formats plus four broken entries: 408 accepted, 4 distinct rejections."""
    images = sorted((realdata / "covid-collection" / "images").iterdir())
    assert len(images) == 408
    _, broken = make_images(tmp_path / "broken")
    rows = [[str(p), REPORT] for p in images] + [[p, REPORT] for p in broken.values()]
    write_csv(tmp_path / "c.csv", rows)
    res = run_prep(opts(input=str(tmp_path / "c.csv"), out=str(tmp_path / "out"), shard_size=128, workers=2,
                        tokenizer=str(realdata / "tokenizer" / "mimic_wordpiece.json")))
    assert res.accepted == 408
    assert sorted(r["reason"] for r in res.rejected) == sorted(broken)
    assert verify_dir(str(tmp_path / "out"), workers=2)[0] == []
    # The original MRM vocabulary lacks [SEP]; prep appends it and the stored ids decode back to the report.
    tok, added = load_tokenizer(str(tmp_path / "out" / "tokenizer.json"))
    assert added == [] and res.manifest["tokenizer"]["sep_id"] == 30000
    _, parts = next(sf.iter_tar_samples(str(tmp_path / "out" / res.manifest["splits"]["train"]["shards"][0]["tar"])))
    ids, att, _ = sf.decode_tokens(parts["ids"], parts["flags"])
    assert decode_ids(tok, ids, att).replace(" ", "") == parts["txt"].decode().lower().replace(" ", "")


def test_cli_prep_strict_and_verify_exit_codes(corpus, tmp_path):
    root, _, _ = corpus
    cmd = [sys.executable, "-m", "mrm_scale.cli", "prep", "--source", "csv", "--input", str(root / "train.csv"),
           "--out", str(tmp_path / "out"), "--shard-size", "4", "--no-progress"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "accepted : 8" in ok.stdout and "truncated-image" in ok.stdout
    strict = subprocess.run(cmd + ["--strict"], capture_output=True, text=True)
    assert strict.returncode == 1 and "--strict" in strict.stderr
    v = subprocess.run([sys.executable, "-m", "mrm_scale.cli", "verify", str(tmp_path / "out")], capture_output=True, text=True)
    assert v.returncode == 0 and "verify OK: 8 samples" in v.stdout
    idx = next((tmp_path / "out").glob("train-*.idx"))
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    v = subprocess.run([sys.executable, "-m", "mrm_scale.cli", "verify", str(tmp_path / "out")], capture_output=True, text=True)
    assert v.returncode == 1 and f"{idx.name}: index does not match" in v.stdout


def test_verify_lists_a_damaged_tokenizer_or_manifest(corpus, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "out"
    run_prep(opts(input=str(root / "train.csv"), out=str(out)))
    (out / "tokenizer.json").write_text("{ not a tokenizer")
    problems, _ = verify_dir(str(out))
    assert any("tokenizer.json: not a readable tokenizer" in p and "re-run prep" in p for p in problems), problems
    m = json.loads((out / sf.MANIFEST).read_text())
    del m["max_tokens"]
    (out / sf.MANIFEST).write_text(json.dumps(m))
    problems, _ = verify_dir(str(out))
    assert any("no max_tokens entry" in p for p in problems), problems


def test_synthetic_shards_read_by_webdataset_and_dali(tmp_path):
    """The issue's acceptance: 64 synthetic samples in shards of 16, verify OK, tar lists the members, and both
    `webdataset.WebDataset` and DALI's `fn.readers.webdataset` (CPU, written index files) read every sample."""
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def

    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "mrm_scale.cli", "prep", "--source", "synthetic", "--num", "64", "--shard-size",
           "16", "--synthetic-size", "256", "--out", str(out), "--no-progress"]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    v = subprocess.run([sys.executable, "-m", "mrm_scale.cli", "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout
    m = json.loads((out / "manifest.json").read_text())
    entries = [e for s in ("train", "val") for e in m["splits"][s]["shards"]]
    assert sum(e["samples"] for e in entries) == 64
    keys = set()
    for e in entries:
        names = subprocess.run(["tar", "-tf", str(out / e["tar"])], capture_output=True, text=True, check=True).stdout.split()
        assert len(names) == 5 * e["samples"] and all(n.rsplit(".", 1)[-1] in sf.MEMBERS for n in names)
        keys |= {n.split(".")[0] for n in names}
    assert len(keys) == 64
    tars = [str(out / e["tar"]) for e in entries]
    seen = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)]
    assert sorted(seen) == sorted(keys)
    for s in wds.WebDataset(tars[:1], shardshuffle=False).decode("l"):
        assert s["jpg"].ndim == 2 and len(s["ids"]) == 4 * m["max_tokens"] and "labels" in s["json"]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def reader():
        jpg, ids = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "ids"],
                                         missing_component_behavior="error", name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.GRAY), ids

    from nvidia.dali import types

    pipe = reader()
    pipe.build()
    n = 0
    while n < 64:
        images, ids = pipe.run()
        for i in range(len(images)):
            assert images.at(i).shape[-1] == 1 and ids.at(i).size == 4 * m["max_tokens"]
        n += len(images)
    assert n == 64 and pipe.epoch_size("reader") == 64


def test_full_disk_during_prep_is_one_line_with_the_path(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI and project machines have it)")
    try:
        p = subprocess.run([sys.executable, "-m", "mrm_scale.cli", "prep", "--source", "synthetic", "--num", "300",
                            "--out", str(disk / "p"), "--no-progress"], capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"error: the disk is full writing {disk / 'p'}" in p.stderr and "free of 1.0 MB" in p.stderr
    assert "Traceback" not in p.stderr

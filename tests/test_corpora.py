"""The whole corpus: CheXpert Plus, PadChest and ReXGradient-160K in their own layouts (fixtures the tests build),
16-bit PNGs that keep their contrast, one tokenizer over several corpora, the [UNK] check and provenance."""

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from mrm_scale.cli import main as cli
from mrm_scale.data.loader import LoaderError
from mrm_scale.data.mixing import check_sources, parse_mix
from mrm_scale.data.prep import PrepError, PrepOptions, run_prep
from mrm_scale.data.verify import verify_dir
from mrm_scale.formats import shards as sf

SPANISH = [
    "derrame pleural izquierdo con atelectasia pasiva . cardiomegalia leve .",
    "sin cambios significativos respecto al estudio previo . catéter venoso central en aurícula derecha .",
    "nódulo pulmonar en língula . aumento de densidad retrocardíaco .",
    "elongación aórtica . pinzamiento del seno costofrénico derecho .",
]


def chest(seed, w=72, h=64, lo=0.0, hi=1.0):
    """A smooth radiograph-like field in [lo, hi] (a bright mediastinum, darker lungs, a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    field = 0.35 + 0.5 * np.exp(-((x - 0.5) ** 2) / 0.02) + 0.15 * y + rng.normal(0, 0.03, (h, w))
    field = (field - field.min()) / (field.max() - field.min())
    return lo + field * (hi - lo)


def png16(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint16)).save(path)


def png8(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.round(chest(seed) * 255).astype(np.uint8), "L").save(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def samples(folder):
    out = {}
    m = sf.read_manifest(folder)
    for split, info in m["splits"].items():
        for e in info["shards"]:
            for key, parts in sf.iter_tar_samples(os.path.join(folder, e["tar"])):
                out[key] = dict(parts, split=split, meta=json.loads(parts["json"]))
    return out


def jpeg_spread(data):
    g = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    lo, hi = np.percentile(g, [5, 95])
    return hi - lo


# ----------------------------------------------------------------------------------------------- layouts

@pytest.fixture
def chexpert_plus(tmp_path):
    root = tmp_path / "chexpert_plus"
    header = ["", "path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
              "patient_report_date_order", "report", "section_findings", "section_impression", "split"]
    rows = []
    for i in range(6):
        split = "valid" if i == 5 else "train"
        rel = f"{split}/patient{i:05d}/study1/view1_frontal.jpg"  # the CSV says .jpg, the release holds .png
        if i != 4:  # patient 4's image is not there: rejected, named
            png8(str(root / "PNG" / "PNG" / rel.replace(".jpg", ".png")), seed=i)
        findings = "" if i == 3 else f"Heart size normal {i}. Lungs clear."
        impression = "" if i == 3 else "No acute process."
        report = ("NARRATIVE: CHEST 1 VIEW. HISTORY: cough. FINDINGS: Stable left effusion. IMPRESSION: Effusion."
                  if i == 3 else "NARRATIVE: ... " + findings + " IMPRESSION: " + impression)
        rows.append([i, rel, rel.replace(".jpg", ".dcm"), "Frontal", "AP" if i % 2 else "PA", f"patient{i:05d}", 1,
                     report, findings, impression, split])
    lateral = "train/patient00000/study1/view2_lateral.jpg"
    png8(str(root / "PNG" / "PNG" / lateral.replace(".jpg", ".png")), seed=9)
    rows.append([6, lateral, "", "Lateral", "", "patient00000", 1, "FINDINGS: x. IMPRESSION: y.", "x", "y", "train"])
    write_csv(root / "df_chexpert_plus_240401.csv", header, rows)
    return root


def test_chexpert_plus_prep_and_verify(chexpert_plus, tmp_path):
    out = tmp_path / "out"
    res = run_prep(PrepOptions(source="chexpert-plus", input=str(chexpert_plus / "df_chexpert_plus_240401.csv"),
                               out=str(out), shard_size=4, max_side=64, progress=False))
    assert verify_dir(str(out))[0] == []
    got = samples(str(out))
    assert len(got) == 5 and res.manifest["stats"]["excluded"] == {"non-frontal": 1}
    assert [r["reason"] for r in res.rejected] == ["missing-file"] and "patient00004" in res.rejected[0]["detail"]
    by_patient = {v["meta"]["source"]["deid_patient_id"]: v for v in got.values()}
    assert by_patient["patient00000"]["txt"].decode() == "Heart size normal 0. Lungs clear. No acute process."
    # no sections split out: the full report's FINDINGS + IMPRESSION, not its NARRATIVE/HISTORY header
    assert by_patient["patient00003"]["txt"].decode() == "Stable left effusion. Effusion."
    assert by_patient["patient00005"]["split"] == "val"  # the source's 'valid' split
    assert by_patient["patient00001"]["meta"]["view"] == "AP"
    src = res.manifest["source"]
    assert src["name"] == "CheXpert Plus" and src["version"] == "df_chexpert_plus_240401" and "Stanford" in src["licence"]


@pytest.fixture
def padchest(tmp_path):
    root = tmp_path / "padchest"
    header = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "Projection",
              "PhotometricInterpretation_DICOM", "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM",
              "ReportID", "Report", "MethodLabel", "Labels"]
    rows = []
    for i in range(8):
        image_id = f"2168401113669640{i:02d}_02-094-102.png"
        # 12-bit values in a 16-bit PNG, each image its own range; image 1 at the high end (a plain 8-bit clip
        # would turn it white), image 2 with a DICOM window that fits its values, image 3 with one that does not
        lo, hi = (200 + 300 * i, 1500 + 300 * i) if i != 1 else (40000, 52000)
        png16(str(root / str(i % 2) / image_id), chest(i, lo=lo, hi=hi))
        window = {2: ("1450", "1300"), 3: ("[60000, 60000]", "[100, 100]")}.get(i, ("", ""))
        projection = ["PA", "AP_horizontal", "PA", "AP", "L", "PA", "COSTAL", "PA"][i]
        rows.append([image_id, f"{i % 2}.0", "20140101", f"study{i}", f"patient{i // 2}", "1950.0", projection,
                     "MONOCHROME2", "12", *window, i, SPANISH[i % 4], "Physician", "['normal', ' cardiomegaly']"])
    write_csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", header, rows)
    return root


def test_padchest_keeps_spanish_and_16bit_contrast(padchest, tmp_path):
    out = tmp_path / "out"
    res = run_prep(PrepOptions(source="padchest", input=str(padchest / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"),
                               out=str(out), shard_size=3, max_side=64, val_fraction=0.3, progress=False))
    assert verify_dir(str(out))[0] == []
    got = samples(str(out))
    assert len(got) == 6 and res.manifest["stats"]["excluded"] == {"non-frontal": 2}  # L and COSTAL
    for v in got.values():
        i = int(v["meta"]["source"]["study_id"][5:])
        assert v["txt"].decode() == SPANISH[i % 4]  # accents and Spanish words as they were
        assert v["meta"]["labels"] == {"normal": 1, "cardiomegaly": 1} and v["meta"]["language"] == "es"
        assert jpeg_spread(v["jpg"]) > 100, (i, v["meta"])  # contrast survives: no clip to white or black
        assert v["meta"]["window"] == ("dicom-window" if i == 2 else "own-range"), i
    assert got[next(k for k in got if got[k]["meta"]["source"]["study_id"] == "study1")]["meta"]["bit_depth_range"][0] >= 40000
    # two images of one patient never straddle the splits
    splits = {}
    for v in got.values():
        splits.setdefault(v["meta"]["source"]["patient_id"], set()).add(v["split"])
    assert all(len(s) == 1 for s in splits.values()) and {"train", "val"} <= set().union(*splits.values())
    # the trained vocabulary keeps accents: no [UNK], and 'aurícula' is not read as 'auricula'
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert res.manifest["stats"]["vocabulary"]["unk_rate"] == 0.0
    assert "í" in "".join(tok.encode("aurícula").tokens) and tok.encode("aurícula").ids != tok.encode("auricula").ids


@pytest.fixture
def rexgradient(tmp_path):
    root = tmp_path / "rexgradient"
    (root / "metadata").mkdir(parents=True)
    for split, n in (("train", 4), ("valid", 1), ("test", 1)):
        studies = {}
        for s in range(n):
            pid = f"{split[:2]}{s:03d}"
            paths, views = [], []
            for j, view in enumerate(["PA", "LATERAL", "AP AXIAL"][: 2 + (s % 2)]):
                rel = f"{pid}/acc{s}/studies/1.2.{s}/series/1.3.{j}/instances/1.4.{j}.png"
                png8(str(root / "deid_png" / rel), seed=hash((split, s, j)) % 1000)
                paths.append("../deid_png/" + rel)
                views.append(view)
            studies[f"p{pid}_a{s}_s1.2.{s}"] = {
                "PatientID": pid, "ImagePath": paths, "ImageViewPosition": views,
                "Indication": "Cough.", "Comparison": "None.",
                "Findings": "" if s == 3 else f"Lungs are clear {split} {s}.",
                "Impression": "" if s == 3 else "No acute cardiopulmonary process."}
        (root / "metadata" / f"{split}_metadata_view_position.json").write_text(json.dumps(studies))
    return root


def test_rexgradient_prep_and_verify(rexgradient, tmp_path):
    out = tmp_path / "out"
    res = run_prep(PrepOptions(source="rexgradient", input=str(rexgradient), out=str(out), shard_size=4, max_side=64,
                               progress=False))
    assert verify_dir(str(out))[0] == []
    got = samples(str(out))
    # train: studies 0, 2 (PA) and 1 (PA, AP AXIAL), study 3 has no findings/impression (rejected, 2 images);
    # valid: one PA; the lateral views and the test split are left out
    assert len(got) == 5
    assert res.manifest["stats"]["excluded"] == {"non-frontal": 5, "test-split": 2}
    assert sorted(r["reason"] for r in res.rejected) == ["empty-report", "empty-report"]
    texts = {v["txt"].decode() for v in got.values()}
    assert "Lungs are clear train 0. No acute cardiopulmonary process." in texts  # no Indication/Comparison
    assert sum(v["split"] == "val" for v in got.values()) == 1
    assert {v["meta"]["view"] for v in got.values()} == {"PA", "AP AXIAL"}
    assert res.manifest["source"]["licence"].startswith("ReXGradient-160K")


def test_missing_columns_name_the_file(tmp_path):
    bad = tmp_path / "PADCHEST.csv"
    write_csv(bad, ["ImageID", "Report"], [["a.png", "x"]])
    with pytest.raises(PrepError, match=r"PADCHEST\.csv: columns ImageDir, PatientID, Projection missing"):
        run_prep(PrepOptions(source="padchest", input=str(bad), out=str(tmp_path / "o"), progress=False))


# -------------------------------------------------------------------------------- one tokenizer, [UNK] rate

def test_tokenizer_train_over_two_sets_gives_one_vocabulary_for_a_mix(padchest, tmp_path, capsys):
    en = tmp_path / "en"
    run_prep(PrepOptions(source="synthetic", num=40, synthetic_size=64, shard_size=8, out=str(en), progress=False))
    csv_path = str(padchest / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")
    es = tmp_path / "es"
    run_prep(PrepOptions(source="padchest", input=csv_path, out=str(es), shard_size=2, max_side=64, progress=False))
    # each with its own vocabulary: the mix is refused before any work, naming both
    with pytest.raises(LoaderError, match=r"'en' \(.*en/manifest.json: tokenizer sha256 \w+.*'es' \(.*different vocabularies"):
        check_sources(parse_mix(f"{en}=0.5,{es}=0.5"))
    tok = tmp_path / "tok" / "tokenizer.json"
    assert cli(["tokenizer", "train", "--input", str(en), str(es), "--vocab-size", "3000", "--out", str(tok)]) == 0
    printed = capsys.readouterr().out
    assert "[UNK] 0.00%" in printed and str(es) in printed
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    assert [t for t, i in sorted(vocab.items(), key=lambda t: t[1])][:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    en2, es2 = tmp_path / "en2", tmp_path / "es2"
    run_prep(PrepOptions(source="synthetic", num=40, synthetic_size=64, shard_size=8, out=str(en2), tokenizer=str(tok),
                         progress=False))
    r = run_prep(PrepOptions(source="padchest", input=csv_path, out=str(es2), shard_size=2, max_side=64,
                             tokenizer=str(tok), progress=False))
    assert r.manifest["stats"]["vocabulary"]["unk_rate"] == 0.0
    manifests = check_sources(parse_mix(f"{en2}=0.5,{es2}=0.5"))
    assert len({m["tokenizer"]["sha256"] for m in manifests.values()}) == 1
    # the same vocabulary from a table of reports
    tok2 = tmp_path / "tok2.json"
    assert cli(["tokenizer", "train", "--input", csv_path, "--vocab-size", "3000", "--out", str(tok2)]) == 0
    assert "nódulo" in json.loads(tok2.read_text())["model"]["vocab"]


def test_reports_the_vocabulary_does_not_know_are_reported_then_refused(tmp_path, capsys):
    en = tmp_path / "en"
    run_prep(PrepOptions(source="synthetic", num=30, synthetic_size=64, shard_size=8, out=str(en), progress=False))
    folder = tmp_path / "ru"
    rows = []
    for i in range(6):
        png8(str(folder / f"{i}.png"), seed=i)
        rows.append({"image_path": f"{i}.png", "report_content": "Плевральный выпот слева. Кардиомегалия. Без динамики."})
    (folder / "reports.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    opt = dict(source="jsonl", input=str(folder / "reports.jsonl"), max_side=64, tokenizer=str(en / "tokenizer.json"),
               progress=False)
    res = run_prep(PrepOptions(out=str(tmp_path / "o1"), **opt))  # accepted, but said
    voc = res.manifest["stats"]["vocabulary"]
    assert voc["unk_rate"] > 0.5 and voc["reports_mostly_unknown"] == 6
    err = capsys.readouterr().err
    assert "are [UNK]" in err and "mrm-scale tokenizer train" in err
    with pytest.raises(PrepError, match=r"\[UNK\].*above --max-unk-rate 0.2"):
        run_prep(PrepOptions(out=str(tmp_path / "o2"), max_unk_rate=0.2, **opt))
    with pytest.raises(PrepError, match=r"with --strict"):
        run_prep(PrepOptions(out=str(tmp_path / "o3"), strict=True, **opt))
    assert not (tmp_path / "o2" / "manifest.json").exists()  # refused before any shard was written
    # the corpus's own vocabulary knows it
    ok = run_prep(PrepOptions(out=str(tmp_path / "o4"), **{**opt, "tokenizer": "train"}))
    assert ok.manifest["stats"]["vocabulary"]["unk_rate"] == 0.0
    assert en.joinpath("manifest.json").is_file()

"""Segmentation: the SIIM-ACR run-length code, synthetic masks (renderer, prep, verify), the SIIM layout, and
`launch/segment.py` learning a finding's extent on one and two processes."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from image_fixtures import write_dicom
from mrm_scale.data import synthetic as S
from mrm_scale.data.masks import MaskError, pack_masks, read_rle_csv, rle_decode, rle_encode, union_rle, unpack_mask
from mrm_scale.data.prep import PrepError, PrepOptions, run_prep
from mrm_scale.eval.seg_data import shard_masked_set
from mrm_scale.eval.segment import main as segment
from mrm_scale.eval.segment import per_image_scores, summarise_scores
from mrm_scale.formats.shards import MASK_MEMBER, iter_tar_samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ RLE
def test_rle_decodes_a_hand_built_mask_unions_rows_and_round_trips(tmp_path):
    # 4 rows x 3 columns, column-major: pixel (row r, col c) is number c * 4 + r
    want = np.zeros((4, 3), dtype=bool)
    want[1:3, 0] = True            # pixels 1, 2
    want[3, 1] = True              # pixel 7
    want[0:2, 2] = True            # pixels 8, 9
    # runs (1, 2), (7, 3): offsets from the end of the previous run: 1, then 7 - 3 = 4
    assert rle_encode(want) == "1 2 4 3"
    assert (rle_decode("1 2 4 3", 4, 3) == want).all()
    assert not rle_decode("-1", 4, 3).any() and rle_encode(np.zeros((4, 3), bool)) == "-1"
    # several rows of one image are unioned; a -1 row adds nothing
    table = tmp_path / "train-rle.csv"
    table.write_text("ImageId, EncodedPixels\nimgA, 1 2\nimgB, -1\nimgA, 7 3\n")
    rows = read_rle_csv(str(table))
    assert rows == {"imgA": ["1 2", "7 3"], "imgB": ["-1"]}
    assert (union_rle(rows["imgA"], 4, 3, "imgA") == want).all()
    assert not union_rle(rows["imgB"], 4, 3, "imgB").any()
    rng = np.random.default_rng(0)
    for shape in ((64, 50), (1, 7), (1024, 1024)):
        m = rng.random(shape) > 0.8
        assert (rle_decode(rle_encode(m), *shape) == m).all()


def test_bad_run_length_codes_are_errors_naming_the_row(tmp_path):
    for code, why in (("1 2 3", "pairs"), ("1 x", "non-integer"), ("0 20", "past the 4x3 image"), ("1 0", "<= 0")):
        with pytest.raises(MaskError, match=why):
            rle_decode(code, 4, 3, "train-rle.csv imgA")
    with pytest.raises(MaskError, match="imgA row 2"):
        union_rle(["1 2", "bad"], 4, 3, "imgA")
    bad = tmp_path / "t.csv"
    bad.write_text("Id,Pixels\na,-1\n")
    with pytest.raises(MaskError, match="lacks ImageId and EncodedPixels"):
        read_rle_csv(str(bad))


def test_bit_plane_masks_keep_each_class():
    a = np.zeros((8, 6), bool)
    a[2:5, 1:3] = True
    c = np.eye(8, 6, dtype=bool)
    png = pack_masks({"a": a, "c": c}, ("a", "b", "c"))
    assert (unpack_mask(png, 0) == a).all() and (unpack_mask(png, 2) == c).all() and not unpack_mask(png, 1).any()
    half = unpack_mask(pack_masks({"a": a}, ("a",), size=(3, 4)), 0)  # resized (w, h) nearest
    assert half.shape == (4, 3) and half.any()


# ------------------------------------------------------------------------------------------------ synthetic masks
def test_synthetic_masks_cover_where_the_finding_changes_the_image():
    """Behaviour: the mask is where drawing the finding changes the pixels, and asking for masks changes none."""
    found = 0
    for i in range(40):
        rec = S.make_record(i, seed=0, size=128, masks=True)
        assert rec.image.tobytes() == S.make_record(i, seed=0, size=128).image.tobytes()
        drawn = {f["name"] for f in rec.meta["findings"]} & set(S.MASK_FINDINGS)
        assert set(rec.masks) == drawn
        case = S._sample_case(np.random.default_rng([0, i, 0]))
        for name in ("pneumothorax", "pleural_effusion", "consolidation"):
            f = case.get(name)
            if f is None or f.severity == "mild" or not rec.masks[name].sum() > 30:
                continue
            without = dataclasses.replace(case, findings=tuple(g for g in case.findings if g.name != name))
            diff = np.abs(rec.image.astype(float) - S._render(without, 0, i, 128).astype(float))
            m = rec.masks[name]
            assert diff[m].mean() > 4 * diff[~m].mean() + 1, (i, name, diff[m].mean(), diff[~m].mean())
            found += 1
    assert found >= 5


def test_prep_stores_masks_that_verify_checks_and_the_segmentation_set_reads(tmp_path):
    out = tmp_path / "masks"
    run_prep(PrepOptions(source="synthetic", out=str(out), num=24, synthetic_size=96, max_side=64, shard_size=12,
                         val_fraction=0.25, masks=True, progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mask_classes"] == list(S.MASK_FINDINGS)
    data = shard_masked_set(str(out), "train", "pneumothorax")
    keys = []
    for tar in sorted(out.glob("train-*.tar")):
        for key, parts in iter_tar_samples(str(tar)):
            rec = S.make_record(int(key[3:]), seed=0, size=96, masks=True)
            for bit, name in enumerate(S.MASK_FINDINGS):
                stored = unpack_mask(parts[MASK_MEMBER], bit)
                assert stored.shape == (64, 64)  # the JPEG's stored size
                assert stored.any() == (name in rec.masks and rec.masks[name].any()), (key, name)
            keys.append(key)
    assert data.keys == keys
    i = next(j for j, k in enumerate(data.keys) if data.labels[j, 0] == 1)
    assert data.mask(i, 64, 64).any() and data.positives_count() == sum(
        "pneumothorax" in json.loads(p["json"]).get("masks", []) for t in sorted(out.glob("train-*.tar"))
        for _, p in iter_tar_samples(str(t)))
    from mrm_scale.data.verify import check_sample

    key, parts = next(iter_tar_samples(str(sorted(out.glob("train-*.tar"))[0])))
    tok = manifest["tokenizer"]
    assert check_sample(key, parts, manifest["max_tokens"], tok) == []
    broken = dict(parts, **{MASK_MEMBER: pack_masks({}, ("a",), size=(32, 32))})
    assert check_sample(key, broken, manifest["max_tokens"], tok) == [
        f"key {key}: {MASK_MEMBER} is PNG L (32, 32), expected an 8-bit grayscale PNG of the image's size (64, 64)"]
    with pytest.raises(PrepError, match="only the synthetic corpus draws masks"):
        PrepOptions(source="csv", input="x.csv", out=str(tmp_path / "x"), masks=True).check()


def test_scores_follow_the_stated_rules():
    truth = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(truth)
    truth[1, 0, :1] = True
    pred[1, 0, :2] = True          # 4 of 8 predicted pixels right: Dice 2*4/(8+4)
    pred[2, 0, 0, 0] = True        # a false positive on an empty image
    t = summarise_scores(per_image_scores(pred, truth))
    assert t["dice"] == pytest.approx(8 / 13, abs=1e-4) and t["iou"] == pytest.approx(4 / 9, abs=1e-4)
    assert t["dice_per_image"] == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-4)  # empty & empty = 1
    assert t["dice_positive_images"] == pytest.approx(2 / 3, abs=1e-4)
    assert t["empty_images"] == 2 and t["false_positive_rate_empty"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ SIIM layout
def _siim_layout(tmp):
    """A SIIM-ACR-like root: nested DICOMs, train-rle.csv with a multi-row image and -1 rows, id lists."""
    root, splits = tmp / "siim", tmp / "splits"
    splits.mkdir(parents=True)
    rows = ["ImageId, EncodedPixels"]
    ids = {"train": [f"1.2.3.{i}" for i in range(10)], "val": [f"1.2.4.{i}" for i in range(6)],
           "test": [f"1.2.5.{i}" for i in range(6)]}
    rng = np.random.default_rng(0)
    for split, names in ids.items():
        for j, name in enumerate(names):
            arr = rng.normal(1200, 150, (48, 48))
            mask = np.zeros((48, 48), bool)
            if j % 2 == 0:                                      # half the images have a pneumothorax
                mask[4:20, 6:6 + 8 + j] = True
                arr[mask] += 1800
            folder = root / "dicom-images-train" / f"study{split}{j}" / "series1"
            folder.mkdir(parents=True)
            if not (split == "train" and j == 9):               # listed, no DICOM
                write_dicom(folder / f"{name}.dcm", np.clip(arr, 0, 4095))
            if split == "train" and j == 8:                     # a DICOM without a mask row
                continue
            if mask.any():
                top, bottom = mask.copy(), mask.copy()
                top[12:] = False
                bottom[:12] = False                             # two rows for one image, unioned
                rows += [f"{name}, {rle_encode(top)}", f"{name}, {rle_encode(bottom)}"]
            else:
                rows.append(f"{name}, -1")
    (root / "train-rle.csv").write_text("\n".join(rows) + "\n")
    (splits / "train_list.txt").write_text("\n".join(ids["train"] + [ids["test"][0]]) + "\n")  # overlaps test
    (splits / "train_10.txt").write_text("\n".join(ids["train"][:6]) + "\n")
    (splits / "val_list.txt").write_text("\n".join(ids["val"]) + "\n")
    (splits / "test_list.txt").write_text("\n".join(ids["test"]) + "\n")
    return root, splits


@pytest.mark.slow
def test_siim_layout_trains_a_few_steps_and_writes_dice(tmp_path, capsys):
    root, splits = _siim_layout(tmp_path)
    out = tmp_path / "out"
    common = ["--dataset", "siim", "--data-root", str(root), "--splits", str(splits), "--init", "random",
              "--preset", "tiny", "--image-size", "32", "--batch-size", "4", "--steps", "4", "--eval-every", "2",
              "--workers", "0", "--no-progress", "--overlays", "4"]
    assert segment([*common, "--label-fraction", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "segment" and res["dataset"] == "siim"
    assert res["data"]["train"]["samples"] == 9 and res["data"]["train"]["skipped"] == 2   # 11 listed
    assert res["data"]["source"]["overlap"]["train&test"] == 1
    assert res["data"]["val"]["positive"] == 3 and res["data"]["test"]["samples"] == 6
    for split in ("val", "test"):
        assert 0 <= res[split]["dice"] <= 1 and 0 <= res[split]["iou"] <= 1 and res[split]["images"] == 6
    assert [h["step"] for h in res["history"]] == [2, 4]
    skipped = (out / "skipped_images.txt").read_text().splitlines()[1:]
    assert sorted(s.split("\t")[2] for s in skipped) == ["missing", "no row in train-rle.csv"]
    assert "overlap" in capsys.readouterr().out
    assert len((out / "test_per_image.tsv").read_text().splitlines()) == 7
    # --disjoint drops the test id from train; 10% reads the paper's train_10.txt
    assert segment([*common, "--label-fraction", "0.1", "--disjoint", "--out", str(tmp_path / "o10")]) == 0
    res10 = json.loads((tmp_path / "o10" / "results.json").read_text())
    assert res10["data"]["train"]["samples"] == 6 and res10["data"]["source"]["split_files"]["train"] == "train_10.txt"
    assert segment([*common, "--label-fraction", "1", "--disjoint", "--out", str(tmp_path / "od")]) == 0
    assert json.loads((tmp_path / "od" / "results.json").read_text())["data"]["train"]["skipped"] == 2
    assert json.loads((tmp_path / "od" / "results.json").read_text())["data"]["train"]["samples"] == 8


@pytest.mark.realdata
def test_official_siim_id_lists_and_their_overlap(realdata):
    from mrm_scale.eval.seg_data import SIIM_FOLDER, siim_id_lists

    folder = str(realdata / "official-splits" / SIIM_FOLDER)
    files, ids, overlap = siim_id_lists(folder, 100)
    assert {k: len(v) for k, v in ids.items()} == {"train": 7969, "val": 1898, "test": 1904}
    assert overlap == {"train&test": 494, "val&test": 124, "train&val": 478}  # stated in seg_data and the README
    files10, ids10, overlap10 = siim_id_lists(folder, 10)
    assert files10["train"] == "train_10.txt" and len(ids10["train"]) == 797 and overlap10["train&test"] == 49
    assert set(ids10["train"]) <= set(ids["train"])
    assert all(i.startswith("1.2.276.0.7230010.3.1.4.") for v in ids.values() for i in v)


# ------------------------------------------------------------------------------------------------ learning
@pytest.fixture(scope="module")
def mask_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "shards"
    run_prep(PrepOptions(source="synthetic", out=str(out), num=400, synthetic_size=128, shard_size=100,
                         val_fraction=0.25, masks=True, progress=False, workers=2))
    return out


def _tb_images(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"images": 0})
    ea.Reload()
    return {tag: ea.Images(tag) for tag in ea.Tags()["images"]}


@pytest.mark.slow
def test_segmentation_learns_an_effusion_from_random_init_and_loads_its_encoder_back(mask_shards, tmp_path):
    """Behaviour: on synthetic effusion masks the random-init model gets well past the trivial scores in 150 steps;
    its encoder, saved as a timm-keyed file, is a pretrained --init for the next run (every key loaded)."""
    common = ["--shards", str(mask_shards), "--mask-class", "pleural_effusion", "--batch-size", "16", "--lr", "1e-3",
              "--workers", "1", "--precision", "bf16", "--no-progress"]
    out = tmp_path / "random"
    assert segment([*common, "--init", "random", "--steps", "150", "--eval-every", "50", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    first, best = res["history"][0], res["val"]
    # predicting nothing scores 0, every pixel about 0.04 (the effusions cover 2% of the val pixels)
    assert best["dice"] > 0.35, res["history"]
    assert best["positive_images"] > 3 and res["test"]["images"] == 50
    overlays = _tb_images(out / "tb")["val/overlay"]
    assert [o.step for o in overlays] == [50, 100, 150] and overlays[0].width > overlays[0].height > 0
    assert first["step"] == 50
    # the trained encoder as a timm ViT file -> --init
    sd = load_file(str(out / "best_model.safetensors"))
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    save_file(enc, str(tmp_path / "vit.safetensors"))
    out2 = tmp_path / "pretrained"
    assert segment([*common, "--init", str(tmp_path / "vit.safetensors"), "--preset", "tiny", "--steps", "10",
                    "--eval-every", "10", "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    loaded = res2["init"]["loaded"]
    assert loaded["missing"] == [] and loaded["unexpected"] == [] and loaded["loaded"] == len(enc)
    assert 0 <= res2["test"]["dice"] <= 1 and "val/overlay" in _tb_images(out2 / "tb")


@pytest.mark.slow
def test_segmentation_data_parallel_over_two_processes(mask_shards, tmp_path):
    """Two gloo processes: levels on block 0 only, so block 1 and the final norm are pruned (a parameter without a
    gradient would stop data-parallel training at its second step); every val/test image scored once."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29671",
           os.path.join(ROOT, "launch", "segment.py"), "--init", "random", "--shards", str(mask_shards),
           "--levels", "0,0,0,0", "--batch-size", "8", "--steps", "4", "--eval-every", "2", "--workers", "0",
           "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["hyper"]["processes"] == 2 and res["hyper"]["per_process_batch"] == 4
    assert res["val"]["images"] == 51 and res["test"]["images"] == 50   # every image scored once (101 val split)
    assert len((out / "test_per_image.tsv").read_text().splitlines()) == 51


def test_segmentation_recipes_state_the_papers_setup_and_refuse_bad_values():
    from mrm_scale.eval.datasets import DataSetError
    from mrm_scale.eval.recipes import PAPER_SEG_FACTS, seg_recipe
    from mrm_scale.eval.seg_model import default_levels

    r = seg_recipe("mrm-paper", "siim", 10)
    assert (r.image_size, r.sr_scale, r.loss, r.drop_path, r.channels) == (512, 1, "dice-focal", 0.1, 512)
    assert default_levels(12) == (3, 5, 7, 11) and r.from_paper == PAPER_SEG_FACTS
    assert (seg_recipe("mrm-paper", "siim", 100).steps, seg_recipe("mrm-paper", "siim", 1).steps) == (20000, 1000)
    with pytest.raises(DataSetError, match="1, 10 and 100 percent"):
        seg_recipe("mrm-paper", "siim", 5)
    with pytest.raises(DataSetError, match="--balance 1.5"):
        seg_recipe("default", None, 100, {"balance": 1.5})
    over = seg_recipe("default", None, 100, {"steps": 7, "levels": [0, 1, 1, 1]})
    assert over.overrides == {"steps": 7, "levels": [0, 1, 1, 1]} and over.levels == (0, 1, 1, 1)


@pytest.mark.slow
def test_segmentation_experiment_smoke(tmp_path):
    """The experiment end to end at smoke size: both pretrainings per seed, each arm segmented at each fraction, the
    pretrained arms from their exports and `none` from the seed's random init, a table and overlays per run."""
    p = subprocess.run([sys.executable, "-m", "mrm_scale.cli", "experiment", "label-efficiency", "--task", "segment",
                        "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["task"] == "segment" and res["mask_class"] == "pneumothorax" and set(res["arms"]) == {"mrm", "mae", "none"}
    for name, arm in res["arms"].items():
        for frac in res["settings"]["fractions"]:
            cell = arm["fractions"][f"{frac:g}"]
            assert [r["seed"] for r in cell["runs"]] == [0, 1] and cell["test_dice"]["n"] == 2
            assert all(0 <= r["test_dice"] <= 1 and r["train_positive"] >= 1 for r in cell["runs"])
            one = json.loads((tmp_path / "seg" / f"{name}-s0-f{frac:g}" / "results.json").read_text())
            assert one["init"]["init"] == ("random" if name == "none" else str(tmp_path / "exports" / f"{name}-s0"))
            assert one["recipe"]["balance"] == 0.5 and one["metric_notes"]["threshold_chosen_on_val"]
            assert "val/overlay" in _tb_images(tmp_path / "seg" / f"{name}-s0-f{frac:g}" / "tb")
    table = (tmp_path / "results.md").read_text()
    assert "| none (random init) |" in table and "test Dice (all pixels)" in table
    assert (tmp_path / "dice_vs_fraction.png").stat().st_size > 1000

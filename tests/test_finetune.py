"""Downstream evaluation: `launch/finetune.py` (linear probe / fine-tune) on labelled shards and split files,
label-fraction subsets, AUC, the label-efficiency experiment (smoke) and the real-data protocol."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mrm_scale.data.prep import PrepOptions, run_prep
from mrm_scale.eval.datasets import (
    DataSetError, draw_subset, load_image, parse_split_file, read_subset, shard_set, split_file_set, split_for_test,
)
from mrm_scale.eval.probe import Classifier, auc_table, layer_decay_groups, masked_bce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "launch", "finetune.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))


def run(cmd, check=True, timeout=600):
    p = subprocess.run([str(c) for c in cmd], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        pytest.fail(f"exit {p.returncode}: {' '.join(map(str, cmd))}\n{out[-6000:]}")
    return p.returncode, out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("labelled") / "syn"
    run_prep(PrepOptions(source="synthetic", out=str(out), num=200, synthetic_size=128, shard_size=16,
                         val_fraction=0.25, progress=False, workers=2))
    return str(out)


# ---------------------------------------------------------------------------------------------------- the job
@pytest.mark.slow
def test_linear_probe_on_shards_and_seeded_subsets(shards, tmp_path):
    common = [sys.executable, FINETUNE, "--mode", "linear", "--init", "random", "--preset", "tiny", "--shards", shards,
              "--label-fraction", "0.01", "--workers", "0", "--no-progress", "--epochs", "40"]
    _, out = run([*common, "--seed", "0", "--out", tmp_path / "a"])
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    from mrm_scale.data.synthetic import LABELS

    assert res["classes"] == list(LABELS) and res["mode"] == "linear"
    for split in ("val", "test"):
        table = res[split]
        assert set(table["auc"]) == set(LABELS)
        scored = [v for v in table["auc"].values() if v is not None]
        assert scored and all(0.0 <= v <= 1.0 for v in scored)
        assert table["mean_auc"] == pytest.approx(float(np.mean(scored)))
        assert set(table["skipped"]) == {c for c, v in table["auc"].items() if v is None}
    n_val = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["val"]["samples"]
    assert res["data"]["val"]["samples"] + res["data"]["test"]["samples"] == n_val  # val split halved, fixed
    assert (tmp_path / "a" / "best_head.safetensors").is_file()
    assert list((tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    subset_a = (tmp_path / "a" / "train_subset.txt").read_text().split()
    assert len(subset_a) == round(0.01 * res["data"]["train"]["samples"]) == res["train_subset"]["samples"]
    from mrm_scale.eval.finetune import main  # the reruns in-process (same code, no start-up cost)

    assert main([str(a) for a in common[2:]] + ["--seed", "0", "--out", str(tmp_path / "b")]) == 0
    assert main([str(a) for a in common[2:]] + ["--seed", "1", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "b" / "train_subset.txt").read_text().split() == subset_a
    assert (tmp_path / "c" / "train_subset.txt").read_text().split() != subset_a
    rerun = json.loads((tmp_path / "b" / "results.json").read_text())  # same seed: same subset, same probe
    assert rerun["test"]["mean_auc"] == pytest.approx(res["test"]["mean_auc"], abs=1e-3)


@pytest.mark.slow
def test_finetune_mode_with_a_given_train_subset(shards, tmp_path, capsys):
    subset = tmp_path / "keys.txt"
    train = shard_set(shards, "train")
    subset.write_text("\n".join(train.keys[:24]) + "\n")
    run([sys.executable, FINETUNE, "--mode", "finetune", "--init", "random", "--preset", "tiny", "--shards", shards,
         "--train-subset", subset, "--workers", "0", "--no-progress", "--epochs", "2", "--batch-size", "8",
         "--layer-decay", "0.65", "--drop-path", "0.1", "--out", tmp_path / "ft"])
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert (tmp_path / "ft" / "train_subset.txt").read_text().split() == sorted(train.keys[:24])
    assert res["train_subset"]["samples"] == 24 and res["recipe"]["layer_decay"] == 0.65
    assert res["recipe"]["name"] == "default" and res["recipe"]["overrides"] == {"layer_decay": 0.65, "epochs": 2,
                                                                                 "batch_size": 8}
    assert [h["epoch"] for h in res["history"]] == [1, 2] and [h["step"] for h in res["history"]] == [3, 6]
    assert res["best_step"] in (3, 6) and res["test"]["mean_auc"] is not None
    assert (tmp_path / "ft" / "best_model.safetensors").is_file()
    from mrm_scale.eval.finetune import main

    assert main(["--init", "random", "--shards", shards, "--train-subset", str(tmp_path / "nope.txt"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "nope.txt: file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_under_accelerate_launch_and_two_processes(shards, tmp_path):
    """`accelerate launch` (one process) and a real 2-process data-parallel group (torchrun, gloo): the same
    subset, half the steps per epoch with two processes, every test sample scored once, one results.json."""
    import shutil

    from mrm_scale.ports import free_port

    subset = tmp_path / "keys.txt"
    subset.write_text("\n".join(shard_set(shards, "train").keys[:32]) + "\n")
    job = [FINETUNE, "--mode", "finetune", "--init", "random", "--preset", "tiny", "--shards", shards,
           "--train-subset", subset, "--workers", "0", "--no-progress", "--epochs", "1", "--batch-size", "8"]
    accelerate = shutil.which("accelerate") or "accelerate"
    run([accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(free_port()), *job, "--out", tmp_path / "one"])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *job, "--out", tmp_path / "two"])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["hyper"]["processes"], two["hyper"]["processes"]) == (1, 2)
    # 32 samples, a global batch of 8: 8 per step on one process, 4 on each of two; the same 4 steps
    assert (one["history"][-1]["step"], two["history"][-1]["step"]) == (4, 4)
    assert (one["hyper"]["per_process_batch"], two["hyper"]["per_process_batch"]) == (8, 4)
    for res in (one, two):
        assert res["train_subset"]["samples"] == 32 and res["test"]["mean_auc"] is not None
        assert res["data"]["test"]["samples"] == one["data"]["test"]["samples"]


@pytest.mark.slow
def test_label_efficiency_experiment_smoke(tmp_path):
    run([sys.executable, "-m", "mrm_scale.cli", "experiment", "label-efficiency", "--smoke", "--out", tmp_path])
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["arms"]) == {"mrm", "mae", "none"}
    for arm in res["arms"].values():
        for frac in res["settings"]["fractions"]:
            cell = arm["fractions"][f"{frac:g}"]
            assert [r["seed"] for r in cell["runs"]] == [0, 1, 2]
            assert cell["test_mean_auc"]["n"] == 3 and 0 <= cell["test_mean_auc"]["mean"] <= 1
    for arm in ("mrm", "mae"):  # one pretraining per arm and seed, each with its own seed
        runs = res["arms"][arm]["pretraining"]["runs"]
        assert sorted(runs) == ["0", "1", "2"]
        cfgs = [json.loads((tmp_path / "runs" / f"{arm}-s{seed}" / "run_config.json").read_text()) for seed in runs]
        assert [c["args"]["seed"] for c in cfgs] == [0, 1, 2]
    assert all(r["final_losses"]["report_loss"] is not None for r in res["arms"]["mrm"]["pretraining"]["runs"].values())
    for r in res["arms"]["mrm"]["pretraining"]["runs"].values():  # the image gain of every MRM pretraining
        use = r["image_use"]
        assert use["image_gain"] == pytest.approx(use["loss_shuffled_image"] - use["loss_own_image"], abs=1e-6)
        assert use["masked_finding_tokens"] > 0 and use["image_gain_finding_words"] is not None
    assert res["arms"]["mrm"]["pretraining"]["image_use"]["image_gain"]["n"] == 3
    for frac in res["settings"]["fractions"]:  # each probe's labelled subset is saved beside the results
        for r in res["arms"]["mrm"]["fractions"][f"{frac:g}"]["runs"]:
            keys = (tmp_path / "subsets" / f"fraction{frac:g}_seed{r['seed']}.txt").read_text().split()
            assert len(keys) == r["train_samples"] == len(set(keys))
    table = (tmp_path / "results.md").read_text()
    for label in ("MRM (image + report", "MAE (image only", "none (random init)"):
        assert label in table
    assert " ± " in table
    assert (tmp_path / "auc_vs_fraction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the image-only arm exports no report model, and says so
    assert not (tmp_path / "exports" / "mae-s0" / "report_model").exists()
    assert "no report model" in (tmp_path / "exports" / "mae-s0" / "README.md").read_text()
    assert (tmp_path / "exports" / "mrm-s0" / "report_model" / "config.json").is_file()


@pytest.mark.realdata
def test_realdata_covid_finetune_with_split_files(realdata, tmp_path):
    covid = realdata / "covid-collection"
    _, out = run([sys.executable, FINETUNE, "--mode", "finetune", "--init", "random", "--preset", "tiny",
                  "--train-list", covid / "covid1" / "iscovid_train.txt", "--val-list",
                  covid / "covid1" / "iscovid_val.txt", "--test-list", covid / "covid1" / "iscovid_test.txt",
                  "--image-root", covid / "images", "--classes", "covid", "--epochs", "1", "--max-steps", "3",
                  "--batch-size", "16", "--workers", "0", "--no-progress", "--out", tmp_path])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["classes"] == ["covid"]
    for split in ("val", "test"):
        assert 0.0 <= res[split]["auc"]["covid"] <= 1.0 and res[split]["mean_auc"] == res[split]["auc"]["covid"]
        assert res["data"][split]["samples"] > 10
    assert res["history"][-1]["step"] == 3
    # entries whose image is not in the collection are skipped and counted, not silently dropped
    listed = sum(1 for line in open(covid / "covid1" / "iscovid_train.txt") if line.strip())
    assert res["data"]["train"]["samples"] + res["data"]["train"]["skipped"] == listed
    assert "listed images skipped" in out


# ---------------------------------------------------------------------------------------------- the pieces
def test_subsets_are_seeded_stratified_and_order_free():
    rng = np.random.default_rng(0)
    n, k = 300, 6
    labels = (rng.random((n, k)) < np.array([0.3, 0.2, 0.1, 0.05, 0.02, 0.01])).astype(np.float32)
    labels[5, 0] = np.nan
    keys = [f"k{i:04d}" for i in range(n)]
    a = draw_subset(keys, labels, 0.02, seed=0)
    assert len(a) == 6 and a == draw_subset(keys, labels, 0.02, seed=0)
    assert [keys[i] for i in a] != [keys[i] for i in draw_subset(keys, labels, 0.02, seed=1)]
    assert (labels[a] == 1).any(axis=0).all()  # 6 samples, 6 classes: one positive each
    perm = rng.permutation(n)  # the same keys in another order give the same subset (by key)
    b = draw_subset([keys[i] for i in perm], labels[perm], 0.02, seed=0)
    assert sorted(keys[perm[i]] for i in b) == sorted(keys[i] for i in a)
    assert len(draw_subset(keys, labels, 0.001, seed=0)) == 1
    assert draw_subset(keys, labels, 1.0, seed=3) == list(range(n))
    with pytest.raises(DataSetError, match="must be in"):
        draw_subset(keys, labels, 0.0, seed=0)


def test_split_files_parse_both_formats_and_skip_missing_images(tmp_path):
    from PIL import Image

    root = tmp_path / "img"
    (root / "sub dir").mkdir(parents=True)
    Image.fromarray((np.arange(64 * 48) % 251).astype(np.uint8).reshape(48, 64)).save(root / "a.png")
    Image.fromarray(np.full((40, 40, 4), 200, np.uint8), "RGBA").save(root / "sub dir" / "b c.png")
    (root / "bad.jpg").write_bytes(b"not an image")
    multi = tmp_path / "multi.txt"
    multi.write_text("a.png 1 0 -1\nsub dir/b c.png 0 1 1\nmissing.png 1 1 1\nbad.jpg 0 0 0\n")
    paths, labels = parse_split_file(str(multi))
    assert paths == ["a.png", "sub dir/b c.png", "missing.png", "bad.jpg"] and labels.shape == (4, 3)
    s = split_file_set(str(multi), str(root), ["x", "y", "z"])
    assert s.keys == ["a.png", "sub dir/b c.png"] and [w.split(":")[0] for _, w in s.skipped] == ["missing", "unreadable"]
    assert np.isnan(s.labels[0, 2]) and s.labels[1].tolist() == [0, 1, 1]  # -1 (uncertain) -> unknown
    img = load_image(s.read_bytes(1), s.keys[1], 32, 3, augment=False)
    assert img.shape == (3, 32, 32) and np.allclose(img[0], img[2])
    binary = tmp_path / "bin.txt"
    binary.write_text("a.png 1\nsub dir/b c.png 0\n")
    assert split_file_set(str(binary), str(root)).classes == ["label"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 1 0\nsub dir/b c.png 1\n")
    with pytest.raises(DataSetError, match=r"bad.txt:2: 1 labels, but earlier lines have 2"):
        parse_split_file(str(bad))
    with pytest.raises(DataSetError, match="class names"):
        split_file_set(str(binary), str(root), ["a", "b"])


def test_shard_set_matches_the_loader(shards, tmp_path):
    """Keys, labels and pixels of the random-access reader equal the streaming loader's (labels= option)."""
    from mrm_scale.data.loader import LoaderConfig, build_loader

    val = shard_set(shards, "val")
    cfg = LoaderConfig(shards=shards, split="val", backend="wds", batch_size=1, image_size=128, workers=0,
                       labels=list(val.classes), shuffle=False, augment=False)
    seen = {}
    for batch in build_loader(cfg):
        seen[batch["key"][0]] = (batch["image"][0], batch["labels"][0])
    n_val = json.load(open(os.path.join(shards, "manifest.json")))["splits"]["val"]["samples"]
    assert sorted(seen) == sorted(val.keys) and len(val) == n_val
    for i in (0, 17, len(val) - 1):
        image, labels = seen[val.keys[i]]
        assert torch.equal(torch.from_numpy(load_image(val.read_bytes(i), val.keys[i], 128, 3, False)), image)
        assert np.array_equal(np.nan_to_num(val.labels[i], nan=-7), np.nan_to_num(labels.numpy(), nan=-7))
    v, t = split_for_test(val, 0.5, 0)
    assert len(v) + len(t) == n_val and abs(len(v) - len(t)) <= 1 and not set(v.keys) & set(t.keys)
    assert split_for_test(val, 0.5, 0)[1].keys == t.keys
    (tmp_path / "subset.txt").write_text(f"{val.keys[0]}\nnope\n")
    with pytest.raises(DataSetError, match="1 keys are not in the training set"):
        read_subset(str(tmp_path / "subset.txt"), val)


def test_auc_skips_single_class_labels_and_bce_ignores_unknown():
    labels = np.array([[1, 0, np.nan], [0, 0, 1], [1, 0, 0], [0, 0, np.nan]], dtype=np.float32)
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.9], [0.8, 0.2, 0.1], [0.1, 0.4, 0.7]])
    t = auc_table(labels, scores, ["a", "b", "c"])
    assert t["auc"] == {"a": 1.0, "b": None, "c": 1.0} and t["mean_auc"] == 1.0
    assert t["skipped"] == {"b": "only negatives (4 samples)"}
    logits = torch.zeros(2, 2, requires_grad=True)
    loss = masked_bce(logits, torch.tensor([[1.0, float("nan")], [0.0, float("nan")]]))
    assert loss.item() == pytest.approx(float(np.log(2)))


def test_layer_decay_scales_lr_by_depth():
    from mrm_scale.model import get_preset

    model = Classifier(get_preset("tiny", report_weight=0), 3)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            by_name[names[id(p)]] = g
    assert by_name["head.weight"]["lr"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["encoder.blocks.1.attn.qkv.weight"]["lr"] == 0.5
    assert by_name["encoder.blocks.0.attn.qkv.weight"]["lr"] == 0.25
    assert by_name["encoder.patch_embed.proj.weight"]["lr"] == 0.125
    assert by_name["encoder.cls_token"]["weight_decay"] == 0.0 and by_name["head.bias"]["weight_decay"] == 0.0
    # random init is the MAE-style one (sin-cos positions), not zeros
    assert model.encoder.pos_embed.abs().sum() > 0

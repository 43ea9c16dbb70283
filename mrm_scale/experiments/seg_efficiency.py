"""``mrm-scale experiment label-efficiency --task segment --out DIR``: does MRM pretraining help locate a finding?

The same three encoders as the classification experiment (:mod:`.label_efficiency`: MRM, image-only MAE, no
pretraining; the same corpus, model, batch, learning rate and seeds, 1,000 pretraining steps instead of 1,500 so
that the whole experiment fits 45 minutes on 2 cores) are fine-tuned with ``launch/segment.py``'s job
(UPerNet on four levels of the encoder, MONAI Dice + focal loss) to segment the synthetic corpus' pneumothorax
masks (``prep --masks``; the masks do not change a pixel, so the pretraining data is the classification experiment's)
with 1%, 10% and 100% of the training images (a seeded stratified subset with at least one positive, the same for
every arm; half of each batch drawn from its images with a pneumothorax, with replacement, since the masks are
sparse and a CPU budget allows 120 steps; the probability threshold chosen on validation). The corpus' val split is cut in two fixed halves: validation (checkpoint choice) and test (reported).
Reported per encoder and fraction: test Dice over all pixels and the mean Dice over the test images that have a
pneumothorax, mean ± std over the seeds. Outputs in ``DIR``: ``results.json``, ``results.md``,
``dice_vs_fraction.png``, every run's folder under ``seg/`` (``results.json``, TensorBoard with overlays).

Re-running on the same ``--out`` reuses the prepared corpus, the finished pretraining runs and finished
segmentation runs.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .label_efficiency import ARM_LABEL, ARMS, prepare_corpus, pretrain_and_export, summarise

# segmentation fine-tuning of every arm (the pretraining settings are the classification experiment's)
# (sized with the pretraining for <= 45 min on 2 CPU cores; README "Label efficiency, segmentation")
SEG_FULL = dict(steps=1000, masks=True, mask_class="pneumothorax", seg_steps=120, seg_batch=16, seg_lr=3e-3, seg_eval_every=60,
                seg_channels=32, seg_precision="bf16", seg_balance=0.5)
SEG_SMOKE = dict(masks=True, mask_class="pneumothorax", seg_steps=4, seg_batch=4, seg_lr=1e-3, seg_eval_every=2,
                 seg_channels=32, seg_precision="bf16", seg_balance=0.5, seeds="0,1")


def _segment_run(out: str, arm: str, seed: int, fraction: float, shards: str, pre: dict, s: dict, workers: int) -> dict:
    from mrm_scale.eval.segment import main as segment

    run_dir = os.path.join(out, "seg", f"{arm}-s{seed}-f{fraction:g}")
    done = os.path.join(run_dir, "results.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    if arm == "none":
        init = ["--init", "random", "--preset", "tiny", "--image-size", str(s["image_size"])]
        for item in s["model_set"]:
            init += ["--set", item]
    else:
        init = ["--init", pre[arm]["runs"][str(seed)]["export"]]
    argv = [*init, "--shards", shards, "--mask-class", s["mask_class"], "--label-fraction", f"{fraction:g}",
            "--seed", str(seed), "--steps", str(s["seg_steps"]), "--batch-size", str(s["seg_batch"]),
            "--lr", str(s["seg_lr"]), "--eval-every", str(s["seg_eval_every"]), "--channels", str(s["seg_channels"]),
            "--precision", s["seg_precision"], "--balance", str(s["seg_balance"]), "--threshold", "auto",
            # one decoding worker beside the two compute threads: the 128-px crops decode in about a millisecond
            "--workers", str(min(1, workers)), "--no-progress", "--overlays", "8",
            "--out", run_dir + ".partial"]
    if os.path.isdir(run_dir + ".partial"):  # an interrupted run starts over (no stale TensorBoard events)
        import shutil

        shutil.rmtree(run_dir + ".partial")
    t0 = time.time()
    code = segment(argv)
    if code != 0:
        raise RuntimeError(f"segmentation run {arm} seed {seed} fraction {fraction:g} failed (exit {code})")
    if os.path.isdir(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    os.replace(run_dir + ".partial", run_dir)
    with open(done) as f:
        res = json.load(f)
    print(f"[experiment] segment {arm} seed {seed} @ {100 * fraction:g}%: test Dice {res['test']['dice']:.3f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    return res


def run_experiment(out: str, s: dict, workers: int = 2) -> dict:
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    shards = prepare_corpus(out, s)
    prep_s = time.time() - t0
    pre = pretrain_and_export(out, shards, s)
    t_seg = time.time()
    arms: dict = {}
    for arm in ARMS:
        per_fraction = {}
        for f in s["fractions"]:
            runs = []
            for seed in s["seeds"]:
                r = _segment_run(out, arm, seed, f, shards, pre, s, workers)
                runs.append({"seed": seed, "train_samples": r["train_subset"]["samples"],
                             "train_positive": r["train_subset"]["positive"], "best_step": r["best_step"],
                             "val_dice": r["val"]["dice"], "test_dice": r["test"]["dice"],
                             "test_iou": r["test"]["iou"], "test_dice_positive": r["test"]["dice_positive_images"],
                             "test_dice_per_image": r["test"]["dice_per_image"], "wall_s": r["wall_s"]})
            per_fraction[f"{f:g}"] = {
                "runs": runs, "train_samples": runs[0]["train_samples"],
                **{k: summarise([r[k] for r in runs]) for k in ("test_dice", "test_iou", "test_dice_positive",
                                                                "test_dice_per_image", "val_dice")}}
        arms[arm] = {"label": ARM_LABEL[arm], "fractions": per_fraction,
                     **({"pretraining": pre[arm]} if arm in pre else {})}
    with open(os.path.join(out, "seg", f"none-s{s['seeds'][0]}-f{s['fractions'][0]:g}", "results.json")) as fh:
        example = json.load(fh)
    results = {
        "experiment": "label-efficiency", "task": "segment", "settings": s, "mask_class": s["mask_class"],
        "data": {k: example["data"][k]["samples"] for k in ("train", "val", "test")},
        "test_positive": example["data"]["test"]["positive"], "global_batch": s["micro_batch"] * s["nproc"],
        "arms": arms, "prep_s": round(prep_s, 1), "segment_s": round(time.time() - t_seg, 1),
        "wall_s": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = write_table(os.path.join(out, "results.md"), results)
    plot(os.path.join(out, "dice_vs_fraction.png"), results)
    print(table, flush=True)
    print(f"[experiment] wrote {out}/results.json, results.md, dice_vs_fraction.png "
          f"({results['wall_s'] / 60:.1f} min)", flush=True)
    return results


def _cell(st: dict) -> str:
    return "n/a" if st["mean"] is None else f"{st['mean']:.3f} ± {st['std']:.3f}"


def write_table(path: str, results: dict) -> str:
    s = results["settings"]
    fr = s["fractions"]
    lines = []
    for key, title in (("test_dice", "test Dice (all pixels)"),
                       ("test_dice_positive", "test Dice, mean over images with a pneumothorax")):
        lines += [f"| encoder: {title} | " + " | ".join(
            f"{100 * f:g}% ({results['arms']['none']['fractions'][f'{f:g}']['train_samples']} images)" for f in fr)
            + " |", "|---|" + "---|" * len(fr)]
        for arm in ARMS:
            lines.append(f"| {ARM_LABEL[arm]} | " + " | ".join(_cell(results["arms"][arm]["fractions"][f"{f:g}"][key])
                                                            for f in fr) + " |")
        lines.append("")
    d = results["data"]
    meta = (f"Synthetic {results['mask_class']} masks, {d['train']} training images ({s['records']} records), "
            f"val {d['val']} / test {d['test']} ({results['test_positive']} test images with a pneumothorax); mean ± "
            f"std over seeds {s['seeds']} (seed = pretraining run, random init of none, labelled subset, head init "
            f"and data order). Segmentation: UPerNet ({s['seg_channels']} channels) on four levels of the encoder "
            f"at {s['image_size']} px crops ({s['image_size'] // 2} px encoder input), MONAI Dice + focal loss, "
            f"AdamW lr {s['seg_lr']:g} (layer decay 0.75), {s['seg_steps']} steps x {s['seg_batch']} with "
            f"{100 * s['seg_balance']:g}% of the draws from images with a pneumothorax, {s['seg_precision']}, the "
            f"best of {s['seg_steps'] // s['seg_eval_every']} validations (checkpoint and probability threshold, "
            "0.1-0.5, chosen on val). Pretraining as "
            f"the classification experiment, {s['steps']} steps x {results['global_batch']} per arm and seed. "
            f"Wall time {results['wall_s'] / 60:.1f} min (segmentation {results['segment_s'] / 60:.1f} min).")
    text = "\n".join(lines) + "\n" + meta + "\n"
    with open(path, "w") as f:
        f.write("# Label efficiency, segmentation: MRM vs image-only MAE vs no pretraining\n\n" + text)
    return text


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = results["settings"]["fractions"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, marker in zip(ARMS, "osd"):
        stats = [results["arms"][arm]["fractions"][f"{f:g}"]["test_dice"] for f in fr]
        ys = [np.nan if st["mean"] is None else st["mean"] for st in stats]
        ax.errorbar([100 * f for f in fr], ys, yerr=[st["std"] for st in stats], marker=marker, capsize=3,
                    label=ARM_LABEL[arm])
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images (%)")
    ax.set_ylabel(f"test Dice ({results['mask_class']})")
    ax.set_title("Segmentation, tiny ViT + UPerNet, synthetic corpus")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

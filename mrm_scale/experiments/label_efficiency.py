"""``mrm-scale experiment label-efficiency --out DIR``: does pretraining with reports help when labels are few?

On the built-in synthetic corpus (prepared in ``DIR/shards``; its mild findings are faint in the image and spelled
out in the report), three image encoders of ``tiny``'s geometry (``EXPERIMENT_MODEL``: wider and deeper) are compared:

- ``mrm``   MRM pretraining, image + report (λ = 1);
- ``mae``   image-only masked-image pretraining (λ = 0, ``--report-weight 0``): the same encoder, decoder, data,
            steps, batch, learning rate and seed; it lacks only the report head (so it spends less compute per
            step: the comparison equalises the image-side compute and the samples seen);
- ``none``  no pretraining: the same encoder with its initial weights (MAE-style init from the seed).

Both pretrainings run the real trainer as a subprocess, started by :mod:`mrm_scale.train.launcher`
(DeepSpeed's launcher on ``--nproc N`` ranks, a plain one-rank ``python -m mrm_scale.train.main`` when
``--nproc 1``) with the package's ``ds_configs/zero2.json``, so the experiment runs from an installed package as
well as from a checkout, and are exported with ``mrm-scale export``'s code. Everything is repeated per seed
(default 0, 1, 2): the seed is the pretraining run's seed (initial weights, masks, data order), the ``none``
encoder's init, the labelled subset and the probe head's init, so the spread covers pretraining as well as the
probe. Each encoder is linearly probed (frozen encoder, mean-pooled patch tokens, standardised linear head, best
epoch by validation AUC) with 1%, 10% and 100% of the training labels. The corpus' val split is cut in two fixed halves: validation (epoch selection) and test
(reported). Outputs in ``DIR``: ``results.json``, ``results.md``
(mean ± std of the test mean AUC per encoder × fraction) and ``auc_vs_fraction.png``.

Re-running on the same ``--out`` reuses the prepared corpus and finished pretraining runs (the trainer resumes).
The labelled subsets are saved in ``DIR/subsets/``.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from mrm_scale.formats.checkpoints import is_complete, tag_for
from mrm_scale.formats.run_record import checkpoints_dir
from mrm_scale.formats.shards import has_manifest, read_manifest, split_samples
from mrm_scale.formats.tokenizer import TokenizerIdentity
from mrm_scale.train.launcher import packaged_ds_config, start_pretraining, stop

log = logging.getLogger("mrm_scale.experiments.label_efficiency")

ARMS = ("mrm", "mae", "none")
ARM_LABEL = {"mrm": "MRM (image + report, λ=1)", "mae": "MAE (image only, λ=0)", "none": "none (random init)"}

# The experiment's model: tiny's geometry (128-px high-res, 64-px encoder input, 8-px patches) and decoder, with a
# wider, deeper encoder (128 x 4) and a wider text stack (128, MLP 512): its text stack reaches masked accuracy 0.61
# at 1,500 steps against 0.39 for tiny's 64-wide one, and both arms get the same encoder (README, Label efficiency).
EXPERIMENT_MODEL = ("embed_dim=128", "depth=4", "num_heads=4", "text_width=128", "text_intermediate=512")

# sized for <= 45 min on 2 CPU cores (see README "Export and evaluation" for the measured wall time)
FULL = dict(records=4000, synthetic_size=256, image_size=128, val_fraction=0.25, shard_size=64, steps=1500,
            micro_batch=16, lr=3e-3, warmup_steps=100, seeds="0,1,2", fractions="0.01,0.1,1.0", probe_epochs=300,
            model_set=EXPERIMENT_MODEL)
SMOKE = dict(records=96, synthetic_size=128, image_size=128, val_fraction=0.34, shard_size=8, steps=3,
             micro_batch=4, lr=1e-3, warmup_steps=1, seeds="0,1,2", fractions="0.1,1.0", probe_epochs=30,
             model_set=("embed_dim=32",))


def prepare_corpus(out: str, s: dict) -> str:
    from mrm_scale.data.prep import PrepOptions, run_prep

    shards = os.path.join(out, "shards")
    if not has_manifest(shards):
        print(f"[experiment] preparing {s['records']} synthetic records in {shards}", flush=True)
    res = run_prep(PrepOptions(source="synthetic", out=shards, num=s["records"], seed=0,
                               synthetic_size=s["synthetic_size"], shard_size=s["shard_size"],
                               val_fraction=s["val_fraction"], workers=min(4, os.cpu_count() or 1),
                               masks=bool(s.get("masks")), progress=False))
    del res
    return shards


def _start_pretraining(out: str, shards: str, arm: str, seed: int, s: dict):
    """Start (or resume) the trainer for one arm and seed; None when the run already finished."""
    name = f"{arm}-s{seed}"
    run_dir = os.path.join(out, "runs", name)
    done = os.path.join(checkpoints_dir(run_dir), tag_for(s["steps"]))  # the final tag, complete once saved
    if is_complete(done):
        print(f"[experiment] {name}: reusing the finished run {run_dir}", flush=True)
        return None
    flags = ["--deepspeed", packaged_ds_config("zero2.json"), "--preset", "tiny",
             "--image-size", str(s["image_size"]), "--report-weight", "1" if arm == "mrm" else "0", "--shards", shards, "--out-root",
             os.path.join(out, "runs"), "--name", name, "--max-steps", str(s["steps"]), "--micro-batch",
             str(s["micro_batch"]), "--lr", str(s["lr"]), "--warmup-steps", str(s["warmup_steps"]), "--seed", str(seed),
             "--save-every", str(s["steps"]), "--keep-last", "1", "--vis-every", "0", "--workers", "1",
             "--log-every", str(max(1, s["steps"] // 20)), "--backend", "wds"]
    for item in s["model_set"]:
        flags += ["--set", item]
    log_path = os.path.join(out, "logs", f"pretrain_{name}.log")
    print(f"[experiment] {name}: pretraining {s['steps']} steps ({s['nproc']} rank(s)); log {log_path}", flush=True)
    proc = start_pretraining(flags, s["nproc"], log_path=log_path)
    return {"proc": proc, "log": log_path, "done": done, "t0": time.time()}


def _finish_pretraining(arm: str, job) -> float | None:
    if job is None:
        return None
    code = job["proc"].wait()
    if code != 0 or not is_complete(job["done"]):
        with open(job["log"]) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"pretraining {arm} failed (exit {code}); see {job['log']}:\n{tail}")
    return round(time.time() - job["t0"], 1)


def pretrain_arms(out: str, shards: str, s: dict) -> dict[tuple[str, int], dict]:
    """Both pretrainings for every seed; one after the other, or MRM and MAE side by side when each has one
    rank and there are cores for both (``--smoke``)."""
    arms = ("mrm", "mae")
    walls = {}
    for seed in s["seeds"]:
        if s["nproc"] == 1 and (os.cpu_count() or 1) >= 2:
            jobs = {arm: _start_pretraining(out, shards, arm, seed, s) for arm in arms}
            try:
                for arm in arms:
                    walls[arm, seed] = _finish_pretraining(f"{arm}-s{seed}", jobs[arm])
            finally:
                for job in jobs.values():
                    if job is not None:
                        stop(job["proc"])
        else:
            for arm in arms:
                job = _start_pretraining(out, shards, arm, seed, s)
                try:
                    walls[arm, seed] = _finish_pretraining(f"{arm}-s{seed}", job)
                finally:  # an interrupted wait (Ctrl-C) leaves no rank behind
                    if job is not None:
                        stop(job["proc"])
    return {(arm, seed): {"run_dir": os.path.join(out, "runs", f"{arm}-s{seed}"), "wall_s": wall,
                          "reused": wall is None} for (arm, seed), wall in walls.items()}


@torch.no_grad()
def report_image_use(export_dir: str, shards: str, image_size: int, batches: int = 8) -> dict:
    """Does the MRM report head use the image? :func:`mrm_scale.model.diagnostics.image_use` on the first
    ``batches`` x 32 val records (own images vs images rolled by one, the same word masks), averaged over the
    batches: report loss with the own / another image, the image gain (all masked words, and the words that name
    a finding, a side or a severity) and the masked accuracy. A gain near 0 means the text was predicted from the
    text alone, and the encoder got little signal from the reports."""
    from tokenizers import Tokenizer

    from mrm_scale.data.loader import LoaderConfig, build_loader
    from mrm_scale.data.synthetic import finding_word_positions
    from mrm_scale.eval.loading import load_full_model
    from mrm_scale.model.diagnostics import image_use

    model = load_full_model(export_dir).eval()
    manifest = read_manifest(shards)
    tok = Tokenizer.from_file(TokenizerIdentity.from_dict(manifest["tokenizer"], shards).path(shards))
    bs = max(2, min(32, split_samples(manifest, "val")))
    cfg = LoaderConfig(shards=shards, split="val", backend="wds", batch_size=bs, image_size=image_size, workers=0,
                       shuffle=False, augment=False, max_tokens=model.cfg.max_tokens, channels=model.cfg.in_chans)
    runs = []
    for i, batch in enumerate(build_loader(cfg)):
        if i >= batches:
            break
        runs.append(image_use(model, batch, 1000 + i, finding_word_positions(tok, batch)))
    keys = [k for k in runs[0] if isinstance(runs[0][k], float)]
    out = {k: float(np.mean([r[k] for r in runs if r[k] is not None])) for k in keys}
    out.update(samples=sum(r["samples"] for r in runs), masked_tokens=sum(r["masked_tokens"] for r in runs),
               masked_finding_tokens=sum(r.get("masked_finding_tokens", 0) for r in runs))
    return out


@torch.no_grad()
def extract(model, data, size: int, channels: int, workers: int) -> torch.Tensor:
    from torch.utils.data import DataLoader

    from mrm_scale.eval.datasets import ImageDataset

    loader = DataLoader(ImageDataset(data, size, channels), batch_size=64, shuffle=False, num_workers=workers)
    model.eval()
    out = []
    for images, _, _ in loader:
        out.append(model.features(images).float())
    return torch.cat(out)


def summarise(values: list[float]) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None, "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
            "n": int(arr.size)}


def write_table(path: str, results: dict) -> str:
    fr = results["settings"]["fractions"]
    head = "| encoder | " + " | ".join(f"{100 * f:g}% labels" for f in fr) + " |"
    lines = [head, "|---|" + "---|" * len(fr)]
    for arm in ARMS:
        cells = []
        for f in fr:
            st = results["arms"][arm]["fractions"][f"{f:g}"]["test_mean_auc"]
            cells.append("n/a" if st["mean"] is None else f"{st['mean']:.3f} ± {st['std']:.3f}")
        lines.append(f"| {ARM_LABEL[arm]} | " + " | ".join(cells) + " |")
    s = results["settings"]
    meta = (f"Test mean ROC AUC over {len(results['classes'])} classes ({results['data']['test']} test samples), "
            f"mean ± std over seeds {s['seeds']} (seed = pretraining run, random init of none, labelled subset and "
            f"head init); linear probe on the frozen encoder's mean-pooled patch tokens. Corpus: {s['records']} "
            f"synthetic records "
            f"({results['data']['train']} train), tiny preset" + (f" with {', '.join(s['model_set'])}" if s["model_set"] else "")
            + f" at {s['image_size']} px high-res / "
            f"{s['image_size'] // 2} px encoder input; pretraining {s['steps']} steps x {results['global_batch']} "
            f"per arm and seed. Wall time {results['wall_s'] / 60:.1f} min.")
    pre = {a: results["arms"][a]["pretraining"] for a in ("mrm", "mae")}
    walls = ", ".join(f"{a.upper()} {pre[a]['wall_s']:.0f} s" for a in pre if pre[a].get("wall_s"))
    meta += (f" Equal budget = same steps, batch, samples and image-side compute; training cost per sample MRM "
             f"{pre['mrm']['train_gflops_per_sample']} vs MAE {pre['mae']['train_gflops_per_sample']} GFLOP"
             + (f" (pretraining wall, all seeds: {walls})" if walls else "") + ".")
    use = pre["mrm"].get("image_use")
    gains = ""
    if use:
        def ms(key, fmt="+.4f"):
            st = use[key]
            return f"{st['mean']:{fmt}} ± {st['std']:.4f}"

        seeds = ", ".join(f"seed {seed}: {r['image_use']['image_gain']:+.4f} / "
                          f"{r['image_use']['image_gain_finding_words']:+.4f}"
                          for seed, r in pre["mrm"]["runs"].items())
        gains = (
            f"\n\nMRM's report head on val ({next(iter(pre['mrm']['runs'].values()))['image_use']['samples']} "
            "records, own image vs another record's, the same masks; mean ± std "
            "over the seeds):\n\n| | all masked words | words naming a finding, side or severity |\n|---|---|---|\n"
            f"| report loss, own image | {ms('loss_own_image', '.3f')} | |\n"
            f"| report loss, another image | {ms('loss_shuffled_image', '.3f')} | |\n"
            f"| **image gain** (nats per masked token) | {ms('image_gain')} | {ms('image_gain_finding_words')} |\n"
            f"| masked accuracy | {ms('masked_accuracy', '.3f')} | {ms('masked_accuracy_finding_words', '.3f')} |"
            f"\n\nImage gain per pretraining (all / finding words): {seeds}.")
    text = "\n".join(lines) + gains + "\n\n" + meta + "\n"
    with open(path, "w") as f:
        f.write("# Label efficiency: MRM vs image-only MAE vs no pretraining\n\n" + text)
    return text


def plot(path: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = results["settings"]["fractions"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, marker in zip(ARMS, "osd"):
        stats = [results["arms"][arm]["fractions"][f"{f:g}"]["test_mean_auc"] for f in fr]
        ys = [np.nan if st["mean"] is None else st["mean"] for st in stats]
        es = [st["std"] for st in stats]
        ax.errorbar([100 * f for f in fr], ys, yerr=es, marker=marker, capsize=3, label=ARM_LABEL[arm])
    ax.set_xscale("log")
    ax.set_xlabel("labelled training samples (%)")
    ax.set_ylabel("test mean ROC AUC")
    ax.set_title("Linear probe, tiny ViT, synthetic corpus")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pretrain_and_export(out: str, shards: str, s: dict) -> dict:
    """Both pretrainings for every seed (:func:`pretrain_arms`), each exported to ``out/exports/ARM-sSEED``:
    ``{arm: {"runs": {seed: {run_dir, wall_s, export, step, final_losses}}, "train_gflops_per_sample", "wall_s"}}``."""
    from mrm_scale.eval.export import export
    from mrm_scale.model import get_preset
    from mrm_scale.model.flops import formula_training_flops
    from mrm_scale.model.presets import parse_overrides

    pre: dict = {arm: {"runs": {}} for arm in ("mrm", "mae")}
    for (arm, seed), info in pretrain_arms(out, shards, s).items():
        name = f"{arm}-s{seed}"
        exp_dir = os.path.join(out, "exports", name)
        meta = export(info["run_dir"], exp_dir, overwrite=True)
        pre[arm]["runs"][str(seed)] = {**info, "export": exp_dir, "step": meta["source"]["step"],
                                       "final_losses": meta["final_losses"]}
        print(f"[experiment] {name}: exported to {exp_dir}; final losses {meta['final_losses']}", flush=True)
    vocab = TokenizerIdentity.from_dict(read_manifest(shards)["tokenizer"], shards).vocab_size
    for arm in pre:
        arm_cfg = get_preset("tiny", img_size=s["image_size"], report_weight=1.0 if arm == "mrm" else 0.0,
                             **parse_overrides(s["model_set"]))
        pre[arm]["train_gflops_per_sample"] = round(formula_training_flops(arm_cfg, vocab_size=vocab)["total"] / 1e9, 4)
        walls = [r["wall_s"] for r in pre[arm]["runs"].values()]
        pre[arm]["wall_s"] = None if None in walls else round(sum(walls), 1)
    return pre


def run_experiment(out: str, s: dict, workers: int = 2) -> dict:
    from mrm_scale.model import get_preset
    from mrm_scale.model.presets import parse_overrides

    from mrm_scale.eval.datasets import draw_subset, shard_set, split_for_test, write_subset
    from mrm_scale.eval.loading import load_encoder_weights
    from mrm_scale.eval.probe import Classifier, apply_head, auc_table, fit_linear_probe, init_encoder_weights

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    shards = prepare_corpus(out, s)
    prep_s = time.time() - t0
    pre = pretrain_and_export(out, shards, s)
    for seed, r in pre["mrm"]["runs"].items():
        r["image_use"] = report_image_use(r["export"], shards, s["image_size"])
        print(f"[experiment] mrm-s{seed} report head on val: image gain {r['image_use']['image_gain']:+.4f} "
              f"(finding words {r['image_use']['image_gain_finding_words']:+.4f}), masked accuracy "
              f"{r['image_use']['masked_accuracy']:.3f}", flush=True)
    pre["mrm"]["image_use"] = {k: summarise([r["image_use"][k] for r in pre["mrm"]["runs"].values()])
                               for k in ("loss_own_image", "loss_shuffled_image", "image_gain",
                                         "image_gain_finding_words", "masked_accuracy",
                                         "masked_accuracy_finding_words")}

    train = shard_set(shards, "train")
    classes = train.classes
    val, test = split_for_test(shard_set(shards, "val", classes), 0.5, 0)
    cfg = get_preset("tiny", img_size=s["image_size"], **{**parse_overrides(s["model_set"]), "report_weight": 0.0})
    # the labelled subsets depend only on (fraction, seed): drawn once, saved beside the results, used by every arm
    subsets = {(f, seed): draw_subset(train.keys, train.labels, f, seed) for f in s["fractions"] for seed in s["seeds"]}
    os.makedirs(os.path.join(out, "subsets"), exist_ok=True)
    for (f, seed), idx in subsets.items():
        write_subset(os.path.join(out, "subsets", f"fraction{f:g}_seed{seed}.txt"), [train.keys[i] for i in idx])
    arms: dict = {}
    for arm in ARMS:
        runs_by_fraction: dict[float, list] = {f: [] for f in s["fractions"]}
        for seed in s["seeds"]:
            torch.manual_seed(seed)
            model = Classifier(cfg, len(classes))  # "none" keeps this MAE-style init
            if arm != "none":
                _, sd, _ = load_encoder_weights(pre[arm]["runs"][str(seed)]["export"])
                init_encoder_weights(model.encoder, sd)
            t1 = time.time()
            feats = {name: extract(model, d, cfg.img_size, cfg.in_chans, workers)
                     for name, d in (("train", train), ("val", val), ("test", test))}
            print(f"[experiment] {arm} seed {seed}: features in {time.time() - t1:.0f} s", flush=True)
            for f in s["fractions"]:
                idx = subsets[f, seed]
                fit = fit_linear_probe(feats["train"][idx], torch.from_numpy(train.labels[idx]), feats["val"],
                                       val.labels, classes, epochs=s["probe_epochs"], seed=seed)
                te = auc_table(test.labels, apply_head(fit["head"], feats["test"]), classes)
                runs_by_fraction[f].append({
                    "seed": seed, "train_samples": len(idx), "best_epoch": fit["best_epoch"],
                    "val_mean_auc": fit["best_val"]["mean_auc"], "test_mean_auc": te["mean_auc"],
                    "test_auc": te["auc"]})
        per_fraction = {}
        for f, runs in runs_by_fraction.items():
            per_fraction[f"{f:g}"] = {
                "runs": runs, "test_mean_auc": summarise([r["test_mean_auc"] for r in runs]),
                "val_mean_auc": summarise([r["val_mean_auc"] for r in runs]),
                "train_samples": runs[0]["train_samples"]}
            st = per_fraction[f"{f:g}"]["test_mean_auc"]
            shown = ("n/a (no class with both labels in test)" if st["mean"] is None
                     else f"{st['mean']:.3f} ± {st['std']:.3f}")
            print(f"[experiment] {arm} @ {100 * f:g}% labels: test mean AUC {shown}", flush=True)
        arms[arm] = {"label": ARM_LABEL[arm], "fractions": per_fraction, **({"pretraining": pre[arm]}
                                                                            if arm in pre else {})}
    results = {
        "experiment": "label-efficiency", "settings": s, "classes": classes,
        "data": {"train": len(train), "val": len(val), "test": len(test), "shards": shards},
        "global_batch": s["micro_batch"] * s["nproc"], "arms": arms,
        "prep_s": round(prep_s, 1), "wall_s": round(time.time() - t0, 1),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = write_table(os.path.join(out, "results.md"), results)
    plot(os.path.join(out, "auc_vs_fraction.png"), results)
    print(table, flush=True)
    print(f"[experiment] wrote {out}/results.json, results.md, auc_vs_fraction.png "
          f"({results['wall_s'] / 60:.1f} min)", flush=True)
    return results

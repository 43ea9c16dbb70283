"""Downstream evaluation job behind ``launch/finetune.py``: linear probe or full fine-tune, per-class ROC AUC.

    python launch/finetune.py --recipe mrm-paper --dataset nih --data-root /data/NIH --splits DatasetsSplits/NIH_ChestX-ray \
        --label-fraction 0.01 --init MRM.pth --out eval/nih-1
    python launch/finetune.py --mode linear --init EXPORT_OR_RUN --shards DIR --label-fraction 0.01 --out OUT
    accelerate launch launch/finetune.py --mode finetune --init EXPORT_OR_RUN --train-list ... --out OUT

Runs under ``accelerate``: one process with plain ``python``; data-parallel with ``accelerate launch --multi_gpu
--num_processes N`` on GPUs, or ``torchrun --nproc_per_node N`` on CPU (gloo).

Recipes (:mod:`.recipes`): ``--recipe default`` (this project's linear probe / fine-tune) or ``--recipe mrm-paper``
(the paper's fine-tuning per dataset and label fraction); explicit flags override single values.

Inputs (one of):
- ``--dataset chexpert|nih|rsna|covid --data-root DIR [--splits DIR]``: the paper's split files for the label
  fraction (0.01 -> ``train_1.txt``, 0.1 -> ``train_10.txt``, 1 -> ``train_list.txt``), with the images in
  their official layout (:mod:`.adapters`).
- ``--shards DIR``: labelled shards (labels from ``KEY.json``); train = split ``train``, val = split ``val``;
  test = ``--test-shards DIR`` (its ``--test-split``, default ``val``), else a fixed ``--test-fraction`` (0.5) of
  val, drawn with ``--split-seed`` (default 0, independent of ``--seed``: every run scores the same test set).
- ``--train-list/--val-list[/--test-list]`` split files (``relative/path label1 label2 ...``, or
  ``FILENAME LABEL``) under ``--image-root``; without ``--test-list`` the test set is cut from val as above.

``--init``: an export folder, a run or checkpoint folder, one weights file (timm / MAE ViT, or a checkpoint in the
original MRM layout, read with ``weights_only=True``), or ``random`` (with ``--preset``).

Outputs in ``--out``: ``results.json`` (the resolved recipe, the data, the init and what of it loaded, per-class
and mean AUC on val at the best evaluation and on test with the best weights), ``train_subset.txt`` (the training
keys used), ``skipped_images.txt`` (every listed image not used, with the reason), the best weights
(``best_head.safetensors`` for the linear probe: weight, bias and the standardisation; ``best_model.safetensors``
when fine-tuning), TensorBoard scalars in ``tb/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from mrm_scale.formats.results import HEAD_FILE, MODEL_FILE, RESULTS_FILE, SKIPPED_FILE, SUBSET_FILE, TB_DIR

from .adapters import ADAPTERS, get_adapter, official_sets
from .datasets import (
    DataSetError, ImageDataset, LabelledSet, draw_subset, read_subset, shard_set, split_file_set, split_for_test,
    write_skipped, write_subset,
)
from .loading import ExportError, load_encoder_weights
from .probe import (
    Classifier, apply_head, auc_table, fit_linear_probe, init_encoder_weights, layer_decay_groups, masked_bce,
    schedule_factor,
)
from .recipes import RECIPES, Recipe, resolve_recipe, run_flops, run_images

log = logging.getLogger("mrm_scale.eval.finetune")
# command-line flag (argparse dest) -> recipe field; a flag given overrides the recipe's value
RECIPE_FLAGS = {"lr": "lr", "weight_decay": "weight_decay", "layer_decay": "layer_decay", "drop_path": "drop_path",
                "warmup_epochs": "warmup_epochs", "warmup_steps": "warmup_steps", "steps": "steps",
                "epochs": "epochs", "batch_size": "batch_size", "clip_grad": "clip_grad", "eval_every": "eval_every",
                "image_size": "image_size", "optimizer": "optimizer", "momentum": "momentum"}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--recipe", choices=RECIPES, default="default",
                   help="default: this project's probe / fine-tune; mrm-paper: the paper's fine-tuning for "
                        "--dataset at --label-fraction (flags below override single values)")
    p.add_argument("--mode", choices=("linear", "finetune"), default=None,
                   help="linear: frozen encoder, standardised linear probe; finetune: all weights (default: linear "
                        "for --recipe default, finetune for mrm-paper)")
    p.add_argument("--init", required=True,
                   help="an export folder (mrm-scale export), a run or checkpoint folder, a weights file (timm / "
                        "MAE ViT or the original MRM checkpoint, .pth/.safetensors), or 'random' (with --preset)")
    p.add_argument("--preset", default=None,
                   help="model preset for --init random (default tiny); for a weights file, the preset whose "
                        "number of heads it has (default: the preset of its width and depth)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=tuple(ADAPTERS), default=None,
                   help="one of the paper's downstream sets in its official layout (with --data-root)")
    d.add_argument("--data-root", default=None, help="--dataset: the downloaded dataset's folder")
    d.add_argument("--splits", default=None,
                   help="--dataset: folder of the paper's split files (the original repository's "
                        "DatasetsSplits/<dataset>); default: the data root")
    d.add_argument("--split-index", type=int, default=1, help="--dataset covid: which of the five splits (1-5)")
    d.add_argument("--shards", default=None, help="labelled shard folder: train = split train, val = split val")
    d.add_argument("--train-split", default="train")
    d.add_argument("--val-split", default="val")
    d.add_argument("--test-shards", default=None, help="shard folder scored as the test set")
    d.add_argument("--test-split", default="val", help="split of --test-shards used as test")
    d.add_argument("--train-list", default=None, help="split file: 'relative/path label1 label2 ...' per line")
    d.add_argument("--val-list", default=None)
    d.add_argument("--test-list", default=None)
    d.add_argument("--image-root", default=None, help="folder the split files' paths are relative to")
    d.add_argument("--classes", default=None, help="comma-separated class names (default: from the labels)")
    d.add_argument("--test-fraction", type=float, default=0.5,
                   help="without a test set: this fraction of val becomes test (fixed by --split-seed)")
    d.add_argument("--split-seed", type=int, default=0)
    d.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of the training labels (0.01, 0.1, 1.0): with --dataset the paper's own split "
                        "file for it; otherwise a seeded, stratified subset")
    d.add_argument("--train-subset", default=None, help="file of training keys to use (e.g. a train_subset.txt)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    t = p.add_argument_group("training (each flag given overrides the recipe's value)")
    t.add_argument("--seed", type=int, default=0, help="subset draw, head init, shuffling, augmentation")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--layer-decay", type=float, default=None, help="finetune: lr x decay^(depth+1-layer)")
    t.add_argument("--drop-path", type=float, default=None, help="finetune: stochastic depth (max rate)")
    t.add_argument("--batch-size", type=int, default=None, help="images per optimizer step over all processes")
    t.add_argument("--clip-grad", type=float, default=None, help="gradient norm clip")
    t.add_argument("--steps", type=int, default=None, help="finetune: optimizer steps (the schedule's length)")
    t.add_argument("--epochs", type=int, default=None,
                   help="linear: full-batch steps on cached features; finetune: epochs, when the recipe has no steps")
    t.add_argument("--warmup-steps", type=int, default=None, help="finetune: linear warmup steps")
    t.add_argument("--warmup-epochs", type=float, default=None, help="finetune: warmup in epochs (no --warmup-steps)")
    t.add_argument("--eval-every", type=int, default=None,
                   help="score val every N steps (finetune default: every epoch of the training set)")
    t.add_argument("--image-size", type=int, default=None,
                   help="side of the crop the model gets (default: the recipe's, else the init's high-resolution "
                        "side, which the encoder sees resized by 1/sr_scale)")
    t.add_argument("--max-steps", type=int, default=None,
                   help="finetune: stop after this many steps; the schedule stays the recipe's (a truncated run)")
    t.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="accelerate mixed precision (auto: bf16 on CUDA, none on CPU)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


# ----------------------------------------------------------------------------------------------------------------
# data and init
# ----------------------------------------------------------------------------------------------------------------
def label_percent(fraction: float) -> int:
    """0.01 -> 1, 0.1 -> 10, 1.0 -> 100 (the paper's split files are named by percent)."""
    return int(round(fraction * 100))


def load_data(args) -> tuple[LabelledSet, LabelledSet, LabelledSet, dict]:
    """(train, val, test, description of where each came from)."""
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    given = [name for name, v in (("--dataset", args.dataset), ("--shards", args.shards),
                                  ("--train-list", args.train_list)) if v]
    if len(given) != 1:
        raise DataSetError("give one of --dataset NAME --data-root DIR, --shards DIR, or --train-list FILE "
                           f"--val-list FILE (with --image-root); got {', '.join(given) or 'none'}")
    if args.dataset:
        if not args.data_root:
            raise DataSetError(f"--dataset {args.dataset} needs --data-root: {get_adapter(args.dataset).layout}")
        adapter = get_adapter(args.dataset)
        train, val, test, info = official_sets(adapter, args.data_root, args.splits,
                                               label_percent(args.label_fraction), args.split_index)
        return train, val, test, {**info, "test": test.name}
    if args.shards:
        train = shard_set(args.shards, args.train_split, classes)
        classes = train.classes
        val = shard_set(args.shards, args.val_split, classes)
        if args.test_shards:
            test, how = shard_set(args.test_shards, args.test_split, classes), f"{args.test_shards}:{args.test_split}"
        else:
            val, test = split_for_test(val, args.test_fraction, args.split_seed)
            how = f"{args.test_fraction:g} of {args.shards}:{args.val_split} (split seed {args.split_seed})"
        return train, val, test, {"dataset": None, "test": how}
    if not args.val_list:
        raise DataSetError("--train-list needs --val-list (and optionally --test-list)")
    root = args.image_root or os.path.dirname(os.path.abspath(args.train_list))
    train = split_file_set(args.train_list, root, classes)
    classes = train.classes
    val = split_file_set(args.val_list, root, classes)
    if args.test_list:
        test, how = split_file_set(args.test_list, root, classes), args.test_list
    else:
        val, test = split_for_test(val, args.test_fraction, args.split_seed)
        how = f"{args.test_fraction:g} of {args.val_list} (split seed {args.split_seed})"
    return train, val, test, {"dataset": None, "test": how}


def resolve_init(args, recipe: Recipe):
    """(model config for the recipe, encoder state dict or None, description)."""
    from mrm_scale.model import get_preset

    if args.init == "random":
        cfg = get_preset(args.preset or "tiny")
        sd, info = None, {"init": "random", "preset": cfg.name}
    else:
        cfg, sd, info = load_encoder_weights(args.init, args.preset)
        info = {"init": os.path.abspath(args.init), **info}
    over = {"report_weight": 0.0, "drop_path": recipe.drop_path if recipe.mode == "finetune" else 0.0}
    if recipe.image_size:
        over["img_size"] = recipe.image_size
    if recipe.sr_scale:
        over["sr_scale"] = recipe.sr_scale
    if recipe.learned_pos_embed:
        over["pos_embed"] = "learned"
    return cfg.replace(**over), sd, info


def _loader(ds, batch_size, workers, shuffle=False, seed=0):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      persistent_workers=False, drop_last=False)


@torch.no_grad()
def run_model(acc, model, loader, n: int, fn, progress: str | None, disable: bool) -> torch.Tensor:
    """``fn(model, images)`` over a prepared loader, gathered across processes, in dataset order (N, ...)."""
    from tqdm.auto import tqdm

    out = None
    model.eval()
    for images, _, idx in tqdm(loader, desc=progress, disable=disable, leave=False):
        with acc.autocast():
            y = fn(model, images).float()
        idx, y = acc.gather_for_metrics((idx, y))
        if out is None:
            out = torch.zeros((n, *y.shape[1:]), dtype=torch.float32)
        out[idx.cpu()] = y.cpu()
    return out


def forward_flops(cfg) -> float:
    """Matrix-product FLOPs of one encoder forward on the whole image (the downstream model's cost)."""
    from mrm_scale.model.flops import encoder_forward_flops

    return float(encoder_forward_flops(cfg))


# ----------------------------------------------------------------------------------------------------------------
# the job
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (DataSetError, ExportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_recipe(args) -> Recipe:
    percent = label_percent(args.label_fraction) if args.dataset else None
    overrides = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items()}
    return resolve_recipe(args.recipe, args.mode, args.dataset, percent, overrides)


def run(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    recipe = build_recipe(args)
    linear = recipe.mode == "linear"
    precision = args.precision if args.precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    # cpu=True without a GPU: several CPU processes (torchrun / accelerate launch) then form a real MULTI_CPU group
    acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    main_proc = acc.is_main_process
    quiet = args.no_progress or not acc.is_local_main_process
    if recipe.batch_size % acc.num_processes:
        raise ValueError(f"--batch-size {recipe.batch_size} (recipe {recipe.name}) is not divisible by the "
                         f"{acc.num_processes} processes; give a multiple of {acc.num_processes}")
    per_process = recipe.batch_size // acc.num_processes

    train_all, val, test, data_info = load_data(args)
    classes = train_all.classes
    if args.train_subset:
        subset = read_subset(args.train_subset, train_all)
        fraction_note = f"given subset {args.train_subset}"
    elif args.dataset:
        subset = list(range(len(train_all)))
        fraction_note = f"the paper's {data_info['split_files']['train']}"
    else:
        subset = draw_subset(train_all.keys, train_all.labels, args.label_fraction, args.seed)
        fraction_note = f"label fraction {args.label_fraction:g}, seed {args.seed}"
    train = train_all.subset(subset)
    os.makedirs(args.out, exist_ok=True)
    skipped = {"train": train_all, "val": val, "test": test}
    if main_proc:
        write_subset(os.path.join(args.out, SUBSET_FILE), train.keys)
        n_skipped = write_skipped(os.path.join(args.out, SKIPPED_FILE), skipped)
        print(f"train {len(train)} of {len(train_all)} samples ({fraction_note}); val {len(val)}; test {len(test)} "
              f"({data_info['test']}); classes {classes}; train positives {train.positives()}", flush=True)
        if n_skipped:
            print(f"{n_skipped} listed images not used (missing or unreadable): "
                  + ", ".join(f"{k} {len(v.skipped)}" for k, v in skipped.items() if v.skipped)
                  + f"; each named in {os.path.join(args.out, SKIPPED_FILE)}", flush=True)

    cfg, enc_sd, init_info = resolve_init(args, recipe)
    model = Classifier(cfg, len(classes), head=recipe.head, head_init_std=recipe.head_init_std)
    if enc_sd is not None:
        init_info["loaded"] = init_encoder_weights(model.encoder, enc_sd).to_dict()
    model.to(acc.device)

    size, chans, workers = cfg.img_size, cfg.in_chans, args.workers
    feats_fn = lambda m, x: acc.unwrap_model(m).features(x)  # noqa: E731
    logits_fn = lambda m, x: m(x)  # noqa: E731
    datasets = {name: ImageDataset(s, size, chans) for name, s in (("train", train), ("val", val), ("test", test))}
    eval_loaders = {name: acc.prepare(_loader(ds, per_process, workers)) for name, ds in datasets.items()}
    cost = run_images(recipe, len(train), len(val), len(test))
    if main_proc:
        flops = run_flops(cost, forward_flops(cfg)) if not linear else None
        print(f"recipe {recipe.name}" + (f" ({recipe.dataset} {recipe.percent}%)" if recipe.dataset else "")
              + f": {recipe.mode}, {recipe.optimizer} lr {recipe.lr:g}, batch {recipe.batch_size}"
              + (f", {cost['steps']} steps ({cost['steps_per_epoch']} per epoch), {cost['val_passes']} val passes, "
                 f"{flops / 1e15:.3g} PFLOP" if not linear else "")
              + (f"; overridden: {recipe.overrides}" if recipe.overrides else ""), flush=True)

    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out, TB_DIR))
    history: list[dict] = []
    from safetensors.torch import save_file

    stopped_at = None
    if linear:
        for p in model.parameters():
            p.requires_grad_(False)
        feats = {name: run_model(acc, model, eval_loaders[name], len(datasets[name]), feats_fn,
                                 f"features {name}", quiet) for name in ("train", "val", "test")}

        def on_eval(step, loss, table):
            if writer:
                writer.add_scalar("train/loss", loss, step)
                if table["mean_auc"] is not None:
                    writer.add_scalar("val/mean_auc", table["mean_auc"], step)

        fit = fit_linear_probe(feats["train"], torch.from_numpy(train.labels), feats["val"], val.labels, classes,
                               epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               eval_every=recipe.eval_every or 10, seed=args.seed, callback=on_eval)
        head = fit["head"]
        best_at, history = fit["best_epoch"], fit["history"]
        val_table = auc_table(val.labels, apply_head(head, feats["val"]), classes)
        test_table = auc_table(test.labels, apply_head(head, feats["test"]), classes)
        ckpt = HEAD_FILE
        if main_proc:
            save_file({k: v.contiguous() for k, v in head.items()}, os.path.join(args.out, ckpt),
                      metadata={"classes": json.dumps(classes), "best_epoch": str(best_at)})
    else:
        best_at, history, stopped_at = fine_tune(acc, model, recipe, args, train, val, datasets, eval_loaders,
                                                 per_process, feats_fn, logits_fn, writer, quiet, classes, cost)
        ckpt = MODEL_FILE
        val_table = auc_table(val.labels, torch.sigmoid(run_model(acc, model, eval_loaders["val"], len(val),
                                                                  logits_fn, None, True)).numpy(), classes)
        test_table = auc_table(test.labels, torch.sigmoid(run_model(acc, model, eval_loaders["test"], len(test),
                                                                    logits_fn, "test", quiet)).numpy(), classes)

    results = {
        "mode": recipe.mode, "recipe": recipe.to_dict(), "dataset": data_info.get("dataset"),
        "percent": recipe.percent if recipe.percent is not None else label_percent(args.label_fraction),
        "init": init_info, "preset": cfg.name,
        "model": {"img_size": cfg.img_size, "input_size": cfg.input_size, "patch_size": cfg.patch_size,
                  "embed_dim": cfg.embed_dim, "depth": cfg.depth, "head": recipe.head},
        "feature": ("mean of the last block's patch tokens (class token excluded) -> fresh LayerNorm (fc_norm)"
                    if recipe.head == "fc_norm" else
                    "mean of the encoder's patch tokens (class token excluded) after its final norm, standardised"),
        "classes": classes,
        "data": {"source": data_info,
                 "train": {"source": train_all.name, "samples": len(train_all), "skipped": len(train_all.skipped)},
                 "val": {"source": val.name, "samples": len(val), "skipped": len(val.skipped)},
                 "test": {"source": data_info["test"], "samples": len(test), "skipped": len(test.skipped)},
                 "skipped_file": SKIPPED_FILE},
        "label_fraction": None if args.train_subset else args.label_fraction, "seed": args.seed,
        "train_subset": {"file": SUBSET_FILE, "samples": len(train), "positives": train.positives(),
                         "given": args.train_subset},
        "hyper": {"processes": acc.num_processes, "per_process_batch": per_process, "precision": precision,
                  "steps": None if linear else cost["steps"], "stopped_at": stopped_at},
        "best_epoch" if linear else "best_step": best_at, "checkpoint": ckpt,
        "val": val_table, "test": test_table, "history": history, "wall_s": round(time.time() - t0, 2),
    }
    if main_proc:
        for split, table in (("val", val_table), ("test", test_table)):
            if table["mean_auc"] is not None:
                writer.add_scalar(f"{split}/best_mean_auc", table["mean_auc"], best_at)
            for c, v in table["auc"].items():
                if v is not None:
                    writer.add_scalar(f"{split}/auc/{c}", v, best_at)
            for c, why in table["skipped"].items():
                print(f"{split}: class {c!r} not scored: {why}", flush=True)
        writer.close()
        with open(os.path.join(args.out, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
        print(f"best {'epoch' if linear else 'step'} {best_at}: val mean AUC {val_table['mean_auc']}, test mean AUC "
              f"{test_table['mean_auc']} -> {os.path.join(args.out, RESULTS_FILE)}", flush=True)
    acc.wait_for_everyone()
    return 0


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def fine_tune(acc, model, recipe: Recipe, args, train, val, datasets, eval_loaders, per_process, feats_fn,
              logits_fn, writer, quiet, classes, cost) -> tuple[int, list[dict], int | None]:
    """Train all weights; score val every ``eval_every`` steps (default: each epoch) and at the end; keep the
    best mean val AUC's weights (loaded into ``model`` on return, saved as best_model.safetensors).
    Returns (best step, history, the step a --max-steps run stopped at or None)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    main_proc = acc.is_main_process
    if recipe.head == "standardised":  # fixed standardisation from the initial encoder's training features
        model.set_standardisation(run_model(acc, model, eval_loaders["train"], len(train), feats_fn,
                                            "features train", quiet).to(acc.device))
    train_ds = ImageDataset(train, datasets["train"].size, datasets["train"].channels, augment=True, seed=args.seed,
                            crop_scale=recipe.crop_scale)
    train_loader = _loader(train_ds, min(per_process, len(train)), args.workers, shuffle=True, seed=args.seed)
    groups = layer_decay_groups(model, recipe.lr, recipe.weight_decay, recipe.layer_decay)
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe.lr)
    model, opt, train_loader = acc.prepare(model, opt, train_loader)
    per_epoch = max(1, len(train_loader))
    total = recipe.steps if recipe.steps is not None else recipe.epochs * per_epoch
    warmup = recipe.warmup_steps if recipe.warmup_steps is not None else int(recipe.warmup_epochs * per_epoch)
    every = recipe.eval_every or per_epoch
    stop = min(total, args.max_steps) if args.max_steps else total
    best_val, best_step, best_state, step, epoch = None, 0, None, 0, 0
    history: list[dict] = []
    losses: list[float] = []
    bar = tqdm(total=stop, desc="fine-tune", disable=quiet)

    def evaluate():
        nonlocal best_val, best_step, best_state
        logits = run_model(acc, model, eval_loaders["val"], len(val), logits_fn, None, True)
        table = auc_table(val.labels, torch.sigmoid(logits).numpy(), classes)
        m, val_loss = table["mean_auc"], float(masked_bce(logits, torch.from_numpy(val.labels)))
        history.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                        "val_loss": val_loss, "val_mean_auc": m})
        losses.clear()
        if writer:
            writer.add_scalar("val/loss", val_loss, step)
            if m is not None:
                writer.add_scalar("val/mean_auc", m, step)
        if best_state is None or (m is not None and (best_val is None or m > best_val)):
            best_val, best_step = m, step
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in acc.unwrap_model(model).state_dict().items()}
            if main_proc:
                save_file({k: v.contiguous() for k, v in best_state.items()},
                          os.path.join(args.out, MODEL_FILE),
                          metadata={"classes": json.dumps(classes), "step": str(step)})
        if main_proc:
            bar.write(f"step {step} (epoch {epoch}): train loss {_num(history[-1]['train_loss'])}, val loss "
                      f"{val_loss:.4f}, val mean AUC {_num(m)}")
        model.train()

    model.train()
    while step < stop:
        epoch += 1
        train_ds.set_epoch(epoch)
        for images, labels, _ in train_loader:
            if step >= stop:
                break
            for g in opt.param_groups:
                g["lr"] = recipe.lr * g["lr_scale"] * schedule_factor(step, total, warmup)
            with acc.autocast():
                loss = masked_bce(model(images), labels)
            acc.backward(loss)
            if recipe.clip_grad:
                acc.clip_grad_norm_(model.parameters(), recipe.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
            if writer:
                writer.add_scalar("train/loss", losses[-1], step)
                writer.add_scalar("lr", opt.param_groups[-1]["lr"], step)
            if step % every == 0:
                evaluate()
    if not history or history[-1]["step"] != step:
        evaluate()
    bar.close()
    acc.unwrap_model(model).load_state_dict(best_state)
    return best_step, history, (step if stop < total else None)

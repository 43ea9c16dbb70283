"""Segmentation from a pretrained encoder, the job behind ``launch/segment.py``: Dice and IoU on val and test.

    python launch/segment.py --recipe mrm-paper --dataset siim --data-root /data/siim \
        --splits DatasetsSplits/SIIM-ACR_Pneumothorax --label-fraction 0.1 --init MRM.pth --out seg/siim-10
    python launch/segment.py --init exports/mrm-tiny --shards shards/masks --label-fraction 0.1 --out seg/syn

Runs under ``accelerate`` like ``launch/finetune.py``: one process with ``python``; data-parallel with
``accelerate launch --multi_gpu --num_processes N`` on GPUs or ``torchrun --nproc_per_node N`` on CPU (gloo).

Inputs (one of):
- ``--dataset siim --data-root DIR [--splits DIR] [--masks-csv train-rle.csv] [--disjoint]``: SIIM-ACR DICOMs,
  the competition's run-length masks and the paper's id lists (:mod:`.seg_data`); 10% and 100% use the paper's
  ``train_10.txt`` / ``train_list.txt``, 1% a seeded stratified subset of ``train_list.txt``.
- ``--shards DIR [--mask-class pneumothorax]``: shards with masks (``mrm-scale prep --source synthetic --masks``);
  train = split ``train`` (a seeded stratified subset for ``--label-fraction``), val/test = a fixed split of
  split ``val`` (``--test-fraction``, ``--split-seed``), or ``--test-shards``.

``--init``: whatever ``launch/finetune.py`` accepts (an export, a run or checkpoint folder, a timm / MAE / original
MRM weights file), or ``random`` (this project's MAE-style init, with ``--preset``).

The model (:mod:`.seg_model`): the ViT through timm's ``forward_intermediates`` at four blocks, a x4/x2/x1/x0.5
pyramid, a UPerNet head. Loss: MONAI's ``DiceFocalLoss`` (or ``DiceCELoss``: ``--loss dice-bce``), sigmoid,
Dice over the whole batch. Recipes (:func:`.recipes.seg_recipe`): ``default`` (AdamW 3e-4, layer decay 0.75,
batch 16, 1,000 steps, the init's geometry) or ``mrm-paper`` (the paper's SIIM setup; the schedule is this
project's, since the original code has none). Explicit flags override single values.

Metrics (MONAI, on masks at the crop resolution, a pixel predicted when its probability >= ``--threshold``, 0.5
by default; ``auto`` picks it from 0.1 ... 0.5 by val Dice at each validation and scores test with the best
checkpoint's):
- ``dice`` / ``iou``: over all pixels of the split (from the summed confusion counts) — the headline figure;
  the best validation ``dice`` chooses the checkpoint;
- ``dice_per_image`` / ``iou_per_image``: the mean over images, where an image with an empty truth scores 1 when
  the prediction is empty too and 0 otherwise (the SIIM-ACR competition's rule);
- ``dice_positive_images``: the mean over images whose truth is not empty; ``empty_images`` and
  ``false_positive_rate_empty`` (share of empty-truth images with any predicted pixel).

Outputs in ``--out``: ``results.json`` (resolved recipe, data and skipped counts, init and what loaded, val at the
best evaluation, test with the best weights, history), ``test_per_image.tsv``, ``train_subset.txt``,
``skipped_images.txt``, ``best_model.safetensors``, ``tb/`` (loss, lr, val Dice/IoU, and ``val/overlay`` images:
the image with the truth in green, the prediction in red, both in yellow).
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

from mrm_scale.formats.results import (
    MODEL_FILE, PER_IMAGE_FILE, RESULTS_FILE, SKIPPED_FILE, SUBSET_FILE, TB_DIR,
)

from .datasets import DataSetError, draw_subset, read_subset, split_for_test, write_skipped, write_subset
from .loading import ExportError, load_encoder_weights
from .probe import schedule_factor
from .recipes import SEG_RECIPES, SegRecipe, seg_recipe
from .seg_data import MaskedDataset, MaskedSet, shard_masked_set, siim_sets
from .seg_model import Segmenter, encoder_state, layer_groups, load_encoder

log = logging.getLogger("mrm_scale.eval.segment")
RECIPE_FLAGS = ("lr", "weight_decay", "layer_decay", "batch_size", "steps", "warmup_steps", "clip_grad", "drop_path",
                "loss", "channels", "levels", "image_size", "eval_every", "threshold", "balance")
DATASETS = ("siim",)
OVERLAY_LEGEND = "green: truth, red: prediction, yellow: both"


THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)  # the candidates of --threshold auto


def _threshold(text: str) -> float:
    if text == "auto":
        return 0.0  # the recipe's code for "chosen on validation"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threshold {text!r}: a probability in (0, 1) or 'auto'") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"--threshold {text!r}: a probability in (0, 1) or 'auto'")
    return v


def _levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels {text!r}: block indices, e.g. 3,5,7,11") from None


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--recipe", choices=SEG_RECIPES, default="default",
                   help="default: this project's; mrm-paper: the paper's SIIM setup (flags below override values)")
    p.add_argument("--init", required=True,
                   help="an export, a run or checkpoint folder, a weights file (timm / MAE ViT or the original MRM "
                        "checkpoint), or 'random' (with --preset)")
    p.add_argument("--preset", default=None, help="model preset for --init random (default tiny), or the preset "
                   "whose number of heads a weights file has")
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="--init random: model config override (repeatable), e.g. --set embed_dim=128")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=None, help="SIIM-ACR in its official layout")
    d.add_argument("--data-root", default=None, help="--dataset siim: the download's folder (DICOMs below it)")
    d.add_argument("--splits", default=None, help="--dataset siim: the paper's id lists (DatasetsSplits/"
                   "SIIM-ACR_Pneumothorax); default: the data root")
    d.add_argument("--masks-csv", default=None, help="--dataset siim: train-rle.csv (default: in the data root)")
    d.add_argument("--disjoint", action="store_true",
                   help="--dataset siim: remove the test ids from train and val, and the val ids from train (the "
                        "official lists overlap)")
    d.add_argument("--shards", default=None, help="shard folder with masks (prep --masks)")
    d.add_argument("--mask-class", default="pneumothorax", help="--shards: which of the manifest's mask_classes")
    d.add_argument("--train-split", default="train")
    d.add_argument("--val-split", default="val")
    d.add_argument("--test-shards", default=None, help="shard folder scored as the test set")
    d.add_argument("--test-split", default="val")
    d.add_argument("--test-fraction", type=float, default=0.5,
                   help="--shards without --test-shards: this fraction of val becomes test (fixed by --split-seed)")
    d.add_argument("--split-seed", type=int, default=0)
    d.add_argument("--label-fraction", type=float, default=1.0, help="0.01, 0.1 or 1.0 of the training images")
    d.add_argument("--train-subset", default=None, help="file of training keys to use")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    t = p.add_argument_group("training (each flag given overrides the recipe's value)")
    t.add_argument("--seed", type=int, default=0, help="subset draw, head init, shuffling, augmentation")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--layer-decay", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="images per optimizer step over all processes")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--clip-grad", type=float, default=None)
    t.add_argument("--drop-path", type=float, default=None)
    t.add_argument("--loss", choices=("dice-focal", "dice-bce"), default=None)
    t.add_argument("--channels", type=int, default=None, help="UPerNet width")
    t.add_argument("--levels", type=_levels, default=None, help="encoder blocks, e.g. 3,5,7,11")
    t.add_argument("--image-size", type=int, default=None, help="crop side (= mask resolution)")
    t.add_argument("--eval-every", type=int, default=None, help="score val every N steps (default steps // 10)")
    t.add_argument("--threshold", type=_threshold, default=None,
                   help="probability above which a pixel is predicted, or 'auto': at each validation the one of "
                        f"{', '.join(map(str, THRESHOLDS))} with the best val Dice, kept with the best checkpoint "
                        "for test")
    t.add_argument("--balance", type=float, default=None,
                   help="share of each training batch drawn from images with a non-empty mask (sampled with "
                        "replacement; default 0: a plain shuffle)")
    t.add_argument("--max-steps", type=int, default=None, help="stop early; the schedule stays the recipe's")
    t.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                   help="bf16 autocast (auto: on CUDA; on a CPU with bf16 matrix units it is faster too)")
    t.add_argument("--overlays", type=int, default=8, help="val images drawn into TensorBoard at each evaluation")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--no-progress", action="store_true")
    return p


# ----------------------------------------------------------------------------------------------------------------
# data, recipe, init
# ----------------------------------------------------------------------------------------------------------------
def _percent(fraction: float) -> int:
    return int(round(fraction * 100))


def load_data(args) -> tuple[MaskedSet, MaskedSet, MaskedSet, dict]:
    given = [n for n, v in (("--dataset", args.dataset), ("--shards", args.shards)) if v]
    if len(given) != 1:
        raise DataSetError("give one of --dataset siim --data-root DIR, or --shards DIR (shards prepared with "
                           f"`mrm-scale prep --source synthetic --masks`); got {', '.join(given) or 'none'}")
    if args.dataset:
        if not args.data_root:
            raise DataSetError("--dataset siim needs --data-root: the SIIM-ACR download's folder")
        train, val, test, info = siim_sets(args.data_root, args.splits, _percent(args.label_fraction),
                                           args.masks_csv, args.disjoint)
        return train, val, test, {**info, "test": test.name}
    train = shard_masked_set(args.shards, args.train_split, args.mask_class)
    val = shard_masked_set(args.shards, args.val_split, args.mask_class)
    if args.test_shards:
        test, how = shard_masked_set(args.test_shards, args.test_split, args.mask_class), \
            f"{args.test_shards}:{args.test_split}"
    else:
        val, test = split_for_test(val, args.test_fraction, args.split_seed)
        how = f"{args.test_fraction:g} of {args.shards}:{args.val_split} (split seed {args.split_seed})"
    return train, val, test, {"dataset": None, "mask_class": args.mask_class, "test": how}


def build_recipe(args) -> SegRecipe:
    return seg_recipe(args.recipe, args.dataset, _percent(args.label_fraction),
                      {k: getattr(args, k) for k in RECIPE_FLAGS})


def resolve_init(args, recipe: SegRecipe):
    """(model config, encoder state dict or None for the random init, description)."""
    from mrm_scale.model import get_preset

    if args.init == "random":
        from mrm_scale.model.presets import parse_overrides

        cfg = get_preset(args.preset or "tiny", **parse_overrides(args.model_set))
        sd, info = None, {"init": "random", "set": list(args.model_set)}
    else:
        if args.model_set:
            raise ValueError("--set changes the model of --init random; a loaded encoder keeps its own geometry")
        cfg, sd, info = load_encoder_weights(args.init, args.preset)
        info = {"init": os.path.abspath(args.init), **info}
    over = {"report_weight": 0.0, "drop_path": recipe.drop_path}
    if recipe.image_size:
        over["img_size"] = recipe.image_size
    if recipe.sr_scale:
        over["sr_scale"] = recipe.sr_scale
    cfg = cfg.replace(**over)
    return cfg, sd, {**info, "preset": cfg.name}


def make_loss(kind: str):
    from monai.losses import DiceCELoss, DiceFocalLoss

    if kind == "dice-focal":
        return DiceFocalLoss(sigmoid=True, batch=True)
    if kind == "dice-bce":
        return DiceCELoss(sigmoid=True, batch=True)
    raise ValueError(f"--loss {kind!r}: dice-focal or dice-bce")


# ----------------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------------
PER_IMAGE = ("dice", "iou", "tp", "fp", "tn", "fn")


def per_image_scores(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B, 6): MONAI's per-image Dice and IoU (an empty truth scores 1 with an empty prediction, else 0) and the
    confusion counts tp, fp, tn, fn of binary masks (B, 1, H, W)."""
    from monai.metrics import DiceMetric, MeanIoU, get_confusion_matrix

    pred, truth = pred.float(), truth.float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred, truth)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(pred, truth)
    cm = get_confusion_matrix(pred, truth, include_background=True)[:, 0, :]
    return torch.cat([dice.reshape(-1, 1), iou.reshape(-1, 1), cm.reshape(-1, 4)], 1).float()


def summarise_scores(rows: torch.Tensor) -> dict:
    """The split's figures from :func:`per_image_scores` rows of every image."""
    from monai.metrics import compute_confusion_matrix_metric

    total = rows[:, 2:6].sum(0)
    nothing = float(total[0] + total[1] + total[3]) == 0  # no mask pixel and none predicted: 1, as per image
    truth_px = rows[:, 2] + rows[:, 5]
    pred_px = rows[:, 2] + rows[:, 3]
    positive = truth_px > 0
    empty = ~positive
    return {
        "dice": 1.0 if nothing else float(compute_confusion_matrix_metric("f1 score", total)),
        "iou": 1.0 if nothing else float(compute_confusion_matrix_metric("threat score", total)),
        "dice_per_image": float(rows[:, 0].mean()), "iou_per_image": float(rows[:, 1].mean()),
        "dice_positive_images": float(rows[positive, 0].mean()) if bool(positive.any()) else None,
        "images": int(rows.shape[0]), "positive_images": int(positive.sum()), "empty_images": int(empty.sum()),
        "false_positive_rate_empty": float((pred_px[empty] > 0).float().mean()) if bool(empty.any()) else None,
    }


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked (torch's own: the Accelerator stays fp32, so runs of different precision can
    follow each other in one process)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def score(acc, model, loader, n: int, thresholds: tuple[float, ...], precision: str = "no") -> torch.Tensor:
    """Per-image rows (len(thresholds), n, 6) over a prepared loader, gathered across processes, in dataset
    order: one set of rows per probability threshold."""
    out = torch.zeros((len(thresholds), n, len(PER_IMAGE)))
    model.eval()
    for images, masks, idx in loader:
        with autocast(acc.device, precision):
            prob = torch.sigmoid(model(images).float())
        rows = torch.stack([per_image_scores(prob >= t, masks >= 0.5) for t in thresholds])
        idx, rows = acc.gather_for_metrics((idx, rows.transpose(0, 1)))
        out[:, idx.cpu()] = rows.transpose(0, 1).cpu()
    return out


def overlay(images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: the radiograph, truth tinted green, prediction red, both yellow."""
    from mrm_scale.data.transforms import IMAGE_MEAN, IMAGE_STD

    gray = (images[:, :1].float() * IMAGE_STD + IMAGE_MEAN).clamp(0, 1)
    rgb = gray.repeat(1, 3, 1, 1)
    t, p = truth[:, :1].bool(), pred[:, :1].bool()
    tint = torch.zeros_like(rgb)
    tint[:, 0:1] = p.float()
    tint[:, 1:2] = t.float()
    any_ = (t | p).float()
    return rgb * (1 - 0.45 * any_) + 0.45 * tint


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


def _loader(ds, batch_size, workers, shuffle=False, seed=0, balance: float = 0.0):
    """``balance`` > 0 (training): draw with replacement, positives (images with a non-empty mask) making up that
    share of the draws."""
    from torch.utils.data import DataLoader, WeightedRandomSampler

    g = torch.Generator().manual_seed(int(seed)) if shuffle else None
    sampler = None
    if shuffle and balance > 0:
        pos = torch.from_numpy(ds.data.labels[:, 0] == 1)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            weights = torch.where(pos, balance / n_pos, (1 - balance) / n_neg).double()
            sampler, shuffle = WeightedRandomSampler(weights, len(ds), replacement=True, generator=g), False
        else:
            log.warning("--balance %g: the training images are all %s; a plain shuffle instead", balance,
                        "empty" if not n_pos else "positive")
    # persistent workers: a small training subset has many short epochs, and restarting workers each costs
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      generator=g if sampler is None else None, drop_last=False, persistent_workers=workers > 0)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def run(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    t0 = time.time()
    recipe = build_recipe(args)
    precision = args.precision if args.precision != "auto" else ("bf16" if torch.cuda.is_available() else "no")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    main_proc = acc.is_main_process
    quiet = args.no_progress or not acc.is_local_main_process
    if recipe.batch_size % acc.num_processes:
        raise ValueError(f"--batch-size {recipe.batch_size} is not divisible by the {acc.num_processes} processes")
    per_process = recipe.batch_size // acc.num_processes

    train_all, val, test, data_info = load_data(args)
    if args.train_subset:
        subset, note = read_subset(args.train_subset, train_all), f"given subset {args.train_subset}"
    elif args.dataset and _percent(args.label_fraction) in (10, 100):
        subset, note = list(range(len(train_all))), f"the paper's {data_info['split_files']['train']}"
    else:
        subset = draw_subset(train_all.keys, train_all.labels, args.label_fraction, args.seed)
        note = f"label fraction {args.label_fraction:g}, seed {args.seed}, at least one positive"
    train = train_all.subset(subset)
    os.makedirs(args.out, exist_ok=True)
    sets = {"train": train_all, "val": val, "test": test}
    if main_proc:
        write_subset(os.path.join(args.out, SUBSET_FILE), train.keys)
        n_skipped = write_skipped(os.path.join(args.out, SKIPPED_FILE), sets)
        print(f"train {len(train)} of {len(train_all)} images ({note}; {train.positives_count()} with a "
              f"{train.mask_class} mask); val {len(val)} ({val.positives_count()} positive); test {len(test)} "
              f"({test.positives_count()} positive; {data_info['test']})", flush=True)
        if n_skipped:
            print(f"{n_skipped} listed images not used (missing, unreadable or without a mask row): "
                  + ", ".join(f"{k} {len(v.skipped)}" for k, v in sets.items() if v.skipped)
                  + f"; each named in {os.path.join(args.out, SKIPPED_FILE)}", flush=True)
        if any((data_info.get("overlap") or {}).values()) and not data_info.get("disjoint"):
            print(f"warning: the official id lists overlap ({data_info['overlap']}); used as given, --disjoint "
                  "removes the overlap", flush=True)

    cfg, enc_sd, init_info = resolve_init(args, recipe)
    torch.manual_seed(args.seed)
    model = Segmenter(cfg, 1, channels=recipe.channels, levels=recipe.levels, drop_path=recipe.drop_path)
    init_info["loaded"] = load_encoder(model, encoder_state(cfg, enc_sd, args.seed))
    model.to(acc.device)
    size, chans = cfg.img_size, cfg.in_chans
    train_ds = MaskedDataset(train, size, chans, augment=True, seed=args.seed, crop_scale=recipe.crop_scale)
    eval_ds = {name: MaskedDataset(s, size, chans) for name, s in (("val", val), ("test", test))}
    eval_loaders = {name: acc.prepare(_loader(ds, per_process, args.workers)) for name, ds in eval_ds.items()}
    train_loader = _loader(train_ds, min(per_process, len(train)), args.workers, shuffle=True, seed=args.seed,
                           balance=recipe.balance)
    opt = torch.optim.AdamW(layer_groups(model, recipe.lr, recipe.weight_decay, recipe.layer_decay), lr=recipe.lr)
    model, opt, train_loader = acc.prepare(model, opt, train_loader)
    loss_fn = make_loss(recipe.loss)
    total = recipe.steps
    warmup = recipe.warmup_steps if recipe.warmup_steps is not None else total // 10
    every = recipe.eval_every or max(1, total // 10)
    stop = min(total, args.max_steps) if args.max_steps else total
    if main_proc:
        print(f"recipe {recipe.name}: {cfg.name} encoder {cfg.embed_dim}x{cfg.depth} at {cfg.input_size} px "
              f"(crop {size}), levels {acc.unwrap_model(model).levels}, UPerNet {acc.unwrap_model(model).channels} "
              f"channels, {recipe.loss}, AdamW lr {recipe.lr:g}, batch {recipe.batch_size}, {total} steps "
              f"(warmup {warmup}), eval every {every}" + (f"; overridden {recipe.overrides}" if recipe.overrides
                                                           else ""), flush=True)

    writer = None
    picks: list[int] = []
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out, TB_DIR))
        writer.add_text("val/overlay_legend", OVERLAY_LEGEND, 0)
        pos = [i for i in range(len(val)) if val.labels[i, 0] == 1]
        neg = [i for i in range(len(val)) if val.labels[i, 0] != 1]
        picks = (pos + neg)[: max(0, args.overlays)]

    history: list[dict] = []
    losses: list[float] = []
    auto = not recipe.threshold
    thresholds = THRESHOLDS if auto else (recipe.threshold,)
    best: dict = {"dice": None, "step": 0, "state": None, "val": None, "threshold": thresholds[-1]}
    step, epoch = 0, 0
    bar = tqdm(total=stop, desc="segment", disable=quiet)

    def evaluate():
        rows = score(acc, model, eval_loaders["val"], len(val), thresholds, precision)
        tables = [summarise_scores(r) for r in rows]
        j = max(range(len(tables)), key=lambda k: (tables[k]["dice"], -k))  # ties: the lowest candidate
        table = {**tables[j], "threshold": thresholds[j]}
        history.append({"step": step, "epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None,
                        **{k: table[k] for k in ("dice", "iou", "dice_per_image", "dice_positive_images",
                                                 "threshold")}})
        losses.clear()
        if best["state"] is None or table["dice"] > best["dice"]:
            best.update(dice=table["dice"], step=step, val=table, threshold=table["threshold"],
                        state={k: v.detach().to("cpu", copy=True)
                               for k, v in acc.unwrap_model(model).state_dict().items()})
            if main_proc:
                save_file({k: v.contiguous() for k, v in best["state"].items()}, os.path.join(args.out, MODEL_FILE),
                          metadata={"step": str(step), "mask_class": val.mask_class})
        if writer:
            for k in ("dice", "iou", "dice_per_image"):
                writer.add_scalar(f"val/{k}", table[k], step)
            if picks:
                draw_overlays(writer, acc.unwrap_model(model), eval_ds["val"], picks, table["threshold"], step,
                              acc.device)
            bar.write(f"step {step} (epoch {epoch}): train loss {_fmt(history[-1]['train_loss'])}, val Dice "
                      f"{table['dice']:.4f}" + (f" at threshold {table['threshold']:g}" if auto else "")
                      + f" (IoU {table['iou']:.4f}, per image {table['dice_per_image']:.4f}, "
                      f"positive images {_fmt(table['dice_positive_images'])})")
        model.train()

    model.train()
    while step < stop:
        epoch += 1
        train_loader.set_epoch(epoch)  # accelerate's loader passes it on to the dataset (new crops each epoch)
        for images, masks, _ in train_loader:
            if step >= stop:
                break
            for g in opt.param_groups:
                g["lr"] = recipe.lr * g["lr_scale"] * schedule_factor(step, total, warmup)
            with autocast(acc.device, precision):
                logits = model(images)
            loss = loss_fn(logits.float(), masks)
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
    acc.unwrap_model(model).load_state_dict(best["state"])
    test_rows = score(acc, model, eval_loaders["test"], len(test), (best["threshold"],), precision)[0]
    test_table = {**summarise_scores(test_rows), "threshold": best["threshold"]}

    results = {
        "task": "segment", "recipe": recipe.to_dict(), "dataset": data_info.get("dataset"),
        "percent": _percent(args.label_fraction) if not args.train_subset else None, "seed": args.seed,
        "mask_class": val.mask_class, "init": init_info, "preset": cfg.name,
        "model": {"img_size": cfg.img_size, "input_size": cfg.input_size, "patch_size": cfg.patch_size,
                  "embed_dim": cfg.embed_dim, "depth": cfg.depth, "levels": list(acc.unwrap_model(model).levels),
                  "channels": acc.unwrap_model(model).channels, "head": "UPerNet on a x4/x2/x1/x0.5 pyramid"},
        "metric_notes": {"dice": "over all pixels of the split", "dice_per_image": "mean over images; an empty "
                         "truth scores 1 with an empty prediction, else 0", "resolution": f"{size} px crops",
                         "threshold": best["threshold"], "threshold_chosen_on_val": auto},
        "data": {"source": data_info,
                 **{k: {"source": s.name, "samples": len(s), "positive": s.positives_count(), "skipped": len(s.skipped)}
                    for k, s in sets.items()}, "skipped_file": SKIPPED_FILE},
        "train_subset": {"file": SUBSET_FILE, "samples": len(train), "positive": train.positives_count(),
                         "given": args.train_subset},
        "hyper": {"processes": acc.num_processes, "per_process_batch": per_process, "precision": precision,
                  "steps": total, "stopped_at": step if stop < total else None},
        "best_step": best["step"], "checkpoint": MODEL_FILE, "val": best["val"], "test": test_table,
        "per_image_file": PER_IMAGE_FILE, "history": history, "wall_s": round(time.time() - t0, 2),
    }
    if main_proc:
        with open(os.path.join(args.out, PER_IMAGE_FILE), "w", encoding="utf-8") as f:
            f.write("key\tdice\tiou\ttruth_px\tpred_px\n")
            for k, r in zip(test.keys, test_rows.tolist()):
                f.write(f"{k}\t{r[0]:.4f}\t{r[1]:.4f}\t{int(r[2] + r[5])}\t{int(r[2] + r[3])}\n")
        for k in ("dice", "iou", "dice_per_image"):
            writer.add_scalar(f"test/{k}", test_table[k], best["step"])
        writer.close()
        with open(os.path.join(args.out, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
        print(f"best step {best['step']}: val Dice {best['dice']:.4f}; test Dice {test_table['dice']:.4f} "
              f"(IoU {test_table['iou']:.4f}, per image {test_table['dice_per_image']:.4f}, positive images "
              f"{_fmt(test_table['dice_positive_images'])}) -> {os.path.join(args.out, RESULTS_FILE)}", flush=True)
    acc.wait_for_everyone()
    return 0


@torch.no_grad()
def draw_overlays(writer, model, ds: MaskedDataset, picks: list[int], threshold: float, step: int, device) -> None:
    from torchvision.utils import make_grid

    was = model.training
    model.eval()
    items = [ds[i] for i in picks]
    images = torch.stack([x[0] for x in items]).to(device)
    truth = torch.stack([x[1] for x in items]).to(device)
    pred = torch.sigmoid(model(images).float()) >= threshold
    grid = make_grid(overlay(images.cpu(), truth.cpu() >= 0.5, pred.cpu()), nrow=min(4, len(picks)), padding=2)
    writer.add_image("val/overlay", grid, step)
    model.train(was)

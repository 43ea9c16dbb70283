"""Downstream evaluation job behind ``launch/finetune.py``: linear probe or full fine-tune, per-class ROC AUC.

    python launch/finetune.py --mode linear --init EXPORT_OR_RUN --shards DIR --label-fraction 0.01 --out OUT
    accelerate launch launch/finetune.py --mode finetune --init EXPORT_OR_RUN --train-list ... --out OUT

Runs under ``accelerate``: one process with plain ``python``; data-parallel with ``accelerate launch --multi_gpu
--num_processes N`` on GPUs, or ``torchrun --nproc_per_node N`` on CPU (gloo).

Inputs (one of):
- ``--shards DIR``: labelled shards (labels from ``KEY.json``); train = split ``train``, val = split ``val``;
  test = ``--test-shards DIR`` (its ``--test-split``, default ``val``), else a fixed ``--test-fraction`` (0.5) of
  val, drawn with ``--split-seed`` (default 0, independent of ``--seed``: every run scores the same test set).
- ``--train-list/--val-list[/--test-list]`` split files (``relative/path label1 label2 ...``, or
  ``FILENAME LABEL``) under ``--image-root``; without ``--test-list`` the test set is cut from val as above.

Outputs in ``--out``: ``results.json`` (per-class and mean AUC on val at the best epoch and on test with the best
checkpoint), ``train_subset.txt`` (the training keys used), the best checkpoint (``best_head.safetensors`` for the
linear probe: weight, bias and the standardisation; ``best_model.safetensors`` when fine-tuning), TensorBoard
scalars in ``tb/``.
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

from .datasets import (
    DataSetError, ImageDataset, LabelledSet, draw_subset, read_subset, shard_set, split_file_set, split_for_test,
    write_subset,
)
from .loading import ExportError, load_encoder_weights
from .probe import (
    Classifier, apply_head, auc_table, cosine_lr, fit_linear_probe, init_encoder_weights, layer_decay_groups,
    masked_bce,
)

log = logging.getLogger("mrm_scale.eval.finetune")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--mode", choices=("linear", "finetune"), default="linear",
                   help="linear: frozen encoder, standardised linear probe; finetune: all weights, layer-wise lr decay")
    p.add_argument("--init", required=True,
                   help="an export folder (mrm-scale export), a run or checkpoint folder (consolidated like the "
                        "export), or 'random' (with --preset)")
    p.add_argument("--preset", default="tiny", help="model preset for --init random")
    p.add_argument("--image-size", type=int, default=None,
                   help="high-resolution side (default: the init's; the encoder sees it resized by 1/sr_scale)")
    d = p.add_argument_group("data")
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
                   help="fraction of the training samples used (seeded, stratified; e.g. 0.01, 0.1, 1.0)")
    d.add_argument("--train-subset", default=None, help="file of training keys to use (e.g. a train_subset.txt)")
    d.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    t = p.add_argument_group("training")
    t.add_argument("--seed", type=int, default=0, help="subset draw, head init, shuffling, augmentation")
    t.add_argument("--epochs", type=int, default=None,
                   help="linear: full-batch steps on cached features (default 300); finetune: epochs (default 10)")
    t.add_argument("--max-steps", type=int, default=None, help="finetune: stop after this many optimizer steps")
    t.add_argument("--batch-size", type=int, default=32, help="images per process per step (and for features)")
    t.add_argument("--lr", type=float, default=None, help="default: linear 0.01, finetune 5e-4")
    t.add_argument("--weight-decay", type=float, default=None, help="default: linear 1e-3, finetune 0.05")
    t.add_argument("--layer-decay", type=float, default=0.75, help="finetune: lr x decay^(depth+1-layer)")
    t.add_argument("--drop-path", type=float, default=0.1, help="finetune: stochastic depth (max rate)")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="finetune: linear warmup")
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--eval-every", type=int, default=10, help="linear: score val every N steps")
    t.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no", help="accelerate mixed precision")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


# ----------------------------------------------------------------------------------------------------------------
# data and init
# ----------------------------------------------------------------------------------------------------------------
def load_data(args) -> tuple[LabelledSet, LabelledSet, LabelledSet, str]:
    """(train, val, test, how the test set was made)."""
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if bool(args.shards) == bool(args.train_list):
        raise DataSetError("give either --shards DIR or --train-list FILE --val-list FILE (with --image-root)")
    if args.shards:
        train = shard_set(args.shards, args.train_split, classes)
        classes = train.classes
        val = shard_set(args.shards, args.val_split, classes)
        if args.test_shards:
            test, how = shard_set(args.test_shards, args.test_split, classes), f"{args.test_shards}:{args.test_split}"
        else:
            val, test = split_for_test(val, args.test_fraction, args.split_seed)
            how = f"{args.test_fraction:g} of {args.shards}:{args.val_split} (split seed {args.split_seed})"
    else:
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
    return train, val, test, how


def resolve_init(args):
    """(model config, encoder state dict or None, description)."""
    from mrm_scale.model import get_preset

    if args.init == "random":
        cfg = get_preset(args.preset)
        sd, info = None, {"init": "random", "preset": cfg.name}
    else:
        cfg, sd, info = load_encoder_weights(args.init)
        info = {"init": os.path.abspath(args.init), **info}
    over = {"report_weight": 0.0}
    if args.image_size:
        over["img_size"] = args.image_size
    over["drop_path"] = args.drop_path if args.mode == "finetune" else 0.0
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


def run(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    # cpu=True without a GPU: several CPU processes (torchrun / accelerate launch) then form a real MULTI_CPU group
    acc = Accelerator(mixed_precision=args.precision, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    main_proc = acc.is_main_process
    quiet = args.no_progress or not acc.is_local_main_process
    linear = args.mode == "linear"
    epochs = args.epochs or (300 if linear else 10)
    lr = args.lr if args.lr is not None else (0.01 if linear else 5e-4)
    wd = args.weight_decay if args.weight_decay is not None else (1e-3 if linear else 0.05)

    train_all, val, test, test_how = load_data(args)
    classes = train_all.classes
    if args.train_subset:
        subset = read_subset(args.train_subset, train_all)
        fraction_note = f"given subset {args.train_subset}"
    else:
        subset = draw_subset(train_all.keys, train_all.labels, args.label_fraction, args.seed)
        fraction_note = f"label fraction {args.label_fraction:g}, seed {args.seed}"
    train = train_all.subset(subset)
    os.makedirs(args.out, exist_ok=True)
    if main_proc:
        write_subset(os.path.join(args.out, "train_subset.txt"), train.keys)
        print(f"train {len(train)} of {len(train_all)} samples ({fraction_note}); val {len(val)}; test {len(test)} "
              f"({test_how}); classes {classes}; train positives {train.positives()}", flush=True)

    cfg, enc_sd, init_info = resolve_init(args)
    model = Classifier(cfg, len(classes))
    if enc_sd is not None:
        init_encoder_weights(model.encoder, enc_sd)
    model.to(acc.device)

    size, chans, bs, workers = cfg.img_size, cfg.in_chans, args.batch_size, args.workers
    feats_fn = lambda m, x: acc.unwrap_model(m).features(x)  # noqa: E731
    logits_fn = lambda m, x: m(x)  # noqa: E731
    datasets = {name: ImageDataset(s, size, chans) for name, s in (("train", train), ("val", val), ("test", test))}
    eval_loaders = {name: acc.prepare(_loader(ds, bs, workers)) for name, ds in datasets.items()}

    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(args.out, "tb"))
    history: list[dict] = []
    from safetensors.torch import save_file

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
                               epochs=epochs, lr=lr, weight_decay=wd, eval_every=args.eval_every, seed=args.seed,
                               callback=on_eval)
        head = fit["head"]
        best_epoch, history = fit["best_epoch"], fit["history"]
        val_table = auc_table(val.labels, apply_head(head, feats["val"]), classes)
        test_table = auc_table(test.labels, apply_head(head, feats["test"]), classes)
        ckpt = "best_head.safetensors"
        if main_proc:
            save_file({k: v.contiguous() for k, v in head.items()}, os.path.join(args.out, ckpt),
                      metadata={"classes": json.dumps(classes), "best_epoch": str(best_epoch)})
    else:
        from tqdm.auto import tqdm

        # fixed standardisation from the initial encoder's training features
        model.set_standardisation(run_model(acc, model, eval_loaders["train"], len(train), feats_fn,
                                            "features train", quiet).to(acc.device))
        train_ds = ImageDataset(train, size, chans, augment=True, seed=args.seed)
        train_loader = _loader(train_ds, min(bs, len(train)), workers, shuffle=True, seed=args.seed)
        groups = layer_decay_groups(model, lr, wd, args.layer_decay)
        opt = torch.optim.AdamW(groups, lr=lr)
        model, opt, train_loader = acc.prepare(model, opt, train_loader)
        steps_per_epoch = max(1, len(train_loader))
        total = epochs * steps_per_epoch
        if args.max_steps:
            total = min(total, args.max_steps)
        warmup = int(args.warmup_epochs * steps_per_epoch)
        best_val, best_epoch, best_state, step = None, 0, None, 0
        bar = tqdm(total=total, desc="fine-tune", disable=quiet)
        for epoch in range(1, epochs + 1):
            if step >= total:
                break
            train_ds.set_epoch(epoch)
            model.train()
            losses = []
            for images, labels, _ in train_loader:
                if step >= total:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr * g["lr_scale"] * cosine_lr(step, total, warmup)
                with acc.autocast():
                    loss = masked_bce(model(images), labels)
                acc.backward(loss)
                if args.clip_grad:
                    acc.clip_grad_norm_(model.parameters(), args.clip_grad)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch)
                if writer:
                    writer.add_scalar("train/loss", losses[-1], step)
                    writer.add_scalar("lr", opt.param_groups[-1]["lr"], step)
            scores = torch.sigmoid(run_model(acc, model, eval_loaders["val"], len(val), logits_fn, None, True))
            table = auc_table(val.labels, scores.numpy(), classes)
            m = table["mean_auc"]
            history.append({"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)) if losses else None,
                            "val_mean_auc": m})
            if writer and m is not None:
                writer.add_scalar("val/mean_auc", m, step)
            if best_state is None or (m is not None and (best_val is None or m > best_val)):
                best_val, best_epoch = m, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in acc.unwrap_model(model).state_dict().items()}
                if main_proc:
                    save_file({k: v.contiguous() for k, v in best_state.items()},
                              os.path.join(args.out, "best_model.safetensors"),
                              metadata={"classes": json.dumps(classes), "epoch": str(epoch)})
            if main_proc:
                bar.write(f"epoch {epoch}: train loss {history[-1]['train_loss']}, val mean AUC {m}")
        bar.close()
        acc.unwrap_model(model).load_state_dict(best_state)
        ckpt = "best_model.safetensors"
        val_table = auc_table(val.labels, torch.sigmoid(run_model(acc, model, eval_loaders["val"], len(val),
                                                                  logits_fn, None, True)).numpy(), classes)
        test_table = auc_table(test.labels, torch.sigmoid(run_model(acc, model, eval_loaders["test"], len(test),
                                                                    logits_fn, "test", quiet)).numpy(), classes)

    results = {
        "mode": args.mode, "init": init_info, "preset": cfg.name,
        "model": {"img_size": cfg.img_size, "input_size": cfg.input_size, "patch_size": cfg.patch_size,
                  "embed_dim": cfg.embed_dim, "depth": cfg.depth},
        "feature": "mean of the encoder's patch tokens (class token excluded) on the downsampled image",
        "classes": classes,
        "data": {"train": {"source": train_all.name, "samples": len(train_all), "skipped": len(train_all.skipped)},
                 "val": {"source": val.name, "samples": len(val), "skipped": len(val.skipped)},
                 "test": {"source": test_how, "samples": len(test), "skipped": len(test.skipped)}},
        "label_fraction": None if args.train_subset else args.label_fraction, "seed": args.seed,
        "train_subset": {"file": "train_subset.txt", "samples": len(train), "positives": train.positives(),
                         "given": args.train_subset},
        "hyper": {"epochs": epochs, "lr": lr, "weight_decay": wd, "batch_size": bs, "processes": acc.num_processes,
                  **({} if linear else {"layer_decay": args.layer_decay, "drop_path": args.drop_path,
                                        "warmup_epochs": args.warmup_epochs, "max_steps": args.max_steps})},
        "best_epoch": best_epoch, "checkpoint": ckpt,
        "val": val_table, "test": test_table, "history": history, "wall_s": round(time.time() - t0, 2),
    }
    if main_proc:
        for split, table in (("val", val_table), ("test", test_table)):
            if table["mean_auc"] is not None:
                writer.add_scalar(f"{split}/best_mean_auc", table["mean_auc"], best_epoch)
            for c, v in table["auc"].items():
                if v is not None:
                    writer.add_scalar(f"{split}/auc/{c}", v, best_epoch)
            for c, why in table["skipped"].items():
                print(f"{split}: class {c!r} not scored: {why}", flush=True)
        writer.close()
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"best epoch {best_epoch}: val mean AUC {val_table['mean_auc']}, test mean AUC {test_table['mean_auc']} "
              f"-> {os.path.join(args.out, 'results.json')}", flush=True)
    acc.wait_for_everyone()
    return 0

"""``mrm-scale eval``: the paper's table from fine-tuning results, and the recipes with what they cost.

    mrm-scale eval table eval/ --paper --out tables/     # every results.json below eval/
    mrm-scale eval recipes --splits-root MRM-pytorch/DatasetsSplits --gpu-tflops 400

``table`` collects ``results.json`` files (given as files or folders searched recursively) into the paper's
layout: one row per model (the ``--init``'s name and the recipe, with any values overridden), one column per dataset x label fraction, each
cell the test mean AUC (x100) as mean ± sample standard deviation over seeds, with the number of seeds; a second
table per dataset gives the per-class AUC. ``--paper`` adds the paper's own MRM figures as a row. Written as
Markdown (printed, and ``table.md``) and CSV (``table.csv``, ``per_class.csv``) under ``--out``. The same (model,
recipe, dataset, fraction, seed) twice is an error naming both files: a table never counts a run twice.

``recipes`` prints ``--recipe mrm-paper`` for every dataset and fraction. With ``--splits-root`` (the original
repository's ``DatasetsSplits``) it adds each run's training and scored images, its FLOPs (ViT-B/16 at 224 px:
35.1 GFLOP per image forward, 3x for a training image), the hours ``--cores`` CPU cores take to decode its images,
and the hours of the run at each ``--gpu-tflops`` sustained (the longer of compute and decoding).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np

from mrm_scale.formats.results import RESULTS_FILE

from .adapters import ADAPTERS
from .datasets import DataSetError, parse_split_file
from .recipes import PAPER_AUC, PAPER_SCHEDULES, paper_recipe, run_flops, run_images



def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    t = sub.add_parser("table", help="results.json files -> the paper's table (Markdown and CSV)")
    t.add_argument("results", nargs="+", help="results.json files or folders holding them (searched recursively)")
    t.add_argument("--paper", action="store_true", help="add the paper's MRM figures as a row")
    t.add_argument("--out", default=None, help="folder for table.md, table.csv, per_class.csv")
    r = sub.add_parser("recipes", help="the mrm-paper recipe per dataset and fraction, and what each run costs")
    r.add_argument("--splits-root", default=None,
                   help="the original repository's DatasetsSplits folder: adds images, FLOPs and hours per run")
    r.add_argument("--gpu-tflops", type=float, action="append", default=None,
                   help="sustained bf16 TFLOP/s to price the runs at (repeatable; default 50, 125 and 400)")
    r.add_argument("--cores", type=int, default=16, help="CPU cores decoding images beside the GPU")


def run(args) -> int:
    try:
        if args.eval_command == "table":
            print(build_tables(find_results(args.results), paper=args.paper, out=args.out))
        else:
            print(recipes_table(args.splits_root, args.gpu_tflops or [50.0, 125.0, 400.0], args.cores))
    except DataSetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ----------------------------------------------------------------------------------------------------------------
# collecting
# ----------------------------------------------------------------------------------------------------------------
def find_results(paths: list[str]) -> list[str]:
    found = []
    for p in paths:
        if os.path.isfile(p):
            found.append(p)
        elif os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                if RESULTS_FILE in filenames:
                    found.append(os.path.join(dirpath, RESULTS_FILE))
        else:
            raise DataSetError(f"{p}: no such file or folder")
    if not found:
        raise DataSetError(f"no {RESULTS_FILE} under {', '.join(paths)}; give the --out folders of launch/finetune.py")
    return found


def model_name(res: dict) -> str:
    init = res.get("init") or {}
    if init.get("init") == "random":
        return f"random init ({init.get('preset', res.get('preset'))})"
    path = str(init.get("init") or "?").rstrip("/")
    base = os.path.basename(path)
    return os.path.splitext(base)[0] if os.path.isfile(path) or "." in base else base


def read_result(path: str) -> dict:
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataSetError(f"{path}: not a readable results.json ({e})") from None
    for key in ("test", "classes", "seed"):
        if key not in res:
            raise DataSetError(f"{path}: no {key!r}; not a results.json of launch/finetune.py")
    recipe = (res.get("recipe") or {}).get("name", "default")
    overrides = (res.get("recipe") or {}).get("overrides") or {}
    if overrides:  # not the named recipe any more: its own row, saying how
        recipe += " (" + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    dataset = res.get("dataset") or "custom:" + os.path.basename(str(res["data"]["train"]["source"]))
    percent = res.get("percent")
    if percent is None:
        percent = int(round(100 * (res.get("label_fraction") or 1.0)))
    return {"path": path, "model": model_name(res), "recipe": recipe, "dataset": dataset, "percent": int(percent),
            "seed": res["seed"], "mean": res["test"]["mean_auc"], "per_class": res["test"]["auc"],
            "classes": res["classes"], "truncated": (res.get("hyper") or {}).get("stopped_at") is not None}


def _cell(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float) * 100.0
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def _fmt(mean: float, std: float | None, n: int) -> str:
    return f"{mean:.1f} ± {std:.1f} ({n})" if std is not None else f"{mean:.1f} ({n})"


def _title(dataset: str) -> str:
    return ADAPTERS[dataset].title if dataset in ADAPTERS else dataset


def build_tables(paths: list[str], paper: bool = False, out: str | None = None) -> str:
    rows = [read_result(p) for p in paths]
    seen: dict[tuple, str] = {}
    for r in rows:
        key = (r["model"], r["recipe"], r["dataset"], r["percent"], r["seed"])
        if key in seen:
            raise DataSetError(f"{seen[key]} and {r['path']} are the same run (model {key[0]}, recipe {key[1]}, "
                               f"{key[2]} {key[3]}%, seed {key[4]}); keep one")
        seen[key] = r["path"]
    order = {name: i for i, name in enumerate(ADAPTERS)}
    columns = sorted({(r["dataset"], r["percent"]) for r in rows}
                     | ({k for k in PAPER_AUC} if paper else set()),
                     key=lambda c: (order.get(c[0], len(order)), c[0], c[1]))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["recipe"], r["dataset"], r["percent"])].append(r)
    models = sorted({(r["model"], r["recipe"]) for r in rows})

    md = ["## Test mean AUC (x100), mean ± std over seeds (number of seeds)", "",
          "| model | recipe | " + " | ".join(f"{_title(d)} {p}%" for d, p in columns) + " |",
          "|---|---|" + "---|" * len(columns)]
    csv_rows = []
    for model, recipe in models:
        cells = []
        for d, p in columns:
            g = [r for r in groups.get((model, recipe, d, p), []) if r["mean"] is not None]
            if not g:
                cells.append("")
                continue
            mean, std = _cell([r["mean"] for r in g])
            mark = "*" if any(r["truncated"] for r in g) else ""
            cells.append(_fmt(mean, std, len(g)) + mark)
            csv_rows.append({"model": model, "recipe": recipe, "dataset": d, "percent": p, "seeds": len(g),
                             "seed_list": " ".join(str(r["seed"]) for r in sorted(g, key=lambda r: r["seed"])),
                             "mean_auc": round(mean, 3), "std_auc": None if std is None else round(std, 3),
                             "paper_auc": PAPER_AUC.get((d, p)), "truncated": any(r["truncated"] for r in g)})
        md.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
    if paper:
        md.append("| MRM (paper) | mrm-paper | " + " | ".join(
            f"{PAPER_AUC[c]:.1f}" if c in PAPER_AUC else "" for c in columns) + " |")
    if any(r["truncated"] for r in rows):
        md += ["", "\\* a run stopped early with --max-steps: not the recipe's full schedule"]

    per_class_rows = []
    for d in sorted({r["dataset"] for r in rows}, key=lambda x: (order.get(x, len(order)), x)):
        classes = next(r["classes"] for r in rows if r["dataset"] == d)
        md += ["", f"### {_title(d)}: per-class test AUC (x100), mean ± std over seeds", "",
               "| model | recipe | % | " + " | ".join(classes) + " |", "|---|---|---|" + "---|" * len(classes)]
        for (model, recipe, dd, p), g in sorted(groups.items()):
            if dd != d:
                continue
            cells = []
            for c in classes:
                vals = [r["per_class"].get(c) for r in g if r["per_class"].get(c) is not None]
                if not vals:
                    cells.append("")
                    continue
                mean, std = _cell(vals)
                cells.append(_fmt(mean, std, len(vals)))
                per_class_rows.append({"model": model, "recipe": recipe, "dataset": d, "percent": p, "class": c,
                                       "seeds": len(vals), "mean_auc": round(mean, 3),
                                       "std_auc": None if std is None else round(std, 3)})
            md.append(f"| {model} | {recipe} | {p} | " + " | ".join(cells) + " |")
    text = "\n".join(md) + "\n"
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(text)
        _write_csv(os.path.join(out, "table.csv"), csv_rows, ["model", "recipe", "dataset", "percent", "seeds",
                                                              "seed_list", "mean_auc", "std_auc", "paper_auc",
                                                              "truncated"])
        _write_csv(os.path.join(out, "per_class.csv"), per_class_rows, ["model", "recipe", "dataset", "percent",
                                                                        "class", "seeds", "mean_auc", "std_auc"])
    return text


def _write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# the recipes and their cost
# ----------------------------------------------------------------------------------------------------------------
def split_sizes(splits_root: str, dataset: str, percent: int) -> tuple[int, int, int] | None:
    """(train, val, test) rows of the paper's split files, or None when a file is not there."""
    adapter = ADAPTERS[dataset]
    names = adapter.files(percent)
    folder = os.path.join(splits_root, adapter.folder)
    sizes = []
    for split in ("train", "val", "test"):
        path = os.path.join(folder, names[split])
        if not os.path.isfile(path):
            return None
        sizes.append(len(parse_split_file(path)[0]))
    return tuple(sizes)


# ms per image on one core, eval transform, measured with `mrm-scale bench finetune` on the project's CPU machine
# (2026-12): NIH 1024-px PNG, CheXpert-small JPEG, RSNA 1024-px JPEG-baseline DICOM, COVID JPEG <= 512 px
DECODE_MS = {"nih": 10.1, "chexpert": 1.7, "rsna": 17.8, "covid": 2.2}


def recipes_table(splits_root: str | None, tflops: list[float], cores: int = 16) -> str:
    from mrm_scale.model import get_preset
    from mrm_scale.model.flops import encoder_forward_flops

    fwd = float(encoder_forward_flops(get_preset("base").replace(img_size=224, sr_scale=1)))
    head = "| dataset | % | steps | warm-up | lr |"
    sep = "|---|---|---|---|---|"
    if splits_root:
        head += (" train / val / test images | val passes | trained + scored images | PFLOP | decode h on "
                 f"{cores} cores | " + " | ".join(f"h at {t:g} TFLOP/s" for t in tflops) + " |")
        sep += "---|---|---|---|---|" + "---|" * len(tflops)
    lines = ["`--recipe mrm-paper` (SGD momentum 0.9, wd 0, batch 96, clip 1, warmup + cosine, 224 px, fc_norm head)",
             "", head, sep]
    for (d, p) in sorted(PAPER_SCHEDULES, key=lambda k: (list(ADAPTERS).index(k[0]), k[1])):
        r = paper_recipe(d, p)
        row = f"| {ADAPTERS[d].title} | {p} | {r.steps:,} | {r.warmup_steps:,} | {r.lr:g} |"
        if splits_root:
            sizes = split_sizes(splits_root, d, p)
            if sizes is None:
                row += " (split files not there) |" + " |" * (4 + len(tflops))
            else:
                img = run_images(r, *sizes)
                flops = run_flops(img, fwd)
                decode_h = (img["train_images"] + img["eval_images"]) * DECODE_MS[d] / 1e3 / cores / 3600
                row += (f" {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} | {img['val_passes']:,} | "
                        f"{img['train_images'] / 1e6:.2f}M + {img['eval_images'] / 1e6:.2f}M | {flops / 1e15:,.0f} | "
                        f"{decode_h:.1f} | "
                        + " | ".join(f"{max(flops / (t * 1e12) / 3600, decode_h):.1f}" for t in tflops) + " |")
        lines.append(row)
    if splits_root:
        lines += ["", f"Forward {fwd / 1e9:.1f} GFLOP per 224-px image (ViT-B/16), a training image 3x; the paper "
                  "scores val after every epoch of the training set. Decoding (ms per image on one core: "
                  + ", ".join(f"{ADAPTERS[k].title} {v}" for k, v in DECODE_MS.items())
                  + ", from `mrm-scale bench finetune`) runs beside the GPU; a run takes the longer of the two. "
                  "The GPU columns assume that sustained rate for the whole run."]
    return "\n".join(lines) + "\n"

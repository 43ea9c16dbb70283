"""``mrm-scale experiment label-efficiency [--task classify|segment]``: the command line of the experiments.

``--task classify`` (default) runs :mod:`.label_efficiency` (linear probe, test mean AUC); ``--task segment``
runs :mod:`.seg_efficiency` (UPerNet on synthetic pneumothorax masks, test Dice). Both share the corpus,
pretraining and export code of :mod:`.label_efficiency`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .label_efficiency import FULL, SMOKE, run_experiment
from .seg_efficiency import SEG_FULL, SEG_SMOKE, run_experiment as run_segment


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["label-efficiency"], help="which experiment")
    p.add_argument("--out", required=True, help="experiment folder (corpus, runs, exports, results)")
    p.add_argument("--task", choices=("classify", "segment"), default="classify",
                   help="classify: linear probe, test mean AUC; segment: UPerNet on synthetic pneumothorax masks, "
                        "test Dice (mrm_scale.experiments.seg_efficiency)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a couple of minutes (CI)")
    p.add_argument("--records", type=int, default=None, help=f"synthetic records (default {FULL['records']})")
    p.add_argument("--synthetic-size", type=int, default=None, help="stored image side of the corpus")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"high-resolution side for all arms (default {FULL['image_size']}, tiny's own)")
    p.add_argument("--steps", type=int, default=None, help=f"pretraining steps per arm (default {FULL['steps']})")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="pretraining learning rate (both arms)")
    p.add_argument("--nproc", type=int, default=None, help="pretraining ranks (default 2; smoke 1)")
    p.add_argument("--seeds", default=None, help="seeds, comma-separated (default 0,1,2): one pretraining per arm "
                   "and seed, and the probes' subsets and heads")
    p.add_argument("--fractions", default=None, help="label fractions (default 0.01,0.1,1.0)")
    p.add_argument("--probe-epochs", type=int, default=None)
    p.add_argument("--set", dest="model_set", action="append", default=None, metavar="FIELD=VALUE",
                   help="model config override for both pretrainings and the probes' encoder (repeatable)")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers for feature extraction")


def _settings(args) -> dict:
    base = dict(SMOKE if args.smoke else FULL)
    base["task"] = getattr(args, "task", "classify")
    if base["task"] == "segment":
        base.update(SEG_SMOKE if args.smoke else SEG_FULL)
    for k in ("records", "synthetic_size", "image_size", "steps", "micro_batch", "lr", "seeds", "fractions",
              "probe_epochs", "model_set"):
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    base["nproc"] = args.nproc or (1 if args.smoke else 2)
    base["seeds"] = [int(s) for s in str(base["seeds"]).split(",")]
    base["fractions"] = [float(f) for f in str(base["fractions"]).split(",")]
    base["model_set"] = list(base["model_set"])
    return base


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    try:
        from mrm_scale.model import get_preset
        from mrm_scale.model.presets import parse_overrides

        get_preset("tiny", img_size=s["image_size"], **parse_overrides(s["model_set"]))  # bad --set: before compute
        if s["task"] == "segment":
            run_segment(os.path.abspath(args.out), s, workers=args.workers)
        else:
            run_experiment(os.path.abspath(args.out), s, workers=args.workers)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

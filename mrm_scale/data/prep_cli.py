"""``mrm-scale prep``: command-line front of :mod:`mrm_scale.data.prep`."""

from __future__ import annotations

import argparse
import sys

from mrm_scale.formats import files

from .prep import SOURCES, PrepError, PrepOptions, run_prep, summary

D = PrepOptions.__dataclass_fields__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, choices=SOURCES, help="kind of corpus")
    p.add_argument("--out", required=True, help="output folder for shards, index files, tokenizer and manifest")
    p.add_argument("--input", help="csv/jsonl file, MIMIC-CXR-JPG root, Open-i report folder/.tgz, CheXpert Plus "
                   "report CSV, PadChest label CSV(.gz), or the ReXGradient-160K folder / its metadata JSON (README, "
                   "'Corpora')")
    p.add_argument("--image-root", help="folder relative image paths start from (csv/jsonl/chexpert-plus/padchest: "
                   "default the file's folder; rexgradient: default <input>/deid_png); Open-i: the folder of PNGs "
                   "named by parentImage id")
    p.add_argument("--report-root", help="mimic-cxr: root of the report .txt tree if not under --input")
    p.add_argument("--metadata", help="openi: nlmcxr_dicom_metadata.csv(.gz) for view positions")
    p.add_argument("--image-column", default=D["image_column"].default)
    p.add_argument("--report-column", default=D["report_column"].default)
    p.add_argument("--num", type=int, default=D["num"].default, help="synthetic: number of records")
    p.add_argument("--seed", type=int, default=D["seed"].default, help="synthetic: corpus seed")
    p.add_argument("--synthetic-size", type=int, default=D["synthetic_size"].default, help="synthetic: image px")
    p.add_argument("--masks", action="store_true",
                   help="synthetic: store each drawn finding's extent (pneumothorax, effusion, consolidation, "
                        "nodule, atelectasis) as KEY.seg.png, for segmentation (launch/segment.py --shards)")
    p.add_argument("--views", choices=("frontal", "all"), default=D["views"].default,
                   help="keep only PA/AP views where the view is known (default) or all")
    p.add_argument("--shard-size", type=int, default=D["shard_size"].default, help="candidates per shard")
    p.add_argument("--val-fraction", type=float, default=D["val_fraction"].default,
                   help="share of records for val when the source has no split of its own")
    p.add_argument("--max-side", type=int, default=D["max_side"].default, help="shrink long side to this (never upscale)")
    p.add_argument("--jpeg-quality", type=int, default=D["jpeg_quality"].default)
    p.add_argument("--tokenizer", default=D["tokenizer"].default,
                   help="'train' (WordPiece on the training reports) or a tokenizers JSON file")
    p.add_argument("--vocab-size", type=int, default=D["vocab_size"].default)
    p.add_argument("--max-tokens", type=int, default=D["max_tokens"].default)
    p.add_argument("--workers", type=int, default=D["workers"].default, help="parallel image decode/encode")
    p.add_argument("--max-unk-rate", type=float, default=None,
                   help="refuse the corpus when more than this share of its report pieces are [UNK] (default: warn "
                        "above 0.05; with --strict, refuse)")
    p.add_argument("--source-name", help="corpus name recorded in the manifest and model cards (default: the source's)")
    p.add_argument("--source-version", help="corpus release recorded in the manifest (e.g. 2.1.0)")
    p.add_argument("--licence", help="licence / data use agreement recorded in the manifest (default: the source's "
                   "where known)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any input was rejected (and refuse a "
                   "corpus the tokenizer mostly does not know)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    kw = {k: getattr(args, k) for k in D if k != "progress" and hasattr(args, k)}
    opt = PrepOptions(**kw, progress=not args.no_progress)
    try:
        result = run_prep(opt)
    except PrepError as e:
        print(f"mrm-scale prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not files.is_disk_full(e):
            raise
        free, _ = files.free_space(opt.out)
        print(f"mrm-scale prep: error: the disk is full writing {e.filename or opt.out} ({free}); free space or "
              f"give --out on a larger disk, then run prep again (no manifest.json was written for the shards "
              "in that folder, so nothing takes them for complete)", file=sys.stderr)
        return 2
    print(summary(result))
    if result.rejected:
        for r in result.rejected[:20]:
            print(f"  rejected {r['reason']}: {r['detail']}", file=sys.stderr)
        if len(result.rejected) > 20:
            print(f"  ... {len(result.rejected) - 20} more in manifest.json", file=sys.stderr)
        if opt.strict:
            print(f"mrm-scale prep: --strict: {len(result.rejected)} input(s) rejected", file=sys.stderr)
            return 1
    return 0

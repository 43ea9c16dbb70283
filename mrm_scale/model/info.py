"""``mrm-scale model-info PRESET``: parameters per part and training GFLOPs per sample, counted and by formula."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .presets import MRMConfig, get_preset, parse_overrides, preset_names

DEFAULT_VOCAB = 30522  # BERT-base uncased; pass --tokenizer or --vocab-size for the data's own vocabulary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "presets", nargs="+", metavar="PRESET", help=f"preset name(s) or 'all' ({', '.join(preset_names())})"
    )
    parser.add_argument("--vocab-size", type=int, default=None, help=f"report vocabulary (default {DEFAULT_VOCAB})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json of a shard set: take the vocabulary from it")
    parser.add_argument(
        "--count", choices=("meta", "cpu", "none"), default="meta",
        help="where to count FLOPs with FlopCounterMode: on the meta device (default; no memory, any size), on a "
        "real CPU model (slow above 'base'), or not at all",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples in the counted step (default 1)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="override a config field, e.g. --set report_weight=0 --set in_chans=1 (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")


def _vocab_size(args) -> int:
    if args.tokenizer:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(args.tokenizer).get_vocab_size()
        except Exception as exc:  # noqa: BLE001 - report which file failed
            raise ValueError(f"cannot read tokenizer {args.tokenizer!r}: {exc}") from exc
    return args.vocab_size or DEFAULT_VOCAB


def describe(cfg: MRMConfig, vocab_size: int, count: str = "meta", batch_size: int = 1) -> dict:
    """Parameter counts and training FLOPs per sample for one config (the row ``model-info`` prints)."""
    from mrm_scale.formats.tokenizer import TokenizerIdentity

    from .flops import count_training_flops, formula_training_flops, synthetic_batch
    from .mrm import build_model

    ids = TokenizerIdentity.canonical(vocab_size).model_ids()
    device = "cpu" if count == "cpu" else "meta"
    model = build_model(cfg, device=device, **ids)
    row: dict = {"preset": cfg.name, "params": model.parameter_counts(), "vocab_size": vocab_size}
    row["geometry"] = {
        "img_size": cfg.img_size, "encoder_input": cfg.input_size, "patch": cfg.patch_size,
        "patches": cfg.num_patches, "visible": cfg.num_visible, "target_patch": cfg.out_patch_size,
        "in_chans": cfg.in_chans, "report_tokens": cfg.max_tokens,
    }
    masked = None
    row["gflops_counted"] = None
    row["count_device"] = None
    if count != "none":
        t0 = time.perf_counter()
        try:
            model.train()
            counted = count_training_flops(model, synthetic_batch(cfg, batch_size, vocab_size=vocab_size, device=device))
        except Exception as exc:  # noqa: BLE001 - some op may lack a meta kernel; the formula still stands
            row["count_error"] = f"{type(exc).__name__}: {exc}"
        else:
            row["gflops_counted"] = counted["per_sample"] / 1e9
            row["count_device"] = device
            row["count_seconds"] = round(time.perf_counter() - t0, 2)
            masked = counted["masked_tokens_per_sample"]
    formula = formula_training_flops(cfg, vocab_size=vocab_size, masked_tokens=masked)
    row["masked_tokens_per_sample"] = (
        masked if masked is not None else cfg.word_mask_prob * (cfg.max_tokens - 2) if cfg.has_report_head else 0
    )
    row["gflops_formula"] = formula["total"] / 1e9
    row["gflops_formula_parts"] = {k: formula[k] / 1e9 for k in ("encoder", "decoder", "report")}
    if row["gflops_counted"]:
        row["counted_vs_formula"] = row["gflops_counted"] / row["gflops_formula"] - 1.0
    return row


def _fmt_m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def run(args) -> int:
    names = preset_names() if args.presets == ["all"] else args.presets
    try:
        overrides = parse_overrides(args.overrides)
        cfgs = [get_preset(name, **overrides) for name in names]
        vocab = _vocab_size(args)
    except ValueError as exc:
        print(f"mrm-scale model-info: {exc}", file=sys.stderr)
        return 2
    rows = [describe(cfg, vocab, args.count, args.batch_size) for cfg in cfgs]
    if args.json:
        print(json.dumps({"vocab_size": vocab, "rows": rows}, sort_keys=True))
        return 0
    head = (
        f"{'preset':<8} {'encoder':>9} {'decoder':>9} {'report':>9} {'total':>9}  "
        f"{'GFLOPs/sample (train)':>22} {'formula':>9} {'diff':>7}  geometry"
    )
    print(f"vocabulary {vocab}; FLOPs = matmul FLOPs of forward + backward (model FLOPs, no recompute)")
    print(head)
    print("-" * len(head))
    for r in rows:
        p, g = r["params"], r["geometry"]
        counted = f"{r['gflops_counted']:.1f} ({r['count_device']})" if r["gflops_counted"] else "n/a"
        diff = f"{100 * r['counted_vs_formula']:+.2f}%" if "counted_vs_formula" in r else ""
        geo = (
            f"{g['img_size']}->{g['encoder_input']}/{g['patch']} ({g['visible']}/{g['patches']} visible), "
            f"target {g['target_patch']}px x{g['in_chans']}"
        )
        print(
            f"{r['preset']:<8} {_fmt_m(p['encoder']):>9} {_fmt_m(p['decoder']):>9} {_fmt_m(p['report']):>9} "
            f"{_fmt_m(p['total']):>9}  {counted:>22} {r['gflops_formula']:>9.1f} {diff:>7}  {geo}"
        )
        if "count_error" in r:
            print(f"         counting failed: {r['count_error']}")
    return 0

"""``mrm-scale export RUN_OR_CHECKPOINT --out DIR``: a pretraining checkpoint -> standalone, loadable weights.

Input: a run folder (its newest *complete* checkpoint is taken) or one checkpoint folder
(``runs/<name>/checkpoints/stepNNNNNNNN``). The ZeRO shards (stage 1, 2 or 3; any number of ranks) are consolidated
with DeepSpeed's own fp32 consolidation (:mod:`mrm_scale.eval.loading`), then written as the export folder of
:mod:`mrm_scale.formats.exports`: the timm image encoder (the exact ``timm.create_model`` call is in
``mrm_config.json`` and in the model card, :mod:`mrm_scale.eval.timm_interop`), the transformers report model with
its tokenizer and the image projection, every weight of the MRM model, the tokenizer and a model card
(:mod:`mrm_scale.eval.model_card`, with the run's last losses and image use: :mod:`mrm_scale.eval.run_logs`).
The folder is staged beside ``--out`` and moved into place whole.

A checkpoint without ``COMPLETE.json`` or with missing DeepSpeed files is refused with the list of missing files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile

import torch

from mrm_scale.data import transforms
from mrm_scale.data.tokenizer import hf_tokenizer
from mrm_scale.formats import files
from mrm_scale.formats.exports import (
    CARD_FILE, CONFIG_FILE, ENCODER_FILE, FORMAT, FULL_FILE, IMAGE_PROJ_FILE, REPORT_DIR, TOKENIZER_COPY,
)
from mrm_scale.formats.shards import summary as shard_summary

from .loading import (
    ExportError, build_loaded_model, check_checkpoint, consolidate, model_config, read_run_record, resolve_checkpoint,
)
from .model_card import model_card
from .run_logs import final_losses
from .timm_interop import check_timm_keys, timm_call, timm_spec

log = logging.getLogger("mrm_scale.eval.export")

__all__ = ["ExportError", "add_arguments", "export", "run"]


def _save_safetensors(sd: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # clones: safetensors refuses tensors sharing memory (BERT's tied output matrix)
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}, path,
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def export(src: str, out: str, *, tokenizer: str | None = None, overwrite: bool = False) -> dict:
    """Export a run/checkpoint folder into ``out``; returns what was written (also in ``mrm_config.json``)."""
    ref = resolve_checkpoint(src)
    record = read_run_record(ref)
    info = check_checkpoint(ref, record)
    cfg = model_config(record.model)
    tok = record.tokenizer
    shards = record.shards or None
    tok_path = tokenizer or (tok.path(shards) if shards else None)
    if not tok_path or not os.path.isfile(tok_path):
        raise ExportError(f"the run's tokenizer {tok_path!r} (from run_config.json 'shards') is not there; pass "
                          "--tokenizer PATH to the shards' tokenizer.json")
    if tok.sha256 and files.sha256_file(tok_path) != tok.sha256:
        raise ExportError(f"{tok_path}: sha256 differs from the run's tokenizer ({tok.sha256}); pass --tokenizer "
                          "with the tokenizer.json of the shards the run was trained on")
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"{out}: folder exists and is not empty; choose another --out or pass --overwrite")

    log.info("consolidating %s (ZeRO stage %d, %d ranks)", ref.path, info["zero_stage"], info["world_size"])
    model = build_loaded_model(cfg, tok, consolidate(ref, info["zero_stage"]), ref.path)
    full_sd = model.state_dict()
    encoder_sd = {k[len("encoder."):]: v for k, v in full_sd.items() if k.startswith("encoder.")}
    check_timm_keys(cfg, encoder_sd)

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(out) or ".")
    try:
        meta_common = {"format": FORMAT, "preset": cfg.name, "step": info["step"]}
        _save_safetensors(encoder_sd, os.path.join(stage, ENCODER_FILE), meta_common)
        _save_safetensors(full_sd, os.path.join(stage, FULL_FILE), meta_common)
        shutil.copyfile(tok_path, os.path.join(stage, TOKENIZER_COPY))
        has_report = model.report is not None
        if has_report:
            rdir = os.path.join(stage, REPORT_DIR)
            model.report.mlm.save_pretrained(rdir, safe_serialization=True)
            hf_tokenizer(tok_path, cfg.max_tokens).save_pretrained(rdir)
            _save_safetensors(model.report.image_proj.state_dict(), os.path.join(rdir, IMAGE_PROJ_FILE), meta_common)
        name, kwargs = timm_spec(cfg)
        meta = {
            "format": FORMAT,
            "model": cfg.to_dict(),
            "tokenizer": tok.replace(file=TOKENIZER_COPY).to_dict(),
            "source": {"checkpoint": ref.path, "run_dir": ref.run_dir, **info},
            "timm": {"name": name, "kwargs": kwargs, "call": timm_call(cfg, ENCODER_FILE)},
            "image": {"img_size": cfg.img_size, "input_size": cfg.input_size, "in_chans": cfg.in_chans,
                      "mean": transforms.IMAGE_MEAN, "std": transforms.IMAGE_STD},
            "report_model": REPORT_DIR if has_report else None,
            "parameters": model.parameter_counts(),
            "data": shard_summary(shards),
            "data_mix": [{**(shard_summary(m["path"]) or {"path": m["path"]}), "name": m["name"], "weight": m["weight"]}
                         for m in record.mix],
            "final_losses": final_losses(ref.run_dir, info["step"]),
            "files": sorted([ENCODER_FILE, FULL_FILE, TOKENIZER_COPY, CONFIG_FILE, CARD_FILE]
                            + ([REPORT_DIR + "/"] if has_report else [])),
        }
        with open(os.path.join(stage, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(stage, CARD_FILE), "w") as f:
            f.write(model_card(cfg, meta, has_report))
        if os.path.isdir(out):
            for name_ in os.listdir(out):  # --overwrite (or an empty folder)
                p = os.path.join(out, name_)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
            os.rmdir(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                   help="run folder (newest complete checkpoint) or a checkpoint folder runs/<name>/checkpoints/stepN")
    p.add_argument("--out", required=True, help="export folder to write")
    p.add_argument("--tokenizer", default=None,
                   help="the shards' tokenizer.json, when the run's shards folder has moved")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    try:
        meta = export(args.path, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    src = meta["source"]
    print(f"exported {src['checkpoint']} (step {src['step']}, ZeRO stage {src['zero_stage']}, "
          f"{src['world_size']} ranks) to {os.path.abspath(args.out)}: {', '.join(meta['files'])}")
    if meta["report_model"] is None:
        print("no report_model/: image-only run (report_weight 0), nothing to export on the text side")
    print(f"timm: {meta['timm']['call']}")
    return 0

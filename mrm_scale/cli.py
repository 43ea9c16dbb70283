"""The ``mrm-scale`` console command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``mrm-scale --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("mrm_scale.data.prep_cli", "prepare an image-report corpus into validated WebDataset shards"),
    "tokenizer": ("mrm_scale.data.tokenizer_cli",
                  "tokenizer train: one WordPiece vocabulary over the reports of several corpora"),
    "verify": ("mrm_scale.data.verify", "re-read a shard folder and check it against its manifest"),
    "model-info": ("mrm_scale.model.info", "parameters per part and training GFLOPs per sample of a preset"),
    "plan": ("mrm_scale.train.plan",
             "what fits on N GPUs of M GiB (ZeRO stage, micro-batch, checkpointing) and the time per epoch"),
    "bench": ("mrm_scale.bench", "benchmarks: loader, step, scaling"),
    "checkpoint": ("mrm_scale.train.checkpoint_cli",
                   "inspect a run's checkpoints; convert one for another world size or ZeRO stage"),
    "export": ("mrm_scale.eval.export", "export a checkpoint: timm image encoder, transformers report model, model card"),
    "eval": ("mrm_scale.eval.tables",
             "fine-tuning results -> the paper's table (eval table); the paper's recipes and their cost (eval recipes)"),
    "experiment": ("mrm_scale.experiments.cli",
                   "experiments: label-efficiency (MRM vs image-only MAE vs random init; --task classify|segment)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrm-scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

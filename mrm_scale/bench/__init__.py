"""``mrm-scale bench``: benchmarks, one module each (``add_arguments(parser)`` + ``run(args) -> int``).

Every benchmark prints one JSON line last (medians of several runs, compared against a baseline measured in
the same run). Add a benchmark by adding its module to ``BENCHES``. Baselines that are not benchmarks of their own
live beside the one that uses them: ``original`` (the original MRM code's training step, ``bench step --original``).
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "loader": ("mrm_scale.bench.loader", "input pipeline throughput (dali | wds) against the paper's loader"),
    "step": ("mrm_scale.bench.step", "one training step (forward, backward, optimizer): samples/s and MFU"),
    "finetune": ("mrm_scale.bench.finetune",
                 "the paper's fine-tuning: decode ms per official image format, step and scoring images/s"),
    "scaling": ("mrm_scale.bench.scaling", "DeepSpeed ZeRO-2 on 1 and 2 ranks: scaling efficiency, data wait"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)  # bench modules import heavy things only in run()
        p.set_defaults(_bench_module=module)


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)

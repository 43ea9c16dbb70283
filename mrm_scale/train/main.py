"""The pretraining job's entry point: flags -> typed run config -> set-up -> the loop.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --preset tiny --max-steps 50
    deepspeed --num_gpus 2 --module mrm_scale.train.main --deepspeed ds_configs/zero2.json ...   (installed package)

``launch/pretrain.py`` runs :func:`main`; :func:`mrm_scale.train.launcher` starts it as a subprocess.
"""

from __future__ import annotations

import argparse

import deepspeed

from mrm_scale.data.loader import LoaderError
from mrm_scale.model.weights import WeightLoadError

from .config import PretrainArgs, RunConfigError, add_arguments
from .loop import NonFiniteLossError, train
from .setup import build_engine, fail, setup_run


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    return add_arguments(deepspeed.add_config_arguments(parser))


def main(argv: list[str] | None = None, hooks=None) -> None:
    """Run the job. ``hooks``: a :class:`mrm_scale.train.loop.LoopHooks` (what a test injects; None in production)."""
    args = PretrainArgs.from_namespace(build_parser().parse_args(argv))  # no Namespace past this line
    try:
        run = setup_run(args)
        engine, model = build_engine(run)
        train(run, engine, model, hooks=hooks)
    except (RunConfigError, NonFiniteLossError, FileNotFoundError, LoaderError, WeightLoadError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()

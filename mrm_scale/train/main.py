"""The pretraining job's entry point: flags -> typed run config -> set-up -> the loop.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --preset tiny --max-steps 50
    deepspeed --num_gpus 2 --module mrm_scale.train.main --deepspeed ds_configs/zero2.json ...   (installed package)

``launch/pretrain.py`` runs :func:`main`; :func:`mrm_scale.train.launcher` starts it as a subprocess.
"""

from __future__ import annotations

import argparse

import deepspeed

from mrm_scale.data.loader import LoaderError, ShardDataError
from mrm_scale.model.weights import WeightLoadError

from . import preemption
from .checkpoint import CheckpointWriteError
from .config import PretrainArgs, RunConfigError, add_arguments
from .loop import NonFiniteLossError, Preempted, train
from .setup import build_engine, fail, setup_run


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    return add_arguments(deepspeed.add_config_arguments(parser))


def main(argv: list[str] | None = None, hooks=None) -> None:
    """Run the job. ``hooks``: a :class:`mrm_scale.train.loop.LoopHooks` (what a test injects; None in production)."""
    args = PretrainArgs.from_namespace(build_parser().parse_args(argv))  # no Namespace past this line
    rank = None
    try:
        run = setup_run(args)
        rank = run.rank
        engine, model = build_engine(run)
        train(run, engine, model, hooks=hooks)
    except Preempted as e:
        if rank == 0:
            print(str(e), flush=True)
        fail(None, preemption.EXIT_PREEMPTED)
    except KeyboardInterrupt:
        fail("interrupted twice: stopped at once, without a checkpoint; --resume auto continues from the newest "
             "complete one", preemption.EXIT_INTERRUPTED)
    except (RunConfigError, NonFiniteLossError, FileNotFoundError, LoaderError, WeightLoadError, ShardDataError,
            CheckpointWriteError) as e:
        fail(str(e))
    except RuntimeError as e:  # a collective that failed because a rank died: name it, no traceback
        message = preemption.lost_ranks_message(e, rank if rank is not None else -1, args.train.dist_timeout)
        if message is None:
            raise
        fail(message)


if __name__ == "__main__":
    main()

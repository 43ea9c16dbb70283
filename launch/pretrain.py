"""MRM pretraining under DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --preset tiny --max-steps 50

Flags: `python launch/pretrain.py --help`. The loop, checkpoints and metrics live in mrm_scale/train/.
"""

import argparse

import deepspeed

from mrm_scale.data.loader import LoaderError
from mrm_scale.model.weights import WeightLoadError
from mrm_scale.train.config import RunConfigError, add_arguments
from mrm_scale.train.loop import NonFiniteLossError, train
from mrm_scale.train.setup import build_engine, fail, setup_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     conflict_handler="resolve")
    args = add_arguments(deepspeed.add_config_arguments(parser)).parse_args()
    try:
        run = setup_run(args)
        engine, model = build_engine(run)
        train(run, engine, model)
    except (RunConfigError, NonFiniteLossError, FileNotFoundError, LoaderError, WeightLoadError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()

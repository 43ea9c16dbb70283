"""MRM pretraining under DeepSpeed.

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed ds_configs/zero2.json --preset tiny --max-steps 50

Flags: `python launch/pretrain.py --help`. The job is mrm_scale/train/main.py (also runnable as
`deepspeed --module mrm_scale.train.main` from an installed package); the loop, checkpoints and metrics live in
mrm_scale/train/.
"""

from mrm_scale.train.main import main

if __name__ == "__main__":
    main()

"""Downstream evaluation of a pretrained encoder: linear probe or fine-tune, per-class ROC AUC.

    python launch/finetune.py --mode linear --init exports/mrm-tiny --shards shards/demo --label-fraction 0.1 --out eval/lp
    accelerate launch launch/finetune.py --mode finetune --init runs/mrm-base --train-list train.txt \
        --val-list val.txt --test-list test.txt --image-root images/ --out eval/ft

Flags: `python launch/finetune.py --help`. The pieces live in mrm_scale/eval/.
"""

import sys

from mrm_scale.eval.finetune import main

if __name__ == "__main__":
    sys.exit(main())

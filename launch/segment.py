"""Segmentation from a pretrained encoder: UPerNet on four ViT blocks, Dice and IoU on val and test.

    python launch/segment.py --init exports/mrm-tiny --shards shards/masks --label-fraction 0.1 --out seg/syn
    python launch/segment.py --recipe mrm-paper --dataset siim --data-root /data/siim \
        --splits DatasetsSplits/SIIM-ACR_Pneumothorax --label-fraction 0.1 --init MRM.pth --out seg/siim-10
    accelerate launch launch/segment.py ...     (data-parallel; torchrun --nproc_per_node N on CPU)

Flags: `python launch/segment.py --help`. The pieces live in mrm_scale/eval/ (segment, seg_data, seg_model).
"""

import sys

from mrm_scale.eval.segment import main

if __name__ == "__main__":
    sys.exit(main())

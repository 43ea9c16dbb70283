"""The export folder (``mrm-scale export RUN --out DIR``): standalone weights, written once, read by eval.

- ``image_encoder.safetensors``  timm ``VisionTransformer`` keys (no head)
- ``report_model/``              the BERT masked-LM and its tokenizer (transformers ``save_pretrained``) and
                                 ``image_proj.safetensors`` (the image-conditioning projection); absent for
                                 image-only runs
- ``mrm_full.safetensors``       every weight of the MRM model (decoder included)
- ``mrm_config.json``            ``format``, ``model`` (MRMConfig), ``tokenizer`` (a TokenizerIdentity entry),
                                 ``source`` (checkpoint, step, ranks, ZeRO stage), ``timm`` (the create_model call),
                                 ``image`` (sizes, mean/std), ``parameters``, ``data``, ``final_losses``, ``files``
- ``tokenizer.json``             the shards' tokenizer, copied
- ``README.md``                  the model card
"""

from __future__ import annotations

import json
import os

from .tokenizer import TOKENIZER_FILE

FORMAT = "mrm-scale-export/1"
ENCODER_FILE = "image_encoder.safetensors"
FULL_FILE = "mrm_full.safetensors"
CONFIG_FILE = "mrm_config.json"
REPORT_DIR = "report_model"
IMAGE_PROJ_FILE = "image_proj.safetensors"
CARD_FILE = "README.md"
TOKENIZER_COPY = TOKENIZER_FILE


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isfile(os.path.join(path, ENCODER_FILE))


def read_meta(path: str) -> dict:
    """The whole ``mrm_config.json`` of an export folder (``FileNotFoundError`` when there is none)."""
    with open(os.path.join(path, CONFIG_FILE)) as f:
        return json.load(f)

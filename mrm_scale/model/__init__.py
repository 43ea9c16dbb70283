"""MRM model: masked image encoder (timm ViT), super-resolution pixel decoder, image-conditioned BERT report head,
on-device masking, presets, FLOP accounting, weight loading and the image-use diagnostic (``diagnostics``)."""

from .masking import apply_token_mask, make_generator, random_patch_mask, whole_word_mask
from .mrm import (
    MRM,
    ImageEncoder,
    MRMOutput,
    PixelDecoder,
    ReportHead,
    build_model,
    compile_blocks,
    materialize,
    param_groups,
    pixel_loss,
)
from .patches import downsample, patchify, sincos_table_2d, unpatchify
from .presets import PRESETS, MRMConfig, get_preset, preset_names

__all__ = [
    "MRM", "MRMConfig", "MRMOutput", "ImageEncoder", "PixelDecoder", "ReportHead", "PRESETS",
    "apply_token_mask", "build_model", "compile_blocks", "downsample", "get_preset", "make_generator",
    "materialize", "param_groups", "patchify", "pixel_loss", "preset_names", "random_patch_mask",
    "sincos_table_2d", "unpatchify", "whole_word_mask",
]

"""The image encoder as timm sees it: which ``timm.create_model`` call builds its architecture, the one-line call
that loads an export's ``image_encoder.safetensors``, and the check that the keys and shapes agree."""

from __future__ import annotations

import functools

import torch

from mrm_scale.model import MRMConfig

from .loading import ExportError

# timm architecture whose kwargs are overridden for presets without a timm name of their own (``tiny``)
TIMM_FALLBACK_ARCH = "vit_tiny_patch16_224"


@functools.lru_cache(maxsize=None)
def _timm_arch(name: str) -> dict:
    import timm

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0)
    blk = m.blocks[0]
    return dict(img_size=m.patch_embed.img_size[0], patch_size=m.patch_embed.patch_size[0],
                in_chans=m.patch_embed.proj.in_channels, embed_dim=m.embed_dim, depth=len(m.blocks),
                num_heads=blk.attn.num_heads, mlp_ratio=blk.mlp.fc1.out_features / m.embed_dim,
                qkv_bias=blk.attn.qkv.bias is not None)


def timm_spec(cfg: MRMConfig) -> tuple[str, dict]:
    """(timm model name, kwargs) that build the encoder's architecture: the preset's ``timm_name`` (or
    ``vit_tiny_patch16_224``) with the fields that differ from it as kwargs."""
    name = cfg.timm_name or TIMM_FALLBACK_ARCH
    have = _timm_arch(name)
    want = dict(img_size=cfg.input_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim,
                depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias)
    kwargs = {k: v for k, v in want.items() if have[k] != v}
    if abs(cfg.mlp_ratio - have["mlp_ratio"]) > 1e-6:
        kwargs["mlp_ratio"] = cfg.mlp_ratio
    return name, kwargs


def timm_call(cfg: MRMConfig, path: str) -> str:
    """The one-line ``timm.create_model`` call that loads ``image_encoder.safetensors`` at ``path``."""
    name, kwargs = timm_spec(cfg)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={path!r}), "
            f"num_classes=0{extra})")


def check_timm_keys(cfg: MRMConfig, encoder_sd: dict[str, torch.Tensor]) -> None:
    """The timm model of :func:`timm_spec` must have exactly the encoder's keys and shapes (checked on the meta
    device, no memory): timm loads with ``strict=False`` when the head is dropped, so a mismatch would pass
    silently there."""
    import timm

    name, kwargs = timm_spec(cfg)
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    theirs = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in encoder_sd.items()}
    if theirs != ours:
        diff = sorted(set(theirs.items()) ^ set(ours.items()))[:8]
        raise ExportError(f"the encoder does not match timm {name} {kwargs}: differing keys/shapes {diff}")

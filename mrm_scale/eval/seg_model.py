"""The segmentation model: a pretrained ViT encoder, a feature pyramid from four of its blocks, a UPerNet head.

- **Encoder**: timm's ``VisionTransformer`` of the init's architecture (:func:`~.timm_interop.timm_spec`, at the
  encoder input size, stochastic depth ``drop_path``), loaded with the same loader as fine-tuning
  (:func:`mrm_scale.model.weights.load_image_encoder`: position table resampled when the grid differs; every key
  the segmenter uses must be there). What the levels do not use (the final norm, blocks after the last level) is
  pruned with timm's ``prune_intermediate_layers``, so a weights file's ``norm.*`` is reported unused. A random
  init is this project's MAE-style init (2-D sin-cos positions), the start of pretraining. The image is
  downsampled to the encoder input first (as in pretraining and fine-tuning).
- **Levels**: the token maps of four blocks through timm's ``forward_intermediates`` (no final norm), by default
  at depth x (1/3, 1/2, 2/3, 1) — blocks 4, 6, 8, 12 (indices 3, 5, 7, 11) of a 12-block ViT-B, as the paper.
- **Pyramid**: rescaled x4 (two 2x2 transposed convolutions with a norm and GELU between), x2 (one), x1, x0.5
  (2x2 max-pool): strides patch/4 ... patch x 2.
- **Head**: UPerNet — a pyramid pooling module (scales 1, 2, 3, 6) on the coarsest level, a top-down FPN with
  3x3 smoothing, every level upsampled to the finest and fused by a 3x3 conv, dropout 0.1, a 1x1 classifier; the
  logits are upsampled bilinearly to the input size. Norm layers are GroupNorm, which needs no cross-process
  statistics and works at any batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrm_scale.model import MRMConfig, downsample


def default_levels(depth: int) -> tuple[int, ...]:
    """Block indices at depth x (1/3, 1/2, 2/3, 1): (3, 5, 7, 11) for 12 blocks, (0, 1, 2, 3) for 4."""
    return tuple(max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1.0))


def _norm(c: int) -> nn.GroupNorm:
    """GroupNorm with at least 4 channels a group (up to 32 groups): it stays defined on the pyramid pooling's
    1 x 1 maps of a single image."""
    return nn.GroupNorm(math.gcd(32, max(1, c // 4)), c)


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _norm(cout), nn.ReLU(inplace=True))


class Pyramid(nn.Module):
    """Four same-stride token maps -> strides x4, x2, x1, x0.5 of the token grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), _norm(dim), nn.GELU(),
                                 nn.ConvTranspose2d(dim, dim, 2, 2))
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]


class UPerHead(nn.Module):
    def __init__(self, dim: int, channels: int, num_classes: int, pool_scales=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(_conv(dim, channels, 1) for _ in self.pool_scales)
        self.ppm_out = _conv(dim + len(self.pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(_conv(dim, channels, 1) for _ in range(3))
        self.smooth = nn.ModuleList(_conv(channels, channels, 3) for _ in range(3))
        self.fuse = _conv(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top = levels[3]
        pooled = [F.interpolate(conv(F.adaptive_avg_pool2d(top, s)), size=top.shape[-2:], mode="bilinear",
                                align_corners=False) for s, conv in zip(self.pool_scales, self.ppm)]
        lat = [conv(x) for conv, x in zip(self.lateral, levels[:3])] + [self.ppm_out(torch.cat([top, *pooled], 1))]
        for i in range(3, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="bilinear",
                                                    align_corners=False)
        outs = [conv(x) for conv, x in zip(self.smooth, lat[:3])] + [lat[3]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, 1))))


class Segmenter(nn.Module):
    """``forward(images (B, C, S, S)) -> logits (B, num_classes, S, S)``."""

    def __init__(self, cfg: MRMConfig, num_classes: int = 1, channels: int | None = None,
                 levels: tuple[int, ...] | None = None, drop_path: float = 0.1):
        super().__init__()
        import timm

        from .timm_interop import timm_spec

        self.cfg = cfg
        name, kwargs = timm_spec(cfg)
        self.encoder = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **kwargs)
        self.levels = tuple(levels) if levels else default_levels(cfg.depth)
        if max(self.levels) >= cfg.depth or min(self.levels) < 0:
            raise ValueError(f"levels {self.levels}: a {cfg.depth}-block encoder has blocks 0..{cfg.depth - 1}")
        # drop what the levels do not use (the final norm, blocks after the last level) with timm's own pruning:
        # no parameter without a gradient, which data-parallel training would refuse
        self.encoder.prune_intermediate_layers(sorted(set(self.levels)), prune_norm=True, prune_head=True)
        kept = len(self.encoder.blocks)
        self.pruned = ("norm",) + ((f"blocks.{kept}-{cfg.depth - 1}",) if kept < cfg.depth else ())
        self.channels = channels or default_channels(cfg.embed_dim)
        self.pyramid = Pyramid(cfg.embed_dim)
        self.head = UPerHead(cfg.embed_dim, self.channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = downsample(images, self.cfg.input_size)
        blocks = sorted(set(self.levels))  # a shallow encoder may feed one block to several levels
        feats = self.encoder.forward_intermediates(x, indices=blocks, norm=False, output_fmt="NCHW",
                                                   intermediates_only=True)
        by_block = dict(zip(blocks, feats))
        logits = self.head(self.pyramid([by_block[b] for b in self.levels]))
        return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)


def default_channels(embed_dim: int) -> int:
    """The head's width: half the encoder's, between 32 and 512 (512 for ViT-L and up, 384 for ViT-B)."""
    return int(min(512, max(32, embed_dim // 2)))


def encoder_state(cfg: MRMConfig, state_dict: dict[str, torch.Tensor] | None, seed: int = 0) -> dict:
    """The encoder weights to start from: ``state_dict`` or, when None, this project's MAE-style random init."""
    if state_dict is not None:
        return state_dict
    from mrm_scale.model import build_model

    torch.manual_seed(seed)
    return build_model(cfg.replace(report_weight=0.0)).encoder.state_dict()


def load_encoder(model: Segmenter, state_dict: dict[str, torch.Tensor]) -> dict:
    """Load timm-keyed encoder weights: every key the segmenter's encoder has must be there; what it pruned (the
    final norm, blocks after the last level) is reported as unused. Returns the load report with ``pruned``."""
    from mrm_scale.model.weights import load_image_encoder

    report = load_image_encoder(model.encoder, state_dict, strict=True).to_dict()
    report["pruned"] = list(model.pruned)
    return report


def layer_groups(model: Segmenter, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """AdamW groups: encoder blocks at lr x decay^(depth + 1 - layer) (embeddings layer 0), the pyramid and head at
    lr; no weight decay on 1-D tensors, the class token and the position table."""
    depth = model.cfg.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = depth + 1
        if name.startswith("encoder."):
            rest = name[len("encoder."):]
            lid = int(rest.split(".")[1]) + 1 if rest.startswith("blocks.") else (
                0 if rest.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")) else depth + 1)
        no_wd = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
        scale = 1.0 if layer_decay is None else layer_decay ** (depth + 1 - lid)
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                              "lr_scale": scale, "lr": lr * scale})
        g["params"].append(p)
    return list(groups.values())

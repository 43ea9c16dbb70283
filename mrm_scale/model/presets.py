"""Model sizes in one place.

``MRMConfig`` holds every size and training-behaviour field of the MRM model; ``PRESETS`` names the sizes this
project trains; ``get_preset(name, **overrides)`` returns a validated copy.

Geometry: ``img_size`` is the high-resolution side the loader delivers (448 for the paper's model). The encoder
sees the image resized by ``1 / sr_scale`` (224) cut into ``patch_size`` patches; the pixel decoder predicts for
every patch the ``patch_size * sr_scale`` square (32 px) of the high-resolution image, times ``in_chans``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REPORT_LOSS_MODES = ("masked", "all")
# Fields that decide the parameters' names and shapes: a checkpoint resumes only into a model that agrees on them
# (the others - mask ratios, losses, drop path, checkpointing - may change between runs).
SHAPE_FIELDS = ("img_size", "sr_scale", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "qkv_bias", "pos_embed", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                "decoder_mlp_ratio", "text_width", "text_depth", "text_heads", "text_intermediate",
                "text_max_positions")
POS_EMBED_MODES = ("sincos", "learned")


@dataclass(frozen=True)
class MRMConfig:
    name: str = "custom"
    # image geometry
    img_size: int = 448  # high-resolution side (the batch's ``image``)
    sr_scale: int = 2  # encoder input = img_size // sr_scale; decoder output patch = patch_size * sr_scale
    patch_size: int = 16
    in_chans: int = 3
    # image encoder (timm ViT)
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: str = "sincos"  # "sincos": fixed 2-D sin-cos (MAE); "learned": trainable, initialised as sin-cos
    # pixel decoder
    decoder_embed_dim: int = 768
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    decoder_mlp_ratio: float = 4.0
    # report head (BERT)
    text_width: int = 384
    text_depth: int = 6
    text_heads: int = 6
    text_intermediate: int = 1536
    text_max_positions: int = 512  # BERT position table; >= max_tokens (512 keeps BERT checkpoints loadable)
    text_dropout: float = 0.1  # BERT hidden/attention dropout, as the original; 0 makes a step a pure function of the seed
    max_tokens: int = 100
    # objective
    mask_ratio: float = 0.75
    word_mask_prob: float = 0.5
    norm_pix_loss: bool = True
    report_weight: float = 1.0  # 0 builds an image-only MAE baseline without any text parameters
    report_loss: str = "masked"  # "masked" (default) or "all" (original code: every position incl. padding)
    # scale
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    # CPU attention kernel: stacks whose sequences are at most this long use SDPA's unfused "math" kernel for
    # bf16/fp16 on CPU (see mrm_scale.model.mrm.attention_kernels); 0 = torch's choice everywhere
    cpu_math_attention_max_tokens: int = 128
    # the report head's vocabulary projection runs on the masked positions, whose number changes every batch; it is
    # rounded up to a multiple of this (padding rows repeat a real one and are dropped before the loss), so the
    # matmul libraries see a few shapes instead of a new one per step (oneDNN builds a kernel per new shape on CPU:
    # 4-20 ms each). 1 = exact row count
    report_rows_multiple: int = 64
    timm_name: str | None = "vit_base_patch16_224"  # timm architecture the encoder exports to

    # ---- derived geometry -------------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Side of the encoder's input image."""
        return self.img_size // self.sr_scale

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_visible(self) -> int:
        """Patches the encoder keeps per sample."""
        return int(self.num_patches * (1.0 - self.mask_ratio))

    @property
    def out_patch_size(self) -> int:
        """Side of the high-resolution square the decoder predicts per patch."""
        return self.patch_size * self.sr_scale

    @property
    def pred_dim(self) -> int:
        return self.out_patch_size**2 * self.in_chans

    @property
    def has_report_head(self) -> bool:
        return self.report_weight > 0

    def timm_kwargs(self) -> dict:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` with the encoder's shape
        (no classifier), so ``VisionTransformer(**cfg.timm_kwargs())`` loads the encoder's state dict strictly."""
        return dict(
            img_size=self.input_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            num_classes=0,
            global_pool="token",
            class_token=True,
        )

    def replace(self, **overrides) -> "MRMConfig":
        return _replace_checked(self, overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "MRMConfig":
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"model config {self.name!r}: field {field!r} = {getattr(self, field)!r}: {why}")

        if self.sr_scale < 1 or self.img_size % self.sr_scale:
            raise bad("img_size", f"must be a multiple of sr_scale={self.sr_scale}")
        if self.input_size % self.patch_size:
            raise bad("patch_size", f"must divide the encoder input size {self.input_size} (img_size // sr_scale)")
        if self.in_chans not in (1, 3):
            raise bad("in_chans", "must be 1 or 3")
        if self.cpu_math_attention_max_tokens < 0:
            raise bad("cpu_math_attention_max_tokens", "must be >= 0 (0: torch's kernel choice everywhere)")
        if self.report_rows_multiple < 1:
            raise bad("report_rows_multiple", "must be >= 1 (1: the exact number of masked tokens)")
        for dim, heads, field in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"),
            (self.text_width, self.text_heads, "text_width"),
        ):
            if dim % heads:
                raise bad(field, f"must be divisible by its number of heads ({heads})")
        for field in ("embed_dim", "decoder_embed_dim"):
            if getattr(self, field) % 4:
                raise bad(field, "must be divisible by 4 (2-D sin-cos position embedding)")
        if not 0.0 <= self.mask_ratio < 1.0 or self.num_visible < 1:
            raise bad("mask_ratio", "must be in [0, 1) and leave at least one visible patch")
        if not 0.0 <= self.word_mask_prob <= 1.0:
            raise bad("word_mask_prob", "must be in [0, 1]")
        if self.report_weight < 0:
            raise bad("report_weight", "must be >= 0 (0 = image-only model)")
        if self.report_loss not in REPORT_LOSS_MODES:
            raise bad("report_loss", f"must be one of {REPORT_LOSS_MODES}")
        if self.pos_embed not in POS_EMBED_MODES:
            raise bad("pos_embed", f"must be one of {POS_EMBED_MODES}")
        if self.text_max_positions < self.max_tokens:
            raise bad("text_max_positions", f"must be >= max_tokens ({self.max_tokens})")
        if not 0.0 <= self.drop_path < 1.0:
            raise bad("drop_path", "must be in [0, 1)")
        return self


def _replace_checked(cfg: MRMConfig, overrides: dict) -> MRMConfig:
    known = {f.name for f in dataclasses.fields(MRMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides).validate()


# Heads of the decoders are 128 wide as in the paper's 768 x 4 x 6 decoder (tiny: 16).
PRESETS: dict[str, MRMConfig] = {
    # CPU tests: 128-px high-res, 64-px encoder input, 8-px patches (8 x 8 grid, 16 visible), 16-px targets.
    "tiny": MRMConfig(
        name="tiny", img_size=128, patch_size=8,
        embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
        text_width=64, text_depth=2, text_heads=4, text_intermediate=128, text_max_positions=128,
        timm_name=None,
    ),
    # ViT-S/16 + a small text stack
    "small": MRMConfig(
        name="small", embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=4,
        text_width=256, text_depth=4, text_heads=4, text_intermediate=1024,
        timm_name="vit_small_patch16_224",
    ),
    # the paper's model: ViT-B/16, decoder 768 x 4 (6 heads), text 384 x 6 x 6 / 1536, 448 -> 224
    "base": MRMConfig(name="base", timm_name="vit_base_patch16_224"),
    # ViT-L/16 + BERT-base-sized text
    "large": MRMConfig(
        name="large", embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=1024, decoder_depth=4, decoder_num_heads=8,
        text_width=768, text_depth=12, text_heads=12, text_intermediate=3072,
        timm_name="vit_large_patch16_224",
    ),
    # ViT-H/14 + BERT-large-sized text; 448 -> 224, 14-px patches, 28-px targets
    "huge": MRMConfig(
        name="huge", patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=1024, decoder_depth=4, decoder_num_heads=8,
        text_width=1024, text_depth=24, text_heads=16, text_intermediate=4096,
        grad_checkpointing=True, timm_name="vit_huge_patch14_224",
    ),
    # ViT-g/14 (1408 x 40 x 16, MLP 6144) + BERT-large-sized text
    "giant": MRMConfig(
        name="giant", patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
        decoder_embed_dim=1024, decoder_depth=4, decoder_num_heads=8,
        text_width=1024, text_depth=24, text_heads=16, text_intermediate=4096,
        grad_checkpointing=True, timm_name="vit_giant_patch14_224",
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str | MRMConfig, **overrides) -> MRMConfig:
    """The named preset with ``overrides`` applied (validated). An ``MRMConfig`` passes through (with overrides)."""
    if isinstance(name, MRMConfig):
        return _replace_checked(name, overrides)
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return _replace_checked(PRESETS[name], overrides)


def parse_overrides(items: list[str]) -> dict:
    """``["FIELD=VALUE", ...]`` (the ``--set`` flags) -> typed config overrides, each field checked."""
    fields = {f.name: f for f in dataclasses.fields(MRMConfig)}
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"--set {item!r}: unknown config field {key!r}; valid: {sorted(fields)}")
        default = getattr(MRMConfig(), key)
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"--set {item!r}: expected a boolean")
            out[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)):
            kind = type(default)
            try:
                out[key] = kind(raw)
            except ValueError:
                raise ValueError(f"--set {item!r}: field {key!r} takes {'an integer' if kind is int else 'a number'}, "
                                 f"e.g. --set {key}={default}") from None
        else:
            out[key] = None if raw.lower() == "none" else raw
    return out

"""The MRM model: masked image encoder (timm ViT), super-resolution pixel decoder, image-conditioned report head.

State-dict layout (export relies on it):

- ``encoder.*``  maps 1:1 onto timm ``VisionTransformer(num_classes=0)`` keys: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``.
- ``decoder.*``  MAE-style pixel decoder (``embed``, ``mask_token``, ``pos_embed``, ``blocks.N.*``, ``norm``,
  ``pred``); dropped after pretraining.
- ``report.image_proj.*``  the conditioning projection (encoder width -> text width).
- ``report.mlm.*``  a plain ``transformers.BertForMaskedLM`` (``bert.*``, ``cls.*``; no pooler), exportable with
  ``save_pretrained`` and loadable by ``AutoModelForMaskedLM``.

Position embeddings: fixed 2-D sin-cos (as MAE and the MRM paper) by default, held in a persistent buffer named
``pos_embed`` so the key matches timm while every *parameter* still receives a gradient each step;
``pos_embed="learned"`` makes the encoder's table a trainable parameter initialised with the same sin-cos values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .masking import apply_token_mask, make_generator, random_patch_mask, whole_word_mask
from .patches import downsample, patchify, sincos_table_2d
from .presets import MRMConfig, get_preset

NORM_PIX_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------------------------
# Attention kernel on CPU. torch's fused CPU flash-attention kernel has a slow bf16/fp16 *backward* on short
# sequences (2-3x the unfused kernel on the encoder's 50 visible tokens and the report's 100); the unfused "math"
# kernel computes half-precision inputs in fp32 on CPU (softmax included). Stacks whose sequences are at most this
# long use it on CPU; longer ones (the pixel decoder's 197 tokens) and every CUDA tensor keep torch's choice
# (flash). 0 switches the rule off. The threshold is ``MRMConfig.cpu_math_attention_max_tokens`` (128; set per
# model with ``MRM.set_cpu_math_attention``). Measured with `mrm-scale bench step` (README, Performance).


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` (the first maximum on ties, as argmax) through ``max``: on CPU over a vocabulary of 30k fp32
    logits, 1.9 ms for 235 rows where ``argmax`` takes 9.3 ms (its kernel does not vectorise the last dimension)."""
    return x.max(dim=-1).indices


def attention_kernels(x: torch.Tensor, max_tokens: int):
    """SDPA kernel context for a transformer stack run on ``x`` (B, T, D): the math kernel for half precision on
    CPU when T <= ``max_tokens``, else torch's choice."""
    if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and x.shape[1] <= max_tokens):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _block_call(blk: nn.Module, x: torch.Tensor, max_tokens: int) -> torch.Tensor:
    with attention_kernels(x, max_tokens):  # inside the checkpointed call: a recompute picks the same kernel
        return blk(x)


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool, max_tokens: int) -> torch.Tensor:
    for blk in blocks:
        if use_checkpoint:
            x = checkpoint(_block_call, blk, x, max_tokens, use_reentrant=False)
        else:
            x = _block_call(blk, x, max_tokens)
    return x


def _vit_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float):
    rates = [drop_path * i / (depth - 1) for i in range(depth)] if depth > 1 else [drop_path] * depth  # linear ramp
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=LayerNorm)
        for rate in rates
    )


class ImageEncoder(nn.Module):
    """ViT encoder over the visible patches; attribute names follow timm's ``VisionTransformer``."""

    def __init__(self, cfg: MRMConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(
            img_size=cfg.input_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        table = torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=True)
        self.blocks = _vit_blocks(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path)
        self.norm = LayerNorm(cfg.embed_dim)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.math_attention_max_tokens = cfg.cpu_math_attention_max_tokens

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, final_norm: bool = True) -> torch.Tensor:
        """``x`` (B, C, input, input) -> (B, 1 + K, D): class token, then the kept patches (all when
        ``ids_keep`` is None), after the final norm (``final_norm=False``: the last block's output, which the
        paper's fine-tuning head pools)."""
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing and self.training and torch.is_grad_enabled(),
                        self.math_attention_max_tokens)
        return self.norm(x) if final_norm else x


class PixelDecoder(nn.Module):
    """MAE-style light decoder: mask tokens fill the removed places, fixed 2-D sin-cos positions, timm Blocks,
    and a linear head to ``(patch * sr_scale)^2 * C`` pixels per patch."""

    def __init__(self, cfg: MRMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_patches + 1, cfg.decoder_embed_dim), persistent=True)
        self.blocks = _vit_blocks(
            cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.decoder_mlp_ratio, True, 0.0
        )
        self.norm = LayerNorm(cfg.decoder_embed_dim)
        self.math_attention_max_tokens = cfg.cpu_math_attention_max_tokens
        self.pred = nn.Linear(cfg.decoder_embed_dim, cfg.pred_dim)
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, 1 + K, D), ``ids_restore`` (B, N) -> predictions (B, N, pred_dim) in grid order."""
        x = self.embed(latent)
        b, t, d = x.shape
        n = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(b, n - (t - 1), d)
        patches = torch.cat([x[:, 1:], fill], dim=1)  # shuffled order: visible first
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # back to grid order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = _run_blocks(self.blocks, x, self.grad_checkpointing and self.training and torch.is_grad_enabled(),
                        self.math_attention_max_tokens)
        x = self.norm(x)
        return self.pred(x[:, 1:])


def _bert_config(cfg: MRMConfig, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.text_width,
        num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate,
        max_position_embeddings=cfg.text_max_positions,
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        pad_token_id=pad_token_id,
        type_vocab_size=2,
        attn_implementation="sdpa",
    )


class ReportHead(nn.Module):
    """Image-conditioned BERT masked-language model.

    The encoder's visible patch tokens are mean-pooled and projected to the text width; the vector is added at
    every position to the output of BERT's embeddings module (after its LayerNorm and dropout), and BERT's layers
    and masked-LM head predict the original tokens (as the paper's code does).
    """

    def __init__(self, cfg: MRMConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        from transformers import BertForMaskedLM

        self.cfg = cfg
        self.image_proj = nn.Linear(cfg.embed_dim, cfg.text_width)
        self.mlm = BertForMaskedLM(_bert_config(cfg, vocab_size, pad_token_id))
        self.math_attention_max_tokens = cfg.cpu_math_attention_max_tokens
        # tokens scored when counting FLOPs on the meta device, where the mask has no values (None = expected)
        self.meta_masked_tokens: int | None = None
        self.rows_multiple = cfg.report_rows_multiple  # count_training_flops sets 1: model FLOPs, no padding

    def set_grad_checkpointing(self, enable: bool) -> None:
        if enable:
            if hasattr(self.mlm, "activation_checkpointing_enable"):
                self.mlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5
                self.mlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            if hasattr(self.mlm, "activation_checkpointing_disable"):
                self.mlm.activation_checkpointing_disable()
            else:
                self.mlm.gradient_checkpointing_disable()

    def _attention_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Key-padding mask (B, 1, 1, L): boolean (True = attend) for SDPA, additive for eager attention."""
        keep = attention_mask.bool()[:, None, None, :]
        if self.mlm.config._attn_implementation == "sdpa":
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    def _masked_rows(self, token_mask: torch.Tensor) -> torch.Tensor:
        flat = token_mask.reshape(-1)
        if flat.device.type == "meta":  # no values: score the expected number of masked tokens
            n = self.meta_masked_tokens
            if n is None:
                n = round(self.cfg.word_mask_prob * (self.cfg.max_tokens - 2) * token_mask.shape[0])
            return torch.nonzero_static(flat, size=int(n)).squeeze(1)
        return flat.nonzero().squeeze(1)

    def masked_logits(self, hidden: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor):
        """(rows, fp32 logits, targets) at the masked positions only: ``rows`` index the flattened (B * L)
        positions; the vocabulary projection runs on those rows alone."""
        rows = self._masked_rows(token_mask)
        n, k = rows.numel(), self.rows_multiple
        padded = rows
        if k > 1 and n % k and n:  # a bucketed row count: few matmul shapes (MRMConfig.report_rows_multiple)
            padded = torch.cat([rows, rows[:1].expand(k - n % k)])
        logits = self.mlm.cls(hidden.reshape(-1, hidden.shape[-1]).index_select(0, padded))[:n].float()
        return rows, logits, labels.reshape(-1).index_select(0, rows)

    def condition(self, latent: torch.Tensor) -> torch.Tensor:
        """The image vector (B, text_width): the encoder's visible patch tokens (class token excluded), mean-pooled,
        then projected (mean-then-project equals project-then-mean for a linear map, one matmul per sample)."""
        return self.image_proj(latent[:, 1:].mean(dim=1))

    def embed(self, latent: torch.Tensor, masked_ids: torch.Tensor) -> torch.Tensor:
        """Input of the BERT layers (B, L, text_width): BERT's embeddings of the masked report (word + position +
        type, LayerNorm, dropout), plus the image vector at every position."""
        bert = self.mlm.bert
        x = bert.embeddings(input_ids=masked_ids)
        # The image vector joins *after* the embeddings' LayerNorm: added before it, the vector (many times larger
        # than a word embedding at init) dominates every token, and the norm makes all tokens of a report alike.
        return x + self.condition(latent).unsqueeze(1).to(x.dtype)

    def encode(self, latent: torch.Tensor, masked_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the BERT layers (B, L, text_width) for the masked report conditioned on the image.
        The layer stack is called directly with a mask built here: BertModel.forward would inspect the mask's
        values (a host sync each step, and impossible on the meta device)."""
        x = self.embed(latent, masked_ids)
        # transformers re-runs a checkpointed layer outside this context: the kernel rule only without checkpointing
        ckpt = getattr(self.mlm, "is_activation_checkpointing", None)
        ckpt = self.mlm.is_gradient_checkpointing if ckpt is None else ckpt  # transformers < 5
        kernels = contextlib.nullcontext() if ckpt else attention_kernels(x, self.math_attention_max_tokens)
        with kernels:
            mask = self._attention_mask(attention_mask, x.dtype)
            return self.mlm.bert.encoder(x, attention_mask=mask).last_hidden_state

    def forward(
        self,
        latent: torch.Tensor,
        masked_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor,
        labels: torch.Tensor,
        mode: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (fp32 report loss, predicted ids (B, L): argmax at scored masked positions, else the input)."""
        hidden = self.encode(latent, masked_ids, attention_mask)
        if mode == "masked":
            rows, logits, targets = self.masked_logits(hidden, token_mask, labels)
            loss = F.cross_entropy(logits, targets, reduction="sum") / max(int(rows.numel()), 1)
            with torch.no_grad():
                pred_ids = masked_ids.reshape(-1).clone()
                pred_ids.index_copy_(0, rows, argmax_last(logits))
                pred_ids = pred_ids.view_as(masked_ids)
        elif mode == "all":  # compatibility: score every position, padding included
            logits = self.mlm.cls(hidden).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            with torch.no_grad():
                pred_ids = torch.where(token_mask, argmax_last(logits), masked_ids)
        else:
            raise ValueError(f"report_loss must be 'masked' or 'all', got {mode!r}")
        return loss, pred_ids


# ----------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MRMOutput:
    loss: torch.Tensor  # image_loss + report_weight * report_loss (fp32)
    image_loss: torch.Tensor  # MSE over removed patches (fp32)
    report_loss: torch.Tensor | None  # CE over masked tokens (fp32); None without a report head
    pred_pixels: torch.Tensor  # (B, N, (p * sr_scale)^2 * C), normalised-target space when norm_pix_loss
    patch_mask: torch.Tensor  # (B, N) float, 1 = removed
    token_mask: torch.Tensor | None  # (B, L) bool, True = masked word piece
    masked_input_ids: torch.Tensor | None  # (B, L) the report as BERT saw it
    report_pred_ids: torch.Tensor | None  # (B, L) argmax prediction at masked positions, input elsewhere


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over removed patches only (fp32). With ``norm_pix`` every target patch is normalised by
    its own mean and (unbiased) variance, ``(t - mean) / sqrt(var + 1e-6)``."""
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MRM(nn.Module):
    """Masked Record Modeling. ``forward(batch, seed)`` masks on the batch's device and returns :class:`MRMOutput`."""

    def __init__(
        self,
        cfg: MRMConfig,
        *,
        vocab_size: int | None = None,
        pad_token_id: int | None = None,
        cls_token_id: int | None = None,
        sep_token_id: int | None = None,
        mask_token_id: int | None = None,
    ):
        super().__init__()
        cfg = cfg.validate()
        self.cfg = cfg
        self.report_weight = float(cfg.report_weight)
        self.encoder = ImageEncoder(cfg)
        self.decoder = PixelDecoder(cfg)
        self.report: ReportHead | None = None
        self.vocab_size = vocab_size
        self.pad_token_id, self.cls_token_id = pad_token_id, cls_token_id
        self.sep_token_id, self.mask_token_id = sep_token_id, mask_token_id
        if cfg.has_report_head:
            ids = dict(pad_token_id=pad_token_id, cls_token_id=cls_token_id, sep_token_id=sep_token_id,
                       mask_token_id=mask_token_id)
            missing = [k for k, v in {"vocab_size": vocab_size, **ids}.items() if v is None]
            if missing:
                raise ValueError(
                    f"model {cfg.name!r} has a report head (report_weight={cfg.report_weight}) and needs {missing} "
                    "from the data's tokenizer.json (or set report_weight=0 for an image-only model)"
                )
            bad = {k: v for k, v in ids.items() if not 0 <= int(v) < int(vocab_size)}
            if bad:
                raise ValueError(f"special token ids {bad} are outside the vocabulary (vocab_size={vocab_size})")
            self.report = ReportHead(cfg, int(vocab_size), int(pad_token_id))
        self.set_grad_checkpointing(cfg.grad_checkpointing)
        self.init_weights()

    # ---- set-up -------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per transformer block (``use_reentrant=False``) in all three stacks."""
        self.grad_checkpointing = bool(enable)
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable
        if self.report is not None:
            self.report.set_grad_checkpointing(enable)

    def set_cpu_math_attention(self, max_tokens: int) -> None:
        """The CPU attention-kernel rule of all three stacks (:func:`attention_kernels`; 0 = torch's choice)."""
        self.cfg = self.cfg.replace(cpu_math_attention_max_tokens=int(max_tokens))
        for stack in (self.encoder, self.decoder, self.report):
            if stack is not None:
                stack.math_attention_max_tokens = int(max_tokens)

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE-style init for the image side (xavier-uniform linears incl. the flattened patch projection, zero
        biases, unit LayerNorms, normal(0.02) class/mask tokens, sin-cos position tables) and BERT's own init for
        the text stack. Also rebuilds non-persistent buffers, so ``to_empty`` + ``init_weights`` materialises a
        model built on the meta device."""
        cfg = self.cfg
        enc, dec = self.encoder, self.decoder
        enc.pos_embed.copy_(sincos_table_2d(cfg.embed_dim, cfg.grid_size, device=enc.pos_embed.device))
        dec.pos_embed.copy_(sincos_table_2d(cfg.decoder_embed_dim, cfg.grid_size, device=dec.pos_embed.device))
        for module in (enc, dec) + ((self.report.image_proj,) if self.report is not None else ()):
            module.apply(_init_mae_module)
        w = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(dec.mask_token, std=0.02)
        if self.report is not None:
            _init_bert(self.report.mlm)

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        batch: Mapping[str, torch.Tensor],
        seed: int | torch.Generator | None = None,
        *,
        labels: torch.Tensor | None = None,
        target_image: torch.Tensor | None = None,
    ) -> MRMOutput:
        """One MRM step.

        ``batch``: the loader's dict (``image`` (B, C, H, H) normalised, ``input_ids``, ``attention_mask``,
        ``word_start`` (B, L); ``key`` is ignored). ``seed``: an int (a generator on the batch's device is seeded
        with it) or a ``torch.Generator``; same seed -> same patch and word masks. ``labels`` (B, L) overrides the
        report targets (default: the original ``input_ids``); ``target_image`` overrides the high-resolution
        image the pixel targets are cut from (default: ``batch["image"]``) - both for tests and analysis.
        """
        cfg = self.cfg
        self._check_image(batch["image"])
        gen = make_generator(seed, batch["image"].device)
        latent, ids_restore, patch_mask = self._encode_masked(batch["image"], gen)
        pred = self.decoder(latent, ids_restore)
        target = patchify(batch["image"] if target_image is None else target_image, cfg.out_patch_size)
        image_loss = pixel_loss(pred, target, patch_mask, cfg.norm_pix_loss)

        if self.report is None:
            return MRMOutput(image_loss, image_loss, None, pred, patch_mask, None, None, None)

        token_mask, masked_ids = self._mask_report(batch, gen)
        input_ids = batch["input_ids"]
        report_loss, pred_ids = self.report(
            latent, masked_ids, batch["attention_mask"], token_mask, input_ids if labels is None else labels,
            cfg.report_loss,
        )
        loss = image_loss + self.report_weight * report_loss
        return MRMOutput(loss, image_loss, report_loss, pred, patch_mask, token_mask, masked_ids, pred_ids)

    @torch.no_grad()
    def report_token_scores(self, batch: Mapping[str, torch.Tensor], seed: int | torch.Generator | None) -> dict:
        """Per-token view of the report branch for analysis (no pixel decoder): the same patch and word masks as
        ``forward(batch, seed)``, then for every position ``token_mask`` (B, L) bool, ``loss`` (B, L) fp32
        cross-entropy of the original token (0 where not masked) and ``correct`` (B, L) bool (argmax = original,
        False where not masked)."""
        if self.report is None:
            raise ValueError("report_token_scores needs a report head (report_weight > 0)")
        self._check_image(batch["image"])
        gen = make_generator(seed, batch["image"].device)
        latent, _, _ = self._encode_masked(batch["image"], gen)
        token_mask, masked_ids = self._mask_report(batch, gen)
        hidden = self.report.encode(latent, masked_ids, batch["attention_mask"])
        rows, logits, targets = self.report.masked_logits(hidden, token_mask, batch["input_ids"])
        loss = torch.zeros(token_mask.numel(), dtype=torch.float32, device=token_mask.device)
        loss.index_copy_(0, rows, F.cross_entropy(logits, targets, reduction="none"))
        correct = torch.zeros(token_mask.numel(), dtype=torch.bool, device=token_mask.device)
        correct.index_copy_(0, rows, argmax_last(logits) == targets)
        return {"token_mask": token_mask, "loss": loss.view_as(token_mask), "correct": correct.view_as(token_mask)}

    def _check_image(self, image: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size)
        if image.dim() != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"batch['image'] has shape {tuple(image.shape)}; model {cfg.name!r} expects (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) (in_chans, img_size, img_size)"
            )

    def _encode_masked(self, image: torch.Tensor, gen: torch.Generator):
        """Patch mask (drawn first from ``gen``) and the encoder's output on the kept patches."""
        cfg = self.cfg
        ids_keep, ids_restore, patch_mask = random_patch_mask(
            image.shape[0], cfg.num_patches, cfg.mask_ratio, gen, image.device
        )
        latent = self.encoder(downsample(image, cfg.input_size), ids_keep)
        return latent, ids_restore, patch_mask

    def _mask_report(self, batch: Mapping[str, torch.Tensor], gen: torch.Generator):
        """Whole-word mask (drawn from ``gen`` after the patch mask) and the masked report ids."""
        cfg = self.cfg
        input_ids = batch["input_ids"]
        b = batch["image"].shape[0]
        if input_ids.dim() != 2 or input_ids.shape[0] != b or input_ids.shape[1] > cfg.text_max_positions:
            raise ValueError(
                f"batch['input_ids'] has shape {tuple(input_ids.shape)}; expected ({b}, L) with "
                f"L <= {cfg.text_max_positions} (max_tokens={cfg.max_tokens})"
            )
        specials = (self.pad_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id)
        token_mask = whole_word_mask(
            input_ids, batch["attention_mask"], batch["word_start"], cfg.word_mask_prob, specials, gen
        )
        return token_mask, apply_token_mask(input_ids, token_mask, self.mask_token_id)

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        parts = {"encoder": self.encoder, "decoder": self.decoder}
        if self.report is not None:
            parts["report"] = self.report
        return parts

    def parameter_counts(self) -> dict[str, int]:
        """Numbers per part: parameters plus fixed position tables (as timm counts ``pos_embed``), each tensor
        once (BERT's tied output matrix is not counted twice); ``trainable`` = parameters with gradients."""
        counts: dict[str, int] = {}
        for name, part in self.parts().items():
            counts[name] = _unique_numel(part)
        counts.setdefault("report", 0)
        counts["total"] = _unique_numel(self)
        counts["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return counts

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay: norms, biases, position tables, class/mask tokens,
        BERT's position and token-type embeddings (every 1-D tensor, plus those special embeddings)."""
        return {name for name, p in self.named_parameters() if _no_decay(name, p)}


_NO_DECAY_SUFFIXES = (
    "cls_token", "mask_token", "pos_embed", "position_embeddings.weight", "token_type_embeddings.weight",
)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.ndim <= 1 or name.endswith(_NO_DECAY_SUFFIXES)


def param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Two optimizer groups: ``weight_decay`` for matrices (linears, conv, word embeddings), 0 for norms, biases,
    position embeddings, class/mask tokens and BERT's token-type embeddings. Each group carries ``names``
    (drop it if your optimizer objects to extra keys)."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():  # named_parameters() yields tied tensors once
        if not p.requires_grad:
            continue
        if _no_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": float(weight_decay), "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def _unique_numel(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    tensors = list(module.parameters()) + [b for n, b in module.named_buffers() if n.endswith("pos_embed")]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def _init_mae_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d) and m.bias is not None:
        nn.init.zeros_(m.bias)


def _init_bert(mlm: nn.Module) -> None:
    std = getattr(mlm.config, "initializer_range", 0.02)
    for m in mlm.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    emb = mlm.bert.embeddings
    if hasattr(emb, "position_ids"):
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1], device=emb.position_ids.device).expand(1, -1))
    if hasattr(emb, "token_type_ids"):
        emb.token_type_ids.zero_()
    nn.init.zeros_(mlm.cls.predictions.bias)  # tied to the decoder's bias


# ----------------------------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------------------------
def build_model(
    preset_or_cfg: str | MRMConfig = "base",
    *,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    cls_token_id: int | None = None,
    sep_token_id: int | None = None,
    mask_token_id: int | None = None,
    device: str | torch.device | None = None,
    compile: bool = False,
    **overrides,
) -> MRM:
    """Build an :class:`MRM` from a preset name or config (``overrides`` replace config fields).

    ``device="meta"`` builds without memory (parameter counts, FLOP counting, deferred init: ``materialize``).
    ``compile=True`` compiles every transformer block in place with ``torch.compile`` (regional compilation:
    the masked gathers between blocks have data-dependent shapes; state-dict keys stay unchanged).
    """
    cfg = get_preset(preset_or_cfg, **overrides)
    ids = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, cls_token_id=cls_token_id,
               sep_token_id=sep_token_id, mask_token_id=mask_token_id)
    if device is None:
        model = MRM(cfg, **ids)
    else:
        with torch.device(device):
            model = MRM(cfg, **ids)
    if compile:
        compile_blocks(model)
    return model


def compile_blocks(model: MRM, **compile_kwargs) -> MRM:
    """``torch.compile`` each transformer block in place (encoder, decoder, BERT layers)."""
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)
    if model.report is not None:
        blocks += list(model.report.mlm.bert.encoder.layer)
    for blk in blocks:
        blk.compile(**compile_kwargs)
    return model


def materialize(model: MRM, device: str | torch.device) -> MRM:
    """Turn a meta-device model into a real one on ``device`` with fresh weights (keeps BERT's tied output
    matrix tied)."""
    model.to_empty(device=device)
    if model.report is not None:
        preds = model.report.mlm.cls.predictions
        preds.decoder.weight = model.report.mlm.bert.embeddings.word_embeddings.weight
        preds.decoder.bias = preds.bias
    model.init_weights()
    return model

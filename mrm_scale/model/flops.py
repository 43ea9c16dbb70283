"""Training FLOPs per sample: counted (``FlopCounterMode`` over forward + backward) and by formula.

Only matrix products are counted (linear layers, the patch convolution, attention's two batched products) - the
convention of MFU accounting; norms, activations, softmax and the losses are left out on both sides.

Formula (forward, per sample; ``2 m n k`` per product), with K visible patches, N patches, L report tokens, M
scored (masked) tokens, V vocabulary:

- encoder: patch projection ``2 N (p^2 C) D``; per block on T = K + 1 tokens
  ``2 T D (3D) + 2 T D D + 2 * 2 T D H + 2 * 2 T^2 D`` (qkv, out-proj, MLP, scores and weighted sum);
- decoder: embedding ``2 T D Dd``, the same block formula on N + 1 tokens at width Dd, head ``2 N Dd P``
  (P = (p * sr_scale)^2 C);
- report: conditioning ``2 D Dt`` (pool, then project), BERT layers on L tokens (same block formula, MLP width
  ``text_intermediate``), MLM head at the M masked tokens ``2 M Dt Dt + 2 M Dt V``.

Training = 3 x forward (backward computes gradients for inputs and weights), except the patch projection, whose
input (the image) needs no gradient: 2 x.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mrm_scale.formats.tokenizer import TokenizerIdentity
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .presets import MRMConfig


def _block_flops(tokens: int, dim: int, mlp_hidden: int) -> int:
    t, d = tokens, dim
    return 2 * t * d * 3 * d + 2 * t * d * d + 2 * 2 * t * d * mlp_hidden + 2 * 2 * t * t * d


def encoder_forward_flops(cfg: MRMConfig) -> int:
    """Forward FLOPs of the encoder on every patch of one image (fine-tuning and scoring; head left out)."""
    n, d = cfg.num_patches, cfg.embed_dim
    return 2 * n * (cfg.patch_size**2 * cfg.in_chans) * d + cfg.depth * _block_flops(n + 1, d, int(cfg.mlp_ratio * d))


def formula_training_flops(
    cfg_or_model,
    *,
    vocab_size: int | None = None,
    masked_tokens: float | None = None,
    text_tokens: int | None = None,
) -> dict[str, float]:
    """Analytic training FLOPs per sample, by part, for a config (or a built model).

    ``masked_tokens``: report tokens scored per sample (default: ``word_mask_prob * (max_tokens - 2)``, i.e.
    full-length reports of one-piece words; pass the observed mean for MFU). ``text_tokens``: report length
    (default ``max_tokens``). ``vocab_size`` is needed unless a model is given.
    Returns ``encoder``, ``decoder``, ``report``, ``total`` (training FLOPs) and ``forward`` (forward FLOPs).
    """
    if isinstance(cfg_or_model, MRMConfig):
        cfg = cfg_or_model
    else:
        cfg = cfg_or_model.cfg
        vocab_size = vocab_size if vocab_size is not None else cfg_or_model.vocab_size
    n = cfg.num_patches
    t_enc = cfg.num_visible + 1
    d, dd, dt = cfg.embed_dim, cfg.decoder_embed_dim, cfg.text_width

    patch = 2 * n * cfg.patch_size**2 * cfg.in_chans * d
    enc_blocks = cfg.depth * _block_flops(t_enc, d, int(d * cfg.mlp_ratio))
    dec = 2 * t_enc * d * dd + cfg.decoder_depth * _block_flops(n + 1, dd, int(dd * cfg.decoder_mlp_ratio))
    dec += 2 * n * dd * cfg.pred_dim

    report_fwd = 0.0
    if cfg.has_report_head:
        if vocab_size is None:
            raise ValueError("formula_training_flops: vocab_size is needed for the report head's FLOPs")
        length = cfg.max_tokens if text_tokens is None else int(text_tokens)
        if cfg.report_loss == "all":
            scored = float(length)
        else:
            scored = cfg.word_mask_prob * (cfg.max_tokens - 2) if masked_tokens is None else float(masked_tokens)
        report_fwd = 2 * d * dt + cfg.text_depth * _block_flops(length, dt, cfg.text_intermediate)
        report_fwd += scored * (2 * dt * dt + 2 * dt * vocab_size)

    encoder = 2 * patch + 3 * enc_blocks
    decoder = 3 * dec
    report = 3 * report_fwd
    return {
        "encoder": float(encoder),
        "decoder": float(decoder),
        "report": float(report),
        "total": float(encoder + decoder + report),
        "forward": float(patch + enc_blocks + dec + report_fwd),
    }


def synthetic_batch(
    cfg: MRMConfig,
    batch_size: int = 1,
    *,
    vocab_size: int = 30522,
    special_ids: Mapping[str, int] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict:
    """A batch in the loader's contract: random image, full-length reports ``[CLS] words... [SEP]`` (70% of
    pieces start a word). On the meta device only the shapes are real."""
    canonical = TokenizerIdentity.canonical(vocab_size).model_ids()  # the ids prep's trained vocabularies use
    ids = {k: v for k, v in canonical.items() if k != "vocab_size"} | dict(special_ids or {})
    device = torch.device(device)
    b, length = batch_size, cfg.max_tokens
    if device.type == "meta":
        return {
            "image": torch.empty(b, cfg.in_chans, cfg.img_size, cfg.img_size, device=device),
            "input_ids": torch.empty(b, length, dtype=torch.int64, device=device),
            "attention_mask": torch.empty(b, length, dtype=torch.int64, device=device),
            "word_start": torch.empty(b, length, dtype=torch.bool, device=device),
            "key": [f"synthetic-{i}" for i in range(b)],
        }
    gen = torch.Generator().manual_seed(seed)
    low = max(ids.values()) + 1
    input_ids = torch.randint(low, vocab_size, (b, length), generator=gen)
    input_ids[:, 0] = ids["cls_token_id"]
    input_ids[:, -1] = ids["sep_token_id"]
    word_start = torch.rand(b, length, generator=gen) < 0.7
    word_start[:, 1] = True
    word_start[:, 0] = word_start[:, -1] = False
    return {
        "image": torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen).to(device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones(b, length, dtype=torch.int64).to(device),
        "word_start": word_start.to(device),
        "key": [f"synthetic-{i}" for i in range(b)],
    }


def count_training_flops(
    model, batch: Mapping, *, seed: int = 0, masked_tokens: int | None = None, include_recompute: bool = False
) -> dict:
    """Count the matmul FLOPs of one forward + backward of ``model`` on ``batch`` with ``FlopCounterMode``.

    Attention runs through SDPA's math backend while counting, so it decomposes into batched matmuls that the
    counter sees on every device (the fused CPU kernel has no FLOP formula). Gradients are computed with
    ``torch.autograd.grad`` and discarded: the parameters' ``.grad`` is left untouched. Works on the meta device;
    there the number of scored report tokens has no data and is ``masked_tokens`` (total over the batch; default:
    the expected count).

    Activation checkpointing is switched off while counting unless ``include_recompute``: the default counts
    model FLOPs (the MFU convention), not the extra forward a checkpointed block re-runs.

    Returns ``total`` (batch), ``per_sample``, ``masked_tokens_per_sample`` (scored report tokens).
    """
    report = getattr(model, "report", None)
    old_hint = report.meta_masked_tokens if report is not None else None
    old_multiple = report.rows_multiple if report is not None else None
    if report is not None:
        report.rows_multiple = 1  # model FLOPs: the padding rows of the bucketed vocabulary projection not counted
        if masked_tokens is not None:
            report.meta_masked_tokens = int(masked_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    ckpt = getattr(model, "grad_checkpointing", False)
    if ckpt and not include_recompute:
        model.set_grad_checkpointing(False)
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            out = model(batch, seed=seed)
            torch.autograd.grad(out.loss, params, allow_unused=True)
    finally:
        if ckpt and not include_recompute:
            model.set_grad_checkpointing(True)
        if report is not None:
            report.meta_masked_tokens, report.rows_multiple = old_hint, old_multiple
    b = batch["image"].shape[0]
    if out.token_mask is None:
        scored = 0.0
    elif model.cfg.report_loss == "all":
        scored = float(out.token_mask.shape[1])
    elif out.token_mask.device.type == "meta":
        n = report.meta_masked_tokens if masked_tokens is None else masked_tokens
        if n is None:
            n = round(model.cfg.word_mask_prob * (model.cfg.max_tokens - 2) * b)
        scored = float(n) / b
    else:
        scored = float(out.token_mask.sum()) / b
    total = int(counter.get_total_flops())
    return {"total": total, "per_sample": total / b, "masked_tokens_per_sample": scored}

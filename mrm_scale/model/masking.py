"""Masking on the device, seeded per step, vectorised (no Python loop over samples or tokens).

Both maskers draw from one ``torch.Generator`` living on the batch's device, so a step's masks are a pure function
of its seed: the trainer passes e.g. ``seed = hash(run_seed, global_step, rank)`` and a rerun masks the same
patches and words.
"""

from __future__ import annotations

import torch


def make_generator(seed: int | torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; a generator passes through; ``None`` = the default RNG.

    Meta tensors have no random numbers to draw: on the meta device this returns ``None``.
    """
    device = torch.device(device)
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None or device.type == "meta":
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random patch masking: sort uniform noise, keep the first ``int(N * (1 - mask_ratio))``.

    Returns ``ids_keep`` (B, K) indices of visible patches (in kept order), ``ids_restore`` (B, N) the inverse
    permutation (position of every patch in the shuffled order), and ``mask`` (B, N) float, 1 = removed.
    """
    num_keep = int(num_patches * (1.0 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)
    order = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(order, dim=1)
    ids_keep = order[:, :num_keep]
    # a patch is removed iff its rank in the shuffled order is >= num_keep
    mask = (ids_restore >= num_keep).to(torch.float32)
    return ids_keep, ids_restore, mask


def special_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids) -> torch.Tensor:
    """True where a token may never be masked: special ids ([CLS], [SEP], [PAD]) and attention 0."""
    special = attention_mask == 0
    for tok in special_ids:
        if tok is not None:
            special = special | (input_ids == int(tok))
    return special


def whole_word_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    word_start: torch.Tensor,
    prob: float,
    special_ids,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Whole-word masking: each word is masked with probability ``prob``; its continuation pieces follow it.

    Word ``k`` of a sample is the span from its k-th ``word_start`` up to the next one; ``cumsum(word_start)``
    gives every token its word number (0 before the first word). One uniform draw per word number decides the
    word; tokens inherit their word's decision unless they are special (``special_ids``) or padding.
    Returns a bool (B, L) mask, True = replace by [MASK].
    """
    batch, length = input_ids.shape
    word_id = torch.cumsum(word_start.to(torch.int64), dim=1)  # (B, L), 0..L
    draw = torch.rand(batch, length + 1, generator=generator, device=input_ids.device) < prob
    chosen = torch.gather(draw, 1, word_id)
    eligible = (word_id > 0) & ~special_token_mask(input_ids, attention_mask, special_ids)
    return chosen & eligible


def apply_token_mask(input_ids: torch.Tensor, token_mask: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``input_ids`` with masked positions replaced by [MASK] (MRM masks every chosen word; no 80/10/10)."""
    return torch.where(token_mask, torch.full_like(input_ids, int(mask_token_id)), input_ids)

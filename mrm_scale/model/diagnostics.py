"""Does the report branch use the image? Measured on one batch with the same patch and word masks twice: each
record with its own image, and with its neighbour's image (the images rolled by one within the batch).

``image_use(model, batch, seed, words=None)`` returns, over the masked word pieces,

- ``loss_own_image`` / ``loss_shuffled_image``: mean cross-entropy of the original tokens;
- ``image_gain`` = shuffled - own (nats per masked token): > 0 when the image helps predict the report, about 0
  when the text alone decides every masked word;
- ``masked_accuracy``: argmax = original token, own image;

and, when ``words`` (B, L) bool marks a subset of positions (e.g. the words that name a finding, a side or a
severity), the same four restricted to the masked positions among them, suffixed ``_finding_words``, plus
``masked_finding_tokens``. The trainer logs them as ``report/*`` (TensorBoard) on a fixed val batch; the
label-efficiency experiment reports them per pretraining.
"""

from __future__ import annotations

import torch

# the figures logged and quoted (TensorBoard ``report/<key>``; the export's model card)
IMAGE_USE_KEYS = ("loss_own_image", "loss_shuffled_image", "image_gain", "masked_accuracy",
                  "loss_own_image_finding_words", "loss_shuffled_image_finding_words", "image_gain_finding_words",
                  "masked_accuracy_finding_words")


def _mean(values: torch.Tensor, where: torch.Tensor) -> float | None:
    n = int(where.sum())
    return float(values[where].float().sum() / n) if n else None


@torch.no_grad()
def image_use(model, batch: dict, seed: int, words: torch.Tensor | None = None) -> dict:
    """Image-use figures of ``model`` (an :class:`~mrm_scale.model.MRM` with a report head) on ``batch``; run it
    in eval mode (no dropout) for figures that depend only on the weights, the batch and ``seed``."""
    own = model.report_token_scores(batch, seed)
    mask = own["token_mask"]
    out = {"samples": int(mask.shape[0]), "masked_tokens": int(mask.sum()),
           "loss_own_image": _mean(own["loss"], mask), "masked_accuracy": _mean(own["correct"], mask)}
    shuffled = None
    if mask.shape[0] > 1:
        shuffled = model.report_token_scores({**batch, "image": batch["image"].roll(1, 0)}, seed)
        if not torch.equal(shuffled["token_mask"], mask):  # masks are drawn before any value is looked at
            raise RuntimeError("image_use: the word masks changed with the image; masking must not depend on it")
    out["loss_shuffled_image"] = None if shuffled is None else _mean(shuffled["loss"], mask)
    out["image_gain"] = (None if out["loss_shuffled_image"] is None
                         else out["loss_shuffled_image"] - out["loss_own_image"])
    if words is not None:
        sel = mask & words.to(mask.device).bool()
        out["masked_finding_tokens"] = int(sel.sum())
        out["loss_own_image_finding_words"] = _mean(own["loss"], sel)
        out["masked_accuracy_finding_words"] = _mean(own["correct"], sel)
        out["loss_shuffled_image_finding_words"] = None if shuffled is None else _mean(shuffled["loss"], sel)
        a, b = out["loss_own_image_finding_words"], out["loss_shuffled_image_finding_words"]
        out["image_gain_finding_words"] = None if a is None or b is None else b - a
    return out

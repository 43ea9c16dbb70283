"""The downstream model and its training pieces: mean-pooled encoder features, the standardised linear probe,
layer-wise learning-rate decay, masked multi-label BCE and per-class ROC AUC.

Feature: the encoder runs on the image downsampled to its input size (as in pretraining, bicubic) with every
patch visible; the feature is the mean of the patch tokens after the final norm (class token excluded), the
same vector MRM's report head is conditioned on.

Linear probe: BatchNorm-free. Features are standardised with the training subset's per-dimension mean and std
(a fixed affine map, stored with the head), then one linear layer per class logit is fitted full-batch with
AdamW on masked BCE; the epoch with the best mean validation AUC is kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mrm_scale.model import ImageEncoder, MRMConfig, build_model, downsample


HEADS = ("standardised", "fc_norm")


class Classifier(nn.Module):
    """Encoder + pooled feature + linear head. ``forward(images)`` takes the high-resolution image (B, C, H, H)
    (or an image already at the encoder's input size) and returns logits (B, K).

    ``head="standardised"``: mean of the patch tokens after the encoder's final norm, standardised with fixed
    training-feature statistics (:meth:`set_standardisation`), head normal(``head_init_std``).
    ``head="fc_norm"`` (the paper's fine-tuning): mean of the patch tokens of the last block (the encoder's final
    norm is not used), a fresh LayerNorm, head truncated-normal(``head_init_std``), bias 0.
    """

    def __init__(self, cfg: MRMConfig, num_classes: int, head: str = "standardised", head_init_std: float = 0.01):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: one of {HEADS}")
        self.cfg = cfg
        self.head_kind = head
        # the encoder of an image-only MRM model: MAE-style init (sin-cos positions), replaced by loaded weights
        self.encoder: ImageEncoder = build_model(cfg.replace(report_weight=0.0)).encoder
        if head == "fc_norm":
            # the encoder's final norm is not used (as the original deletes it): no parameters that never get a
            # gradient, which data-parallel training would refuse; loading weights reports its keys as unused
            self.encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        else:
            self.register_buffer("feat_mean", torch.zeros(cfg.embed_dim))
            self.register_buffer("feat_std", torch.ones(cfg.embed_dim))
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        if head == "fc_norm":
            nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        else:
            nn.init.normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled vector before the head's own normalisation (what the linear probe caches)."""
        x = downsample(images, self.cfg.input_size)
        return self.encoder(x, final_norm=self.head_kind != "fc_norm")[:, 1:].mean(dim=1)

    def logits_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "fc_norm":
            return self.head(self.fc_norm(feats))
        return self.head((feats - self.feat_mean) / self.feat_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.features(images))

    @torch.no_grad()
    def set_standardisation(self, feats: torch.Tensor) -> None:
        """Per-dimension mean/std of the training features (std floored, so constant dimensions stay finite)."""
        feats = feats.float()
        self.feat_mean.copy_(feats.mean(0))
        std = feats.std(0, unbiased=False) if feats.shape[0] > 1 else torch.ones_like(self.feat_std)
        self.feat_std.copy_(std.clamp_min(1e-4 * float(std.max().clamp_min(1e-6))).clamp_min(1e-6))


def init_encoder_weights(encoder: ImageEncoder, state_dict: dict[str, torch.Tensor]):
    """Load timm-keyed encoder weights (position table resampled when the image size differs); every encoder key
    must be there. Returns the :class:`~mrm_scale.model.weights.LoadReport` (also logged)."""
    from mrm_scale.model.weights import load_image_encoder

    return load_image_encoder(encoder, state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics
# ----------------------------------------------------------------------------------------------------------------
def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean per-class sigmoid BCE over known labels (NaN = unknown, left out)."""
    known = ~torch.isnan(labels)
    if not bool(known.any()):
        return logits.sum() * 0.0
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(labels, nan=0.0), reduction="none")
    return (loss * known).sum() / known.sum()


def auc_table(labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict:
    """Per-class ROC AUC (scikit-learn) over the samples whose label is known; a class with only one label value
    present is skipped and named under ``skipped``. ``mean_auc`` averages the scored classes."""
    from sklearn.metrics import roc_auc_score

    per, skipped = {}, {}
    for j, c in enumerate(classes):
        known = ~np.isnan(labels[:, j])
        y = labels[known, j]
        if y.size == 0:
            per[c], skipped[c] = None, "no known labels"
            continue
        if np.unique(y).size < 2:
            per[c], skipped[c] = None, f"only {'positives' if y[0] == 1 else 'negatives'} ({y.size} samples)"
            continue
        per[c] = float(roc_auc_score(y, scores[known, j]))
    scored = [v for v in per.values() if v is not None]
    return {"auc": per, "mean_auc": float(np.mean(scored)) if scored else None, "skipped": skipped,
            "samples": int(labels.shape[0]), "scored_classes": len(scored)}


# ----------------------------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------------------------
def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for encoder block i, depth + 1 for the final norm and the head."""
    if name.startswith("encoder."):
        rest = name[len("encoder."):]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: Classifier, lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """Optimizer groups with lr scaled by ``layer_decay ** (depth + 1 - layer_id)`` (BEiT/MAE fine-tuning; ``None``:
    one lr for all); no weight decay on 1-D tensors, class token and position table."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_wd = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
        g = groups.setdefault((lid, no_wd), {"params": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                              "lr_scale": 1.0 if layer_decay is None else layer_decay ** (depth + 1 - lid),
                                              "layer": lid})
        g["params"].append(p)
    out = list(groups.values())
    for g in out:
        g["lr"] = lr * g["lr_scale"]
    return out


def schedule_factor(step: int, total: int, warmup: int) -> float:
    """The lr multiplier of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps, then half-cosine
    to 0 at ``total`` - the value the original's warmup-cosine scheduler gives its (step + 1)-th update."""
    s = step + 1
    if warmup and s < warmup:
        return s / warmup
    progress = (s - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# ----------------------------------------------------------------------------------------------------------------
# linear probe on cached features
# ----------------------------------------------------------------------------------------------------------------
def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: np.ndarray,
                     classes: list[str], *, epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-3,
                     eval_every: int = 10, seed: int = 0, callback=None) -> dict:
    """Fit the standardised linear head full-batch on cached features; keep the best mean-val-AUC epoch.

    Returns ``{"head": state dict (weight, bias, feat_mean, feat_std), "best_epoch", "best_val", "history"}``.
    Runs on one thread: the matrices are small, and thread start-up costs more than it saves (5x on 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_linear_probe(train_x, train_y, val_x, val_y, classes, epochs=epochs, lr=lr,
                                 weight_decay=weight_decay, eval_every=eval_every, seed=seed, callback=callback)
    finally:
        torch.set_num_threads(threads)


def _fit_linear_probe(train_x, train_y, val_x, val_y, classes, *, epochs, lr, weight_decay, eval_every, seed,
                      callback) -> dict:
    g = torch.Generator().manual_seed(int(seed))
    k = train_y.shape[1]
    d = train_x.shape[1]
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False) if train_x.shape[0] > 1 else torch.ones(d)
    std = std.clamp_min(1e-4 * float(std.max().clamp_min(1e-6))).clamp_min(1e-6)
    xt = (train_x - mean) / std
    xv = (val_x - mean) / std
    head = nn.Linear(d, k)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best = {"mean_auc": -1.0}
    best_state, best_epoch, history = None, 0, []
    for epoch in range(1, epochs + 1):
        for group in opt.param_groups:
            group["lr"] = lr * schedule_factor(epoch - 1, epochs, max(1, epochs // 20))
        loss = masked_bce(head(xt), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % eval_every == 0 or epoch == epochs:
            with torch.no_grad():
                scores = torch.sigmoid(head(xv)).numpy()
            table = auc_table(val_y, scores, classes)
            m = table["mean_auc"] if table["mean_auc"] is not None else float("nan")
            history.append({"epoch": epoch, "train_loss": float(loss.detach()),
                            "val_mean_auc": None if math.isnan(m) else m})  # None: results.json stays strict JSON
            if callback:
                callback(epoch, float(loss.detach()), table)
            if best_state is None or (not math.isnan(m) and m > best["mean_auc"]):
                best, best_epoch = table, epoch
                best_state = {k_: v.detach().clone() for k_, v in head.state_dict().items()}
    state = {"weight": best_state["weight"], "bias": best_state["bias"], "feat_mean": mean, "feat_std": std}
    return {"head": state, "best_epoch": best_epoch, "best_val": best, "history": history}


def apply_head(state: dict, feats: torch.Tensor) -> np.ndarray:
    """Probabilities (N, K) of a probe head (as returned by :func:`fit_linear_probe`) on features."""
    x = (feats - state["feat_mean"]) / state["feat_std"]
    return torch.sigmoid(x @ state["weight"].T + state["bias"]).numpy()

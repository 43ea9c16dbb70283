"""Initialise parts of an MRM model from existing weights.

- :func:`load_image_encoder`: the ViT encoder from a timm or MAE state dict (``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``, ``{"model": ...}``-style wrappers unwrapped, or ``.safetensors``). Position
  embeddings are resampled when the grid differs, the patch projection is adapted between 3 and 1 input channels
  (and resampled when the patch size differs).
- :func:`load_report_head`: the BERT masked-LM from a transformers directory (``save_pretrained``) or a single
  weights file; ``bert.*``/``cls.*`` keys, bare ``BertModel`` keys, and old ``gamma``/``beta`` names are accepted.

Both return a :class:`LoadReport` naming loaded, missing, unexpected and adapted keys (and log them); both fail with
an exception naming the file when nothing matches or a tensor cannot fit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state", "model_state_dict")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


class WeightLoadError(ValueError):
    """Weights could not be used; the message names the file and the keys at fault."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # key -> what was done to fit it

    def log(self, what: str) -> None:
        log.info("%s: loaded %d tensors from %s", what, len(self.loaded), self.source)
        for key, how in self.adapted.items():
            log.info("%s: %s adapted: %s", what, key, how)
        if self.missing:
            log.warning("%s: %d keys missing in %s (kept their init): %s", what, len(self.missing), self.source,
                        ", ".join(self.missing))
        if self.unexpected:
            log.warning("%s: %d keys in %s not used: %s", what, len(self.unexpected), self.source,
                        ", ".join(self.unexpected))


# ----------------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``), unwrapping
    ``{"model": ...}``, ``{"state_dict": ...}``, ``{"module": ...}`` wrappers and dropping non-tensor entries."""
    path = Path(path)
    if not path.is_file():
        raise WeightLoadError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file's name
        raise WeightLoadError(f"cannot read weights file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _resolve(source) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items() if isinstance(v, torch.Tensor)}, "<state dict>"
    return load_state_dict_file(source), str(source)


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# image encoder
# ----------------------------------------------------------------------------------------------------------------
_ENCODER_PREFIXES = ("", "encoder.", "model.", "backbone.", "visual.", "image_encoder.", "vit.")


def _encoder_of(target: nn.Module) -> nn.Module:
    enc = getattr(target, "encoder", None)
    if enc is not None and hasattr(enc, "patch_embed"):
        return enc
    if hasattr(target, "patch_embed") and hasattr(target, "blocks"):
        return target
    raise TypeError(f"expected an MRM model or its ImageEncoder, got {type(target).__name__}")


def _adapt_pos_embed(src: torch.Tensor, dst: torch.Tensor, key: str, where: str) -> tuple[torch.Tensor, str]:
    from timm.layers import resample_abs_pos_embed

    if src.dim() != 3 or src.shape[-1] != dst.shape[-1]:
        raise WeightLoadError(f"{where}: {key} has shape {tuple(src.shape)}, the encoder needs {tuple(dst.shape)}")
    n_src = src.shape[1]
    prefix = next((p for p in (1, 0, 2, 4) if n_src > p and math.isqrt(n_src - p) ** 2 == n_src - p), None)
    if prefix is None:
        raise WeightLoadError(f"{where}: {key} with {n_src} positions is not a square grid (+ prefix tokens)")
    old = math.isqrt(n_src - prefix)
    new = math.isqrt(dst.shape[1] - 1)
    grid = src[:, prefix:] if prefix != 1 else src
    resampled = resample_abs_pos_embed(
        grid.float(), new_size=[new, new], old_size=[old, old], num_prefix_tokens=1 if prefix == 1 else 0
    )
    if prefix != 1:  # no class-token position in the source (or several prefix tokens): class position = 0 / first
        cls = src[:, :1].float() if prefix > 1 else torch.zeros(1, 1, src.shape[-1])
        resampled = torch.cat([cls, resampled], dim=1)
    return resampled.to(src.dtype), f"resampled {old}x{old} -> {new}x{new} grid (bicubic), {prefix} prefix token(s)"


def _adapt_patch_proj(src: torch.Tensor, dst: torch.Tensor, key: str, where: str) -> tuple[torch.Tensor, str]:
    from timm.layers import resample_patch_embed

    if src.dim() != 4 or src.shape[0] != dst.shape[0]:
        raise WeightLoadError(f"{where}: {key} has shape {tuple(src.shape)}, the encoder needs {tuple(dst.shape)}")
    notes = []
    w = src.float()
    c_src, c_dst = w.shape[1], dst.shape[1]
    if c_src != c_dst:
        if c_src == 3 and c_dst == 1:
            w = w.sum(dim=1, keepdim=True)
            notes.append("RGB -> 1 channel (sum over channels)")
        elif c_src == 1 and c_dst == 3:
            w = w.repeat(1, 3, 1, 1) / 3.0
            notes.append("1 -> 3 channels (repeat / 3)")
        else:
            raise WeightLoadError(f"{where}: {key} has {c_src} input channels, the encoder {c_dst}; only 3<->1 adapt")
    if tuple(w.shape[-2:]) != tuple(dst.shape[-2:]):
        notes.append(f"patch {w.shape[-1]} -> {dst.shape[-1]} px (resampled)")
        w = resample_patch_embed(w, list(dst.shape[-2:]))
    return w.to(src.dtype), "; ".join(notes)


def _apply(module: nn.Module, new: dict, sd: dict, report: LoadReport, problems: list[str], where: str, what: str,
           strict: bool, expected: str) -> LoadReport:
    """Shared end of both loaders: fail loudly on shape problems, on nothing matched and (strict) on missing
    keys; otherwise load the matched tensors and log the report."""
    if problems:
        raise WeightLoadError(f"{where}: cannot load into the {what}: " + " | ".join(problems))
    if not new:
        sample = ", ".join(list(sd)[:5]) or "(no tensors)"
        raise WeightLoadError(f"{where}: no key matches the {what} (expected {expected}; the file has e.g. {sample})")
    if strict and report.missing:
        raise WeightLoadError(f"{where}: {what} keys missing: {', '.join(report.missing)}")
    module.load_state_dict(new, strict=False)
    report.log(what)
    return report


def load_image_encoder(
    target: nn.Module,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    prefix: str | None = None,
    strict: bool = False,
) -> LoadReport:
    """Load a timm/MAE ViT state dict into ``target`` (an :class:`MRM` or its ``ImageEncoder``).

    ``prefix``: the keys' prefix in the source (default: detected among ``""``, ``"encoder."``, ``"model."``,
    ``"backbone."``, ...). ``strict``: raise when any encoder key is missing. Shapes that cannot be adapted raise.
    """
    enc = _encoder_of(target)
    sd, where = _resolve(source)
    sd = _strip(sd)
    if prefix is None:
        prefix = next((p for p in _ENCODER_PREFIXES if f"{p}patch_embed.proj.weight" in sd), "")
    mine = enc.state_dict()
    report = LoadReport(source=where)
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems = []
    for key, dst in mine.items():
        src_key = prefix + key
        if src_key not in sd:
            report.missing.append(key)
            continue
        src = sd[src_key]
        used.add(src_key)
        if src.shape != dst.shape:
            try:
                if key == "pos_embed":
                    src, how = _adapt_pos_embed(src, dst, src_key, where)
                elif key == "patch_embed.proj.weight":
                    src, how = _adapt_patch_proj(src, dst, src_key, where)
                else:
                    raise WeightLoadError(
                        f"{src_key}: shape {tuple(src.shape)} in the file, {tuple(dst.shape)} in the encoder"
                    )
            except WeightLoadError as exc:
                problems.append(str(exc))
                continue
            report.adapted[key] = how
        new[key] = src
        report.loaded.append(key)
    report.unexpected = sorted(k for k in sd if k not in used)
    return _apply(enc, new, sd, report, problems, where, "image encoder", strict,
                  "timm ViT keys such as 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight'")


# ----------------------------------------------------------------------------------------------------------------
# report head
# ----------------------------------------------------------------------------------------------------------------
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_IGNORED_BUFFERS = ("position_ids", "token_type_ids")
_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
         "cls.predictions.decoder.bias": "cls.predictions.bias"}


def _report_file(source: str | os.PathLike) -> Path:
    path = Path(source)
    if path.is_dir():
        for name in _HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        if any(path.glob("*.index.json")):
            raise WeightLoadError(f"{str(path)!r}: sharded checkpoints are not supported; merge the shards first")
        raise WeightLoadError(f"{str(path)!r}: no {' or '.join(_HF_WEIGHT_FILES)} in this directory")
    return path


def _normalise_bert_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = _strip(sd)
    if any(k.startswith("report.mlm.") for k in sd):  # one of our own MRM state dicts
        sd = {k[len("report.mlm."):]: v for k, v in sd.items() if k.startswith("report.mlm.")}
    out = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.", "pooler.")):  # a bare BertModel
            key = "bert." + key
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def load_report_head(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = False
) -> LoadReport:
    """Load BERT masked-LM weights into ``model.report.mlm``.

    ``source``: a ``save_pretrained`` directory, a ``.safetensors``/``.bin`` file, or a state dict. The vocabulary
    must match the model's (the data's tokenizer) - a mismatch raises, naming both sizes. A longer position table
    is cut to the model's ``text_max_positions``. Pooler and next-sentence weights are reported as unused.
    """
    report_head = getattr(model, "report", None)
    if report_head is None:
        raise WeightLoadError("this model has no report head (report_weight=0); nothing to load BERT weights into")
    mlm = report_head.mlm
    if isinstance(source, Mapping):
        sd, where = _resolve(source)
    else:
        file = _report_file(source)
        sd, where = load_state_dict_file(file), str(file)
    sd = _normalise_bert_keys(sd)
    mine = mlm.state_dict()
    report = LoadReport(source=where)

    word_key = "bert.embeddings.word_embeddings.weight"
    if word_key in sd and sd[word_key].shape[0] != mine[word_key].shape[0]:
        raise WeightLoadError(
            f"{where}: vocabulary mismatch: the file's word embeddings have {sd[word_key].shape[0]} rows, the model's "
            f"tokenizer has {mine[word_key].shape[0]} tokens; use weights trained with the same tokenizer"
        )
    new: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    problems = []
    for key, dst in mine.items():
        if key in _TIED:  # shares its tensor with the word embeddings / the MLM bias
            used.add(key)
            continue
        if key not in sd:
            report.missing.append(key)
            continue
        src = sd[key]
        used.add(key)
        if src.shape != dst.shape:
            if key.endswith("position_embeddings.weight") and src.shape[0] > dst.shape[0] and src.shape[1:] == dst.shape[1:]:
                src = src[: dst.shape[0]]
                report.adapted[key] = f"first {dst.shape[0]} of {sd[key].shape[0]} positions"
            else:
                problems.append(f"{key}: shape {tuple(src.shape)} in the file, {tuple(dst.shape)} in the model")
                continue
        new[key] = src
        report.loaded.append(key)
    report.unexpected = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED_BUFFERS))
    return _apply(mlm, new, sd, report, problems, where, "report head", strict,
                  "'bert.*' / 'cls.*' keys of a BERT masked LM")

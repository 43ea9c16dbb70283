"""Initialise parts of an MRM model from existing weights.

- :func:`load_image_encoder`: the ViT encoder from a timm or MAE state dict (``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``, ``{"model": ...}``-style wrappers unwrapped, or ``.safetensors``). Position
  embeddings are resampled when the grid differs, the patch projection is adapted between 3 and 1 input channels
  (and resampled when the patch size differs).
- :func:`load_report_head`: the BERT masked-LM (and the image projection) from a transformers directory
  (``save_pretrained``), a single weights file or a checkpoint in the original MRM layout
  (``bert_encoder.model.*``, ``bert_mlp.*``); ``bert.*``/``cls.*`` keys, bare ``BertModel`` keys, and old
  ``gamma``/``beta`` names are accepted.
- :func:`load_pixel_decoder`: the MAE-style pixel decoder from the original MRM/MAE layout or ours.
- :func:`read_encoder`: a file's encoder tensors (timm keys) and the geometry they imply, for building a model
  around weights whose config is not stored with them.

Torch files are read with ``weights_only=True``; the only class allowed beyond tensors and containers is
``argparse.Namespace`` (``SAFE_GLOBALS``: the ``args`` the original MRM and MAE scripts save beside the model).
The loaders return a :class:`LoadReport` naming loaded, missing, unexpected and adapted keys (and log them); they
fail with an exception naming the file when nothing matches or a tensor cannot fit.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state", "model_state_dict")
# the only non-container objects a weights file may hold: the original MRM and MAE code save their
# argparse.Namespace under "args"
SAFE_GLOBALS = (argparse.Namespace,)
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
                        ", ".join(summarise_keys(self.unexpected)))

    def to_dict(self) -> dict:
        return {"loaded": len(self.loaded), "missing": list(self.missing),
                "unexpected": summarise_keys(self.unexpected), "adapted": dict(self.adapted)}


def summarise_keys(keys: list[str], limit: int = 12) -> list[str]:
    """The key names, or past ``limit`` their leading components with counts (``decoder_blocks.* (64)``)."""
    if len(keys) <= limit:
        return list(keys)
    groups: dict[str, int] = {}
    for k in keys:
        head = k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return [f"{h}.* ({n})" if n > 1 else next(k for k in keys if k.split(".")[0] == h) for h, n in groups.items()]


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
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        bad = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a {bad.group(1)} object" if bad else "an object torch's safe loader does not accept"
        raise WeightLoadError(
            f"cannot read weights file {str(path)!r}: it holds {what}, and weights are never unpickled beyond "
            f"tensors, containers and {', '.join(g.__module__ + '.' + g.__qualname__ for g in SAFE_GLOBALS)}; "
            "save its state dict alone (torch.save(ckpt['model'], 'weights.pth')) or as .safetensors") from None
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


_ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


def read_encoder(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """(the encoder's tensors under timm keys, their geometry: ``embed_dim``, ``depth``, ``patch_size``,
    ``in_chans``, ``grid``, ``mlp_ratio``, ``qkv_bias``) of a timm / MAE / original-MRM state dict or file."""
    sd, where = _resolve(source)
    sd = _strip(sd)
    prefix = next((p for p in _ENCODER_PREFIXES if f"{p}patch_embed.proj.weight" in sd), None)
    if prefix is None:
        sample = ", ".join(list(sd)[:5]) or "(no tensors)"
        raise WeightLoadError(f"{where}: no ViT encoder in it (no 'patch_embed.proj.weight' under any of the "
                              f"prefixes {list(_ENCODER_PREFIXES)}; the file has e.g. {sample})")
    enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)
           and k[len(prefix):].startswith(_ENCODER_TOP)}
    proj = enc["patch_embed.proj.weight"]
    blocks = sorted({int(k.split(".")[1]) for k in enc if k.startswith("blocks.") and k.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightLoadError(f"{where}: encoder blocks {blocks[:4]}... are not numbered 0..N-1")
    dim = proj.shape[0]
    fc1 = enc.get("blocks.0.mlp.fc1.weight")
    pos = enc.get("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.dim() == 3 else None
    return enc, {"embed_dim": int(dim), "depth": len(blocks), "patch_size": int(proj.shape[-1]),
                 "in_chans": int(proj.shape[1]), "grid": grid,
                 "mlp_ratio": float(fc1.shape[0] / dim) if fc1 is not None else 4.0,
                 "qkv_bias": "blocks.0.attn.qkv.bias" in enc, "source": where, "layout": _layout(sd)}


def _layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Which code wrote a state dict, as far as its key names tell."""
    if any(k.startswith(ORIGINAL_TEXT_PREFIX) for k in sd):
        return "original MRM (encoder, pixel decoder, text stack)"
    if any(k.startswith("report.mlm.") for k in sd):
        return "mrm-scale MRM"
    if "decoder_embed.weight" in sd:
        return "MAE (encoder, pixel decoder)"
    return "timm ViT"


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


ORIGINAL_TEXT_PREFIX = "bert_encoder.model."  # the original MRM code's text stack (a BertForMaskedLM)
ORIGINAL_IMAGE_PROJ = "bert_mlp."  # ... and its image-to-text projection


def _normalise_bert_keys(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(masked-LM keys as ``bert.*`` / ``cls.*``, image projection ``weight``/``bias`` if the source has one).
    Sources: our MRM state dicts (``report.mlm.*``, ``report.image_proj.*``), the original MRM layout
    (``bert_encoder.model.*``, ``bert_mlp.*``), transformers masked LMs and bare ``BertModel`` keys."""
    sd = _strip(sd)
    proj: dict[str, torch.Tensor] = {}
    for prefix, proj_prefix in (("report.mlm.", "report.image_proj."), (ORIGINAL_TEXT_PREFIX, ORIGINAL_IMAGE_PROJ)):
        if any(k.startswith(prefix) for k in sd):
            proj = {k[len(proj_prefix):]: v for k, v in sd.items() if k.startswith(proj_prefix)}
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    out = {}
    for key, value in sd.items():
        if key.startswith(("embeddings.", "encoder.", "pooler.")):  # a bare BertModel
            key = "bert." + key
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out, proj


def load_report_head(
    model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *, strict: bool = False
) -> LoadReport:
    """Load BERT masked-LM weights into ``model.report.mlm`` (and the image projection when the source has it).

    ``source``: a ``save_pretrained`` directory (our export's ``report_model/``, with its image projection), a
    ``.safetensors``/``.pth`` file, a checkpoint in the original MRM layout (``bert_encoder.model.*`` and
    ``bert_mlp.*``), or a state dict. The vocabulary must match the model's (the data's tokenizer) - a mismatch
    raises, naming both sizes. A longer position table is cut to the model's ``text_max_positions``; a shorter one
    (the original's 100 rows) fills the first rows, which is all a model with ``max_tokens`` up to that uses.
    Pooler and next-sentence weights are reported as unused.
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
    sd, proj = _normalise_bert_keys(sd)
    if not proj and not isinstance(source, Mapping) and Path(source).is_dir():
        from mrm_scale.formats.exports import IMAGE_PROJ_FILE

        if (Path(source) / IMAGE_PROJ_FILE).is_file():
            proj = load_state_dict_file(Path(source) / IMAGE_PROJ_FILE)
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
            rows = key.endswith("position_embeddings.weight") and src.shape[1:] == dst.shape[1:]
            if rows and src.shape[0] > dst.shape[0]:
                src = src[: dst.shape[0]]
                report.adapted[key] = f"first {dst.shape[0]} of {sd[key].shape[0]} positions"
            elif rows and src.shape[0] >= report_head.cfg.max_tokens:
                src = torch.cat([src, dst[src.shape[0]:].to(src.dtype)])
                report.adapted[key] = (f"{sd[key].shape[0]} positions into the first rows of {dst.shape[0]} (the rest "
                                       f"keep their init; max_tokens {report_head.cfg.max_tokens} uses none of them)")
            else:
                problems.append(f"{key}: shape {tuple(src.shape)} in the file, {tuple(dst.shape)} in the model")
                continue
        new[key] = src
        report.loaded.append(key)
    report.unexpected = sorted(k for k in sd if k not in used and not k.endswith(_IGNORED_BUFFERS))
    report = _apply(mlm, new, sd, report, problems, where, "report head", strict,
                    "'bert.*' / 'cls.*' keys of a BERT masked LM")
    if proj:
        target = report_head.image_proj
        shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in proj.items() if k in shapes}
        if got != shapes:
            raise WeightLoadError(f"{where}: the image projection has {got or sorted(proj)}, the model needs "
                                  f"{shapes} (encoder width -> text width)")
        target.load_state_dict({k: proj[k] for k in shapes})
        report.loaded += [f"image_proj.{k}" for k in shapes]
        log.info("report head: image projection loaded from %s", where)
    else:  # a plain BERT: the projection is ours to learn (not listed as missing: the masked LM is complete)
        log.info("report head: %s has no image projection; it keeps its init", where)
    return report


# ----------------------------------------------------------------------------------------------------------------
# pixel decoder
# ----------------------------------------------------------------------------------------------------------------
# the original MRM / MAE layout -> our PixelDecoder's names
_ORIGINAL_DECODER = (("decoder_embed.", "embed."), ("decoder_blocks.", "blocks."), ("decoder_norm.", "norm."),
                     ("decoder_pred.", "pred."), ("mask_token", "mask_token"), ("decoder_pos_embed", "pos_embed"))


def load_pixel_decoder(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor], *,
                       strict: bool = True) -> LoadReport:
    """Load the pixel decoder from the original MRM or MAE layout (``decoder_embed``, ``decoder_blocks.N``,
    ``decoder_norm``, ``decoder_pred``, ``mask_token``, ``decoder_pos_embed``) or one of our MRM state dicts
    (``decoder.*``). ``strict``: every decoder tensor must be in the file, with the model's shape."""
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise TypeError(f"expected an MRM model, got {type(model).__name__}")
    sd, where = _resolve(source)
    sd = _strip(sd)
    mapped: dict[str, torch.Tensor] = {}
    if any(k.startswith("decoder.") for k in sd):
        mapped = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")}
    else:
        for k, v in sd.items():
            for theirs, ours in _ORIGINAL_DECODER:
                if k.startswith(theirs):
                    mapped[ours + k[len(theirs):]] = v
                    break
    mine = decoder.state_dict()
    report = LoadReport(source=where)
    problems, new = [], {}
    for key, dst in mine.items():
        if key not in mapped:
            report.missing.append(key)
            continue
        if mapped[key].shape != dst.shape:
            problems.append(f"{key}: shape {tuple(mapped[key].shape)} in the file, {tuple(dst.shape)} in the model")
            continue
        new[key] = mapped[key]
        report.loaded.append(key)
    report.unexpected = sorted(k for k in mapped if k not in mine)
    return _apply(decoder, new, sd, report, problems, where, "pixel decoder", strict,
                  "'decoder_embed.*', 'decoder_blocks.*', ... (original MRM/MAE) or 'decoder.*'")

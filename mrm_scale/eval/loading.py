"""Pretrained models for every job of eval: from a run or checkpoint folder (ZeRO consolidation) or an export.

- :func:`resolve_checkpoint` a run folder (its newest *complete* checkpoint) or one checkpoint folder -> a
  :class:`~mrm_scale.formats.checkpoints.CheckpointRef`; the layout itself is :mod:`mrm_scale.formats.checkpoints`.
- :func:`check_checkpoint` refuses a checkpoint without ``COMPLETE.json`` or with missing DeepSpeed files, listing
  every missing file.
- :func:`consolidate` the full fp32 state dict, through DeepSpeed's own consolidation of the ZeRO partitions
  (stage 1, 2 or 3; any number of ranks).
- :func:`load_checkpoint_model`, :func:`load_full_model` (an export), :func:`load_encoder_weights` (either).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import io
import logging
import os

import torch

from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats import exports
from mrm_scale.formats.checkpoints import CheckpointRef
from mrm_scale.formats.run_record import RunRecord, RunRecordError
from mrm_scale.formats.tokenizer import TokenizerIdentity
from mrm_scale.model import MRM, MRMConfig, build_model

log = logging.getLogger("mrm_scale.eval.export")


class ExportError(ValueError):
    """The input cannot be exported or loaded; the message names the folder/files and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# finding and checking the checkpoint
# ----------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str) -> CheckpointRef:
    """A run folder (newest complete checkpoint) or a checkpoint folder -> :class:`CheckpointRef`."""
    try:
        return layout.locate(path)
    except layout.CheckpointLayoutError as e:
        raise ExportError(str(e)) from None


def read_run_record(ref: CheckpointRef) -> RunRecord:
    """How the run was made: ``<run>/run_config.json``, else the record stored in the checkpoint's client state."""
    try:
        if RunRecord.exists(ref.run_dir):
            return RunRecord.read(ref.run_dir)
        files = sorted(glob.glob(os.path.join(ref.path, "*model_states.pt")))
        if files:
            try:
                state = torch.load(files[0], map_location="cpu", weights_only=False)
            except RuntimeError as e:
                raise ExportError(f"{files[0]} cannot be read ({e}); export another checkpoint of the run") from None
            if isinstance(state, dict) and isinstance(state.get("run_config"), dict):
                return RunRecord.from_dict(state["run_config"], files[0])
    except RunRecordError as e:
        raise ExportError(str(e)) from None
    raise ExportError(f"{ref.path}: no run_config.json in the run folder and no run config in the checkpoint's "
                      "client state; export a checkpoint written by launch/pretrain.py, inside its run folder")


def _zero_stage(record: RunRecord, ckpt: str) -> int:
    if record.zero_stage is not None:
        return record.zero_stage
    if glob.glob(os.path.join(ckpt, "zero_pp_rank_*_model_states.pt")):
        return 3
    return 2 if glob.glob(os.path.join(ckpt, "*zero_pp_rank_*_optim_states.pt")) else 0


def expected_files(stage: int, world_size: int, bf16: bool | None) -> list[str]:
    """DeepSpeed's files of one checkpoint tag. ``bf16=None``: optimizer files may carry either prefix
    (reported as ``[bf16_]zero_pp_rank_...``)."""
    prefix = {True: "bf16_", False: "", None: "[bf16_]"}[bf16]
    if stage >= 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    else:
        files = ["mp_rank_00_model_states.pt"]
    if stage >= 1:
        files += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    return files


def _present(ckpt: str, name: str) -> bool:
    if name.startswith("[bf16_]"):
        rest = name[len("[bf16_]"):]
        return os.path.isfile(os.path.join(ckpt, rest)) or os.path.isfile(os.path.join(ckpt, "bf16_" + rest))
    return os.path.isfile(os.path.join(ckpt, name))


def check_checkpoint(ref: CheckpointRef, record: RunRecord) -> dict:
    """Refuse an incomplete checkpoint, naming every missing file. Returns ``{step, world_size, zero_stage}``."""
    ckpt = ref.path
    missing, info = [], None
    if layout.is_complete(ckpt):
        try:
            info = layout.CompleteRecord.read(ckpt)
        except layout.CheckpointLayoutError as e:
            raise ExportError(str(e)) from None
    else:
        missing.append(layout.COMPLETE)
    world = int((info.world_size if info else 0) or record.world_size or 1)
    stage = _zero_stage(record, ckpt)
    missing += [f for f in expected_files(stage, world, record.bf16) if not _present(ckpt, f)]
    damaged = info.check_files(ckpt) if info and not missing else []  # sizes recorded at save time
    if damaged:
        raise ExportError(f"{ckpt}: damaged checkpoint: {'; '.join(damaged)}; export another checkpoint of the run "
                          "(`mrm-scale checkpoint inspect` lists them) or copy the file back from a backup")
    if missing:
        why = (f"{layout.COMPLETE} is written only after every rank has saved, so the save was interrupted or is "
               "still running" if layout.COMPLETE in missing else "DeepSpeed files are gone")
        raise ExportError(
            f"{ckpt}: incomplete checkpoint (ZeRO stage {stage}, {world} ranks), missing: {', '.join(missing)} "
            f"({why}); export another checkpoint of the run (the run folder takes the newest complete one) or "
            "copy the missing files back")
    step = info.step if info and info.step >= 0 else (ref.step if ref.step is not None else -1)
    return {"step": step, "world_size": world, "zero_stage": stage}


# ----------------------------------------------------------------------------------------------------------------
# consolidation and the model
# ----------------------------------------------------------------------------------------------------------------
def unreadable_files(folder: str) -> str:
    """The ``*.pt`` files of ``folder`` torch cannot open (truncated zip archives), comma-separated."""
    import zipfile

    bad = []
    for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            bad.append(f"{path} ({e})")
    return ", ".join(bad)


def consolidate(ref: CheckpointRef, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the module (parameters from the optimizer's fp32 master partitions, buffers
    from the model states), via DeepSpeed's own consolidation; stage 0 reads the module weights directly."""
    if zero_stage == 0:
        state = torch.load(os.path.join(ref.path, "mp_rank_00_model_states.pt"), map_location="cpu",
                           weights_only=False)
        sd = state["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # DeepSpeed prints its progress; keep it for debugging, not the console
        try:
            with contextlib.redirect_stdout(chatter):
                sd = get_fp32_state_dict_from_zero_checkpoint(ref.root, tag=ref.tag)
        except (FileNotFoundError, ValueError) as e:
            raise ExportError(f"{ref.path}: DeepSpeed could not consolidate this checkpoint: {e}") from None
        except RuntimeError as e:  # torch's reader on a cut-short file: find which one
            raise ExportError(f"{ref.path}: {unreadable_files(ref.path) or 'a file'} cannot be read ({e}); export "
                              "another checkpoint of the run or copy the file back") from None
        finally:
            log.debug("zero_to_fp32 said:\n%s", chatter.getvalue())
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().to(torch.float32).contiguous()
    return out


def model_config(saved_model: dict) -> MRMConfig:
    """An :class:`MRMConfig` from its saved ``to_dict()`` (fields this version does not know are ignored)."""
    fields = {f.name for f in dataclasses.fields(MRMConfig)}
    extra = sorted(set(saved_model) - fields)
    if extra:
        log.warning("saved model config has fields this version does not know (ignored): %s", ", ".join(extra))
    return MRMConfig(**{k: v for k, v in saved_model.items() if k in fields}).validate()


def build_loaded_model(cfg: MRMConfig, tok: TokenizerIdentity, state_dict: dict[str, torch.Tensor],
                       origin: str) -> MRM:
    """``build_model`` + a strict ``load_state_dict``; mismatches raise :class:`ExportError` naming the keys."""
    model = build_model(cfg, **tok.model_ids())
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{origin}: weights do not fit the run's model config ({cfg.name}): missing "
            f"{result.missing_keys[:8]}{'...' if len(result.missing_keys) > 8 else ''}, unexpected "
            f"{result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}")
    return model.eval()


def load_checkpoint_model(path: str) -> tuple[MRM, dict]:
    """A run or checkpoint folder -> (the consolidated MRM model in fp32, info). Used by fine-tuning's
    ``--init RUN`` so it takes exactly the export's code path."""
    ref = resolve_checkpoint(path)
    record = read_run_record(ref)
    info = check_checkpoint(ref, record)
    cfg = model_config(record.model)
    model = build_loaded_model(cfg, record.tokenizer, consolidate(ref, info["zero_stage"]), ref.path)
    return model, {**info, "checkpoint": ref.path, "run_dir": ref.run_dir, "run_record": record}


# ----------------------------------------------------------------------------------------------------------------
# reading an export back
# ----------------------------------------------------------------------------------------------------------------
def read_export_config(path: str) -> tuple[MRMConfig, dict]:
    """(model config, the whole ``mrm_config.json``) of an export folder."""
    try:
        meta = exports.read_meta(path)
    except FileNotFoundError:
        raise ExportError(f"{path}: no {exports.CONFIG_FILE}; not an export folder (make one with "
                          "`mrm-scale export`)") from None
    return model_config(meta["model"]), meta


def load_full_model(path: str) -> MRM:
    """``build_model`` from ``mrm_config.json`` + ``load_state_dict`` of ``mrm_full.safetensors``."""
    from safetensors.torch import load_file

    cfg, meta = read_export_config(path)
    tok = TokenizerIdentity.from_dict(meta["tokenizer"], os.path.join(path, exports.CONFIG_FILE))
    return build_loaded_model(cfg, tok, load_file(os.path.join(path, exports.FULL_FILE)), path)


def load_encoder_file(path: str, preset: str | None = None) -> tuple[MRMConfig, dict[str, torch.Tensor], dict]:
    """(config, encoder state dict with timm keys, info) from one weights file: a timm or MAE ViT, or a
    checkpoint in the original MRM layout (``.pth``/``.pt``/``.bin``/``.safetensors``; read with
    ``weights_only=True``). The shapes give width, depth, patch size and channels; the number of heads, which
    shapes do not show, comes from ``preset`` or from the one preset with that width and depth."""
    from mrm_scale.model import get_preset
    from mrm_scale.model.presets import PRESETS
    from mrm_scale.model.weights import WeightLoadError, read_encoder

    try:
        sd, geo = read_encoder(path)
    except WeightLoadError as e:
        raise ExportError(str(e)) from None
    if preset:
        base = get_preset(preset)
        if (base.embed_dim, base.depth) != (geo["embed_dim"], geo["depth"]):
            raise ExportError(f"{path}: a ViT of width {geo['embed_dim']} and depth {geo['depth']}, but --preset "
                              f"{preset} is {base.embed_dim} x {base.depth}; give a preset of that size")
    else:
        fits = [c for c in PRESETS.values() if (c.embed_dim, c.depth) == (geo["embed_dim"], geo["depth"])]
        if not fits:
            raise ExportError(f"{path}: a ViT of width {geo['embed_dim']} and depth {geo['depth']}, which no preset "
                              f"has ({', '.join(f'{n} {c.embed_dim}x{c.depth}' for n, c in PRESETS.items())}); "
                              "its number of heads is unknown")
        base = fits[0]
    side = (geo["grid"] or base.grid_size) * geo["patch_size"]
    cfg = base.replace(patch_size=geo["patch_size"], in_chans=geo["in_chans"], mlp_ratio=geo["mlp_ratio"],
                       qkv_bias=geo["qkv_bias"], img_size=side, sr_scale=1, report_weight=0.0)
    info = {"file": os.path.abspath(path), "layout": geo["layout"], "preset": base.name,
            "geometry": {k: geo[k] for k in ("embed_dim", "depth", "patch_size", "in_chans", "grid")}}
    return cfg, sd, info


def load_encoder_weights(path: str, preset: str | None = None) -> tuple[MRMConfig, dict[str, torch.Tensor], dict]:
    """(config, encoder state dict with timm keys, info) from an export folder, a run folder, a checkpoint
    folder or one weights file (:func:`load_encoder_file`)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return load_encoder_file(path, preset)
    if exports.is_export(path):
        from safetensors.torch import load_file

        cfg, meta = read_export_config(path)
        return cfg, load_file(os.path.join(path, exports.ENCODER_FILE)), {"export": os.path.abspath(path),
                                                                            "source": meta.get("source")}
    model, info = load_checkpoint_model(path)
    sd = {k[len("encoder."):]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return model.cfg, sd, {k: v for k, v in info.items() if k != "run_record"}

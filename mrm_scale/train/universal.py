"""Resuming under another world size or ZeRO stage: DeepSpeed's universal checkpoints.

A ZeRO checkpoint holds each rank's partition of the fp32 master weights and optimizer moments, so it loads only
under the world size and stage that wrote it. DeepSpeed's ``ds_to_universal`` rewrites a tag into one file per
parameter and state (``<tag>/universal/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`` plus the model-states file
with the client state), which an engine started with ``"checkpoint": {"load_universal": true}`` loads under any
world size and stage 1–3, offload on or off. The step, the scheduler position, the RNG states and the data
positions travel in the client state.

:func:`convert` runs it once per tag: into ``<tag>.universal.tmp-<pid>`` beside the tag, moved to ``<tag>/universal``
when it is done, so an interrupted conversion is never taken for a finished one and a finished one is reused.
:func:`why_universal` says whether a resume needs it; :func:`refusal` names the combinations it cannot do.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import shutil

from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats import files


class ConversionError(RuntimeError):
    """ds_to_universal failed; the message names the tag and DeepSpeed's last words."""


def why_universal(rec: layout.CompleteRecord, world_size: int, zero_stage: int | None, offload: bool) -> str | None:
    """Why a checkpoint described by ``rec`` cannot be loaded as saved by this run (None: it can)."""
    diffs = []
    if rec.world_size != world_size:
        diffs.append(f"{rec.world_size} ranks -> {world_size}")
    if rec.zero_stage is not None and zero_stage is not None and int(rec.zero_stage) != int(zero_stage):
        diffs.append(f"ZeRO stage {rec.zero_stage} -> {zero_stage}")
    if rec.offload is not None and bool(rec.offload) != bool(offload):
        diffs.append(f"offload {'on' if rec.offload else 'off'} -> {'on' if offload else 'off'}")
    return ", ".join(diffs) or None


def refusal(rec: layout.CompleteRecord, zero_stage: int | None, tag_path: str) -> str | None:
    """Why DeepSpeed cannot carry this checkpoint over (None: it can), with the way out."""
    if rec.zero_stage in (None, 0):
        return (f"{tag_path} was saved without ZeRO (stage {rec.zero_stage}); DeepSpeed's universal conversion "
                f"needs a ZeRO stage 1-3 checkpoint: resume it with {rec.world_size} ranks and its own config")
    if zero_stage in (None, 0):
        return (f"this run has no ZeRO stage (zero_optimization.stage {zero_stage}); a universal checkpoint loads "
                "into ZeRO stages 1-3: resume with one of ds_configs/zero1.json, zero2.json, zero3.json")
    return None


def convert(tag_path: str, workers: int | None = None) -> str:
    """The universal form of the tag at ``tag_path`` (made once, then reused); returns its folder."""
    out = layout.universal_path(tag_path)
    if layout.has_universal(tag_path):
        return out
    from deepspeed.checkpoint import ds_to_universal

    # The form is written beside the tag (DeepSpeed's reader walks the tag folder recursively: a half-written form
    # inside it would be read as source files) and moved into the tag when done.
    for stale in glob.glob(f"{tag_path}.universal.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{tag_path}.universal.tmp-{os.getpid()}"
    n = max(1, min(4, workers or (os.cpu_count() or 1)))
    args = argparse.Namespace(input_folder=tag_path, output_folder=tmp, num_extract_workers=n, num_merge_workers=n,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        _both_model_state_names(tmp)
        _both_optimizer_state_forms(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - DeepSpeed asserts, a full disk: name the tag and the cause
        shutil.rmtree(tmp, ignore_errors=True)
        last = [ln for ln in log.getvalue().splitlines() if ln.strip()][-3:]
        what = "the disk is full" if files.is_disk_full(e) else f"{type(e).__name__}: {e}"
        raise ConversionError(f"converting {tag_path} to DeepSpeed's universal form failed: {what} "
                              f"{' | '.join(last)} ({files.free_space(tag_path)[0]}); resume with the world size "
                              "and ZeRO config that saved it, or free space and try again") from None
    return out


_ZERO3_STATES = re.compile(r"^zero_pp_rank_0_(mp_rank_\d+_model_states\.pt)$")
_ZERO12_STATES = re.compile(r"^(mp_rank_\d+_model_states\.pt)$")


def _both_model_state_names(folder: str) -> None:
    """A universal folder holds the model-states file (the client state) under the name its source stage used;
    an engine of ZeRO-3 looks for ``zero_pp_rank_0_mp_rank_NN_model_states.pt``, one of stage 1/2 for
    ``mp_rank_NN_model_states.pt``. Both names are given (a hard link, a copy where links are not possible), so
    the form loads under either."""
    names = os.listdir(folder)
    for name in names:
        m3, m12 = _ZERO3_STATES.match(name), _ZERO12_STATES.match(name)
        other = m3.group(1) if m3 else f"zero_pp_rank_0_{m12.group(1)}" if m12 else None
        if other and other not in names:
            src, dst = os.path.join(folder, name), os.path.join(folder, other)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def _both_optimizer_state_forms(folder: str) -> None:
    """``zero/optimizer_state.pt`` as both loaders read it. A stage 1/2 conversion writes the optimizer's global
    state with ``param_groups`` and a ``step.pt`` per parameter; the stage 3 loader reads the step and the groups
    from ``optimizer_state_dict`` instead (and a stage 3 conversion writes only that form). Each form is completed
    from the other, so a tag converted from any stage loads under any stage."""
    import torch

    zero = os.path.join(folder, "zero")
    path = os.path.join(zero, "optimizer_state.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False)
    inner = sd.get("optimizer_state_dict") if isinstance(sd.get("optimizer_state_dict"), dict) else None
    groups = sd.get("param_groups") or (inner or {}).get("param_groups")
    if not groups:
        raise ConversionError(f"{path}: DeepSpeed's universal form holds no optimizer param_groups")
    params = [d for d in sorted(os.listdir(zero)) if os.path.isdir(os.path.join(zero, d))]
    # the optimizer's step count: each parameter's step.pt (stage 1/2 form), else the inner state (stage 3); the
    # step of param_groups is another counter of some optimizers (0 for DeepSpeed's Adam), not this one
    step = next((torch.load(os.path.join(zero, d, "step.pt"), weights_only=False) for d in params
                 if os.path.isfile(os.path.join(zero, d, "step.pt"))), None)
    if step is None and inner and inner.get("state"):
        step = next(iter(inner["state"].values())).get("step")
    if step is None:
        raise ConversionError(f"{path}: DeepSpeed's universal form holds no optimizer step")
    if inner is None:
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": groups}
    sd.setdefault("param_groups", groups)
    if "ds_version" not in sd:
        import deepspeed

        sd["ds_version"] = deepspeed.__version__
    torch.save(sd, path)
    for d in params:
        step_file = os.path.join(zero, d, "step.pt")
        if not os.path.isfile(step_file):  # the stage 1/2 loader takes each parameter's step from its step.pt
            torch.save(step, step_file)
        for name in ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"):
            f = os.path.join(zero, d, name)
            if os.path.isfile(f):  # a stage 3 conversion saves bare tensors; the stage 1/2 loader wants {"param": t}
                t = torch.load(f, map_location="cpu", weights_only=False)
                if torch.is_tensor(t):
                    torch.save({"param": t}, f)

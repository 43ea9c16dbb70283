"""Checkpoints: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` plus what exact resume needs.

The layout (tags, the ``COMPLETE.json`` marker, the newest complete tag) is :mod:`mrm_scale.formats.checkpoints`.
The ``client_state`` holds the global step, every rank's loader state and RNG states, and the run record
(:class:`~mrm_scale.formats.run_record.RunRecord`). ``--resume auto`` takes the newest complete tag, so a
checkpoint interrupted while being written never replaces a good one. Older complete tags beyond ``keep_last``
(and incomplete leftovers) are removed.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats import files
from mrm_scale.formats.run_record import RunRecord


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (full disk, I/O error); the message names the path and the free space."""


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, and how."""

    root: str  # DeepSpeed's checkpoint_dir (the run's checkpoints/)
    tag: str
    record: layout.CompleteRecord
    universal: str | None = None  # why it loads through DeepSpeed's universal form (None: loaded as saved)
    warnings: list[str] = field(default_factory=list)  # newer checkpoints passed over, and why

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)


def find_resume(ckpt_dir: str, resume: str, set_aside: bool = False) -> ResumePoint | None:
    """The checkpoint to resume from, or None to start fresh. ``auto``: the newest complete tag whose files are
    all there at their saved sizes; a damaged newer one is passed over with a warning naming the bad file, and
    with ``set_aside`` (the trainer) renamed to ``<tag>.damaged`` so that it counts no longer (neither for later
    resumes nor for pruning) and the run can save that step again."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        warnings = []
        for _, tag in reversed(layout.complete_tags(ckpt_dir)):
            path = os.path.join(ckpt_dir, tag)
            try:
                rec = layout.CompleteRecord.read(path)
            except layout.CheckpointLayoutError as e:
                warnings.append(f"{e}; falling back to the complete checkpoint before it")
                continue
            bad = rec.check_files(path)
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                moved = ""
                if set_aside:
                    aside = f"{path}.damaged"
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(path, aside)
                    moved = f" (set aside as {aside})"
                warnings.append(f"checkpoint {path} is damaged: {bad[0]}{more}; falling back to the complete "
                                f"checkpoint before it{moved}")
                continue
            return ResumePoint(ckpt_dir, tag, rec, warnings=warnings)
        if warnings:
            raise FileNotFoundError(f"{ckpt_dir}: no intact complete checkpoint to resume from ({'; '.join(warnings)})"
                                    "; start a new --name, or --resume none to train this one from scratch")
        return None
    try:
        ref = layout.locate(resume)
    except layout.CheckpointLayoutError as e:
        raise FileNotFoundError(f"--resume {resume}: {e}") from None
    if not layout.is_complete(ref.path):
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (a step######## folder with "
                                f"{layout.COMPLETE})")
    try:
        rec = layout.CompleteRecord.read(ref.path)
    except layout.CheckpointLayoutError as e:
        raise FileNotFoundError(f"--resume {resume}: {e}") from None
    bad = rec.check_files(ref.path)
    if bad:
        raise FileNotFoundError(f"--resume {resume}: checkpoint {ref.path} is damaged: {'; '.join(bad)}; resume "
                                "from an older tag, or with --resume auto (it takes the newest intact one)")
    return ResumePoint(ref.root, ref.tag, rec)


def _device_accelerator():
    """DeepSpeed's accelerator when it is a device with its own RNG (CUDA, XPU, ...), else None (CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return None if acc.device_name() == "cpu" else acc


def rng_state() -> dict:
    acc = _device_accelerator()
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": acc.get_rng_state() if acc else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    acc = _device_accelerator()
    if state.get("accelerator") is not None and acc:
        acc.set_rng_state(state["accelerator"])


def gather(obj) -> list:
    """``obj`` of every rank, in rank order (works without a process group, too)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save(engine, ckpt_dir: str, step: int, loader_state: dict, record: RunRecord, keep_last: int) -> str:
    """Save on every rank (collective); returns the tag. A failed write raises :class:`CheckpointWriteError`
    naming the path and the free space; the previous complete checkpoint is untouched (a tag counts only once
    its :data:`~mrm_scale.formats.checkpoints.COMPLETE` is written, after every rank's files)."""
    tag = layout.tag_for(step)
    path = os.path.join(ckpt_dir, tag)
    loaders = gather(loader_state)
    client_state = {"step": step, "loader": loaders, "rng": gather(rng_state()), "run_config": record.to_dict()}
    if engine.global_rank == 0 and layout.is_complete(path):  # this step saved before (a resumed run): not complete
        os.remove(os.path.join(path, layout.COMPLETE))          # again until every rank has rewritten it
    if dist.is_initialized():
        dist.barrier()
    try:
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=True)
    except (OSError, RuntimeError) as e:
        message = write_failure(path, e, ckpt_dir)
        if engine.global_rank == 0:  # the incomplete tag is never loaded; give its space back
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointWriteError(message) from None
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        # what a resume must agree with, readable without loading the checkpoint (setup._check_resumable), and
        # every file's size, so that a file lost or cut short later is found before anything loads it
        try:
            layout.CompleteRecord(step=step, world_size=engine.world_size, model=record.model,
                                  tokenizer_sha256=record.tokenizer.sha256, zero_stage=record.zero_stage,
                                  offload=record.offload, files=layout.tag_files(path),
                                  loader=loaders).write(path)
        except OSError as e:
            raise CheckpointWriteError(write_failure(path, e, ckpt_dir)) from None
        _prune(ckpt_dir, keep_last, tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def write_failure(path: str, error: BaseException, ckpt_dir: str) -> str:
    """One line for a failed checkpoint write: the path, the cause, the free space, what to do."""
    free, nearly_full = files.free_space(path)
    why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = "the disk is full" if files.is_disk_full(error) or nearly_full else f"{type(error).__name__}: {why}"
    newest = layout.newest_complete(ckpt_dir)
    keep = (f"the newest complete checkpoint, {os.path.join(ckpt_dir, newest)}, is intact and --resume auto "
            "continues from it" if newest else "no earlier complete checkpoint exists")
    return (f"writing checkpoint {path} failed: {cause} ({free}); free space there or give --out-root on a "
            f"larger disk; {keep}")


def _prune(ckpt_dir: str, keep_last: int, saved: str) -> None:
    """Keep the newest ``keep_last`` complete tags up to the one just ``saved``, which always stays; tags newer than
    it belong to a timeline this run left (``--resume`` of an older tag) and are kept as they are."""
    step = layout.step_of(saved)
    complete = [(s, t) for s, t in layout.complete_tags(ckpt_dir) if s <= step]
    keep = {t for _, t in complete[-max(1, keep_last):]} | {saved}
    keep |= {t for t in layout.tag_folders(ckpt_dir) if layout.step_of(t) > step}
    newest = max((s for s, _ in complete), default=-1)
    for name in layout.tag_folders(ckpt_dir):
        if name in keep:
            continue
        # Incomplete tags older than the newest complete one are dead leftovers of an interrupted save.
        if layout.is_complete(os.path.join(ckpt_dir, name)) or layout.step_of(name) < newest:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load(engine, point: ResumePoint, rank: int) -> tuple[int, list[dict]]:
    """Load a checkpoint into ``engine`` (as saved, or through its universal form when ``point.universal``);
    returns (step, every saved rank's loader state). RNG states: this rank's own under the same world size;
    otherwise those of rank ``rank % saved world size`` (masks and augmentation are seeded from the step and the
    sample, not from these)."""
    if point.universal:
        load_dir, tag = point.path, layout.UNIVERSAL_DIR
    else:
        load_dir, tag = point.root, point.tag
    path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None or client is None:
        raise FileNotFoundError(f"{os.path.join(load_dir, tag)}: DeepSpeed could not load this checkpoint")
    rngs = client["rng"]
    set_rng_state(rngs[rank] if len(rngs) == engine.world_size else rngs[rank % len(rngs)])
    return int(client["step"]), list(client["loader"])

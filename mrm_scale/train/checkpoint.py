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

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats.run_record import RunRecord


def find_resume(ckpt_dir: str, resume: str) -> tuple[str, str] | None:
    """(checkpoint folder, tag) to resume from, or None to start fresh."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        tag = layout.newest_complete(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    try:
        ref = layout.locate(resume)
    except layout.CheckpointLayoutError as e:
        raise FileNotFoundError(f"--resume {resume}: {e}") from None
    if not layout.is_complete(ref.path):
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (a step######## folder with "
                                f"{layout.COMPLETE})")
    return ref.root, ref.tag


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
    """Save on every rank (collective); returns the tag."""
    tag = layout.tag_for(step)
    client_state = {"step": step, "loader": gather(loader_state), "rng": gather(rng_state()),
                    "run_config": record.to_dict()}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=True)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        # what a resume must agree with, readable without loading the checkpoint (setup._check_resumable)
        layout.CompleteRecord(step=step, world_size=engine.world_size, model=record.model,
                              tokenizer_sha256=record.tokenizer.sha256,
                              zero_stage=record.zero_stage).write(os.path.join(ckpt_dir, tag))
        _prune(ckpt_dir, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(ckpt_dir: str, keep_last: int) -> None:
    complete = layout.complete_tags(ckpt_dir)
    keep = {t for _, t in complete[-max(1, keep_last):]}
    newest = max((s for s, _ in complete), default=-1)
    for name in layout.tag_folders(ckpt_dir):
        if name in keep:
            continue
        # Incomplete tags older than the newest complete one are dead leftovers of an interrupted save.
        if layout.is_complete(os.path.join(ckpt_dir, name)) or layout.step_of(name) < newest:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str, rank: int) -> tuple[int, dict | None]:
    """Load a checkpoint into ``engine``; returns (step, this rank's loader state). The world size was checked
    against ``COMPLETE.json`` before any compute (``setup._check_resumable``)."""
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None or client is None:
        raise FileNotFoundError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    set_rng_state(client["rng"][rank])
    return int(client["step"]), client["loader"][rank]

"""Checkpoints: DeepSpeed's ``save_checkpoint``/``load_checkpoint`` plus what exact resume needs.

Layout: ``<run>/checkpoints/step00000100/`` (one DeepSpeed tag per save). The ``client_state`` holds the
global step, every rank's loader state and RNG states, and the resolved run config (DESIGN §3).

A tag counts only once every rank has finished writing it and rank 0 has written ``COMPLETE.json`` into it;
``--resume auto`` takes the newest complete tag, so a checkpoint interrupted while being written never
replaces a good one. Older complete tags beyond ``keep_last`` (and incomplete leftovers) are removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.data import shardformat as sf

COMPLETE = "COMPLETE.json"
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, COMPLETE)):
            out.append((int(m.group(1)), name))
    return sorted(out)


def find_resume(ckpt_dir: str, resume: str) -> tuple[str, str] | None:
    """(checkpoint folder, tag) to resume from, or None to start fresh."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1][1]) if tags else None
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if tags:
        return path, tags[-1][1]
    raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (a step######## folder with {COMPLETE})")


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


def save(engine, ckpt_dir: str, step: int, loader_state: dict, run_config: dict, keep_last: int) -> str:
    """Save on every rank (collective); returns the tag."""
    tag = tag_for(step)
    client_state = {"step": step, "loader": gather(loader_state), "rng": gather(rng_state()), "run_config": run_config}
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=True)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        marker = os.path.join(ckpt_dir, tag, COMPLETE)
        # what a resume must agree with, readable without loading the checkpoint (setup._check_resumable)
        sf.write_atomic(marker, json.dumps({
            "step": step, "world_size": engine.world_size, "model": run_config.get("model"),
            "tokenizer_sha256": run_config.get("tokenizer", {}).get("sha256")}).encode())
        _prune(ckpt_dir, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(ckpt_dir: str, keep_last: int) -> None:
    keep = {t for _, t in complete_tags(ckpt_dir)[-max(1, keep_last):]}
    newest = max((s for s, _ in complete_tags(ckpt_dir)), default=-1)
    for name in os.listdir(ckpt_dir):
        m = TAG_RE.match(name)
        if not m or name in keep:
            continue
        # Incomplete tags older than the newest complete one are dead leftovers of an interrupted save.
        if os.path.isfile(os.path.join(ckpt_dir, name, COMPLETE)) or int(m.group(1)) < newest:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str, rank: int) -> tuple[int, dict | None]:
    """Load a checkpoint into ``engine``; returns (step, this rank's loader state). The world size was checked
    against ``COMPLETE.json`` before any compute (``setup._check_resumable``)."""
    path, client = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None or client is None:
        raise FileNotFoundError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
    set_rng_state(client["rng"][rank])
    return int(client["step"]), client["loader"][rank]

"""The checkpoint layout: where tags live, when a tag counts, which one is newest.

``<run>/checkpoints/step00000100/`` is one DeepSpeed tag (its own files, written by ``save_checkpoint``). A tag
counts only once every rank has finished writing it and rank 0 has written :data:`COMPLETE` into it — a
:class:`CompleteRecord`: step, world size, model config, tokenizer sha256, ZeRO stage, what a resume or an
export must agree with, readable without loading the checkpoint. A save interrupted midway therefore never
replaces a good checkpoint: the newest *complete* tag is the one taken.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass, field

from .files import read_json, write_json

CHECKPOINTS_DIR = "checkpoints"  # inside a run folder
COMPLETE = "COMPLETE.json"
TAG_RE = re.compile(r"^step(\d{8})$")


class CheckpointLayoutError(ValueError):
    """A path that holds no usable checkpoint; the message names the folder and what to do."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def tag_folders(root: str) -> list[str]:
    """Every step######## folder under ``root``, complete or not, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if TAG_RE.match(n) and os.path.isdir(os.path.join(root, n)))


def is_complete(tag_path: str) -> bool:
    return os.path.isfile(os.path.join(tag_path, COMPLETE))


def complete_tags(root: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``root``, oldest first."""
    return [(step_of(t), t) for t in tag_folders(root) if is_complete(os.path.join(root, t))]


def newest_complete(root: str) -> str | None:
    tags = complete_tags(root)
    return tags[-1][1] if tags else None


@dataclass
class CompleteRecord:
    """What ``COMPLETE.json`` holds."""

    step: int
    world_size: int
    model: dict = field(default_factory=dict)  # MRMConfig.to_dict() of the run
    tokenizer_sha256: str | None = None
    zero_stage: int | None = None

    def write(self, tag_path: str) -> None:
        write_json(os.path.join(tag_path, COMPLETE), dataclasses.asdict(self), indent=None)

    @classmethod
    def read(cls, tag_path: str) -> "CompleteRecord":
        d = read_json(os.path.join(tag_path, COMPLETE), CheckpointLayoutError,
                      missing=f"{tag_path}: no {COMPLETE}, which the trainer writes once every rank has saved; the "
                      "save was interrupted or is still running: take another checkpoint of the run",
                      unreadable="unreadable ({why}); take another checkpoint of the run")
        step = d.get("step", step_of(os.path.basename(tag_path)))
        return cls(step=int(step if step is not None else -1), world_size=int(d.get("world_size") or 0),
                   model=d.get("model") or {}, tokenizer_sha256=d.get("tokenizer_sha256"),
                   zero_stage=d.get("zero_stage"))


@dataclass
class CheckpointRef:
    """One checkpoint tag: DeepSpeed's ``(checkpoint_dir, tag)`` pair, and the run folder when there is one."""

    root: str  # folder holding the tag folders (DeepSpeed's ``checkpoint_dir``)
    tag: str  # stepNNNNNNNN
    run_dir: str | None  # the run folder, when the layout is <run>/checkpoints/<tag>

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def step(self) -> int | None:
        return step_of(self.tag)


def _looks_like_tag(path: str) -> bool:
    return (TAG_RE.match(os.path.basename(path)) is not None or is_complete(path)
            or bool(glob.glob(os.path.join(path, "*_model_states.pt"))))


def _ref(root: str, tag: str) -> CheckpointRef:
    run_dir = os.path.dirname(root) if os.path.basename(root) == CHECKPOINTS_DIR else None
    return CheckpointRef(root, tag, run_dir)


def locate(path: str) -> CheckpointRef:
    """A run folder, its ``checkpoints/`` folder (newest complete tag) or one tag folder -> :class:`CheckpointRef`.

    A tag folder is returned as it is (completeness is checked by whoever reads it); a folder of tags without a
    complete one is refused, naming the incomplete tags.
    """
    path = os.path.abspath(os.fspath(path).rstrip("/"))
    if not os.path.isdir(path):
        raise CheckpointLayoutError(f"{path}: no such run or checkpoint folder")
    if _looks_like_tag(path):
        return _ref(os.path.dirname(path), os.path.basename(path))
    for root in (os.path.join(path, CHECKPOINTS_DIR), path):
        tags = tag_folders(root)
        if not tags:
            continue
        newest = newest_complete(root)
        if newest is None:
            raise CheckpointLayoutError(
                f"{root}: no complete checkpoint ({', '.join(tags)} lack {COMPLETE}, which the trainer writes once "
                "every rank has saved); let the run save one (it saves every --save-every steps and at the end) "
                "or resume it with --resume auto")
        return _ref(root, newest)
    raise CheckpointLayoutError(f"{path}: neither a run folder (with {CHECKPOINTS_DIR}/stepNNNNNNNN/) nor a "
                                "checkpoint folder (with *_model_states.pt)")

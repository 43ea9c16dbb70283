"""The checkpoint layout: where tags live, when a tag counts, which one is newest.

``<run>/checkpoints/step00000100/`` is one DeepSpeed tag (its own files, written by ``save_checkpoint``). A tag
counts only once every rank has finished writing it and rank 0 has written :data:`COMPLETE` into it — a
:class:`CompleteRecord`: step, world size, model config, tokenizer sha256, ZeRO stage, what a resume or an
export must agree with, readable without loading the checkpoint. A save interrupted midway therefore never
replaces a good checkpoint: the newest *complete* tag is the one taken. The record also lists every file of the
tag with its size and every rank's data position, so that a file lost or cut short later is found before
anything loads it, and a resume under another world size can be checked before compute.
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
# DeepSpeed's universal form of a tag (``ds_to_universal``), written beside the tag's own files when a run resumes
# it under another world size or ZeRO stage (or by ``mrm-scale checkpoint convert``): <tag>/universal/
UNIVERSAL_DIR = "universal"


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
    offload: bool | None = None  # ZeRO offload of the optimizer (or parameters) to the CPU
    files: dict = field(default_factory=dict)  # every file DeepSpeed wrote into the tag: name -> size in bytes
    loader: list = field(default_factory=list)  # every rank's loader state (the data position), rank order

    @property
    def samples_by_source(self) -> dict[str, int]:
        """Samples drawn per source over all ranks, for a mixed run (its loader states' ``drawn``), else {}."""
        out: dict[str, int] = {}
        for st in self.loader:
            for name, n in ((st.get("drawn") or {}) if isinstance(st, dict) else {}).items():
                out[name] = out.get(name, 0) + int(n)
        return out

    def check_files(self, tag_path: str) -> list[str]:
        """What is wrong with the tag's files against what was recorded at save time: one line per missing or
        resized file (empty when all is well, or when the record predates size records)."""
        problems = []
        for name, size in sorted(self.files.items()):
            path = os.path.join(tag_path, name)
            try:
                have = os.path.getsize(path)
            except OSError:
                problems.append(f"{path} is missing")
                continue
            if have != int(size):
                problems.append(f"{path} is {have} bytes, {int(size)} when saved (truncated or rewritten)")
        return problems

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
                   zero_stage=d.get("zero_stage"), offload=d.get("offload"), files=d.get("files") or {},
                   loader=list(d.get("loader") or []))


def tag_files(tag_path: str) -> dict[str, int]:
    """name -> size of the files DeepSpeed wrote into a tag (not :data:`COMPLETE`, not the universal form)."""
    out = {}
    for name in sorted(os.listdir(tag_path)):
        path = os.path.join(tag_path, name)
        if name != COMPLETE and name != UNIVERSAL_DIR and os.path.isfile(path) and ".tmp-" not in name:
            out[name] = os.path.getsize(path)
    return out


def universal_path(tag_path: str) -> str:
    return os.path.join(tag_path, UNIVERSAL_DIR)


def has_universal(tag_path: str) -> bool:
    """A finished universal form (the conversion renames its folder into place only when done)."""
    return os.path.isdir(os.path.join(tag_path, UNIVERSAL_DIR, "zero"))


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

"""The run folder and its record.

``<out-root>/<name>/`` of a pretraining run holds:

- ``run_config.json``   the :class:`RunRecord`: the flags as given, what the trainer derived from them, the
                        model config, the resolved DeepSpeed config, ranks, loader, tokenizer and shards;
                        also stored in every checkpoint's client state, so a checkpoint copied alone still says
                        how it was made
- ``ds_config.json``    the resolved DeepSpeed config alone (what the engine got)
- ``checkpoints/``      the tags (:mod:`mrm_scale.formats.checkpoints`)
- ``tb/``               TensorBoard event files (``loss/*``, ``report/*``, ``throughput/*``, ...)
- ``trace/rank<R>.jsonl`` per-rank keys and losses of every step (``--trace``)
- ``image_use.json``    the last image-use figures of the report branch
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .checkpoints import CHECKPOINTS_DIR
from .files import read_json, write_json
from .tokenizer import TokenizerIdentity

RUN_CONFIG = "run_config.json"
DS_CONFIG = "ds_config.json"
TB_DIR = "tb"
TRACE_DIR = "trace"
IMAGE_USE = "image_use.json"


class RunRecordError(ValueError):
    pass


def zero_stage_of(ds_config: dict) -> int | None:
    """The ZeRO stage of a DeepSpeed config (None: no ``zero_optimization.stage``)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage")
    return None if stage is None else int(stage)


def offload_of(ds_config: dict) -> bool:
    """ZeRO offloads the optimizer or the parameters (to the CPU or NVMe) under this DeepSpeed config."""
    zero = ds_config.get("zero_optimization") or {}
    return any(str((zero.get(k) or {}).get("device", "none")).lower() not in ("none", "")
               for k in ("offload_optimizer", "offload_param"))


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR)


def tb_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TB_DIR)


def trace_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, TRACE_DIR, f"rank{rank}.jsonl")


@dataclass
class RunRecord:
    """``run_config.json``: how a run was made."""

    args: dict  # every flag as the parser gave it (None where the user gave nothing)
    derived: dict  # what the trainer derived: max_steps, warmup_steps, micro_batch, grad_accum, global_batch, lr
    model: dict  # MRMConfig.to_dict()
    ds_config: dict  # the resolved DeepSpeed config
    world_size: int
    tokenizer: TokenizerIdentity
    shards: str  # absolute path of the shard folder
    loader: dict = field(default_factory=dict)  # LoaderConfig of the training split
    mix: list = field(default_factory=list)  # weighted shard sets [{name, path, weight}] of a mixed run, else []

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tokenizer"] = self.tokenizer.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, origin: str) -> "RunRecord":
        if not isinstance(d, dict):
            raise RunRecordError(f"{origin}: run record is {type(d).__name__}, not a mapping")
        missing = [k for k in ("model", "tokenizer") if k not in d]
        if missing:
            raise RunRecordError(f"{origin}: run record lacks {', '.join(missing)}; export a run written by "
                                 "`launch/pretrain.py`")
        try:
            tok = TokenizerIdentity.from_dict(d["tokenizer"], origin)
        except ValueError as e:
            raise RunRecordError(str(e)) from None
        return cls(args=dict(d.get("args") or {}), derived=dict(d.get("derived") or {}), model=dict(d["model"]),
                   ds_config=dict(d.get("ds_config") or {}), world_size=int(d.get("world_size") or 1),
                   tokenizer=tok, shards=d.get("shards") or "", loader=dict(d.get("loader") or {}),
                   mix=list(d.get("mix") or []))

    def write(self, run_dir: str) -> str:
        path = os.path.join(run_dir, RUN_CONFIG)
        write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: str) -> "RunRecord":
        path = os.path.join(run_dir, RUN_CONFIG)
        d = read_json(path, RunRecordError, missing=f"{run_dir}: no {RUN_CONFIG}; not a run folder written by the "
                      "trainer", unreadable="unreadable ({why})")
        return cls.from_dict(d, path)

    @staticmethod
    def exists(run_dir: str | None) -> bool:
        return bool(run_dir) and os.path.isfile(os.path.join(run_dir, RUN_CONFIG))

    @property
    def zero_stage(self) -> int | None:
        return zero_stage_of(self.ds_config)

    @property
    def offload(self) -> bool:
        return offload_of(self.ds_config)

    @property
    def bf16(self) -> bool | None:
        section = self.ds_config.get("bf16")
        return bool(section.get("enabled")) if isinstance(section, dict) else None

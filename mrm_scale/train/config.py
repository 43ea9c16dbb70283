"""Command-line flags of the pretraining job and the resolution of the DeepSpeed JSON they fill.

One source of truth: the DeepSpeed JSON gives defaults, flags that are set override them, and the result —
the *resolved* config — is what the engine gets, what the loop reads (batch sizes, lr, steps) and what is
printed and saved with the run (``runs/<name>/ds_config.json``). ``train_batch_size`` fixed in the JSON must
agree with micro batch x accumulation x ranks unless a batch flag is given (then the flags win, and the saved
config says so).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from dataclasses import dataclass

DEFAULT_SHARDS = os.path.join("shards", "demo")
DEFAULT_BLR = 1.5e-4


class RunConfigError(ValueError):
    """A run that cannot work: raised before any compute, with the flag or config field to fix."""


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Our flags. Call after ``deepspeed.add_config_arguments`` on a parser made with
    ``conflict_handler="resolve"``: ``--deepspeed`` then takes the config path (``--deepspeed zero2.json``), the
    form users know; DeepSpeed's ``--deepspeed_config PATH`` keeps working."""
    p.add_argument("--deepspeed", nargs="?", const=True, default=False, metavar="CONFIG.json",
                   help="DeepSpeed JSON config (e.g. ds_configs/zero2.json)")
    g = p.add_argument_group("mrm-scale run")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    g.add_argument("--preset", default="base", help="model size: tiny, small, base (the paper's), large, huge, giant")
    g.add_argument("--shards", default=DEFAULT_SHARDS,
                   help="prepared shard folder (mrm-scale prep); the default shards/demo is prepared on first use")
    g.add_argument("--demo-num", type=int, default=1000, help="records of the synthetic corpus prepared for shards/demo")
    g.add_argument("--name", default=None, help="run name: outputs go to <out-root>/<name> (default mrm-<preset>)")
    g.add_argument("--out-root", default="runs")
    g.add_argument("--backend", choices=("dali", "wds"), default="dali", help="input pipeline")
    g.add_argument("--workers", type=int, default=1, help="loader workers (wds processes / DALI threads) per rank")
    g.add_argument("--image-size", type=int, default=None, help="high-resolution image side (default: the preset's)")
    g.add_argument("--micro-batch", type=int, default=None, help="samples per rank per micro-step (JSON: train_micro_batch_size_per_gpu)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-steps per optimizer step (JSON: gradient_accumulation_steps)")
    g.add_argument("--global-batch", type=int, default=None,
                   help="samples per optimizer step over all ranks; sets --grad-accum from it")
    g.add_argument("--blr", type=float, default=None,
                   help="base learning rate: lr = blr * global batch / 256 (default 1.5e-4 unless the JSON sets lr)")
    g.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --blr)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (JSON default 0.05)")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping (JSON: gradient_clipping)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: the JSON's bf16 section")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=1.0, help="used when --max-steps is not given")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default: 5%% of the steps)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mask-ratio", type=float, default=None, help="image patches removed (preset default 0.75)")
    g.add_argument("--report-weight", type=float, default=None, help="lambda of the report loss (0: image-only MAE)")
    g.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set text_dropout=0 --set embed_dim=128")
    g.add_argument("--compile", action="store_true", help="torch.compile every transformer block")
    g.add_argument("--init-encoder", default=None,
                   help="encoder weights: a timm/MAE ViT or the original MRM checkpoint (.pth/.safetensors)")
    g.add_argument("--init-decoder", default=None,
                   help="pixel decoder weights: an MAE or the original MRM checkpoint (continue pretraining)")
    g.add_argument("--init-report", default=None,
                   help="report head: a BERT directory or file, or the original MRM checkpoint (its "
                        "bert_encoder.model.* text stack and bert_mlp image projection)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizers JSON the run expects; refused when the shards were made with another one")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept")
    g.add_argument("--resume", default="auto", help="'auto' (latest complete checkpoint of this run, if any), "
                   "'none', or a checkpoint folder")
    g.add_argument("--log-every", type=int, default=10, help="console line and TensorBoard scalars every N steps")
    g.add_argument("--vis-every", type=int, default=200,
                   help="TensorBoard image grid, report text and image-use figures (report/*) every N steps")
    g.add_argument("--image-use-samples", type=int, default=32,
                   help="val records of the fixed batch on which report/image_gain is measured (0: off)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: known GPU table, or a matmul measured at start on CPU)")
    g.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many consecutive non-finite losses")
    g.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective may wait for a rank before the run stops naming it (gloo and NCCL; "
                   "raise it when saves or a checkpoint conversion take longer)")
    g.add_argument("--trace", action="store_true",
                   help="write per-rank keys and losses of every step to <run>/trace/rank<R>.jsonl")
    return p


# ------------------------------------------------------------------------------------------ typed flags
# The launcher turns the flags into these three groups; nothing past it sees an argparse Namespace. Their field
# names are the flags' destinations (``--micro-batch`` -> ``micro_batch``, ``--set`` -> ``overrides``).

@dataclass(frozen=True)
class DataArgs:
    shards: str = DEFAULT_SHARDS
    demo_num: int = 1000
    backend: str = "dali"
    workers: int = 1
    tokenizer: str | None = None  # the tokenizers JSON the run expects


@dataclass(frozen=True)
class ModelArgs:
    preset: str = "base"
    image_size: int | None = None
    mask_ratio: float | None = None
    report_weight: float | None = None
    grad_checkpointing: bool = False
    overrides: tuple[str, ...] = ()  # --set FIELD=VALUE
    compile: bool = False
    init_encoder: str | None = None
    init_decoder: str | None = None
    init_report: str | None = None


@dataclass(frozen=True)
class TrainArgs:
    deepspeed_config: str | None = None  # --deepspeed CONFIG.json (or DeepSpeed's --deepspeed_config)
    name: str | None = None
    out_root: str = "runs"
    micro_batch: int | None = None
    grad_accum: int | None = None
    global_batch: int | None = None
    blr: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    clip_grad: float | None = None
    precision: str | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    warmup_steps: int | None = None
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"
    log_every: int = 10
    vis_every: int = 200
    image_use_samples: int = 32
    peak_tflops: float | None = None
    max_bad_steps: int = 5
    dist_timeout: float = 600.0
    trace: bool = False


@dataclass(frozen=True)
class PretrainArgs:
    """The pretraining job's flags, typed and grouped: what the user asked for (None: not given)."""

    data: DataArgs
    model: ModelArgs
    train: TrainArgs

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "PretrainArgs":
        values = vars(ns)

        def group(kind):
            out = {}
            for f in dataclasses.fields(kind):
                if f.name == "deepspeed_config":
                    out[f.name] = ds_config_path(ns)
                elif f.name in values:
                    v = values[f.name]
                    out[f.name] = tuple(v) if f.name == "overrides" else v
            return kind(**out)

        return cls(data=group(DataArgs), model=group(ModelArgs), train=group(TrainArgs))

    def flags(self) -> dict:
        """Every flag as given, one flat JSON-able mapping (the run record's ``args``)."""
        out = {}
        for part in (self.data, self.model, self.train):
            out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(part).items()})
        return out

    @property
    def run_name(self) -> str:
        return self.train.name or f"mrm-{self.model.preset}"


@dataclass(frozen=True)
class Schedule:
    """What :func:`resolve_ds_config` derived from the flags and the DeepSpeed JSON (the run record's ``derived``)."""

    micro_batch: int
    grad_accum: int
    global_batch: int
    lr: float
    max_steps: int
    warmup_steps: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _get(cfg: dict, path: str, default=None):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def ds_config_path(ns: argparse.Namespace) -> str | None:
    deepspeed = getattr(ns, "deepspeed", None)
    return deepspeed if isinstance(deepspeed, str) else getattr(ns, "deepspeed_config", None)


def load_ds_json(path: str | None) -> dict:
    if not path:
        raise RunConfigError("--deepspeed CONFIG.json is required (e.g. --deepspeed ds_configs/zero2.json)")
    if not os.path.isfile(path):
        raise RunConfigError(f"--deepspeed {path}: file not found (the package ships zero1/2/3 and zero3_offload.json in "
                             "mrm_scale/ds_configs/, the checkout's ds_configs/)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RunConfigError(f"{path}: not valid JSON ({e})") from None


def resolve_ds_config(ds: dict, args: TrainArgs, world_size: int, steps_per_epoch: int | None,
                      run_dir: str) -> tuple[dict, Schedule]:
    """Fill the DeepSpeed JSON from the flags (see module doc); returns it and the :class:`Schedule` derived.
    ``steps_per_epoch``: batches per rank. Neither ``args`` nor ``ds`` is changed."""
    cfg = copy.deepcopy(ds)
    micro = args.micro_batch or _get(cfg, "train_micro_batch_size_per_gpu")
    if not micro:
        raise RunConfigError("micro batch unknown: pass --micro-batch or set train_micro_batch_size_per_gpu")
    accum = args.grad_accum or _get(cfg, "gradient_accumulation_steps", 1)
    if args.global_batch is not None:
        per_step = micro * world_size
        if args.global_batch % per_step:
            raise RunConfigError(
                f"--global-batch {args.global_batch} is not divisible by micro batch {micro} x {world_size} ranks "
                f"= {per_step}; choose a multiple of {per_step} or change --micro-batch")
        if args.grad_accum and args.grad_accum != args.global_batch // per_step:
            raise RunConfigError(f"--grad-accum {args.grad_accum} contradicts --global-batch {args.global_batch} "
                                 f"(= {micro} x {world_size} x {args.global_batch // per_step}); give one of them")
        accum = args.global_batch // per_step
    global_batch = micro * accum * world_size
    fixed = _get(cfg, "train_batch_size")
    if fixed is not None and fixed != global_batch and not (args.micro_batch or args.grad_accum or args.global_batch):
        raise RunConfigError(f"train_batch_size {fixed} in the DeepSpeed JSON != micro {micro} x accum {accum} x "
                             f"{world_size} ranks; remove train_batch_size or fix the other two")
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["train_batch_size"] = global_batch
    if args.clip_grad is not None:
        cfg["gradient_clipping"] = args.clip_grad
    if args.precision == "fp32":
        cfg.setdefault("bf16", {})["enabled"] = False
        cfg.pop("fp16", None)
    elif args.precision == "bf16":
        cfg.setdefault("bf16", {})["enabled"] = True

    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    if args.lr is not None:
        params["lr"] = args.lr
    elif args.blr is not None or "lr" not in params:
        params["lr"] = (args.blr if args.blr is not None else DEFAULT_BLR) * global_batch / 256
    params.setdefault("betas", [0.9, 0.95])
    if args.weight_decay is not None:
        params["weight_decay"] = args.weight_decay
    params.setdefault("weight_decay", 0.05)

    max_steps = args.max_steps
    if max_steps is None:
        if not steps_per_epoch:
            raise RunConfigError("cannot derive the number of steps: pass --max-steps")
        max_steps = max(1, int(args.epochs * steps_per_epoch // accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else max_steps // 20
    if warmup > max_steps:
        raise RunConfigError(f"--warmup-steps {warmup} exceeds --max-steps {max_steps}")
    warmup = max(2, warmup)  # DeepSpeed's WarmupCosineLR warms up for at least 2 steps: save what really runs
    sched = cfg.setdefault("scheduler", {"type": "WarmupCosineLR", "params": {}})
    if sched.get("type") == "WarmupCosineLR":
        sp = sched.setdefault("params", {})
        sp["total_num_steps"] = max_steps
        sp["warmup_num_steps"] = warmup
        sp.setdefault("warmup_type", "linear")
        sp.setdefault("warmup_min_ratio", 0.0)
        sp.setdefault("cos_min_ratio", 0.0)
    tb = cfg.get("tensorboard")
    if isinstance(tb, dict) and tb.get("enabled") and not tb.get("output_path"):
        tb["output_path"] = os.path.join(run_dir, "tb_deepspeed")  # DeepSpeed's own monitor, beside ours
    cfg.setdefault("steps_per_print", 10**9)
    return cfg, Schedule(micro_batch=int(micro), grad_accum=int(accum), global_batch=int(global_batch),
                         lr=float(params["lr"]), max_steps=int(max_steps), warmup_steps=int(warmup))


def bf16_enabled(ds_cfg: dict) -> bool:
    return bool(_get(ds_cfg, "bf16.enabled", False))


def zero_stage(ds_cfg: dict) -> int:
    return int(_get(ds_cfg, "zero_optimization.stage", 0))

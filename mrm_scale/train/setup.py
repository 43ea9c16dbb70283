"""Everything before the first step: distributed start, run folder, demo corpus, checks, loader, model, engine.

Every check that can fail (batch arithmetic, shards vs ranks × workers, tokenizer/vocabulary, missing shards,
unknown preset, resume under another world size) runs here, before any training compute, and raises
:class:`~mrm_scale.train.config.RunConfigError` naming the flag or field to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.data import shardformat as sf
from mrm_scale.data.loader import LoaderConfig, LoaderError, build_loader
from mrm_scale.model import MRMConfig, build_model, get_preset, param_groups
from mrm_scale.model.presets import SHAPE_FIELDS, parse_overrides
from mrm_scale.ports import free_port

from . import checkpoint
from .config import DEFAULT_SHARDS, RunConfigError, ds_config_path, load_ds_json, resolve_ds_config

log = logging.getLogger("mrm_scale.train")


@dataclass
class Run:
    args: argparse.Namespace
    rank: int
    world_size: int
    local_rank: int
    device: str
    run_dir: str
    ckpt_dir: str
    manifest: dict
    model_cfg: MRMConfig
    ds_config: dict
    loader_cfg: LoaderConfig
    resume_from: tuple[str, str] | None = None
    run_config: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(fn):
    """``fn()`` runs on rank 0 only; every rank returns its result, or fails with its error. For decisions that
    must not differ between ranks (which checkpoint to resume) and for work only rank 0 does (the demo corpus):
    nodes that see files differently, or a failing rank 0, cannot leave the other ranks waiting in a barrier."""
    if not dist.is_initialized():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    result, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RunConfigError(f"rank 0 failed: {message}")
    return result


def start_distributed() -> tuple[int, int, int, str]:
    """Initialise the process group through DeepSpeed (nccl on GPUs, gloo on CPU); (rank, world, local, device)."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # Started with plain `python`: a world of one, without MPI discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local)
        device = f"{acc.device_name()}:{local}"
    else:
        device = "cpu"
        _release_shm_name(rank)  # only the CPU accelerator uses DeepSpeed's shared-memory all-reduce
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if "OMP_NUM_THREADS" not in os.environ or int(os.environ["OMP_NUM_THREADS"]) < 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return rank, world, local, device


def _release_shm_name(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce gives every rank a /dev/shm file (~70 MB) that it never removes:
    runs would pile them up until memory runs out. Once every rank has mapped every rank's file (they do so while
    initialising; the barrier proves all are past it), each rank removes its own name. The mapping lives on until
    the processes exit, so even a killed run leaves nothing behind."""
    path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                                    f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    _barrier()
    try:
        os.unlink(path)
    except FileNotFoundError:  # not a single-node CPU run: DeepSpeed made no such file
        pass


def prepare_demo_if_needed(shards: str, demo_num: int, seed: int) -> None:
    """``shards/demo`` is prepared on first use (rank 0 prepares, the others wait); other paths must exist."""
    manifest = os.path.join(shards, sf.MANIFEST)
    is_default = os.path.normpath(shards) == os.path.normpath(DEFAULT_SHARDS)
    if os.path.isfile(manifest) and not is_default:
        return
    if not is_default:
        raise RunConfigError(
            f"--shards {shards}: no manifest.json there; prepare the corpus first, e.g. "
            f"`mrm-scale prep --source csv --input training.csv --out {shards}` (only the default {DEFAULT_SHARDS} "
            "is prepared automatically)")
    # Every rank waits for rank 0 whether or not the manifest exists yet: a rank that started late could otherwise
    # see rank 0's fresh manifest and go on while the others still wait.
    def prepare() -> None:
        if os.path.isfile(manifest):
            return
        from mrm_scale.data.prep import PrepOptions, run_prep, summary

        print(f"{shards} does not exist: preparing the built-in synthetic corpus ({demo_num} records) ...", flush=True)
        res = run_prep(PrepOptions(source="synthetic", out=shards, num=demo_num, seed=seed, shard_size=32,
                                   workers=min(4, os.cpu_count() or 1), progress=False))
        print(summary(res), flush=True)

    _from_rank0(prepare)


def setup_run(args: argparse.Namespace) -> Run:
    rank, world, local, device = start_distributed()
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    ds_json = load_ds_json(ds_config_path(args))
    try:
        model_cfg = get_preset(args.preset)
    except ValueError as e:
        raise RunConfigError(f"--preset: {e}") from None
    overrides = {}
    if args.image_size:
        overrides["img_size"] = args.image_size
    if args.mask_ratio is not None:
        overrides["mask_ratio"] = args.mask_ratio
    if args.report_weight is not None:
        overrides["report_weight"] = args.report_weight
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    try:
        overrides.update(parse_overrides(getattr(args, "overrides", None) or []))
        model_cfg = model_cfg.replace(**overrides).validate() if overrides else model_cfg.validate()
    except (ValueError, TypeError) as e:
        raise RunConfigError(str(e)) from None

    name = args.name or f"mrm-{args.preset}"
    run_dir = os.path.join(args.out_root, name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    prepare_demo_if_needed(args.shards, args.demo_num, args.seed)
    with open(os.path.join(args.shards, sf.MANIFEST)) as f:
        manifest = json.load(f)
    if int(manifest["max_tokens"]) != model_cfg.max_tokens:
        model_cfg = model_cfg.replace(max_tokens=int(manifest["max_tokens"]))

    expected_tok = sf.sha256_file(args.tokenizer) if args.tokenizer else None
    micro = args.micro_batch or ds_json.get("train_micro_batch_size_per_gpu")
    loader_cfg = LoaderConfig(
        shards=args.shards, split="train", backend=args.backend, batch_size=int(micro or 1),
        image_size=model_cfg.img_size, channels=model_cfg.in_chans, max_tokens=model_cfg.max_tokens,
        workers=args.workers, seed=args.seed, tokenizer_sha256=expected_tok,
        device=device if device.startswith("cuda") else "cpu")
    try:
        probe = build_loader(loader_cfg, rank, world)  # runs every data check; cheap (no pipeline started)
        steps_per_epoch = len(probe)
        probe.close()
    except LoaderError as e:
        raise RunConfigError(str(e)) from None

    ds_config = resolve_ds_config(ds_json, args, world, steps_per_epoch, run_dir)
    run = Run(args=args, rank=rank, world_size=world, local_rank=local, device=device, run_dir=run_dir,
              ckpt_dir=ckpt_dir, manifest=manifest, model_cfg=model_cfg, ds_config=ds_config, loader_cfg=loader_cfg)
    run.run_config = {
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_") and _jsonable(v)},
        "model": model_cfg.to_dict(), "ds_config": ds_config, "world_size": world,
        "loader": {k: v for k, v in dataclasses.asdict(loader_cfg).items() if _jsonable(v)},
        "tokenizer": manifest["tokenizer"], "shards": os.path.abspath(args.shards),
    }
    if args.resume:
        # Rank 0 decides which checkpoint every rank loads (nodes may see the folder at different moments) and
        # whether resuming from it would be silently wrong.
        run.resume_from = _from_rank0(lambda: _resume_point(run))
    if run.is_main:
        os.makedirs(run_dir, exist_ok=True)
        sf.write_atomic(os.path.join(run_dir, "ds_config.json"), json.dumps(ds_config, indent=2).encode())
        sf.write_atomic(os.path.join(run_dir, "run_config.json"), json.dumps(run.run_config, indent=2).encode())
        print("resolved DeepSpeed config:\n" + json.dumps(ds_config, indent=2), flush=True)
    _barrier()
    return run


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _resume_point(run: Run) -> tuple[str, str] | None:
    """The checkpoint to resume from (``--resume``), checked; None to start fresh."""
    found = checkpoint.find_resume(run.ckpt_dir, run.args.resume)
    if found:
        _check_resumable(run, os.path.join(*found))
    return found


def _check_resumable(run: Run, ckpt: str) -> None:
    """Refuse, before compute, a resume from ``ckpt`` that would be silently wrong (reads its COMPLETE.json)."""
    path = os.path.join(ckpt, checkpoint.COMPLETE)
    with open(path) as f:
        info = json.load(f)
    if info.get("world_size") != run.world_size:
        raise RunConfigError(
            f"{ckpt} was written by {info.get('world_size')} ranks, this run has {run.world_size}: resume with "
            f"{info.get('world_size')} ranks (each rank's data position is stored), or start a new --name")
    old_model = info.get("model") or {}
    new_model = run.model_cfg.to_dict()
    differ = [f"{k}={old_model[k]!r} (this run: {new_model.get(k)!r})" for k in SHAPE_FIELDS
              if k in old_model and old_model[k] != new_model.get(k)]
    if "report_weight" in old_model and (old_model["report_weight"] > 0) != run.model_cfg.has_report_head:
        differ.append(f"report head {'present' if old_model['report_weight'] > 0 else 'absent'} "
                      f"(this run: {'present' if run.model_cfg.has_report_head else 'absent'}; see --report-weight)")
    if differ:
        raise RunConfigError(
            f"{ckpt} holds a {old_model.get('name', '?')} model that differs from this run's "
            f"{run.model_cfg.name}: {', '.join(differ)}; resume with the same --preset and size flags, "
            "or start a new --name")
    old_tok, new_tok = info.get("tokenizer_sha256"), run.manifest["tokenizer"]["sha256"]
    if old_tok and old_tok != new_tok:
        raise RunConfigError(
            f"{ckpt} was trained on shards with tokenizer sha256 {old_tok}, but {run.args.shards} uses {new_tok}: "
            "the vocabulary would not match; resume on the same shards or start a new --name")


def build_loader_for(run: Run, state: dict | None):
    return build_loader(run.loader_cfg, run.rank, run.world_size, state=state)


def build_engine(run: Run):
    """The MRM model wrapped in a DeepSpeed engine (optimizer and scheduler from the resolved config)."""
    import deepspeed

    tok = run.manifest["tokenizer"]
    # Same seed, same initial weights: runs are comparable (and DeepSpeed broadcasts rank 0's weights anyway).
    random.seed(run.args.seed)
    np.random.seed(run.args.seed)
    torch.manual_seed(run.args.seed)
    model = build_model(run.model_cfg, vocab_size=tok["vocab_size"], pad_token_id=tok["pad_id"],
                        cls_token_id=tok["cls_id"], sep_token_id=tok["sep_id"], mask_token_id=tok["mask_id"])
    if run.args.init_encoder or run.args.init_report:
        from mrm_scale.model import weights

        if run.args.init_encoder:
            weights.load_image_encoder(model, run.args.init_encoder)
        if run.args.init_report:
            weights.load_report_head(model, run.args.init_report)
    if run.args.compile:
        from mrm_scale.model import compile_blocks

        compile_blocks(model)
    wd = run.ds_config["optimizer"]["params"]["weight_decay"]
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, wd)]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=run.ds_config)
    return engine, model


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)

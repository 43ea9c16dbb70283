"""Everything before the first step: distributed start, run folder, demo corpus, checks, loader, model, engine.

Every check that can fail (batch arithmetic, shards vs ranks × workers, tokenizer/vocabulary, missing shards,
unknown preset, resume under another world size) runs here, before any training compute, and raises
:class:`~mrm_scale.train.config.RunConfigError` naming the flag or field to fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.data.loader import LoaderConfig, LoaderError, build_loader, check_unique_keys
from mrm_scale.data.mixing import is_mix_spec, parse_mix
from mrm_scale.formats import files
from mrm_scale.formats import shards as sf
from mrm_scale.formats import checkpoints as layout
from mrm_scale.formats.run_record import DS_CONFIG, RunRecord, checkpoints_dir
from mrm_scale.formats.tokenizer import TokenizerIdentity
from mrm_scale.model import MRMConfig, build_model, get_preset, param_groups
from mrm_scale.model.presets import SHAPE_FIELDS, parse_overrides
from mrm_scale import host_memory
from mrm_scale.ports import free_port

from . import checkpoint, preemption, universal
from .config import DEFAULT_SHARDS, PretrainArgs, RunConfigError, Schedule, load_ds_json, resolve_ds_config

log = logging.getLogger("mrm_scale.train")


@dataclass
class Run:
    """Everything the loop needs, settled before the first step."""

    args: PretrainArgs  # the flags as given
    schedule: Schedule  # what was derived from them (steps, warmup, batch sizes, lr)
    rank: int
    world_size: int
    local_rank: int
    device: str
    run_dir: str
    ckpt_dir: str
    manifest: dict
    tokenizer: TokenizerIdentity
    model_cfg: MRMConfig
    ds_config: dict
    loader_cfg: LoaderConfig
    record: RunRecord
    resume_from: checkpoint.ResumePoint | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards(self) -> str:
        """The shard folder (of a mix: its first source, whose tokenizer file and val split the run reads)."""
        return self.loader_cfg.shards

    @property
    def mix(self) -> list[dict] | None:
        return self.loader_cfg.mix


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


def start_distributed(timeout_s: float = 600.0) -> tuple[int, int, int, str]:
    """Initialise the process group through DeepSpeed (nccl on GPUs, gloo on CPU); (rank, world, local, device).

    Started by a launcher (torchrun, deepspeed), by ``srun`` with one task per rank (``SLURM_PROCID`` and
    friends; ``MASTER_ADDR``/``MASTER_PORT`` from the batch script), or by plain ``python`` (a world of one).
    A collective that waits longer than ``timeout_s`` for a rank fails (:mod:`mrm_scale.train.preemption`)."""
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
                          LOCAL_WORLD_SIZE=os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # Started with plain `python`: a world of one, without MPI discovery.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
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
        try:  # freed host memory stays in the process: no page faults on every step's temporaries
            host_memory.apply_for_training(world)
        except ValueError as e:
            raise RunConfigError(str(e)) from None
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


def _mix_sources(spec: str):
    """The sources of ``--shards NAME=WEIGHT,...`` or a mix file (:mod:`mrm_scale.data.mixing`), else None. Their
    manifests and tokenizers are checked when the loader is built (before any compute)."""
    if not is_mix_spec(spec):
        return None
    try:
        return parse_mix(spec)
    except LoaderError as e:
        raise RunConfigError(f"--shards: {e}") from None


def prepare_demo_if_needed(shards: str, demo_num: int, seed: int) -> None:
    """``shards/demo`` is prepared on first use (rank 0 prepares, the others wait); other paths must exist."""
    is_default = os.path.normpath(shards) == os.path.normpath(DEFAULT_SHARDS)
    if sf.has_manifest(shards) and not is_default:
        return
    if not is_default:
        raise RunConfigError(
            f"--shards {shards}: no manifest.json there; prepare the corpus first, e.g. "
            f"`mrm-scale prep --source csv --input training.csv --out {shards}` (only the default {DEFAULT_SHARDS} "
            "is prepared automatically)")
    # Every rank waits for rank 0 whether or not the manifest exists yet: a rank that started late could otherwise
    # see rank 0's fresh manifest and go on while the others still wait.
    def prepare() -> None:
        if sf.has_manifest(shards):
            return
        from mrm_scale.data.prep import PrepOptions, run_prep, summary

        print(f"{shards} does not exist: preparing the built-in synthetic corpus ({demo_num} records) ...", flush=True)
        res = run_prep(PrepOptions(source="synthetic", out=shards, num=demo_num, seed=seed, shard_size=32,
                                   workers=min(4, os.cpu_count() or 1), progress=False))
        print(summary(res), flush=True)

    _from_rank0(prepare)


def model_config(args: PretrainArgs) -> MRMConfig:
    """The preset with the model flags and ``--set`` overrides applied, validated."""
    m = args.model
    try:
        cfg = get_preset(m.preset)
    except ValueError as e:
        raise RunConfigError(f"--preset: {e}") from None
    overrides = {}
    if m.image_size:
        overrides["img_size"] = m.image_size
    if m.mask_ratio is not None:
        overrides["mask_ratio"] = m.mask_ratio
    if m.report_weight is not None:
        overrides["report_weight"] = m.report_weight
    if m.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    try:
        overrides.update(parse_overrides(list(m.overrides)))
        return cfg.replace(**overrides).validate() if overrides else cfg.validate()
    except (ValueError, TypeError) as e:
        raise RunConfigError(str(e)) from None


def setup_run(args: PretrainArgs) -> Run:
    rank, world, local, device = start_distributed(args.train.dist_timeout)
    preemption.note_peers()
    if rank != 0:
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    data, train = args.data, args.train
    ds_json = load_ds_json(train.deepspeed_config)
    model_cfg = model_config(args)

    run_dir = os.path.join(train.out_root, args.run_name)
    ckpt_dir = checkpoints_dir(run_dir)
    mix = _mix_sources(data.shards)
    folder = mix[0].path if mix else data.shards  # the shards whose tokenizer file and val split the run reads
    if mix is None:
        prepare_demo_if_needed(data.shards, data.demo_num, train.seed)
    try:
        manifest = sf.read_manifest(folder)
        tokenizer = TokenizerIdentity.from_dict(manifest["tokenizer"], sf.manifest_path(folder))
    except ValueError as e:
        raise RunConfigError(f"--shards {data.shards}: {e}") from None
    tok_file = tokenizer.path(folder)
    if not os.path.isfile(tok_file):
        raise RunConfigError(f"{tok_file}: the shards' tokenizer is missing ({sf.manifest_path(folder)} names it); "
                             "copy it back from where `mrm-scale prep` wrote these shards, or prepare them again")
    if tokenizer.sha256 and files.sha256_file(tok_file) != tokenizer.sha256:
        raise RunConfigError(f"{tok_file}: sha256 differs from the one in {sf.manifest_path(folder)} (the file "
                             "was replaced); put back the tokenizer these shards were made with, or prepare them again")
    if int(manifest["max_tokens"]) != model_cfg.max_tokens:
        model_cfg = model_cfg.replace(max_tokens=int(manifest["max_tokens"]))

    expected_tok = files.sha256_file(data.tokenizer) if data.tokenizer else None
    micro = train.micro_batch or ds_json.get("train_micro_batch_size_per_gpu")
    loader_cfg = LoaderConfig(
        shards=folder, split="train", backend=data.backend, batch_size=int(micro or 1),
        image_size=model_cfg.img_size, channels=model_cfg.in_chans, max_tokens=model_cfg.max_tokens,
        workers=data.workers, seed=train.seed, tokenizer_sha256=expected_tok,
        device=device if device.startswith("cuda") else "cpu",
        mix=[s.to_dict() for s in mix] if mix else None)
    try:
        probe = build_loader(loader_cfg, rank, world)  # runs every data check; cheap (no pipeline started)
        steps_per_epoch = len(probe)
        probe.close()
        shardsets = getattr(probe, "shardsets", None) or [probe.shardset]
        _from_rank0(lambda: [check_unique_keys(s) for s in shardsets])  # counts and keys of the index files
    except LoaderError as e:
        raise RunConfigError(str(e)) from None

    ds_config, schedule = resolve_ds_config(ds_json, train, world, steps_per_epoch, run_dir)
    record = RunRecord(
        args=args.flags(), derived=schedule.to_dict(), model=model_cfg.to_dict(), ds_config=ds_config,
        world_size=world, tokenizer=tokenizer, shards=os.path.abspath(folder),
        loader={k: v for k, v in dataclasses.asdict(loader_cfg).items() if _jsonable(v)},
        mix=[{**s.to_dict(), "path": os.path.abspath(s.path)} for s in mix] if mix else [])
    run = Run(args=args, schedule=schedule, rank=rank, world_size=world, local_rank=local, device=device,
              run_dir=run_dir, ckpt_dir=ckpt_dir, manifest=manifest, tokenizer=tokenizer, model_cfg=model_cfg,
              ds_config=ds_config, loader_cfg=loader_cfg, record=record)
    if train.resume:
        # Rank 0 decides which checkpoint every rank loads (nodes may see the folder at different moments) and
        # whether resuming from it would be silently wrong.
        run.resume_from = _from_rank0(lambda: _resume_point(run))
    if run.is_main:
        os.makedirs(run_dir, exist_ok=True)
        files.write_json(os.path.join(run_dir, DS_CONFIG), ds_config)
        record.write(run_dir)
        print("resolved DeepSpeed config:\n" + json.dumps(ds_config, indent=2), flush=True)
    _barrier()
    return run


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _resume_point(run: Run) -> checkpoint.ResumePoint | None:
    """The checkpoint to resume from (``--resume``), checked, and converted to DeepSpeed's universal form when
    this run's world size or ZeRO stage differs from the one that saved it; None to start fresh."""
    point = checkpoint.find_resume(run.ckpt_dir, run.args.train.resume, set_aside=True)
    if point is None:
        return None
    for w in point.warnings:
        print(f"warning: {w}", flush=True)
    _check_resumable(run, point)
    stage, offload = run.record.zero_stage, run.record.offload
    point.universal = universal.why_universal(point.record, run.world_size, stage, offload)
    if point.universal:
        why_not = universal.refusal(point.record, stage, point.path)
        if why_not:
            raise RunConfigError(f"cannot resume {point.path} here ({point.universal}): {why_not}")
        had = layout.has_universal(point.path)
        try:
            universal.convert(point.path)
        except universal.ConversionError as e:
            raise RunConfigError(str(e)) from None
        print(f"resuming {point.path} with another setup ({point.universal}): through DeepSpeed's universal "
              f"checkpoint {layout.universal_path(point.path)} ({'reused' if had else 'converted once, kept'})",
              flush=True)
    return point


def _check_resumable(run: Run, point: checkpoint.ResumePoint) -> None:
    """Refuse, before compute, a resume from ``point`` that would be silently wrong (its COMPLETE.json)."""
    info, ckpt = point.record, point.path
    old_model = info.model
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
    old_tok, new_tok = info.tokenizer_sha256, run.tokenizer.sha256
    if old_tok and old_tok != new_tok:
        raise RunConfigError(
            f"{ckpt} was trained on shards with tokenizer sha256 {old_tok}, but {run.shards} uses {new_tok}: "
            "the vocabulary would not match; resume on the same shards or start a new --name")
    saved_mix = bool(info.loader) and isinstance(info.loader[0], dict) and "sources" in info.loader[0]
    if info.loader and saved_mix != bool(run.mix):
        was = ("a mix of " + ", ".join(n for n, _ in info.loader[0].get("mix", []))) if saved_mix else "one shard folder"
        raise RunConfigError(f"{ckpt} was trained on {was}, this run reads "
                             f"{'a mix' if run.mix else 'one shard folder'} (--shards {run.args.data.shards}): "
                             "resume with the run's own --shards, or start a new --name")
    if info.loader:  # the data position must carry over to this setup (re-split mid-epoch, or refused)
        try:
            build_loader(run.loader_cfg, 0, run.world_size, states=info.loader).close()
        except LoaderError as e:
            raise RunConfigError(f"{ckpt}: {e}") from None


def build_loader_for(run: Run, states: list[dict] | None):
    """This rank's loader, continuing from the saved run's data positions (every rank's) when resuming."""
    return build_loader(run.loader_cfg, run.rank, run.world_size, states=states or None)


def build_engine(run: Run):
    """The MRM model wrapped in a DeepSpeed engine (optimizer and scheduler from the resolved config)."""
    import deepspeed

    m = run.args.model
    # Same seed, same initial weights: runs are comparable (and DeepSpeed broadcasts rank 0's weights anyway).
    seed = run.args.train.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = build_model(run.model_cfg, **run.tokenizer.model_ids())
    if m.init_encoder or m.init_decoder or m.init_report:
        from mrm_scale.model import weights

        if m.init_encoder:
            weights.load_image_encoder(model, m.init_encoder)
        if m.init_decoder:
            weights.load_pixel_decoder(model, m.init_decoder)
        if m.init_report:
            weights.load_report_head(model, m.init_report)
    if m.compile:
        from mrm_scale.model import compile_blocks

        compile_blocks(model)
    wd = run.ds_config["optimizer"]["params"]["weight_decay"]
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, wd)]
    config = run.ds_config
    if run.resume_from is not None and run.resume_from.universal:  # load the universal form (this start only)
        config = {**config, "checkpoint": {**(config.get("checkpoint") or {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    return engine, model


def fail(message: str | None, code: int = 2) -> None:
    """End the job with one line (``error: message``, when there is one) and exit ``code``."""
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a group broken by a lost rank: nothing left to tidy
            pass
    sys.stdout.flush()
    sys.exit(code)

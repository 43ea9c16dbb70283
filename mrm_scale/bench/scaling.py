"""``mrm-scale bench scaling``: the training step under the DeepSpeed engine (ZeRO-2) on 1 and 2 ranks.

The real job does the work: the trainer (``mrm_scale.train.main``) with the package's ``ds_configs/zero2.json``
is started as a subprocess by :mod:`mrm_scale.train.launcher` for N = 1 and N = 2 ranks (DeepSpeed's launcher
for N > 1, the one rank as a plain ``python -m``; CPU ranks with gloo when there is no GPU), with the real loader
on synthetic shards prepared into a temporary folder (``run_prep(PrepOptions(source="synthetic", ...))``).
Throughput and the data-wait fraction are read back from the run's TensorBoard scalars
(``throughput/samples_per_s`` is global samples/s, ``time/data_wait_fraction``), medians over the steps after
``--warmup``; ``--trace`` files confirm every rank took part.

On CPU every rank gets the same number of intra-op threads in both runs (``--threads-per-rank``, default
cores // 2), so the 2-rank run has twice the compute of the 1-rank run and

    efficiency = aggregate samples/s with 2 ranks / (2 x samples/s with 1 rank)

measures what distribution costs (gradient reduce-scatter/all-gather over gloo, loaders sharing the machine).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mrm_scale.train.launcher import packaged_ds_config, run_pretraining, trainer_env

DEFAULT_CONFIG = "zero2.json"  # shipped in the package (mrm_scale/ds_configs/)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base",
                   help="model preset (default base, the step of `bench step`; tiny for a quick check)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes; the first is the baseline")
    p.add_argument("--config", default=None,
                   help=f"DeepSpeed JSON (default: the package's {DEFAULT_CONFIG}; a shipped name such as zero3.json "
                   "or a path)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--backend", choices=("dali", "wds"), default="wds", help="input pipeline of the trainer")
    p.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--threads-per-rank", type=int, default=None,
                   help="OMP threads per CPU rank, the same in every run (default: cores // max ranks, >= 1)")
    p.add_argument("--shards", default=None, help="prepared shard folder (default: synthetic shards in a temp dir)")
    p.add_argument("--num", type=int, default=None, help="synthetic records to prepare (default: enough for the runs)")
    p.add_argument("--image-side", type=int, default=512, help="side of the synthetic radiographs")
    p.add_argument("--image-size", type=int, default=None, help="training image side (default: the preset's)")
    p.add_argument("--keep", metavar="DIR", default=None, help="keep shards and run folders in DIR")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run before it is stopped")


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}


def _median_after(series: list[tuple[int, float]], warmup: int) -> float:
    vals = [v for s, v in series if s > warmup] or [v for _, v in series]
    return statistics.median(vals)


def _prep(folder: str, num: int, shard_size: int, side: int) -> str:
    from mrm_scale.data.prep import PrepOptions, run_prep

    out = os.path.join(folder, "shards")
    run_prep(PrepOptions(source="synthetic", out=out, num=num, synthetic_size=side, shard_size=shard_size,
                         val_fraction=0.05, workers=min(2, os.cpu_count() or 1), progress=False))
    return out


def run_one(args, world: int, threads: int, shards: str, out_root: str) -> dict:
    name = f"ranks{world}"
    flags = ["--deepspeed", args.config, "--preset", args.preset, "--shards", shards, "--out-root", out_root,
             "--name", name, "--micro-batch", str(args.micro_batch), "--grad-accum", "1",
             "--max-steps", str(args.steps), "--warmup-steps", "1", "--log-every", "1", "--vis-every", "0",
             "--save-every", str(10**9), "--resume", "none", "--backend", args.backend,
             "--workers", str(args.workers), "--precision", args.precision, "--trace"]
    if args.image_size:
        flags += ["--image-size", str(args.image_size)]
    t0 = time.perf_counter()
    p = run_pretraining(flags, world, timeout=args.timeout, env={"OMP_NUM_THREADS": str(threads)}, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-4000:]
        raise RuntimeError(f"{world}-rank run failed (exit {p.returncode}): {' '.join(p.args)}\n{tail}")
    run_dir = os.path.join(out_root, name)
    sc = _scalars(run_dir)
    if "throughput/samples_per_s" not in sc:
        raise RuntimeError(f"{run_dir}/tb has no throughput/samples_per_s scalar (tags: {sorted(sc)})")
    traces = sorted(glob.glob(os.path.join(run_dir, "trace", "rank*.jsonl")))
    if len(traces) != world:
        raise RuntimeError(f"{run_dir}/trace has {len(traces)} rank files, expected {world}")
    agg = _median_after(sc["throughput/samples_per_s"], args.warmup)
    res = {
        "ranks": world, "threads_per_rank": threads,
        "samples_per_s": round(agg, 4), "per_rank_samples_per_s": round(agg / world, 4),
        "data_wait_fraction": round(_median_after(sc.get("time/data_wait_fraction", [(0, 0.0)]), args.warmup), 4),
        "steps": len(sc["throughput/samples_per_s"]), "wall_s": round(wall, 1),
    }
    if "throughput/mfu" in sc:
        res["mfu_trainer"] = round(_median_after(sc["throughput/mfu"], args.warmup), 4)
    return res


def run(args: argparse.Namespace) -> int:
    try:
        worlds = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        print(f"mrm-scale bench scaling: --ranks {args.ranks!r}: expected e.g. 1,2", file=sys.stderr)
        return 2
    if not worlds or min(worlds) < 1 or args.steps <= args.warmup:
        print("mrm-scale bench scaling: need --ranks >= 1 and --steps > --warmup", file=sys.stderr)
        return 2
    try:
        if args.config is None or (not os.path.isfile(args.config) and os.sep not in args.config):
            args.config = packaged_ds_config(args.config or DEFAULT_CONFIG)  # a name the package ships
    except FileNotFoundError as e:
        print(f"mrm-scale bench scaling: --config: {e}", file=sys.stderr)
        return 2
    if not os.path.isfile(args.config):
        print(f"mrm-scale bench scaling: --config {args.config}: file not found", file=sys.stderr)
        return 2
    args.config = os.path.abspath(args.config)
    cores = os.cpu_count() or 1
    threads = args.threads_per_rank or max(1, cores // max(worlds))
    folder = args.keep or tempfile.mkdtemp(prefix="mrm-bench-scaling-")
    os.makedirs(folder, exist_ok=True)
    try:
        shards = args.shards
        if shards is None:
            # every rank's loader reads whole shards: at least max(world) x workers train shards, and enough
            # samples that no run wraps its epoch more than once or twice
            per_shard = max(args.micro_batch, 8)
            n_shards = max(worlds) * args.workers * 2
            num = args.num or per_shard * n_shards + 8
            t0 = time.perf_counter()
            shards = _prep(folder, num, per_shard, args.image_side)
            print(f"prepared {num} synthetic records into {shards} ({time.perf_counter() - t0:.1f} s)", flush=True)
        results = []
        for world in worlds:
            r = run_one(args, world, threads, shards, os.path.join(folder, "runs"))
            print(f"{world} rank(s) x {threads} thread(s): {r['samples_per_s']:.3f} samples/s "
                  f"({r['per_rank_samples_per_s']:.3f} per rank), data wait {100 * r['data_wait_fraction']:.1f}%",
                  flush=True)
            results.append(r)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"mrm-scale bench scaling: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    base = results[0]
    summary = {
        "bench": "scaling", "preset": args.preset, "micro_batch": args.micro_batch, "precision": args.precision,
        "zero": os.path.basename(args.config), "backend": args.backend, "workers": args.workers,
        "steps": args.steps, "warmup": args.warmup, "accelerator": trainer_env(1).get("DS_ACCELERATOR") or "cuda",
        "runs": results,
    }
    for r in results:
        n = r["ranks"]
        summary[f"samples_per_s_{n}rank"] = r["samples_per_s"]
        summary[f"per_rank_samples_per_s_{n}rank"] = r["per_rank_samples_per_s"]
        summary[f"data_wait_fraction_{n}rank"] = r["data_wait_fraction"]
        if r is not base:
            summary[f"efficiency_{n}rank"] = round(
                r["samples_per_s"] * base["ranks"] / (n * base["samples_per_s"]), 4)
    if len(results) > 1:
        summary["scaling_efficiency"] = summary[f"efficiency_{results[-1]['ranks']}rank"]
    print(json.dumps(summary), flush=True)
    return 0

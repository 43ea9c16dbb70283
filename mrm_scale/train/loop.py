"""The pretraining loop: micro-steps under the DeepSpeed engine, the non-finite loss guard, checkpoints,
metrics and the optional per-rank trace.

Masks are seeded per micro-step from ``(seed, step, micro-step, rank)``, so a resumed run draws the same
masks as an uninterrupted one; the loader's position and the RNG states come back from the checkpoint.

Non-finite guard: the loss of every micro-batch is checked on all ranks together (one all-reduce). When it is
NaN/inf anywhere, no rank runs backward or step for that micro-batch — the engine sees nothing, so no update
comes from it and DeepSpeed's accumulation counters stay aligned — and the batch is counted and logged.
After ``--max-bad-steps`` consecutive bad micro-batches the run stops with advice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from mrm_scale.formats.run_record import tb_dir, trace_path

from . import checkpoint
from .config import bf16_enabled
from .image_use import ImageUseProbe, summary_line
from .metrics import Metrics, device_peak_tflops
from .preemption import EXIT_PREEMPTED, StopRequest
from .setup import Run, build_loader_for


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """The run stopped on request (a signal, the launcher gone) after writing a complete checkpoint."""

    def __init__(self, step: int, reason: str, checkpoint_path: str):
        self.step, self.reason, self.checkpoint_path = step, reason, checkpoint_path
        super().__init__(f"stopped at step {step} on {reason}: checkpoint {checkpoint_path} is complete; run the "
                         f"same command again (--resume auto) to continue (exit {EXIT_PREEMPTED})")


class LoopHooks:
    """Points where a caller may look into or change the loop; the production job passes none. Tests subclass it
    (a crash before a step, a NaN loss) instead of flags in the job."""

    def before_step(self, step: int) -> None:
        """Called before optimizer step ``step`` (1-based) is computed."""

    def after_resume(self, engine, step: int) -> None:
        """Called right after a checkpoint was loaded into ``engine`` (before the loader is built)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss of step ``step`` as the loop will use it (checked for NaN, backpropagated)."""
        return loss


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0]) & 0x7FFFFFFF


def _any_rank(flag: bool, device: str) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _mean_over_ranks(values: dict, keys: tuple[str, ...], device: str, world: int) -> dict:
    """``values`` with ``keys`` averaged over the ranks (each rank's loss covers only its share of the batch)."""
    if world == 1 or not dist.is_initialized():
        return values
    t = torch.tensor([values[k] or 0.0 for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {**values, **{k: None if values[k] is None else v / world for k, v in zip(keys, t.tolist())}}


def _to_device(batch: dict, device: str, image_dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            if k == "image" and v.dim() == 4 and v.shape[1] > 1 and v.stride(1) == 0:
                # grayscale replicated as a zero-copy view: move one channel, expand again on the device
                v = v[:, :1].to(device, non_blocking=True).to(image_dtype).expand(v.shape)
            else:
                v = v.to(device, non_blocking=True)
                if k == "image":
                    v = v.to(image_dtype)
        out[k] = v
    return out


class BatchStream:
    """Endless batches over epochs, timing how long the loop waits for data."""

    def __init__(self, loader):
        self.loader = loader
        self.it = iter(loader)
        self.wait = 0.0

    def next(self) -> dict:
        t0 = time.perf_counter()
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)  # the loader moved on to its next epoch
            batch = next(self.it)
        self.wait += time.perf_counter() - t0
        return batch


def param_digest(engine) -> str:
    """sha256 over the full parameters (gathered under ZeRO-3) — for checking that ranks agree."""
    h = hashlib.sha256()
    params = list(engine.module.named_parameters())
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            for name, p in params:
                h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    else:
        for name, p in params:
            h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def train(run: Run, engine, model, hooks: LoopHooks | None = None) -> dict:
    args = run.args.train
    hooks = hooks or LoopHooks()
    accum = run.schedule.grad_accum
    global_batch = run.schedule.global_batch
    bf16 = bf16_enabled(run.ds_config)
    image_dtype = torch.bfloat16 if bf16 else torch.float32
    max_steps = run.schedule.max_steps

    step, loader_states = 0, None
    if run.resume_from:
        step, loader_states = checkpoint.load(engine, run.resume_from, run.rank)
        if hooks is not None:
            hooks.after_resume(engine, step)
        if run.is_main:
            print(f"resumed from {run.resume_from.path} at step {step}", flush=True)
    loader = build_loader_for(run, loader_states)
    stream = BatchStream(loader)

    from mrm_scale.model.flops import formula_training_flops

    flops = formula_training_flops(run.model_cfg, vocab_size=run.tokenizer.vocab_size)["total"]
    peak, peak_src = device_peak_tflops(run.device, image_dtype, args.peak_tflops)
    metrics = Metrics(run.run_dir, run.rank, flops, peak, run.world_size)
    if run.is_main:
        print(f"training {run.model_cfg.name}: {sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.1f} M params, "
              f"{flops / 1e9:.2f} GFLOP/sample, {run.world_size} rank(s) x micro batch "
              f"{run.ds_config['train_micro_batch_size_per_gpu']} x accum {accum} = {global_batch}/step, "
              f"{max_steps} steps, peak {peak:.2f} TFLOP/s ({peak_src}), run folder {run.run_dir}", flush=True)
    trace = None
    if args.trace:
        path = trace_path(run.run_dir, run.rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        trace = open(path, "a")

    decode = None
    if run.is_main and run.model_cfg.has_report_head:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(run.tokenizer.path(run.shards))
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731

    probe = ImageUseProbe(run, lambda b: _to_device(b, run.device, image_dtype))
    image_use = None

    bad_total = bad_run = 0
    last = {}
    engine.train()
    stop = StopRequest().install()  # SIGTERM / SIGUSR1 / Ctrl-C: checkpoint at the next step boundary
    try:
        while step < max_steps:
            hooks.before_step(step + 1)
            t0 = time.perf_counter()
            stream.wait = 0.0
            sums = {"loss": 0.0, "image_loss": 0.0, "report_loss": 0.0}
            keys, sources, good, micro = [], [], 0, 0
            while good < accum:
                batch = _to_device(stream.next(), run.device, image_dtype)
                out = engine(batch, seed=step_seed(args.seed, step, micro, run.rank))
                micro += 1
                loss = hooks.loss(step + 1, out.loss)
                if _any_rank(not bool(torch.isfinite(loss.detach()).item()), run.device):
                    bad_total += 1
                    bad_run += 1
                    if run.is_main:
                        print(f"step {step + 1}: non-finite loss on some rank; batch skipped, no update "
                              f"({bad_run} in a row, {bad_total} in all)", flush=True)
                    if bad_run >= args.max_bad_steps:
                        raise NonFiniteLossError(
                            f"the loss was NaN/inf for {bad_run} consecutive batches (step {step + 1}); try a lower "
                            "--blr or --lr, more --warmup-steps, --clip-grad 1.0, --precision fp32, and check the "
                            f"data with `mrm-scale verify {run.shards}`")
                    continue
                bad_run = 0
                engine.backward(loss)
                engine.step()
                good += 1
                keys.extend(batch["key"])
                sources.extend(batch.get("source") or [])
                sums["loss"] += loss.item() / accum
                sums["image_loss"] += out.image_loss.item() / accum
                if out.report_loss is not None:
                    sums["report_loss"] += out.report_loss.item() / accum
            step += 1
            seconds = time.perf_counter() - t0
            grad_norm = engine.get_global_grad_norm()
            values = {**sums, "lr": engine.get_lr()[0], "bad_steps": bad_total,
                      "grad_norm": None if grad_norm is None else float(grad_norm)}
            if out.report_loss is None:
                values["report_loss"] = None
            last = values
            if trace:
                trace.write(json.dumps({"step": step, "keys": keys, **({"sources": sources} if sources else {}),
                                        **{k: values[k] for k in sums}}) + "\n")
                trace.flush()
            log_now = step % args.log_every == 0 or step == max_steps or step == 1
            if log_now:  # the same steps on every rank: the mean is a collective
                logged = _mean_over_ranks(values, tuple(sums), run.device, run.world_size)
                metrics.step(step, max_steps, logged, global_batch, seconds, stream.wait, console=True)
                metrics.mix(step, getattr(loader, "drawn", None), run.world_size)
            if args.vis_every and (step % args.vis_every == 0 or step == max_steps):
                metrics.visualise(step, run.model_cfg, batch, out, decode)
            if probe.active and ((args.vis_every and step % args.vis_every == 0) or step == max_steps):
                image_use = probe.measure(engine)  # every rank: a ZeRO-3 forward needs all of them
                metrics.image_use(step, image_use)
                probe.save(step, image_use)
            saved = step % args.save_every == 0 or step == max_steps
            if saved:
                tag = checkpoint.save(engine, run.ckpt_dir, step, loader.state_dict(), run.record, args.keep_last)
                if run.is_main:
                    print(f"checkpoint {os.path.join(run.ckpt_dir, tag)}", flush=True)
            reason = stop.agreed(run.device)  # every rank, every step: any rank's request stops all of them
            if reason and step < max_steps:  # at the last step the run is done anyway: it ends as finished
                if not saved:
                    tag = checkpoint.save(engine, run.ckpt_dir, step, loader.state_dict(), run.record,
                                          args.keep_last)
                raise Preempted(step, reason, os.path.join(run.ckpt_dir, tag))
    finally:
        stop.uninstall()
        metrics.close()
    digest = param_digest(engine)
    if trace:
        trace.write(json.dumps({"final": True, "step": step, "param_sha256": digest, "world_size": run.world_size,
                                "skipped_samples": getattr(loader, "skipped", 0),
                                **({"drawn": loader.drawn} if getattr(loader, "drawn", None) else {})}) + "\n")
        trace.close()
    if run.is_main and summary_line(image_use):
        print(summary_line(image_use), flush=True)
    if run.is_main and getattr(loader, "drawn", None):
        print("samples per source (all ranks): " + ", ".join(f"{k} {v * run.world_size}" for k, v in
                                                             loader.drawn.items()), flush=True)
    if run.is_main:
        print(f"done: {step} steps. Checkpoints: {run.ckpt_dir}  TensorBoard: tensorboard --logdir "
              f"{tb_dir(run.run_dir)}", flush=True)
    return {"step": step, **last, "image_use": image_use}

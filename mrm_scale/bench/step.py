"""``mrm-scale bench step``: time of one full MRM training step (forward, backward, optimizer step) and its MFU.

One process, no DeepSpeed, random data of the batch contract's shapes (``flops.synthetic_batch``). The step is the
one the DeepSpeed engine runs:

- ``--precision bf16``: the module is cast to bf16 (weights, buffers, activations: what the engine does with
  ``"bf16": {"enabled": true}``), the image is fed as bf16 (as the trainer does), and the optimizer keeps an fp32
  master copy of every parameter: bf16 gradients are copied into fp32 gradient buffers, clipped (norm 1.0, as
  ``ds_configs/*.json``), AdamW updates the fp32 masters, which are copied back to the bf16 weights. Losses are
  computed in fp32 by the model (``pixel_loss``, the report head's ``.float()`` logits).
- ``--precision fp32``: fp32 weights and AdamW on them (same clipping).

Model FLOPs per sample are counted with ``count_training_flops`` (matmuls of forward + backward, no recompute) on
the timed batch. The practical peak is a large square matmul of the same dtype measured in the same run, in
between the timed steps (so both see the same machine load); MFU = achieved / peak. Step times and peak are
medians. The last line printed is one JSON object.

``--engine`` also times the step through the DeepSpeed engine the trainer builds (``train.setup.build_engine``'s
recipe, ZeRO-2 bf16 with DeepSpeed's optimizer, a world of one) in a child process, one engine step after each
plain step, so both see the same machine load; the JSON line gains ``engine`` and ``engine_over_plain``
(engine samples/s over the plain step's). ``--original`` does the same for the original MRM code's step
(:mod:`mrm_scale.bench.original`): ``original`` and ``plain_over_original`` (this step's samples/s over the
original's; MFU of both from the same model FLOPs).

Imports stay light at module level (no DeepSpeed, no DALI): the GPU script runs this on a machine with only
PyTorch, timm and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from mrm_scale import host_memory

DEFAULT_VOCAB = 30522
CLIP_NORM = 1.0  # ds_configs/*.json "gradient_clipping"
ADAMW = dict(lr=1.5e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset (tiny, small, base, large, huge, giant)")
    p.add_argument("--batch", type=int, default=4, help="samples per step")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--optimizer", choices=("fused", "foreach", "loop", "deepspeed"), default="fused",
                   help="AdamW implementation: torch's fused kernel (default), multi-tensor foreach, per-tensor, or "
                   "DeepSpeed's FusedAdam (the trainer engine's; on a CPU its C++ op, built on first use)")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block (regional)")
    p.add_argument("--sdpa", choices=("auto", "flash", "math"), default="auto",
                   help="attention kernels: auto (torch picks), flash (flash attention; memory-efficient kernel "
                   "where a padding mask is given, as BERT's), math (unfused, for comparison). On CPU the model's "
                   "own rule for short half-precision stacks applies inside (see --cpu-math-attention-max-tokens)")
    p.add_argument("--cpu-math-attention-max-tokens", type=int, default=None, metavar="T",
                   help="the model's CPU rule: bf16 stacks of <= T tokens use the unfused SDPA kernel (default: "
                   "the preset's cpu_math_attention_max_tokens, 128; 0 = flash everywhere)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set report_loss=all")
    p.add_argument("--peak-size", type=int, default=None, help="side of the peak matmul (default 2048 CPU, 8192 GPU)")
    p.add_argument("--peak-reps", type=int, default=3, help="peak matmuls after each timed step")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one step with torch.profiler and print the top N ops (stderr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                   help="CPU host memory policy (mrm_scale.host_memory): retain freed memory in the process, as the "
                   "trainer's CPU ranks do (default), or glibc's default (mmap/munmap large blocks, trim the heap)")
    p.add_argument("--engine", action="store_true",
                   help="also time the same step through the DeepSpeed engine the trainer builds (a world of one in a "
                   "child process; --config, ZeRO-2 bf16 by default, with its own optimizer), stepped in turn with "
                   "the plain step; the JSON line gives both and engine_over_plain")
    p.add_argument("--original", action="store_true",
                   help="also time the original MRM code's step (mrm_scale/bench/original.py: fp32 weights under "
                   "autocast, report loss at every position, torch AdamW) at the same sizes on the same batch, in a "
                   "child process stepped in turn with the plain step; the JSON line gives plain_over_original")
    p.add_argument("--config", default="zero2.json",
                   help="DeepSpeed JSON for --engine: a shipped name (zero2.json) or a path")
    p.add_argument("--against", default=None, metavar="FLAGS",
                   help="A/B in this process: a second step built with these flags on top of the others (e.g. "
                   "--against '--set report_loss=all', or --against=--compile for a single flag); the two run "
                   "alternately, step for step, and the JSON line gives both medians and the ratio")


# ------------------------------------------------------------------------------------------------ optimizer

class MasterAdamW:
    """AdamW on fp32 master copies of (bf16) model parameters: DeepSpeed's bf16 scheme, on one process.

    With fp32 parameters it is plain AdamW on them (no copies). ``impl``: ``fused`` / ``foreach`` / ``loop``.
    Gradients are clipped to a global L2 norm (DeepSpeed's ``gradient_clipping``) on the fp32 copies.
    """

    def __init__(self, groups: list[dict], impl: str, clip: float | None = CLIP_NORM):
        import torch

        self.clip = clip
        self.model_params = [p for g in groups for p in g["params"]]
        self.mixed = any(p.dtype != torch.float32 for p in self.model_params)
        master_groups = []
        for g in groups:
            params = [p.detach().float().clone().requires_grad_(True) if self.mixed else p for p in g["params"]]
            master_groups.append({**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": params})
        self.master = [p for g in master_groups for p in g["params"]]
        if self.mixed:
            for m in self.master:
                m.grad = torch.zeros_like(m)
        self.impl = impl
        if impl == "deepspeed":  # the kernel the trainer's engine steps with (FusedAdam; its C++ op on a CPU)
            from deepspeed.ops.adam import FusedAdam

            self.opt = FusedAdam(master_groups, adam_w_mode=True, **ADAMW)
        else:
            flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[impl]
            self.opt = torch.optim.AdamW(master_groups, **ADAMW, **flags)

    def step(self) -> None:
        import torch

        with torch.no_grad():
            if self.mixed:
                for m, p in zip(self.master, self.model_params):
                    if p.grad is None:  # (every MRM parameter gets a gradient; this keeps a stale one out)
                        m.grad.zero_()
                pairs = [(m.grad, p.grad) for m, p in zip(self.master, self.model_params) if p.grad is not None]
                torch._foreach_copy_([m for m, _ in pairs], [g for _, g in pairs])  # bf16 -> fp32 gradients
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.master, self.clip, foreach=self.impl != "loop")
            self.opt.step()
            if self.mixed:
                torch._foreach_copy_(self.model_params, self.master)  # fp32 masters -> bf16 weights

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None


# ------------------------------------------------------------------------------------------------ helpers

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_context(mode: str):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode == "flash":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    if mode == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


class PeakMatmul:
    """Square matmul of the step's dtype; ``sample()`` times ``reps`` of them (one GFLOP/s figure each)."""

    def __init__(self, n: int, dtype, device):
        import torch

        self.n, self.device = n, device
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        self.out = torch.empty(n, n, device=device, dtype=dtype)
        self.values: list[float] = []
        for _ in range(2):  # warm-up
            self._once()

    def _once(self) -> float:
        import torch

        _sync(self.device)
        t0 = time.perf_counter()
        torch.mm(self.a, self.b, out=self.out)
        _sync(self.device)
        return time.perf_counter() - t0

    def sample(self, reps: int) -> None:
        for _ in range(reps):
            self.values.append(2 * self.n**3 / self._once() / 1e9)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def model_config(args):
    """The model config of the step: the preset, ``--set`` overrides, ``--grad-checkpointing`` and the CPU
    attention rule (the plain step and the engine's build the same model)."""
    from mrm_scale.model import get_preset
    from mrm_scale.model.presets import parse_overrides

    cfg = get_preset(args.preset, **parse_overrides(args.overrides))
    if args.grad_checkpointing:
        cfg = cfg.replace(grad_checkpointing=True)
    if args.cpu_math_attention_max_tokens is not None:
        cfg = cfg.replace(cpu_math_attention_max_tokens=args.cpu_math_attention_max_tokens).validate()
    return cfg


def build(args, device):
    """(model, optimizer, batch, cfg) for the step."""
    import torch

    from mrm_scale.formats.tokenizer import TokenizerIdentity
    from mrm_scale.model import build_model, param_groups
    from mrm_scale.model.flops import synthetic_batch

    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = build_model(cfg, **TokenizerIdentity.canonical(args.vocab_size).model_ids()).to(device)
    batch = synthetic_batch(cfg, args.batch, vocab_size=args.vocab_size, device=device, seed=args.seed)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)  # what the DeepSpeed engine does with bf16 enabled
        batch["image"] = batch["image"].to(torch.bfloat16)  # what the trainer feeds it
    model.train()
    groups = param_groups(model, ADAMW["weight_decay"])
    optimizer = MasterAdamW(groups, args.optimizer)
    if args.compile:
        from mrm_scale.model import compile_blocks

        compile_blocks(model)
    return model, optimizer, batch, cfg


def _sig(x: float, digits: int = 5) -> float:
    """``x`` to ``digits`` significant figures: ratios of printed figures stay exact to 1e-4 at any scale."""
    return float(f"{x:.{digits}g}")


def train_step(model, optimizer, batch, seed: int):
    import torch

    torch.manual_seed(seed)  # text dropout draws from the global RNG: a step's loss is then a function of its seed
    out = model(batch, seed=seed)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return out


def timed_step(model, optimizer, batch, seed: int, device) -> tuple[float, float]:
    """(loss, seconds) of one :func:`train_step`, the device synchronised on both sides."""
    _sync(device)
    t0 = time.perf_counter()
    out = train_step(model, optimizer, batch, seed=seed)
    _sync(device)
    return float(out.loss.detach()), time.perf_counter() - t0


def profile_step(model, optimizer, batch, seed: int, top: int, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(model, optimizer, batch, seed)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


class EngineStep:
    """The same step through the DeepSpeed engine the trainer builds (``train.setup.build_engine``'s recipe): the
    DeepSpeed JSON resolved by ``train.config.resolve_ds_config`` for this batch and precision on a world of one,
    the model built with the same seed and parameter groups, the image fed in the engine's dtype."""

    def __init__(self, args, device):
        import tempfile

        import torch

        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed picks its accelerator
        import deepspeed

        from mrm_scale.formats.tokenizer import TokenizerIdentity
        from mrm_scale.model import build_model, param_groups
        from mrm_scale.model.flops import synthetic_batch
        from mrm_scale.train.config import TrainArgs, load_ds_json, resolve_ds_config, zero_stage
        from mrm_scale.train.launcher import packaged_ds_config
        from mrm_scale.train.setup import start_distributed

        path = args.config if os.path.isfile(args.config) else packaged_ds_config(args.config)
        targs = TrainArgs(deepspeed_config=path, micro_batch=args.batch, lr=ADAMW["lr"], precision=args.precision,
                          clip_grad=CLIP_NORM, max_steps=10**6)
        with tempfile.TemporaryDirectory() as tmp:
            self.ds_config, _ = resolve_ds_config(load_ds_json(path), targs, 1, None, tmp)
        self.config_name = os.path.basename(path)
        self.zero_stage = zero_stage(self.ds_config)
        start_distributed()
        cfg = model_config(args)
        torch.manual_seed(args.seed)
        model = build_model(cfg, **TokenizerIdentity.canonical(args.vocab_size).model_ids())
        if args.compile:
            from mrm_scale.model import compile_blocks

            compile_blocks(model)
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, ADAMW["weight_decay"])]
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=self.ds_config)
        self.device = self.engine.device
        batch = synthetic_batch(cfg, args.batch, vocab_size=args.vocab_size, device=self.device, seed=args.seed)
        if args.precision == "bf16":
            batch["image"] = batch["image"].to(torch.bfloat16)  # what the trainer feeds a bf16 engine
        self.batch = batch
        basic = getattr(self.engine, "basic_optimizer", None)
        self.info = {"config": self.config_name, "zero_stage": self.zero_stage,
                     "bf16": bool(self.ds_config.get("bf16", {}).get("enabled")),
                     "optimizer": type(self.engine.optimizer).__name__,
                     "basic_optimizer": type(basic).__name__ if basic is not None else None,
                     "deepspeed": deepspeed.__version__}

    def timed(self, seed: int) -> tuple[float, float]:
        import torch

        _sync(self.device)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        out = self.engine(self.batch, seed=seed)
        self.engine.backward(out.loss)
        self.engine.step()
        _sync(self.device)
        return float(out.loss.detach()), time.perf_counter() - t0

    def close(self) -> None:
        import torch.distributed as dist

        self.engine.destroy() if hasattr(self.engine, "destroy") else None
        if dist.is_initialized():
            dist.destroy_process_group()


class OriginalSide:
    """``--original``: the original MRM code's step (:mod:`mrm_scale.bench.original`) at the preset's sizes, on the
    same batch (fp32 image: its loop feeds fp32 and autocasts)."""

    def __init__(self, args, device):
        import torch

        from mrm_scale.bench.original import OriginalStep
        from mrm_scale.formats.tokenizer import TokenizerIdentity
        from mrm_scale.model.flops import synthetic_batch

        cfg = model_config(args)
        ids = TokenizerIdentity.canonical(args.vocab_size).model_ids()
        batch = synthetic_batch(cfg, args.batch, vocab_size=args.vocab_size, device=device, seed=args.seed)
        self.step = OriginalStep(cfg, batch, args.vocab_size, ids, args.precision, args.seed)
        self.info = {"code": "the original MRM step (mrm_scale/bench/original.py)",
                     "precision": ("fp32 weights, forward and backward under bf16 autocast"
                                   if args.precision == "bf16" else "fp32"),
                     "optimizer": "torch.optim.AdamW (the device's default implementation), no clipping",
                     "report_loss": "every position", "torch": torch.__version__}

    def timed(self, seed: int) -> tuple[float, float]:
        _sync(self.step.device)
        t0 = time.perf_counter()
        loss = self.step.step(seed)
        _sync(self.step.device)
        return loss, time.perf_counter() - t0

    def close(self) -> None:
        pass


SIDES = {"engine": EngineStep, "original": OriginalSide}


def _side_worker(kind: str, args: argparse.Namespace, device: str, conn) -> None:
    """One compared step (``--engine`` or ``--original``) in its own process: its own heap (and, for the engine,
    its own process group)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(device).type == "cpu":
        host_memory.apply(args.malloc)
    try:
        side = SIDES[kind](args, torch.device(device))
    except Exception as e:  # noqa: BLE001 - reported by the parent, which names the flag
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", side.info))
    while (seed := conn.recv()) is not None:
        conn.send(("step", side.timed(seed)))
    side.close()
    conn.send(("closed", None))


class SideProcess:
    """A compared step (:class:`EngineStep`, :class:`OriginalSide`) in a child process, stepped in turn with the
    plain step of this one. Two models in one process share one heap: their differently-sized temporaries keep it
    growing (page faults, 2-5 s steps with the engine in that setting), which neither has when run alone."""

    TIMEOUT_S = 1800.0  # a generous guard: a DeepSpeed start compiles its CPU ops once (minutes)

    def __init__(self, kind: str, args: argparse.Namespace, device):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.kind = kind
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_side_worker, args=(kind, args, str(device), child), daemon=True)
        self.proc.start()
        child.close()
        what, info = self._recv()
        if what != "ready":
            self.proc.join(10)
            raise RuntimeError(info)
        self.info = info

    def _recv(self):
        if not self.conn.poll(self.TIMEOUT_S):
            self.proc.terminate()
            raise RuntimeError(f"the {self.kind} process did not answer in {self.TIMEOUT_S:.0f} s")
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.kind} process ended (exit code {self.proc.exitcode})") from None

    def timed(self, seed: int) -> tuple[float, float]:
        self.conn.send(seed)
        return self._recv()[1]

    def close(self) -> None:
        try:
            self.conn.send(None)
            self._recv()
        except (RuntimeError, OSError):
            pass
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.terminate()


def _variant(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--against``'s flags applied on top."""
    import copy
    import shlex

    p = argparse.ArgumentParser(prog="mrm-scale bench step --against", add_help=False)
    add_arguments(p)
    b = copy.deepcopy(args)
    b.against = None
    return p.parse_args(shlex.split(args.against), namespace=b)


def _run_ab(args: argparse.Namespace, device) -> int:
    """Two steps (A: the flags, B: the flags + ``--against``) timed alternately, A B B A ..., so both see the
    same machine load; the module-wide CPU attention rule is switched to each side's value around its step
    (:func:`run` restores the process's own afterwards)."""
    import torch

    try:
        b_args = _variant(args)
    except SystemExit:
        print(f"mrm-scale bench step: --against {args.against!r}: not flags of bench step", file=sys.stderr)
        return 2
    if b_args.preset != args.preset or b_args.batch != args.batch or b_args.device != args.device:
        print("mrm-scale bench step: --against may not change --preset, --batch or --device", file=sys.stderr)
        return 2
    sides = {}
    for name, a in (("a", args), ("b", b_args)):
        try:
            model, optimizer, batch, cfg = build(a, device)
        except ValueError as e:
            print(f"mrm-scale bench step: {e}", file=sys.stderr)
            return 2
        sides[name] = dict(args=a, model=model, optimizer=optimizer, batch=batch, cfg=cfg,
                           rule=cfg.cpu_math_attention_max_tokens, times=[], losses=[])
    for i in range(args.warmup + args.steps):
        for name in (("a", "b") if i % 2 == 0 else ("b", "a")):
            side = sides[name]
            if device.type == "cpu":
                host_memory.apply(side["args"].malloc)  # process-wide: switched around each side's step
            with _sdpa_context(side["args"].sdpa):
                loss, dt = timed_step(side["model"], side["optimizer"], side["batch"], args.seed + i, device)
            side["losses"].append(loss)
            if i >= args.warmup:
                side["times"].append(dt)
    med = {n: statistics.median(s_["times"]) for n, s_ in sides.items()}
    result = {
        "bench": "step-ab", "preset": args.preset, "batch": args.batch, "device": str(device),
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "a": {"flags": "(as given)", "step_s": round(med["a"], 5), "loss_first": sides["a"]["losses"][0]},
        "b": {"flags": args.against, "step_s": round(med["b"], 5), "loss_first": sides["b"]["losses"][0]},
        "b_over_a": round(med["b"] / med["a"], 4),  # > 1: B's step is slower, A's setting is the fast path
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(result), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:
        if host_memory.current() == "retain":  # a process that goes on (a test session) gets glibc's ways back
            host_memory.apply("default")


def _run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mrm-scale bench step: --device cuda but torch.cuda.is_available() is False (no GPU or no CUDA "
              "build of torch); use --device cpu", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        print("mrm-scale bench step: --steps and --batch must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    malloc = host_memory.apply(args.malloc) if device.type == "cpu" else None
    if args.against:
        if args.engine or args.original:
            print("mrm-scale bench step: --engine/--original and --against are separate comparisons; give one",
                  file=sys.stderr)
            return 2
        return _run_ab(args, device)
    try:
        model, optimizer, batch, cfg = build(args, device)
    except ValueError as e:
        print(f"mrm-scale bench step: {e}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = PeakMatmul(args.peak_size or (8192 if device.type == "cuda" else 2048), dtype, device)

    from mrm_scale.model.flops import count_training_flops

    others: dict[str, SideProcess] = {}
    for kind in [k for k in SIDES if getattr(args, k)]:
        try:
            others[kind] = SideProcess(kind, args, device)
        except RuntimeError as e:
            for o in others.values():
                o.close()
            print(f"mrm-scale bench step --{kind}: {e}", file=sys.stderr)
            return 2
    order = ["plain", *others]
    with _sdpa_context(args.sdpa):
        times, losses = {k: [] for k in order}, {k: [] for k in order}
        for i in range(args.warmup + args.steps):
            # the compared steps take turns, the order reversed every step (P E O O E P ...): same machine load
            for side in (order if i % 2 == 0 else order[::-1]):
                if side == "plain":
                    loss, dt = timed_step(model, optimizer, batch, args.seed + i, device)
                else:
                    loss, dt = others[side].timed(args.seed + i)
                losses[side].append(loss)
                if i >= args.warmup:
                    times[side].append(dt)
            if i >= args.warmup:
                peak.sample(args.peak_reps)  # interleaved: the peak sees the same machine load as the steps
        for o in others.values():
            o.close()
        table = profile_step(model, optimizer, batch, args.seed, args.profile, device) if args.profile else None
    # counted on the first timed step's masks (FlopCounterMode; gradients discarded, weights untouched)
    flops = count_training_flops(model, batch, seed=args.seed + args.warmup)
    if table:
        print(f"torch.profiler, one step, top {args.profile} ops by self "
              f"{'CUDA' if device.type == 'cuda' else 'CPU'} time:\n{table}", file=sys.stderr)

    step_s = statistics.median(times["plain"])
    samples_per_s = args.batch / step_s
    gflop = flops["per_sample"] / 1e9
    achieved = gflop * samples_per_s
    result = {
        "bench": "step", "preset": cfg.name, "batch": args.batch, "precision": args.precision,
        "precision_scheme": ("bf16 weights/activations (module cast, as the DeepSpeed engine), fp32 master "
                             "weights + AdamW, fp32 losses") if args.precision == "bf16" else "fp32",
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "optimizer": f"AdamW({args.optimizer}) + clip {CLIP_NORM}",
        "host_malloc": malloc, "compile": args.compile, "sdpa": args.sdpa, "grad_checkpointing": cfg.grad_checkpointing,
        "cpu_math_attention_max_tokens": cfg.cpu_math_attention_max_tokens,
        "steps": args.steps, "warmup": args.warmup,
        "step_s": round(step_s, 5), "step_s_all": [round(t, 4) for t in times["plain"]],
        "samples_per_s": _sig(samples_per_s),
        "model_gflop_per_sample": _sig(gflop),
        "masked_tokens_per_sample": flops["masked_tokens_per_sample"],
        "achieved_gflop_s": _sig(achieved),
        "peak_gflop_s": _sig(peak.median), "peak_matmul": f"{peak.n}x{peak.n} {args.precision}",
        "mfu": _sig(achieved / peak.median),
        "loss_first": losses["plain"][0], "loss_last": losses["plain"][-1],
        "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for kind, other in others.items():
        other_s = statistics.median(times[kind])
        result[kind] = {
            **other.info, "process": "its own, stepped in turn with this one",
            "step_s": round(other_s, 5), "step_s_all": [round(t, 4) for t in times[kind]],
            "samples_per_s": _sig(args.batch / other_s),
            # the same model FLOPs per sample (the method's work), so MFUs compare as samples/s do
            "mfu": _sig(gflop * args.batch / other_s / peak.median),
            "loss_first": losses[kind][0], "loss_last": losses[kind][-1],
        }
    if "engine" in others:  # samples/s of the engine / of the plain step
        result["engine_over_plain"] = _sig(step_s / result["engine"]["step_s"])
    if "original" in others:  # samples/s of this step / of the original code's
        result["plain_over_original"] = _sig(result["original"]["step_s"] / step_s)
    print(json.dumps(result), flush=True)
    return 0

"""``mrm-scale plan``: what fits on N GPUs of M GiB before a cluster is booked, and how long one pass takes.

    mrm-scale plan --preset large --gpus 8 --gpu-mem 80
    mrm-scale plan --preset giant --gpus 8 --gpu-mem 80 --zero 3 --grad-checkpointing --micro-batch 16
    mrm-scale plan --preset all --gpus 8 --gpu-mem 80 --gpu H100 --mfu 0.4 --samples 377110

Per GPU, for the bf16 step of ``ds_configs/zero{1,2,3}.json``:

- **model states** (bf16 weights, gradients, fp32 masters and AdamW moments) from DeepSpeed's own estimators:
  ``estimate_zero2_model_states_mem_needs`` (2 P + 18 P / N bytes) and ``estimate_zero3_model_states_mem_needs``
  (4 x largest layer + 18 P / N), without offload; ZeRO-1, which DeepSpeed has no estimator for, by the same terms
  with the bf16 gradients whole on every GPU (4 P + 16 P / N);
- **DeepSpeed's buffers** from the JSON: the gradient reduce buckets (``reduce_bucket_size`` bf16 elements, two with
  ``overlap_comm``) and, under ZeRO-3, the prefetch bucket;
- **activations per sample** by formula (:func:`mrm_scale.model.memory.activation_bytes`, fused attention as on a
  GPU), which a CPU measurement checks (``--measure``): within 3% for tiny, small and base; with checkpointing
  the formula is 2-28% above the measured peak (it keeps the cross-entropy's transient and a recomputed block apart);
- **headroom**: 2 GiB for the CUDA context, cuBLAS and NCCL workspaces, and 10% of the card for the caching
  allocator's fragmentation.

The largest micro-batch is what the remainder holds. Without ``--zero`` the lowest stage that fits the micro-batch
is chosen (ZeRO-2 before 3: its communication is that of plain data parallelism), then the same with activation
checkpointing; ``--micro-batch`` defaults to the largest that fits, capped at ``--max-micro-batch``.

Time per epoch = samples x model FLOPs per sample / (GPUs x data-sheet peak x MFU), model FLOPs as in
``model-info`` (matmuls of forward + backward; recompute under checkpointing is not model work: it is one reason the
MFU reached is lower). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from mrm_scale.model.presets import get_preset, parse_overrides, preset_names

DEFAULT_VOCAB = 30522
CONTEXT_GIB = 2.0  # CUDA context, cuBLAS / NCCL workspaces
FRAGMENTATION = 0.10  # share of the card left to the caching allocator
MIMIC_CXR_IMAGES = 377110  # MIMIC-CXR-JPG v2.0.0
GIB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, help=f"model preset or 'all' ({', '.join(preset_names())})")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default min(--gpus, 8))")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--gpu", default="H100", help="GPU for the data-sheet bf16 peak (H100, H200, A100, B200, L40S, ...)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak TFLOP/s of one GPU (overrides --gpu)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to time the epoch at (default 0.4)")
    p.add_argument("--samples", type=int, default=MIMIC_CXR_IMAGES,
                   help=f"samples per epoch (default {MIMIC_CXR_IMAGES:,}, the MIMIC-CXR-JPG images)")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per GPU per step (default: the largest)")
    p.add_argument("--max-micro-batch", type=int, default=256, help="cap of the default micro-batch (default 256)")
    p.add_argument("--zero", type=int, choices=(1, 2, 3), default=None, help="ZeRO stage (default: the lowest that fits)")
    p.add_argument("--grad-checkpointing", action="store_true", help="plan with activation checkpointing per block")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help=f"report vocabulary (default {DEFAULT_VOCAB})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field (repeatable), e.g. --set img_size=512")
    p.add_argument("--measure", action="store_true",
                   help="also measure the activation memory per sample on this CPU (tiny/small/base: seconds)")


# ------------------------------------------------------------------------------------------------ model states

def model_numbers(cfg, vocab_size: int) -> dict:
    """Parameters (unique), the largest layer's own parameters (ZeRO-3's estimator), built on the meta device."""
    from mrm_scale.formats.tokenizer import TokenizerIdentity
    from mrm_scale.model import build_model

    model = build_model(cfg, device="meta", **TokenizerIdentity.canonical(vocab_size).model_ids())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"params": int(model.parameter_counts()["total"]), "largest_layer_params": int(largest)}


def model_state_bytes(stage: int, params: int, largest_layer: int, gpus: int, per_node: int) -> float:
    """Bytes of model states per GPU without offload (DeepSpeed's estimators for ZeRO-2 and -3)."""
    nodes = max(1, math.ceil(gpus / per_node))
    if stage == 1:
        return 4 * params + 16 * params / gpus
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return float(estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=False)[1])
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return float(estimate_zero3_model_states_mem_needs(params, largest_layer, per_node, nodes, cpu_offload=False,
                                                       cpu_offload_params=False, zero_init=True)[1])


def buffer_bytes(stage: int) -> float:
    """DeepSpeed's bf16 buffers per GPU, from the shipped ``zero{stage}.json``."""
    from mrm_scale.train.config import load_ds_json
    from mrm_scale.train.launcher import packaged_ds_config

    z = load_ds_json(packaged_ds_config(f"zero{stage}.json")).get("zero_optimization", {})
    reduce = float(z.get("reduce_bucket_size", 5e8)) * 2 * (2 if z.get("overlap_comm") else 1)
    if stage == 3:
        reduce += float(z.get("stage3_prefetch_bucket_size", 5e7)) * 2
    return reduce


# ------------------------------------------------------------------------------------------------ the plan

def peak_tflops(gpu: str, given: float | None) -> tuple[float, str]:
    from mrm_scale.train.metrics import KNOWN_PEAK_TFLOPS

    if given:
        return given, "--peak-tflops"
    for name, value in sorted(KNOWN_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() == gpu.lower():
            return value, f"{name} data sheet, dense bf16"
    raise ValueError(f"--gpu {gpu!r}: no data-sheet peak known ({', '.join(sorted(KNOWN_PEAK_TFLOPS))}); "
                     "give --peak-tflops")


def option(stage: int, ckpt: bool, cfg, numbers: dict, args) -> dict:
    from mrm_scale.model.memory import activation_bytes

    per_node = args.gpus_per_node or min(args.gpus, 8)
    states = model_state_bytes(stage, numbers["params"], numbers["largest_layer_params"], args.gpus, per_node)
    buffers = buffer_bytes(stage)
    act = activation_bytes(cfg, args.vocab_size, grad_checkpointing=ckpt)["total"]
    usable = args.gpu_mem * GIB * (1 - FRAGMENTATION) - CONTEXT_GIB * GIB
    free = usable - states - buffers
    largest = max(0, int(free // act))
    return {"zero": stage, "grad_checkpointing": ckpt, "model_states_gib": states / GIB,
            "buffers_gib": buffers / GIB, "activations_mib_per_sample": act / 2**20,
            "usable_gib": usable / GIB, "largest_micro_batch": largest}


def plan(cfg, args) -> dict:
    from mrm_scale.model.flops import formula_training_flops

    numbers = model_numbers(cfg, args.vocab_size)
    stages = [args.zero] if args.zero else [2, 3]
    ckpts = [True] if args.grad_checkpointing else [False, True]
    options = [option(s, c, cfg, numbers, args) for c in ckpts for s in stages]
    want = args.micro_batch or 1
    chosen = next((o for o in options if o["largest_micro_batch"] >= want), None)
    micro = None
    if chosen is not None:
        micro = args.micro_batch or min(chosen["largest_micro_batch"], args.max_micro_batch)
    peak, peak_from = peak_tflops(args.gpu, args.peak_tflops)
    flops = formula_training_flops(cfg, vocab_size=args.vocab_size)["total"]
    samples_per_s = args.gpus * peak * 1e12 * args.mfu / flops
    out = {
        "preset": cfg.name, "params": numbers["params"], "largest_layer_params": numbers["largest_layer_params"],
        "gpus": args.gpus, "gpu_mem_gib": args.gpu_mem, "options": options,
        "fits": chosen is not None, "zero": chosen["zero"] if chosen else None,
        "grad_checkpointing": chosen["grad_checkpointing"] if chosen else None, "micro_batch": micro,
        "largest_micro_batch": chosen["largest_micro_batch"] if chosen else 0,
        "gpu_memory_used_gib": ((chosen["model_states_gib"] + chosen["buffers_gib"] + CONTEXT_GIB
                                 + micro * chosen["activations_mib_per_sample"] / 1024) if chosen else None),
        "model_gflop_per_sample": flops / 1e9, "peak_tflops": peak, "peak_from": peak_from, "mfu": args.mfu,
        "samples": args.samples, "samples_per_s": samples_per_s, "epoch_s": args.samples / samples_per_s,
    }
    if args.measure:
        from mrm_scale import host_memory
        from mrm_scale.model.memory import activation_bytes, measure_activation_bytes

        host_memory.apply("retain")
        measured_cfg = cfg.replace(grad_checkpointing=args.grad_checkpointing)
        m = measure_activation_bytes(measured_cfg, args.vocab_size)
        f = activation_bytes(measured_cfg, args.vocab_size, masked_tokens=m["masked_tokens_per_sample"],
                             text_attention=m["text_attention"])["total"]
        out["measured"] = {"per_sample_mib": m["per_sample"] / 2**20, "formula_same_kernels_mib": f / 2**20,
                           "formula_over_measured": f / m["per_sample"], "grad_checkpointing": args.grad_checkpointing,
                           "kernels": "ViT stacks fused, BERT unfused (CPU)"}
    return out


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _row(r: dict) -> str:
    if not r["fits"]:
        return f"{r['preset']:<7} {r['params'] / 1e6:>8.0f}M  does not fit on {r['gpus']} x {r['gpu_mem_gib']:g} GiB"
    ckpt = "yes" if r["grad_checkpointing"] else "no"
    return (f"{r['preset']:<7} {r['params'] / 1e6:>8.0f}M  ZeRO-{r['zero']}  ckpt {ckpt:<3}  micro {r['micro_batch']:>4} "
            f"(largest {r['largest_micro_batch']:>5})  {r['gpu_memory_used_gib']:>6.1f} GiB/GPU  "
            f"{r['samples_per_s']:>8.0f} samples/s ({r['samples_per_s'] / r['gpus']:.0f}/GPU)  "
            f"epoch {duration(r['epoch_s'])}")


def run(args: argparse.Namespace) -> int:
    names = preset_names() if args.preset == "all" else [args.preset]
    try:
        if args.gpus < 1 or args.gpu_mem <= 0 or not 0 < args.mfu <= 1 or args.samples < 1:
            raise ValueError("--gpus and --samples must be >= 1, --gpu-mem > 0 and 0 < --mfu <= 1")
        if args.micro_batch is not None and args.micro_batch < 1:
            raise ValueError("--micro-batch must be >= 1")
        overrides = parse_overrides(args.overrides)
        cfgs = [get_preset(n, **overrides) for n in names]
        peak_tflops(args.gpu, args.peak_tflops)
    except ValueError as e:
        print(f"mrm-scale plan: {e}", file=sys.stderr)
        return 2
    rows = [plan(cfg, args) for cfg in cfgs]
    print(f"{args.gpus} x {args.gpu} ({args.gpu_mem:g} GiB), bf16, AdamW; headroom {CONTEXT_GIB:g} GiB + "
          f"{FRAGMENTATION:.0%}; epoch of {args.samples:,} samples at MFU {args.mfu:g} of "
          f"{rows[0]['peak_tflops']:g} TFLOP/s per GPU")
    for r in rows:
        print(_row(r))
        for o in r["options"]:
            print(f"         ZeRO-{o['zero']} ckpt {'yes' if o['grad_checkpointing'] else 'no ':<3}: states "
                  f"{o['model_states_gib']:.2f} GiB + buffers {o['buffers_gib']:.2f} GiB, activations "
                  f"{o['activations_mib_per_sample']:.1f} MiB/sample -> largest micro-batch {o['largest_micro_batch']}")
        if "measured" in r:
            m = r["measured"]
            print(f"         measured on CPU: {m['per_sample_mib']:.1f} MiB/sample; formula with the same kernels "
                  f"{m['formula_same_kernels_mib']:.1f} ({m['formula_over_measured']:.3f}x)")
    print("(samples/s per GPU is also what the input pipeline must deliver: see `mrm-scale bench loader`)")
    print(json.dumps(rows[0] if len(rows) == 1 else {"rows": rows}))
    return 0

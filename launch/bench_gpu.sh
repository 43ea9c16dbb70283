#!/usr/bin/env bash
# launch/bench_gpu.sh - one prepared GPU benchmark of mrm-scale (about 3-6 minutes on one NVIDIA GPU).
#
# What it measures, on the first visible NVIDIA GPU, with nothing but PyTorch, torchvision (timm's dependency),
# timm, transformers, numpy, pillow and tokenizers (no DALI, no DeepSpeed; this repository need not be installed):
#   1. training-step throughput and MFU of the `base` and `large` presets in bf16 with flash SDPA:
#      `mrm-scale bench step --device cuda --precision bf16 --sdpa flash` (forward, backward, fp32-master AdamW
#      step on random data of the batch contract; model FLOPs counted with FlopCounterMode; peak = an 8192^2 bf16
#      matmul measured in the same run); `base` with `--original`: the original MRM code's step beside ours;
#   2. the CUDA paths of the model: the same weights, batch and seed give the same masks and bf16 and fp32
#      losses (image and report, fp32 in both) that agree on the GPU, with finite gradients;
#   3. JPEG decoding of synthetic shards (prepared here with `mrm-scale prep --source synthetic`) on the GPU with
#      torchvision.io.decode_jpeg(device="cuda"), against the CPU decoder, images/s and pixel agreement;
#   4. the paper's fine-tuning step (`mrm-scale bench finetune --skip-decode`: ViT-B/16 at 224 px, fc_norm head,
#      SGD, bf16 autocast, batch 96) and scoring: images/s and TFLOP/s, the figures behind the README's run times.
# The last thing printed is a table of the results.
#
# usage: bash launch/bench_gpu.sh [--device cuda|cpu] [--out DIR]
#   --device cpu   a dry run of the same steps on the CPU with the `tiny` preset (checks the script, not the GPU)
#   --out DIR      where shards, JSON lines and logs go (default: a temp dir, removed at the end)
# env: BASE_BATCH (default 64), LARGE_BATCH (default 32), STEPS (default 20), WARMUP (default 5)
# Exit status: 0 all passed; 1 a step or check failed (the table still comes last); 3 no CUDA GPU visible (with
# --device cuda, the default).
set -euo pipefail

DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "bench_gpu.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
START=$(date +%s)
BUDGET="${BUDGET_S:-450}"  # the whole script stays under 8 minutes: each step's timeout is capped by what is left
cap() { local left=$(( BUDGET - ($(date +%s) - START) )); (( left < 20 )) && left=20; echo $(( $1 < left ? $1 : left )); }
FAILED=""

if [ "$DEVICE" = cuda ]; then
  if ! GPU="$("$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(torch.cuda.get_device_name(0))' 2>/dev/null)"; then
    echo "bench_gpu.sh: no CUDA GPU visible (torch.cuda.is_available() is False, or torch is missing):" \
         "this script measures GPU paths and needs an NVIDIA GPU with a CUDA build of PyTorch." \
         "For a CPU dry run of its steps use: bash launch/bench_gpu.sh --device cpu" >&2
    exit 3
  fi
  PRESETS="base large"; BATCH_base="${BASE_BATCH:-64}"; BATCH_large="${LARGE_BATCH:-32}"; FT_BATCH=96
  STEPS="${STEPS:-20}"; WARMUP="${WARMUP:-5}"; CHECK_PRESET=base; NUM=512; SIDE=1024
else
  GPU="cpu dry run"
  PRESETS="tiny"; BATCH_tiny=4; STEPS="${STEPS:-3}"; WARMUP="${WARMUP:-1}"; CHECK_PRESET=tiny; NUM=48; SIDE=256
  FT_BATCH=2
fi

if [ -z "$OUT" ]; then
  OUT="$(mktemp -d "${TMPDIR:-/tmp}/mrm-bench-gpu.XXXXXX")"
  trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"
echo "== mrm-scale GPU benchmark on: $GPU ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
echo "== results in $OUT"

# -- 1. training step per preset ---------------------------------------------------------------------------
ORIGINAL="--original"  # the first preset also times the original MRM code's step beside ours (plain_over_original)
for P in $PRESETS; do
  B="BATCH_$P"; B="${!B}"
  echo "== [1] bench step: preset $P, batch $B, bf16, flash SDPA, $STEPS steps after $WARMUP warm-up ${ORIGINAL}"
  if timeout "$(cap 300)" "$PY" -m mrm_scale.cli bench step --device "$DEVICE" --preset "$P" --batch "$B" --precision bf16 \
      --sdpa flash --steps "$STEPS" --warmup "$WARMUP" $ORIGINAL 2>&1 | tee "$OUT/step_$P.log"; then
    tail -n 1 "$OUT/step_$P.log" > "$OUT/step_$P.json"
  else
    FAILED="$FAILED step_$P"
  fi
  ORIGINAL=""
done

# -- 2. CUDA paths: bf16 vs fp32 losses on the same weights, batch and masks --------------------------------
echo "== [2] loss agreement: preset $CHECK_PRESET, bf16 vs fp32 on $DEVICE"
timeout "$(cap 240)" "$PY" - "$DEVICE" "$CHECK_PRESET" "$OUT/losses.json" <<'PYEOF' || FAILED="$FAILED losses"
import json, sys

import copy

import torch

from mrm_scale.formats.tokenizer import TokenizerIdentity
from mrm_scale.model import build_model
from mrm_scale.model.flops import synthetic_batch

device, preset, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
torch.backends.cudnn.allow_tf32 = False
ids = TokenizerIdentity.canonical(30522).model_ids()
torch.manual_seed(0)
ref = build_model(preset, **ids, text_dropout=0.0).train()  # fp32 weights, built once; no dropout: same draws
batch = synthetic_batch(ref.cfg, 4, seed=0, device=device)


def run(dtype):
    m = copy.deepcopy(ref).to(device=device, dtype=dtype)  # the same weights, no second initialisation
    b = dict(batch, image=batch["image"].to(dtype))
    out = m(b, seed=7)  # same seed, same device: same patch and word masks
    out.loss.backward()
    finite = all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
    return out, {"image": float(out.image_loss.detach()), "report": float(out.report_loss.detach()),
                 "dtype": str(out.loss.dtype),
                 "finite_grads": finite}


out32, r32 = run(torch.float32)
out16, r16 = run(torch.bfloat16)
rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
checks = {"bf16_vs_fp32_image": rel(r16["image"], r32["image"]),
          "bf16_vs_fp32_report": rel(r16["report"], r32["report"])}
tol = 3e-2
same_masks = bool(torch.equal(out16.patch_mask, out32.patch_mask) and torch.equal(out16.token_mask, out32.token_mask))
ok = (all(v <= tol for v in checks.values()) and same_masks
      and all(r["dtype"] == "torch.float32" and r["finite_grads"] for r in (r16, r32)))
summary = {"preset": preset, "device": device, "fp32": r32, "bf16": r16, "rel_diff": checks, "tolerance": tol,
           "same_masks": same_masks, "ok": ok}
print(json.dumps(summary))
with open(out_path, "w") as f:
    json.dump(summary, f)
sys.exit(0 if ok else 1)
PYEOF

# -- 3. JPEG decode of synthetic shards on the GPU ----------------------------------------------------------
echo "== [3] prep $NUM synthetic records (${SIDE}px), then decode their JPEGs on $DEVICE"
timeout "$(cap 300)" "$PY" -m mrm_scale.cli prep --source synthetic --num "$NUM" --synthetic-size "$SIDE" --max-side "$SIDE" \
  --shard-size 64 --workers "$(nproc 2>/dev/null || echo 2)" --out "$OUT/shards" > "$OUT/prep.log" 2>&1 \
  || { tail -n 20 "$OUT/prep.log" >&2; FAILED="$FAILED prep"; }
timeout "$(cap 180)" "$PY" - "$DEVICE" "$OUT/shards" "$OUT/decode.json" <<'PYEOF' || FAILED="$FAILED decode"
import glob, json, os, statistics, sys, time

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mrm_scale.formats import shards as sf

device, shards, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
datas = []
for tar in sorted(glob.glob(os.path.join(shards, "train-*.tar"))):
    for _, parts in sf.iter_tar_samples(tar):
        datas.append(torch.frombuffer(bytearray(parts["jpg"]), dtype=torch.uint8))
mb = sum(d.numel() for d in datas) / 2**20


def timed(fn, runs=3):
    fn()  # warm-up (CUDA context, nvJPEG handles)
    ts = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def gpu_decode():
    try:
        return decode_jpeg(datas, mode=ImageReadMode.UNCHANGED, device="cuda")  # batched nvJPEG
    except TypeError:  # torchvision < 0.19 decodes one image per call on the GPU
        return [decode_jpeg(d, mode=ImageReadMode.UNCHANGED, device="cuda") for d in datas]


cpu_s, cpu_imgs = timed(lambda: [decode_jpeg(d, mode=ImageReadMode.UNCHANGED) for d in datas])
res = {"images": len(datas), "jpeg_mib": round(mb, 2), "cpu_images_per_s": round(len(datas) / cpu_s, 1),
       "cpu_threads": torch.get_num_threads()}
ok = len(datas) > 0
if device == "cuda":
    gpu_s, gpu_imgs = timed(gpu_decode)
    diffs = [(g.cpu().int() - c.int()).abs().float().mean().item() for g, c in zip(gpu_imgs, cpu_imgs)]
    same_shape = all(tuple(g.shape) == tuple(c.shape) for g, c in zip(gpu_imgs, cpu_imgs))
    res.update(gpu_images_per_s=round(len(datas) / gpu_s, 1), gpu_vs_cpu_speedup=round(cpu_s / gpu_s, 2),
               mean_abs_pixel_diff=round(max(diffs), 3), same_shapes=same_shape)
    ok = ok and same_shape and max(diffs) < 2.0  # nvJPEG and libjpeg-turbo differ by rounding only
res["ok"] = bool(ok)
print(json.dumps(res))
with open(out_path, "w") as f:
    json.dump(res, f)
sys.exit(0 if ok else 1)
PYEOF

# -- 4. the paper's fine-tuning step ------------------------------------------------------------------------
echo "== [4] bench finetune: preset $CHECK_PRESET at 224 px, batch $FT_BATCH, the mrm-paper step and scoring"
if timeout "$(cap 180)" "$PY" -m mrm_scale.cli bench finetune --device "$DEVICE" --preset "$CHECK_PRESET" \
    --batch "$FT_BATCH" --steps 3 --skip-decode 2>&1 | tee "$OUT/finetune.log"; then
  tail -n 1 "$OUT/finetune.log" > "$OUT/finetune.json"
else
  FAILED="$FAILED finetune"
fi

# -- table -------------------------------------------------------------------------------------------------
"$PY" - "$OUT" "$GPU" "$(( $(date +%s) - START ))" "$PRESETS" "${FAILED:-}" <<'PYEOF'
import glob, json, os, sys

out, gpu, secs, presets, failed = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5].split()


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


rows = []
for p in presets:
    r = load(f"step_{p}.json")
    rows.append((f"step {p} bf16 (flash SDPA)", "FAILED (see step_%s.log)" % p if r is None else
                 f"batch {r['batch']}: {r['samples_per_s']:.1f} samples/s, {r['achieved_gflop_s'] / 1e3:.2f} TFLOP/s, "
                 f"MFU {r['mfu']:.3f} (peak {r['peak_gflop_s'] / 1e3:.1f} TFLOP/s, {r['peak_matmul']} matmul)"
                 + (f"; the original code's step: {r['original']['samples_per_s']:.1f} samples/s, ours "
                    f"{r['plain_over_original']:.2f}x" if "original" in r else "")))
loss = load("losses.json")
if loss is None:
    rows.append(("losses bf16 vs fp32", "FAILED"))
else:
    d = loss["rel_diff"]
    rows.append((f"losses bf16 vs fp32 ({loss['preset']}, {loss['device']})",
                 f"rel. diff image {d['bf16_vs_fp32_image']:.1e}, report {d['bf16_vs_fp32_report']:.1e}, same masks "
                 f"{loss['same_masks']} -> {'ok' if loss['ok'] else 'FAILED'} (tolerance {loss['tolerance']})"))
dec = load("decode.json")
if dec is None:
    rows.append(("decode_jpeg synthetic shards", "FAILED"))
else:
    gpu_dec = (f"GPU {dec['gpu_images_per_s']:.0f} img/s ({dec['gpu_vs_cpu_speedup']:.1f}x CPU), max mean |diff| "
               f"{dec['mean_abs_pixel_diff']:.2f} -> {'ok' if dec['ok'] else 'FAILED'}"
               if "gpu_images_per_s" in dec else "GPU not run (cpu dry run)")
    rows.append((f"decode_jpeg {dec['images']} JPEGs", f"CPU {dec['cpu_images_per_s']:.0f} img/s "
                 f"({dec['cpu_threads']} threads); {gpu_dec}"))
ft = load("finetune.json")
if ft is None or "step" not in ft:
    rows.append(("mrm-paper fine-tune step", "FAILED (see finetune.log)"))
else:
    st = ft["step"]
    rows.append((f"mrm-paper fine-tune step ({st['preset']}, 224 px)",
                 f"batch {st['batch']}: train {st['train_images_per_s']:.1f} img/s ({st['train_tflop_s']:.2f} TFLOP/s, "
                 f"{st['train_fraction_of_peak']:.2f} of the bf16 matmul), score {st['score_images_per_s']:.1f} img/s"))
w = max(len(a) for a, _ in rows)
print(f"\nmrm-scale GPU benchmark - {gpu} - {secs} s")
print(f"{'measurement':<{w}} | result")
print(f"{'-' * w}-+-{'-' * 60}")
for a, b in rows:
    print(f"{a:<{w}} | {b}")
if failed:
    print(f"FAILED: {' '.join(failed)}")
PYEOF
[ -z "$FAILED" ]

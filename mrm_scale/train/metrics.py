"""Metrics: TensorBoard (rank 0), console progress line, throughput/MFU accounting and the visualisations.
The logged losses are the mean over all ranks (the whole global batch), not rank 0's share.

Scalars: ``loss/total``, ``loss/image``, ``loss/report``, ``lr``, ``grad_norm``, ``throughput/samples_per_s``,
``throughput/tflops_per_device``, ``throughput/mfu``, ``time/data_wait_fraction``, ``memory/max_allocated_gb``,
``train/bad_steps``. Every ``--vis-every`` steps: image ``vis/reconstruction`` (input | masked |
reconstruction, one row per sample) and text ``vis/report`` (masked report, targets and predictions); then and at
the end the image-use probe's ``report/loss_own_image``, ``report/loss_shuffled_image``, ``report/image_gain``,
``report/masked_accuracy`` (and ``..._finding_words`` on the synthetic corpus).
"""

from __future__ import annotations

import os
import time

import torch

from mrm_scale.model.diagnostics import IMAGE_USE_KEYS

# Dense bf16 peak TFLOP/s per device, by a substring of the device name (vendor data sheets).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "L40": 181.0, "A10G": 125.0, "A10": 125.0, "L4": 121.0, "V100": 125.0, "B200": 2250.0}


def measure_matmul_tflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 0.5) -> float:
    """Achieved TFLOP/s of a large square matmul in ``dtype`` on this device (the practical peak)."""
    g = torch.Generator().manual_seed(0)  # its own generator: measuring must not move the training RNG streams
    a = torch.rand(n, n, generator=g).to(device, dtype)
    b = torch.rand(n, n, generator=g).to(device, dtype)
    a @ b  # warm-up
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or runs < 2:
        a @ b
        runs += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - t0) / 1e12


def device_peak_tflops(device: str, dtype: torch.dtype, given: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from)."""
    if given:
        return given, "--peak-tflops"
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for k, v in KNOWN_PEAK_TFLOPS.items():
            if k in name:
                return (v if dtype == torch.bfloat16 else v / 2), f"data sheet ({name})"
    return measure_matmul_tflops(dtype, device), "measured matmul"


def max_memory_gb() -> float:
    from deepspeed.accelerator import get_accelerator

    try:
        return float(get_accelerator().max_memory_allocated()) / 2**30
    except Exception:  # an accelerator without memory statistics
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Metrics:
    """Rank-0 TensorBoard writer plus the console line; other ranks get a silent instance."""

    def __init__(self, run_dir: str, rank: int, flops_per_sample: float, peak_tflops: float, world_size: int):
        self.rank, self.world = rank, world_size
        self.flops, self.peak = flops_per_sample, peak_tflops
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def step(self, step: int, max_steps: int, values: dict, samples: int, seconds: float, wait: float,
             console: bool) -> None:
        if self.rank != 0:
            return
        sps = samples / max(seconds, 1e-9)
        tflops = self.flops * sps / self.world / 1e12
        scalars = {
            "loss/total": values["loss"], "loss/image": values["image_loss"], "loss/report": values["report_loss"],
            "lr": values["lr"], "grad_norm": values["grad_norm"], "throughput/samples_per_s": sps,
            "throughput/tflops_per_device": tflops, "throughput/mfu": tflops / self.peak if self.peak else 0.0,
            "time/data_wait_fraction": wait / max(seconds, 1e-9), "memory/max_allocated_gb": max_memory_gb(),
            "train/bad_steps": values["bad_steps"],
        }
        for k, v in scalars.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)
        if console:
            rep = "" if values["report_loss"] is None else f" rep {values['report_loss']:.3f}"
            print(f"step {step:>6}/{max_steps} | loss {values['loss']:.4f} (img {values['image_loss']:.3f}{rep}) | "
                  f"lr {values['lr']:.2e} | {sps:7.1f} samples/s | mfu {scalars['throughput/mfu']:.3f} | "
                  f"data wait {100 * scalars['time/data_wait_fraction']:.0f}%", flush=True)

    def visualise(self, step: int, model_cfg, batch: dict, out, decode) -> None:
        if self.rank != 0:
            return
        self.writer.add_image("vis/reconstruction", reconstruction_grid(model_cfg, batch, out), step)
        if out.token_mask is not None:
            self.writer.add_text("vis/report", report_text(batch, out, decode), step)

    def image_use(self, step: int, res: dict | None) -> None:
        """``report/*`` scalars of the image-use probe (see :mod:`mrm_scale.train.image_use`)."""
        if self.rank != 0 or not res:
            return
        for key in IMAGE_USE_KEYS:
            if res.get(key) is not None:
                self.writer.add_scalar(f"report/{key}", float(res[key]), step)

    def mix(self, step: int, drawn: dict[str, int], world_size: int) -> None:
        """Samples drawn per source of a mixed run, over all ranks (every rank draws the same counts):
        ``data/samples/<name>`` and ``data/share/<name>``."""
        if self.rank != 0 or not drawn:
            return
        total = sum(drawn.values()) or 1
        for name, n in drawn.items():
            self.writer.add_scalar(f"data/samples/{name}", n * world_size, step)
            self.writer.add_scalar(f"data/share/{name}", n / total, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


@torch.no_grad()
def reconstruction_grid(cfg, batch: dict, out, max_rows: int = 4) -> torch.Tensor:
    """(3, H, W) uint8-range float image: per sample, input | masked input | reconstruction (visible patches
    pasted back), all at the high resolution, channel 0, de-normalised to [0, 1] by min/max."""
    from mrm_scale.model import patchify, unpatchify

    img = batch["image"][:max_rows, :1].float()
    p = cfg.out_patch_size
    target = patchify(batch["image"][:max_rows].float(), p)
    pred = out.pred_pixels[:max_rows].float()
    if cfg.norm_pix_loss:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    mask = out.patch_mask[:max_rows].float().unsqueeze(-1)
    grid = (cfg.img_size // p,) * 2
    channels = batch["image"].shape[1]
    masked = unpatchify(target * (1 - mask), p, channels, grid)[:, :1]
    recon = unpatchify(pred * mask + target * (1 - mask), p, channels, grid)[:, :1]
    rows = torch.cat([img, masked, recon], dim=3)  # B, 1, H, 3W
    lo, hi = rows.amin(dim=(1, 2, 3), keepdim=True), rows.amax(dim=(1, 2, 3), keepdim=True)
    rows = ((rows - lo) / (hi - lo + 1e-6)).clamp(0, 1)
    return torch.cat(list(rows), dim=1).repeat(3, 1, 1)  # 3, B*H, 3W


def report_text(batch: dict, out, decode, max_rows: int = 4) -> str:
    """Markdown: for each sample, the report with masked words marked, and the model's predictions."""
    lines = []
    for i in range(min(max_rows, len(batch["key"]))):
        att = batch["attention_mask"][i].bool().cpu()
        ids = batch["input_ids"][i].cpu()[att]
        mask = out.token_mask[i].cpu()[att]
        pred = out.report_pred_ids[i].cpu()[att]
        shown = [f"**[{decode([int(t)])}]**" if m else decode([int(t)]) for t, m in zip(ids, mask)]
        guess = [f"**[{decode([int(t)])}]**" if m else decode([int(t)]) for t, m in zip(pred, mask)]
        lines.append(f"`{batch['key'][i]}`  \nmasked: {' '.join(shown)}  \npredicted: {' '.join(guess)}")
    return "\n\n".join(lines)

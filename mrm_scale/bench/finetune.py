"""``mrm-scale bench finetune``: what a run of ``--recipe mrm-paper`` costs per image, on this machine.

Two figures the README's run-time estimates are built from:

- **decode**: milliseconds per image on one core for each official format through the fine-tuning dataset
  (:class:`mrm_scale.eval.datasets.ImageDataset`: read, decode, window, crop, resize to 224, normalise), eval
  transform and training transform: NIH ChestX-ray14 (1024 x 1024 8-bit PNG), CheXpert-small (390 x 320 JPEG),
  RSNA (1024 x 1024 DICOM, JPEG-baseline compressed as the Kaggle files; the real sample from
  ``../shared/realdata`` when present, else an uncompressed synthetic one), COVID (JPEG at 512 px). The synthetic
  images are smooth radiograph-like fields with noise, so PNG and JPEG compress as real ones roughly do.
- **step**: one fine-tuning step of the paper's model (ViT-B/16 at 224 px with the ``fc_norm`` head, SGD with
  momentum, clipping at 1, bf16 autocast): images/s and achieved TFLOP/s (3 x 35.1 GFLOP per image), against a
  square bf16 matmul measured in the same run, and the forward-only rate of scoring.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

REAL_DICOM = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "realdata", "dicom",
                          "siim-acr-cxr-sample.dcm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="base", help="model preset of the step (the paper's: base)")
    p.add_argument("--batch", type=int, default=8, help="images per timed step (the recipe's 96 on a GPU)")
    p.add_argument("--steps", type=int, default=4, help="timed steps (median reported)")
    p.add_argument("--images", type=int, default=12, help="decodes per format and transform (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--skip-step", action="store_true", help="decode figures only")
    p.add_argument("--skip-decode", action="store_true", help="step figures only (no PIL/pydicom work)")


def _field(shape, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    base = 120 + 60 * np.sin(x / w * 3.1) * np.cos(y / h * 2.3) + 30 * np.exp(-((x - w / 2) ** 2) / (w * w / 20))
    return np.clip(base + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)


def make_images(folder: str) -> dict[str, str]:
    """One image per official format under ``folder``: name -> path."""
    from PIL import Image

    out = {}
    out["nih_png_1024"] = os.path.join(folder, "nih.png")
    Image.fromarray(_field((1024, 1024), 0), "L").save(out["nih_png_1024"])
    out["chexpert_jpeg_390x320"] = os.path.join(folder, "chexpert.jpg")
    Image.fromarray(_field((390, 320), 1), "L").save(out["chexpert_jpeg_390x320"], quality=95)
    out["covid_jpeg_512"] = os.path.join(folder, "covid.jpg")
    Image.fromarray(_field((512, 430), 2), "L").save(out["covid_jpeg_512"], quality=90)
    if os.path.isfile(REAL_DICOM):
        out["rsna_dicom_1024_jpeg"] = os.path.abspath(REAL_DICOM)
    else:
        out["rsna_dicom_1024_raw"] = os.path.join(folder, "rsna.dcm")
        _write_dicom(out["rsna_dicom_1024_raw"], _field((1024, 1024), 3))
    return out


def _write_dicom(path, arr) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fm = FileMetaDataset()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(path, {}, file_meta=fm, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)


def decode_ms(images: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    import numpy as np
    import torch

    from mrm_scale.eval.datasets import ImageDataset, LabelledSet
    from mrm_scale.eval.recipes import TORCHVISION_CROP_SCALE

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker = one core
    out = {}
    try:
        for name, path in images.items():
            data = LabelledSet(name, [f"{name}-{i}" for i in range(n)], np.zeros((n, 1), np.float32), ["x"],
                               [path] * n)
            row = {}
            for how, augment in (("eval", False), ("train", True)):
                ds = ImageDataset(data, 224, 3, augment=augment, crop_scale=TORCHVISION_CROP_SCALE)
                ds[0]
                times = []
                for i in range(n):
                    t0 = time.perf_counter()
                    ds[i]
                    times.append((time.perf_counter() - t0) * 1e3)
                row[how] = round(statistics.median(times), 2)
            out[name] = row
    finally:
        torch.set_num_threads(threads)
    return out


def step_figures(args) -> dict:
    import torch

    from mrm_scale.bench.step import PeakMatmul, _sync
    from mrm_scale.eval.probe import Classifier, layer_decay_groups, masked_bce
    from mrm_scale.eval.recipes import paper_recipe
    from mrm_scale.model import get_preset
    from mrm_scale.model.flops import encoder_forward_flops

    device = torch.device(args.device)
    r = paper_recipe("nih", 1)
    cfg = get_preset(args.preset).replace(img_size=224, sr_scale=1, pos_embed="learned", drop_path=r.drop_path,
                                          report_weight=0.0)
    model = Classifier(cfg, 14, head=r.head, head_init_std=r.head_init_std).to(device)
    opt = torch.optim.SGD(layer_decay_groups(model, r.lr, 0.0, None), lr=r.lr, momentum=r.momentum)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224, generator=gen).to(device)
    y = (torch.rand(args.batch, 14, generator=gen) < 0.2).float().to(device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)

    def train_step():
        with torch.autocast(**amp):
            loss = masked_bce(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def score():
        with torch.autocast(**amp):
            model(x)

    peak = PeakMatmul(2048 if device.type == "cpu" else 8192, torch.bfloat16, device)
    res = {}
    for name, fn in (("train", train_step), ("score", score)):
        model.train(name == "train")
        fn()
        times = []
        for _ in range(args.steps):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            peak.sample(2)
        res[name] = statistics.median(times)
    fwd = encoder_forward_flops(cfg)
    train_rate = args.batch / res["train"]
    score_rate = args.batch / res["score"]
    achieved = 3 * fwd * train_rate / 1e12
    sig = lambda v: float(f"{v:.4g}")  # noqa: E731 - four significant digits, whatever the scale
    return {"preset": cfg.name, "batch": args.batch, "device": str(device),
            "train_images_per_s": sig(train_rate), "score_images_per_s": sig(score_rate),
            "train_tflop_s": sig(achieved), "score_tflop_s": sig(fwd * score_rate / 1e12),
            "peak_bf16_matmul_tflop_s": sig(peak.median / 1e3),
            "train_fraction_of_peak": sig(achieved / (peak.median / 1e3)),
            "forward_gflop_per_image": sig(fwd / 1e9)}


def run(args: argparse.Namespace) -> int:
    out = {}
    if not args.skip_decode:
        with tempfile.TemporaryDirectory() as tmp:
            images = make_images(tmp)
            dec = decode_ms(images, args.images)
        for name, row in dec.items():
            print(f"decode {name:24s} eval {row['eval']:7.2f} ms  train {row['train']:7.2f} ms  (one core)",
                  flush=True)
        out["decode_ms_per_image_one_core"] = dec
    if not args.skip_step:
        step = step_figures(args)
        print(f"step {step['preset']} x{step['batch']} on {step['device']}: train {step['train_images_per_s']} img/s "
              f"({step['train_tflop_s']} TFLOP/s, {step['train_fraction_of_peak']:.0%} of a "
              f"{step['peak_bf16_matmul_tflop_s']} TFLOP/s bf16 matmul), score {step['score_images_per_s']} img/s",
              flush=True)
        out["step"] = step
    print(json.dumps(out))
    return 0

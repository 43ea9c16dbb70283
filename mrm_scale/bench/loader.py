"""``mrm-scale bench loader``: samples/s of the streaming loader, optionally against the paper's input pipeline.

The baseline is the original MRM way, written plainly here: a CSV (``image_path,report_content``) of the
images the shards were made from, per-file PIL decode, torchvision RandomResizedCrop(S, scale 0.2–1,
bicubic) + flip + grayscale to 3 channels + normalise, per-sample tokenisation with the shards'
``tokenizer.json`` and a Python per-token loop for 50% whole-word masking, in a torch ``DataLoader`` with
the same number of workers and batch size (workers kept across epochs on both sides). ``--export-baseline
DIR`` writes such a CSV (and the images) from the shards themselves. Both sides produce full batches of the
same size from the same number of workers; the timed runs alternate (loader, baseline, loader, ...) so
that both see the same load on a shared machine, each run starting its workers afresh and excluding
``--warmup`` batches. Each side reports the median of ``--runs`` timed runs of ``--batches`` batches;
``ratio`` is the ratio of the medians, ``ratio_runs`` the per-round ratios (``ratio_paired_median`` their
median). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from mrm_scale.formats.tokenizer import CLS, MASK, PAD, SEP, SPECIAL_TOKENS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="shard folder written by `mrm-scale prep`")
    p.add_argument("--split", default="train")
    p.add_argument("--backend", choices=("dali", "wds"), default="dali")
    p.add_argument("--workers", type=int, default=2, help="wds: worker processes; dali: threads; baseline: workers")
    p.add_argument("--batches", type=int, default=20, help="timed batches per run")
    p.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--device", default="cpu", help="dali: cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", metavar="CSV", help="CSV with image_path,report_content: time the paper's loader too")
    p.add_argument("--mix", metavar="NAME=WEIGHT,...",
                   help="also time a weighted mix of shard sets (or a mix file), same batch size, workers per "
                        "source: the mixer's cost against --shards alone (mix_ratio)")
    p.add_argument("--export-baseline", metavar="DIR",
                   help="write DIR/baseline.csv + DIR/images/ from the shards and use it as --baseline")


# ------------------------------------------------------------------------------------------- baseline

def export_baseline(shards: str, split: str, out: str) -> str:
    """Write the shards' images (as stored) and reports to ``out/images`` + ``out/baseline.csv``."""
    import csv

    from mrm_scale.formats import shards as sf

    manifest = sf.read_manifest(shards)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    path = os.path.join(out, "baseline.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "report_content"])
        for e in manifest["splits"][split]["shards"]:
            for key, parts in sf.iter_tar_samples(os.path.join(shards, e["tar"])):
                rel = os.path.join("images", f"{key}.jpg")
                with open(os.path.join(out, rel), "wb") as g:
                    g.write(parts["jpg"])
                w.writerow([rel, parts.get("txt", b"").decode("utf-8")])
    return path


class PaperDataset:
    """The original per-file, per-sample, per-token input pipeline (a map-style dataset)."""

    def __init__(self, csv_path: str, tokenizer_json: str, image_size: int, max_tokens: int):
        import csv

        from PIL import Image
        from tokenizers import Tokenizer
        from torchvision import transforms as T

        from mrm_scale.data import transforms

        root = os.path.dirname(os.path.abspath(csv_path))
        with open(csv_path, newline="", encoding="utf-8") as f:
            self.rows = [(os.path.join(root, r["image_path"]), r["report_content"]) for r in csv.DictReader(f)]
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.max_tokens = max_tokens
        self.ids = {t: self.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        self.transform = T.Compose([
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.Grayscale(num_output_channels=3),
            T.ToTensor(),
            T.Normalize([transforms.IMAGE_MEAN] * 3, [transforms.IMAGE_STD] * 3),
        ])
        self._open = Image.open

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        import random

        import torch

        path, report = self.rows[i]
        image = self.transform(self._open(path).convert("RGB"))
        enc = self.tokenizer.encode(report, add_special_tokens=False)
        tokens = enc.tokens[: self.max_tokens - 2]
        ids = [self.ids[CLS], *enc.ids[: self.max_tokens - 2], self.ids[SEP]]
        masked, targets = list(ids), [-100] * len(ids)
        mask_word = False
        for j, tok in enumerate(tokens, start=1):  # whole-word masking, one token at a time
            if not tok.startswith("##"):
                mask_word = random.random() < 0.5
            if mask_word:
                targets[j] = ids[j]
                masked[j] = self.ids[MASK]
        pad = self.max_tokens - len(ids)
        attention = [1] * len(ids) + [0] * pad
        masked += [self.ids[PAD]] * pad
        targets += [-100] * pad
        ids += [self.ids[PAD]] * pad
        return {"image": image, "input_ids": torch.tensor(ids), "masked_ids": torch.tensor(masked),
                "labels": torch.tensor(targets), "attention_mask": torch.tensor(attention)}


class PaperLoader:
    """The baseline's ``DataLoader``, with ``close()`` to stop its workers between timed runs.

    Its workers persist across epochs (``persistent_workers``), as the streaming loader's do, so that
    neither side pays worker start-up inside an epoch chain; the baseline is, if anything, favoured.
    """

    def __init__(self, dataset, **kwargs):
        self.dataset, self.kwargs, self.loader = dataset, kwargs, None

    def __iter__(self):
        import torch

        if self.loader is None:
            self.loader = torch.utils.data.DataLoader(self.dataset, **self.kwargs)
        return iter(self.loader)

    def close(self) -> None:
        loader, self.loader = self.loader, None
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# --------------------------------------------------------------------------------------------- timing

def _endless(loader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the loader yielded no batch")


def time_batches(loader, batch_size: int, warmup: int, batches: int, runs: int) -> list[float]:
    """samples/s of ``runs`` timed runs over one endless iteration (epochs chained, warm-up excluded)."""
    it = _endless(loader)
    try:
        for _ in range(warmup):
            next(it)
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            rates.append(batches * batch_size / (time.perf_counter() - t0))
    finally:
        it.close()  # ends the iteration (a plain DataLoader's workers stop with it)
    return rates


def time_interleaved(sides: dict, batch_size: int, warmup: int, batches: int, runs: int) -> dict[str, list[float]]:
    """Rounds of one timed run per side (A, B, A, B, ...), so that both sides see the same machine load.

    Each run iterates afresh (loaders continue where they stopped: mid-epoch resume) and drops its
    ``warmup`` first batches from the timing; its iterator (and the loader's workers) are closed before the
    other side runs, so no worker of one side computes while the other is timed.
    """
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, loader in sides.items():
            rates[name] += time_batches(loader, batch_size, warmup, batches, 1)
            close = getattr(loader, "close", None)  # workers kept across epochs (wds) stop too
            if close is not None:
                close()
    return rates


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    from mrm_scale.data.loader import LoaderConfig, LoaderError, build_loader
    from mrm_scale.formats import shards as sf
    from mrm_scale.formats.tokenizer import TokenizerIdentity

    try:
        manifest = sf.read_manifest(args.shards)
        cfg = LoaderConfig(shards=args.shards, split=args.split, backend=args.backend, batch_size=args.batch_size,
                           image_size=args.image_size, max_tokens=int(manifest["max_tokens"]), workers=args.workers,
                           seed=args.seed, device=args.device, augment=True, shuffle=True)
        loader = build_loader(cfg, rank=0, world_size=1)
        mixed = None
        if args.mix:
            import dataclasses

            from mrm_scale.data.mixing import parse_mix

            mixed = build_loader(dataclasses.replace(cfg, mix=[m.to_dict() for m in parse_mix(args.mix)]), 0, 1)
    except (LoaderError, sf.ManifestError) as e:
        print(f"mrm-scale bench loader: error: {e}", file=sys.stderr)
        return 2
    result = {"bench": "loader", "backend": args.backend, "workers": args.workers, "batch_size": args.batch_size,
              "image_size": args.image_size, "batches": args.batches, "runs": args.runs, "device": args.device}
    sides = {"loader": loader}
    if mixed is not None:
        sides["mix"] = mixed
        result["mix"] = [[name, round(m.weight, 4)] for name, m in zip(mixed.loaders, mixed.sources)]
    csv_path = args.baseline
    if args.export_baseline:
        csv_path = export_baseline(args.shards, args.split, args.export_baseline)
        print(f"baseline CSV written: {csv_path}")
    if csv_path:
        ds = PaperDataset(csv_path, TokenizerIdentity.from_dict(manifest["tokenizer"]).path(args.shards),
                          args.image_size, int(manifest["max_tokens"]))
        if len(ds) < args.batch_size:
            print(f"mrm-scale bench loader: error: {csv_path} lists {len(ds)} rows, fewer than one batch",
                  file=sys.stderr)
            return 2
        sides["baseline"] = PaperLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                        drop_last=True, persistent_workers=args.workers > 0)
    load0 = _loadavg()
    rates = time_interleaved(sides, args.batch_size, args.warmup, args.batches, args.runs)
    result["samples_per_s"] = round(statistics.median(rates["loader"]), 2)
    result["runs_samples_per_s"] = [round(r, 2) for r in rates["loader"]]
    print(f"{args.backend}: {result['samples_per_s']:.1f} samples/s (runs: {result['runs_samples_per_s']})")
    if "mix" in rates:
        result["mix_samples_per_s"] = round(statistics.median(rates["mix"]), 2)
        result["mix_runs_samples_per_s"] = [round(r, 2) for r in rates["mix"]]
        result["mix_ratio"] = round(result["mix_samples_per_s"] / result["samples_per_s"], 3)
        print(f"mix {args.mix}: {result['mix_samples_per_s']:.1f} samples/s; {result['mix_ratio']:.2f}x of "
              f"--shards alone")
    if "baseline" in rates:
        base = rates["baseline"]
        result["baseline_samples_per_s"] = round(statistics.median(base), 2)
        result["baseline_runs_samples_per_s"] = [round(r, 2) for r in base]
        result["ratio"] = round(result["samples_per_s"] / result["baseline_samples_per_s"], 3)
        result["ratio_runs"] = [round(a / b, 3) for a, b in zip(rates["loader"], base)]  # per round
        result["ratio_paired_median"] = round(statistics.median(result["ratio_runs"]), 3)
        print(f"baseline (paper's loader): {result['baseline_samples_per_s']:.1f} samples/s; "
              f"ratio {result['ratio']:.2f}x (per round: {result['ratio_runs']})")
    result["loadavg"] = [load0, _loadavg()]  # 1-minute load before / after: other work on the machine
    print(json.dumps(result))
    return 0

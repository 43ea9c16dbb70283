"""The image-use probe of a run: how much the report branch gains from the image, on a fixed batch.

One batch of the val split (the first ``--image-use-samples`` records in shard order, resized without
augmentation; the train split when the shards have no val records) is read once at start. Every ``--vis-every``
steps and at the end, every rank (ZeRO-3 needs all of them in a forward) scores it twice in eval mode with one
fixed seed — own images, then images rolled by one — with :func:`mrm_scale.model.diagnostics.image_use`; rank 0
logs ``report/loss_own_image``, ``report/loss_shuffled_image``, ``report/image_gain``, ``report/masked_accuracy``
and, on the synthetic corpus (whose finding words are known), the same restricted to the words that name a
finding, a side or a severity (``..._finding_words``). The last figures go into the run's final line and
``<run>/image_use.json``; the export's model card quotes them.
"""

from __future__ import annotations

import os

import torch

from mrm_scale.data.loader import LoaderConfig, build_loader
from mrm_scale.formats import files
from mrm_scale.formats.run_record import IMAGE_USE
from mrm_scale.model.diagnostics import image_use

SEED = 20230501  # the probe's mask seed: the same masks at every step, so the curve shows the model, not the draw


class ImageUseProbe:
    def __init__(self, run, to_device):
        self.run = run
        self.batch = None
        self.words = None
        self.split = None
        n = int(run.args.train.image_use_samples or 0)
        if n <= 0 or not run.model_cfg.has_report_head:
            return
        splits = run.manifest.get("splits", {})
        self.split = "val" if splits.get("val", {}).get("samples") else "train"
        n = min(n, int(splits.get(self.split, {}).get("samples") or 0))
        if n < 2:  # a shuffled image needs a second record
            self.split = None
            return
        cfg = LoaderConfig(shards=run.shards, split=self.split, backend="wds", batch_size=n,
                           image_size=run.model_cfg.img_size, channels=run.model_cfg.in_chans,
                           max_tokens=run.model_cfg.max_tokens, workers=0, shuffle=False, augment=False)
        with torch.random.fork_rng(devices=[]):  # reading the batch must not move the training RNG (resume)
            loader = build_loader(cfg)
            try:
                batch = next(iter(loader))
            finally:
                getattr(loader, "close", lambda: None)()
        self.words = _finding_word_positions(run, batch)
        self.batch = to_device(batch)

    @property
    def active(self) -> bool:
        return self.batch is not None

    def measure(self, engine) -> dict | None:
        if not self.active:
            return None
        module = engine.module
        was_training = module.training
        module.eval()
        try:
            res = image_use(module, self.batch, SEED, self.words)
        finally:
            module.train(was_training)
        return {**res, "split": self.split}

    def save(self, step: int, res: dict | None) -> None:
        if res is None or not self.run.is_main:
            return
        files.write_json(os.path.join(self.run.run_dir, IMAGE_USE), {"step": step, **res})


def _finding_word_positions(run, batch) -> torch.Tensor | None:
    """The synthetic corpus' finding words in the probe batch (None for other corpora: their words are unknown)."""
    if (run.manifest.get("source") or {}).get("kind") != "synthetic":
        return None
    from tokenizers import Tokenizer

    from mrm_scale.data.synthetic import finding_word_positions

    return finding_word_positions(Tokenizer.from_file(run.tokenizer.path(run.shards)), batch)


def summary_line(res: dict | None) -> str | None:
    if not res:
        return None
    line = (f"image use ({res['samples']} {res['split']} records, {res['masked_tokens']} masked tokens): report loss "
            f"{res['loss_own_image']:.3f} with the own image, {res['loss_shuffled_image']:.3f} with another, "
            f"image gain {res['image_gain']:+.3f} nats/token, masked accuracy {res['masked_accuracy']:.3f}")
    if res.get("image_gain_finding_words") is not None:
        line += (f"; finding words ({res['masked_finding_tokens']} tokens): gain "
                 f"{res['image_gain_finding_words']:+.3f}, accuracy {res['masked_accuracy_finding_words']:.3f}")
    return line

"""WebDataset backend: ``webdataset`` tar streaming + torch ``DataLoader`` worker processes.

Each rank's sample range of the epoch plan (:mod:`mrm_scale.data.loader`) is split into W contiguous worker
ranges, from our own rank/world size (``torch.distributed`` need not be initialised). A worker reads the
tars overlapping its range with webdataset's tar iterators (local paths, brace patterns, ``pipe:`` and
other webdataset URLs), shuffles within a seeded buffer, decodes and augments (PIL: RandomResizedCrop
with torchvision's parameter rule, bicubic, horizontal flip, normalise; the random numbers come from
(seed, epoch, key), so a sample's augmentation does not depend on rank or worker) and collates full
batches itself. The ``DataLoader`` returns worker batches in order, round robin; every worker delivers the
same number of batches, so batch i of the epoch is batch i // W of worker i % W — deterministic.

Resume: every batch reports how many raw samples its worker has consumed; the state keeps those positions
and a restored worker skips that many raw samples (read, not decoded). Worker slots are rotated so that
the first batch after the restore comes from the worker whose turn it is.

Bad data: a sample that does not decode (or has malformed token members) is skipped, logged with shard
and key, and counted; the unreadable rest of a truncated tar is counted from the manifest's sample
counts. A worker whose range ran short re-reads its range (new shuffle) to fill its quota.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mrm_scale.data import shardformat as sf
from mrm_scale.data.loader import (
    TAG_AUGMENT, TAG_RESAMPLE, TAG_WDS_SHUFFLE, LoaderError, ShardDataError, StreamingLoader, key_hash, labels_value,
    reader_quota, seed_for, segments, shard_order, split_range, token_tensors,
)

log = logging.getLogger("mrm_scale.data.loader")

MAX_EVENTS = 1000  # bad-sample records kept on the loader


# ------------------------------------------------------------------------------------------ transforms

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop: the rule torchvision uses (10 tries, then a centre crop)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_image(data: bytes, key: str, size: int, augment: bool, seed: int, epoch: int,
                 scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """JPEG bytes -> normalised float32 (size, size) array (train: random crop + flip; else centre crop)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        gray = im if im.mode == "L" else im.convert("L")
        width, height = gray.size
        if augment:
            rng = np.random.default_rng([seed & 0xFFFFFFFF, TAG_AUGMENT, epoch, key_hash(key)])
            x, y, w, h = random_resized_crop_box(width, height, rng, scale, ratio)
            out = gray.resize((size, size), Image.BICUBIC, box=(x, y, x + w, y + h))
            if rng.random() < 0.5:
                out = out.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # resize the shorter side to `size`, centre crop
            short = min(width, height)
            x, y = (width - short) / 2, (height - short) / 2
            out = gray.resize((size, size), Image.BICUBIC, box=(x, y, x + short, y + short))
    arr = np.asarray(out, dtype=np.float32)
    arr *= 1.0 / (255.0 * sf.IMAGE_STD)
    arr -= sf.IMAGE_MEAN / sf.IMAGE_STD
    return arr


# ------------------------------------------------------------------------------------------- streaming

class _Counters:
    def __init__(self, bad: int = 0):
        self.bad = bad  # samples that did not decode (not re-counted when a resume skips them)
        self.missing = 0  # samples lost to unreadable tar ends (re-counted by the replay on resume)
        self.events: list[tuple[str, str, str]] = []

    def record(self, shard: str, key: str, why: str) -> None:
        self.events.append((shard, key, why))


def read_segment(url: str, start: int, stop: int, counters: _Counters, first_pass: bool = True) -> Iterator[dict]:
    """Samples ``start <= i < stop`` of a tar (earlier ones are read, not decoded) through webdataset's tar
    stages; a tar that ends early (truncated, unreadable) has its missing samples counted (on the first
    pass over it)."""
    import webdataset as wds
    from webdataset import tariterators

    errors: list = []

    def stop_tar(exn: Exception) -> bool:  # webdataset handler: record, end this tar
        errors.append(exn)
        return False

    seen, last_key, stream, samples = 0, None, None, None
    try:
        stream = wds.gopen(url)
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=stop_tar)
        samples = tariterators.group_by_keys(files, handler=stop_tar)
        for i, sample in enumerate(samples):
            seen, last_key = i + 1, sample.get("__key__")
            if i >= start:
                yield sample
            if seen >= stop:
                return
    except Exception as e:  # opening failed, or anything the handlers did not catch
        errors.append(e)
    finally:
        if samples is not None:
            samples.close()
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a pipe: command's exit status after we stopped reading early
                pass
    missing = stop - max(seen, start)
    if missing > 0 and first_pass:
        why = f"{errors[0]}" if errors else "tar ended early"
        after = f"after sample {last_key!r}" if last_key else "at its start"
        counters.missing += missing
        counters.record(url, f"<{missing} samples {after}>", f"tar unreadable: {why}")


def shuffle_buffer(src: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Seeded buffer shuffle: fill ``size`` samples, then emit a random one for each one read; drain at the end."""
    buf: list = []
    for sample in src:
        if len(buf) < size:
            buf.append(sample)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], sample = sample, buf[j]
        yield sample
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def _shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (handed to the main process without a copy)."""
    try:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape)
    except (AttributeError, RuntimeError, TypeError):  # private API moved: copy into shared memory instead
        return torch.empty(shape, dtype=dtype).share_memory_()


class _EpochStream(IterableDataset):
    """One rank's epoch; each DataLoader worker slot plays one plan worker (rotated on resume)."""

    def __init__(self, cfg, urls: list[str], counts: list[int], plan: list[list[tuple[int, int, int]]] | None,
                 epoch: int, rank: int, steps: int, start_batch: int, pos: list[int], bad: list[int]):
        self.cfg, self.urls, self.counts, self.plan = cfg, urls, counts, plan
        self.epoch, self.rank, self.steps, self.start_batch = epoch, rank, steps, start_batch
        self.pos, self.bad = pos, bad
        self.readers = cfg.readers_per_rank

    # raw samples of plan worker w, endless (passes over its range, or resampled shards)
    def _raw(self, w: int, counters: _Counters) -> Iterator[dict]:
        cfg = self.cfg
        buf = cfg.shuffle_buffer if cfg.do_shuffle else 0
        if self.plan is None:  # resample: whole shards drawn with replacement
            pick = np.random.default_rng(seed_for(cfg.seed, TAG_RESAMPLE, self.epoch, self.rank, w))

            def drawn():
                while True:
                    i = int(pick.integers(len(self.urls)))
                    yield from read_segment(self.urls[i], 0, self.counts[i], counters)

            rng = np.random.default_rng(seed_for(cfg.seed, TAG_WDS_SHUFFLE, self.epoch, self.rank, w))
            yield from shuffle_buffer(drawn(), buf, rng) if buf else drawn()
            return
        segs = self.plan[w]
        for rnd in itertools.count():
            if rnd == 1:
                log.warning("wds: rank %d worker %d ran short of samples after skipping bad ones; re-reading "
                            "its range to fill its quota", self.rank, w)
            src = itertools.chain.from_iterable(read_segment(self.urls[i], a, b, counters, rnd == 0)
                                                for i, a, b in segs)
            if buf:
                src = shuffle_buffer(src, buf, np.random.default_rng(
                    seed_for(cfg.seed, TAG_WDS_SHUFFLE, self.epoch, self.rank, w, rnd)))
            n = 0
            for sample in src:
                n += 1
                sample["__pass__"] = rnd
                yield sample
            if n == 0:
                names = ", ".join(self.urls[i] for i, _, _ in segs)
                raise ShardDataError(f"wds: rank {self.rank} worker {w} read no sample from {names}; "
                                     "run `mrm-scale verify` on the shard folder")

    def _batches(self, w: int) -> Iterator[dict]:
        cfg = self.cfg
        B, S, L, C = cfg.batch_size, cfg.image_size, cfg.max_tokens, cfg.channels
        delivered = reader_quota(self.start_batch, self.readers, w)
        todo = reader_quota(self.steps, self.readers, w) - delivered
        if todo <= 0:
            return
        counters = _Counters(self.bad[w])
        stream = self._raw(w, counters)
        pos = self.pos[w]
        for _ in range(pos):  # resume: skip what this worker already delivered, without decoding
            next(stream)
        in_worker = get_worker_info() is not None
        limit = (sum(b - a for _, a, b in self.plan[w]) if self.plan else 0) + cfg.shuffle_buffer + B
        for _ in range(todo):
            new = _shared_empty if in_worker else torch.empty  # in a worker: collate straight into shared memory
            image = new((B, C, S, S), dtype=torch.float32)
            ids = new((B, L), dtype=torch.int32)
            flags = new((B, L), dtype=torch.uint8)
            img_np, ids_np, flags_np = image.numpy(), ids.numpy(), flags.numpy()
            keys, metas, n, bad_run = [], [], 0, 0
            while n < B:
                sample = next(stream)
                pos += 1
                key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
                try:
                    ib, fb = sample["ids"], sample["flags"]
                    if len(ib) != 4 * L or len(fb) != L:
                        raise ValueError(f"token members hold {len(ib)} / {len(fb)} bytes, expected {4 * L} / {L}")
                    meta = json.loads(sample["json"]) if cfg.labels else None
                    img_np[n, 0] = decode_image(sample["jpg"], key, S, cfg.do_augment, cfg.seed, self.epoch,
                                                tuple(cfg.crop_scale), tuple(cfg.crop_ratio))
                except Exception as e:
                    if not sample.get("__pass__"):  # count (and report) a bad sample once, on the first pass
                        counters.bad += 1
                        why = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"member {e} missing"
                        counters.record(url, key, why)
                    bad_run += 1
                    if bad_run > limit:
                        raise ShardDataError(f"wds: rank {self.rank} worker {w}: {bad_run} samples in a row failed "
                                             f"to decode (last {key!r} in {url}); run `mrm-scale verify`") from e
                    continue
                bad_run = 0
                ids_np[n] = np.frombuffer(ib, dtype=sf.IDS_DTYPE)
                flags_np[n] = np.frombuffer(fb, dtype=sf.FLAGS_DTYPE)
                keys.append(key)
                metas.append(meta)
                n += 1
            if C == 3:
                img_np[:, 1:] = img_np[:, :1]
            batch = {"image": image, **token_tensors(ids, flags), "key": keys}
            if cfg.labels:
                batch["labels"] = labels_value(metas, cfg.labels)
            batch["__meta__"] = {"worker": w, "pos": pos, "bad": counters.bad, "missing": counters.missing,
                                 "events": counters.events}
            counters.events = []
            yield batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        w = (slot + self.start_batch) % self.readers
        return self._batches(w)


class WdsLoader(StreamingLoader):
    backend = "wds"

    def __init__(self, cfg, shardset, rank, world_size):
        super().__init__(cfg, shardset, rank, world_size)
        W = cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        self._skipped_before = 0
        self.bad_samples: list[tuple[str, str, str]] = []  # (shard, key, reason), most recent last

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._bad) + sum(self._missing)

    @skipped.setter
    def skipped(self, value: int) -> None:  # set by the base class on init / restore
        self._skipped_before = value - sum(getattr(self, "_bad", [])) - sum(getattr(self, "_missing", []))

    def _plan(self, epoch: int) -> list[list[tuple[int, int, int]]] | None:
        if self.cfg.epoch_mode == "resample":
            return None
        counts = self.shardset.counts
        order = shard_order(len(counts), self.cfg.seed, epoch, self.cfg.do_shuffle)
        a, b = split_range(sum(counts), self.rank, self.world_size)
        W = self.cfg.readers_per_rank
        plan = []
        for w in range(W):
            lo, hi = split_range(b - a, w, W)
            plan.append(segments(order, counts, a + lo, a + hi))
        return plan

    def _backend_state(self) -> dict:
        return {"wds": {"pos": list(self._pos), "bad": list(self._bad), "missing": list(self._missing)}}

    def _load_backend_state(self, state: dict) -> None:
        total = self.skipped
        st = state.get("wds") or {}
        W = self.cfg.readers_per_rank
        for name in ("pos", "bad", "missing"):
            v = st.get(name)
            if not (isinstance(v, list) and len(v) == W):
                raise LoaderError(f"wds loader state lacks per-worker {name!r} for {W} workers; drop the loader "
                                  "state to restart the epoch")
        self._pos, self._bad, self._missing = [int(x) for x in st["pos"]], [int(x) for x in st["bad"]], \
            [int(x) for x in st["missing"]]
        self.skipped = total

    def _next_epoch(self) -> None:
        self._skipped_before = self.skipped
        W = self.cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        super()._next_epoch()

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.steps:
            self._next_epoch()
        cfg = self.cfg
        ds = _EpochStream(cfg, [s.url for s in self.shardset.shards], self.shardset.counts, self._plan(self.epoch),
                          self.epoch, self.rank, self.steps, self.batch, list(self._pos), list(self._bad))
        kw = {}
        if cfg.workers > 0:
            kw = {"prefetch_factor": max(1, cfg.prefetch), "multiprocessing_context": cfg.mp_context}
        dl = DataLoader(ds, batch_size=None, num_workers=cfg.workers, pin_memory=cfg.pin_memory,
                        persistent_workers=False, **kw)
        for batch in dl:
            meta = batch.pop("__meta__")
            w = meta["worker"]
            self._pos[w], self._bad[w], self._missing[w] = meta["pos"], meta["bad"], meta["missing"]
            for shard, key, why in meta["events"]:  # logged here: worker processes may not share our handlers
                log.warning("wds: skipped %s of shard %s (%s); run `mrm-scale verify` on %s", key, shard, why,
                            self.shardset.root)
                self.bad_samples.append((shard, key, why))
            del self.bad_samples[:-MAX_EVENTS]
            self.batch += 1
            yield batch
        if self.batch != self.steps:
            raise ShardDataError(f"wds: rank {self.rank} epoch {self.epoch} ended after {self.batch} of "
                                 f"{self.steps} batches")
        self._next_epoch()

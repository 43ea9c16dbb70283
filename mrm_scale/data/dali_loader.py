"""DALI backend: ``fn.readers.webdataset`` over the shards' index files, decoding and augmentation in DALI.

One pipeline per rank and epoch. The reader gets all tars in the epoch's shard order with
``num_shards=world_size, shard_id=rank, stick_to_shard=True`` (the contiguous range of the plan in
:mod:`mrm_scale.data.loader`) and shuffles within ``initial_fill`` samples, seeded from (seed, epoch, rank).
Images: ``decoders.image_random_crop`` (RandomResizedCrop with ``cfg.crop_scale``/``crop_ratio``, the image pipeline's defaults
(:mod:`mrm_scale.data.transforms`); only the crop is
decoded) to grayscale, cubic ``resize`` to S×S whose ROI runs right-to-left on a coin flip (the mirror,
without a pass of its own); the pipeline's output is the uint8 gray batch. Validation: the centred square of
the shorter side is decoded alone (``decoders.image_crop``) and resized to S×S. Normalising to float and the
3-channel view (``expand``, no copy) happen once per batch in torch (:func:`~mrm_scale.data.transforms.
normalise_gray` reads DALI's CPU output buffer in place). On CUDA the decoder runs ``mixed`` (nvJPEG /
hardware decoder), the image ops and the normalisation on the GPU; on CPU the pipeline uses
``device_id=None``. Token members are read as int32/uint8 arrays (``dtypes=``), keys come
from ``source_info``; no Python runs per sample except turning key bytes into strings.

Resume: the pipeline runs with ``enable_checkpointing=True``; the state carries ``pipe.checkpoint()``
(base64) and a rebuilt pipeline continues from it with the same following samples.
A DALI failure is re-raised as :class:`ShardDataError` naming the shard and key: the reader alone is
replayed (no decoding) up to the failing batch and the candidates are checked with PIL.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from typing import Iterator

import numpy as np
import torch

from mrm_scale.formats import shards as sf
from .seeds import TAG_DALI_PIPE, TAG_DALI_READER, TAG_RESAMPLE, seed_for
from .streaming import (
    LoaderError, ShardDataError, StreamingLoader, key_from_source_info, labels_value, shard_order, token_tensors,
)
from .transforms import normalise_gray

log = logging.getLogger("mrm_scale.data.loader")

_MALFORMED_INDEX = re.compile(r'index file at "(?P<idx>[^"]+)" line (?P<line>\d+)')


def _device_id(device: str) -> int | None:
    dev = torch.device(device)
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        raise LoaderError(f"device={device!r}: the dali backend runs on 'cpu' or 'cuda[:N]'")
    return dev.index if dev.index is not None else torch.cuda.current_device()


class DaliLoader(StreamingLoader):
    backend = "dali"

    def __init__(self, cfg, shardset, rank, world_size):
        super().__init__(cfg, shardset, rank, world_size)
        self.device_id = _device_id(cfg.device)
        self._pipe = None
        self._pipe_epoch = None
        self._restore: bytes | None = None  # checkpoint to continue from (after load_state_dict)

    # ------------------------------------------------------------------------------------ plan -> reader
    def _reader_args(self, epoch: int) -> dict:
        cfg, shards = self.cfg, self.shardset.shards
        if cfg.epoch_mode == "resample":
            # draw whole shards with replacement until the epoch (plus the shuffle buffer) is covered
            rng = np.random.default_rng(seed_for(cfg.seed, TAG_RESAMPLE, epoch, self.rank))
            need, picked, total = self.steps * cfg.batch_size + cfg.shuffle_buffer, [], 0
            while total < need:
                s = shards[int(rng.integers(len(shards)))]
                picked.append(s)
                total += s.samples
            shard_args = {"num_shards": 1, "shard_id": 0}
        else:
            picked = [shards[i] for i in shard_order(len(shards), cfg.seed, epoch, cfg.do_shuffle)]
            shard_args = {"num_shards": self.world_size, "shard_id": self.rank}
        ext = ["jpg", "ids", "flags"] + (["json"] if cfg.labels else [])
        from nvidia.dali import types

        dtypes = [types.UINT8, types.INT32, types.UINT8] + ([types.UINT8] if cfg.labels else [])
        return dict(paths=[s.url for s in picked], index_paths=[s.index for s in picked], ext=ext, dtypes=dtypes,
                    random_shuffle=cfg.do_shuffle, initial_fill=max(1, cfg.shuffle_buffer),
                    seed=seed_for(cfg.seed, TAG_DALI_READER, epoch, self.rank), stick_to_shard=True,
                    missing_component_behavior="error", name="reader", **shard_args)

    def _build(self, epoch: int, checkpoint: bytes | None = None, decode: bool = True):
        from nvidia.dali import Pipeline, fn, types

        cfg = self.cfg
        S = cfg.image_size
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers), device_id=self.device_id,
                        seed=seed_for(cfg.seed, TAG_DALI_PIPE, epoch, self.rank),
                        prefetch_queue_depth=max(1, cfg.prefetch),
                        enable_checkpointing=decode, checkpoint=checkpoint)
        with pipe:
            outs = fn.readers.webdataset(**self._reader_args(epoch))
            jpg, ids, flags = outs[:3]
            info = fn.get_property(jpg, key="source_info")
            if not decode:  # reader replay for error reports
                pipe.set_outputs(jpg, ids, flags, info)
                return pipe
            dec = "mixed" if self.device_id is not None else "cpu"
            if cfg.do_augment:
                img = fn.decoders.image_random_crop(
                    jpg, device=dec, output_type=types.GRAY, random_area=list(cfg.crop_scale),
                    random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10)
                # the coin-flip mirror as a reversed x range of the resize ROI: no separate pass
                m = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
                zero = m * 0.0
                roi = {"roi_start": fn.stack(zero, m), "roi_end": fn.stack(zero + 1.0, 1.0 - m),
                       "roi_relative": True}
            else:  # centre square (the shorter side), decoded alone, then resized: as the wds backend
                shape = fn.peek_image_shape(jpg)
                side = fn.cast(fn.reductions.min(fn.stack(shape[0], shape[1])), dtype=types.FLOAT)
                img = fn.decoders.image_crop(jpg, device=dec, output_type=types.GRAY, crop_w=side, crop_h=side,
                                             crop_pos_x=0.5, crop_pos_y=0.5)
                roi = {}
            # uint8 (S, S, 1) out: normalising (and the 3-channel view) happens once per batch in torch
            img = fn.resize(img, size=[S, S], interp_type=types.INTERP_CUBIC, antialias=True, **roi)
            pipe.set_outputs(img, ids, flags, info, *outs[3:])
        return pipe

    # --------------------------------------------------------------------------------------- iteration
    def _open(self, epoch: int, checkpoint: bytes | None):
        self._close()
        pipe = self._build(epoch, checkpoint)
        try:
            pipe.build()
        except Exception as e:
            raise self._explain(e, epoch, 0) from e
        self._pipe, self._pipe_epoch = pipe, epoch
        return pipe

    def _close(self) -> None:
        self._pipe = self._pipe_epoch = None

    def _convert(self, outs) -> dict:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        cfg = self.cfg
        B, S = cfg.batch_size, cfg.image_size
        if self.device_id is None:  # read DALI's output buffer in place (valid until the next run)
            gray = np.asarray(outs[0].as_tensor()).reshape(B, 1, S, S)
            image = normalise_gray(gray, cfg.channels, pin=cfg.pin_memory)
        else:
            dev = torch.device("cuda", self.device_id)
            gray = torch.empty((B, S, S, 1), dtype=torch.uint8, device=dev)
            feed_ndarray(outs[0].as_tensor(), gray, cuda_stream=torch.cuda.current_stream(dev))
            image = normalise_gray(gray.view(B, 1, S, S), cfg.channels)
        ids = torch.empty((B, cfg.max_tokens), dtype=torch.int32)
        flags = torch.empty((B, cfg.max_tokens), dtype=torch.uint8)
        feed_ndarray(outs[1].as_tensor(), ids)
        feed_ndarray(outs[2].as_tensor(), flags)
        keys = [key_from_source_info(np.asarray(t).tobytes().decode("utf-8"))[1] for t in outs[3]]
        batch = {"image": image, **token_tensors(ids, flags), "key": keys}
        if cfg.labels:
            metas = [json.loads(np.asarray(t).tobytes() or b"{}") for t in outs[4]]
            batch["labels"] = labels_value(metas, cfg.labels)
        return batch

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.steps:
            self._next_epoch()
        epoch = self.epoch
        restore, self._restore = self._restore, None
        pipe = self._pipe if (self._pipe is not None and self._pipe_epoch == epoch and self.batch) else None
        if pipe is None:
            pipe = self._open(epoch, restore)
            if self.batch and restore is None:  # no checkpoint: replay (same keys, slower)
                log.warning("dali: no pipeline checkpoint in the state; replaying %d batches", self.batch)
                for i in range(self.batch):
                    self._run(pipe, epoch, i)
        while self.batch < self.steps:
            outs = self._run(pipe, epoch, self.batch)
            try:
                batch = self._convert(outs)
            except Exception as e:
                raise self._explain(e, epoch, self.batch) from e
            self.batch += 1
            yield batch
        self._close()
        self._next_epoch()

    def _run(self, pipe, epoch: int, at: int):
        try:
            return pipe.run()
        except Exception as e:
            self._close()
            raise self._explain(e, epoch, at) from e

    # ------------------------------------------------------------------------------------------- state
    def _backend_state(self) -> dict:
        if self._pipe is not None and self._pipe_epoch == self.epoch:
            ck = self._pipe.checkpoint()
        elif self._restore is not None:  # restored but not iterated yet
            ck = self._restore
        else:
            return {}
        return {"dali_checkpoint": base64.b64encode(ck).decode("ascii")}

    def _load_backend_state(self, state: dict) -> None:
        ck = state.get("dali_checkpoint")
        self._restore = base64.b64decode(ck) if ck else None
        self._close()

    # ------------------------------------------------------------------------------------ error reports
    def _explain(self, exc: Exception, epoch: int, at: int) -> ShardDataError:
        """Turn a DALI failure into an error naming shard and key (and what to do)."""
        root = self.shardset.root
        msg = str(exc)
        m = _MALFORMED_INDEX.search(msg)
        if m:
            where = _index_entry(m["idx"], int(m["line"]))
            return ShardDataError(
                f"{where[0]}: sample {where[1]!r} (index {m['idx']} line {m['line']}) lies beyond the end of "
                f"the tar: the shard is truncated or its index is stale. Run `mrm-scale verify {root}` and "
                f"re-run `mrm-scale prep` for the damaged shards. (DALI: {_first_line(msg)})")
        try:
            found = self._find_bad_sample(epoch, at)
        except Exception as e:  # the replay itself failed: report what we know
            found = None
            log.debug("dali: replay for the error report failed: %s", e)
        if found:
            shard, key, why = found
            return ShardDataError(
                f"{shard}: sample {key!r} cannot be read ({why}); DALI stopped at epoch {epoch}, batch {at}. "
                f"Run `mrm-scale verify {root}` and re-run `mrm-scale prep` for the damaged shards. "
                f"(DALI: {_first_line(msg)})")
        return ShardDataError(
            f"dali pipeline failed at epoch {epoch}, batch {at} (rank {self.rank}) reading {root}; no damaged "
            f"sample found among the batches in flight. Run `mrm-scale verify {root}`. DALI said: {msg}")

    def _find_bad_sample(self, epoch: int, at: int) -> tuple[str, str, str] | None:
        """Replay the reader alone (same order) through the batches in flight and check every sample."""
        pipe = self._build(epoch, decode=False)
        pipe.build()
        last = min(self.steps, at + max(1, self.cfg.prefetch) + 1)
        L = self.cfg.max_tokens
        for i in range(last):
            jpg, ids, flags, info = pipe.run()
            if i < at:
                continue
            for j in range(len(info)):
                shard, key = key_from_source_info(np.asarray(info[j]).tobytes().decode("utf-8"))
                why = _check_sample(np.asarray(jpg[j]).tobytes(), np.asarray(ids[j]).size,
                                    np.asarray(flags[j]).size, L)
                if why:
                    return shard, key, why
        return None


def _check_sample(jpg: bytes, n_ids: int, n_flags: int, max_tokens: int) -> str | None:
    from PIL import Image

    if n_ids != max_tokens or n_flags != max_tokens:
        return f"token members hold {n_ids} ids / {n_flags} flags, expected {max_tokens}"
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im.load()
    except Exception as e:
        return f"JPEG does not decode: {e}"
    return None


def _index_entry(idx_path: str, line: int) -> tuple[str, str]:
    """(tar path, key) of the sample DALI's index error points at: the first one whose members run past the
    end of the tar (DALI's ``line N`` is sample N-1, the header being line 0)."""
    tar = idx_path[: -len(".idx")] + ".tar" if idx_path.endswith(".idx") else idx_path
    try:
        entries = sf.read_index(idx_path)
        size = os.path.getsize(tar)
        for key, members in entries:
            if any(offset + n > size for _, offset, n in members):
                return tar, key
        return tar, entries[line - 1][0]
    except (OSError, IndexError, ValueError):
        return tar, f"<sample {line - 1} of the index>"


def _first_line(msg: str) -> str:
    """The line of a DALI error message that says what went wrong (after ``encountered:``)."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln == "encountered:":
            return lines[i + 1]
    return lines[0] if lines else ""

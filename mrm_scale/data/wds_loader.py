"""WebDataset backend: ``webdataset`` tar streaming + torch ``DataLoader`` worker processes.

Each rank's sample range of the epoch plan (:mod:`mrm_scale.data.streaming`) is split into W contiguous worker
ranges, from our own rank/world size (``torch.distributed`` need not be initialised). A worker reads the
tars overlapping its range - local tars with their index by offset (only the members it needs), anything
else (brace patterns, ``pipe:`` and other webdataset URLs) with webdataset's tar iterators - shuffles within a seeded buffer, decodes and augments with the image pipeline
(:func:`mrm_scale.data.transforms.decode_image`: the random numbers come from (seed, epoch, key), so a sample's
augmentation does not depend on rank or worker) and collates full batches itself. The ``DataLoader`` returns worker batches in order, round robin;
every worker delivers the same number of batches per epoch, so batch i of the epoch is batch i // W of
worker i % W — deterministic.

Fast path: workers send gray uint8 crops (a quarter of the float bytes, a twelfth of 3-channel floats) and
raw token members through a ring of reused shared-memory buffers; the main process normalises once per
batch (one vectorised pass) and widens the tokens, and 3 channels are an ``expand`` view of the gray one.
Workers are not restarted per epoch: they run on into the next epoch while the main process finishes the
current one (``close()`` stops them; an interrupted iteration simply continues with the next batch).

Resume: every batch reports how many raw samples its worker has consumed; the state keeps those positions
and a restored worker skips that many raw samples (read again, so the shuffle buffer fills exactly as before,
but not decoded). Worker
slots are rotated so that the first batch after the restore comes from the worker whose turn it is.

Bad data: a sample that does not decode (or has malformed token members) is skipped, logged with shard
and key, and counted; the unreadable rest of a truncated tar is counted from the manifest's sample
counts. A worker whose range ran short re-reads its range (new shuffle) to fill its quota.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mrm_scale.formats import shards as sf
from .seeds import TAG_RESAMPLE, TAG_WDS_SHUFFLE, seed_for
from .streaming import (
    LoaderError, ShardDataError, StreamingLoader, is_local, labels_value, reader_quota, segments, shard_order,
    split_range, token_tensors,
)
from .transforms import decode_image, normalise_gray

log = logging.getLogger("mrm_scale.data.loader")

MAX_EVENTS = 1000  # bad-sample records kept on the loader
RING_SLOTS_EXTRA = 2  # ring slots per worker beyond its prefetched batches (one being copied out, one spare)
RING_WAIT_S = 5.0  # longest wait for a ring slot before a one-off buffer is used


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


_INDEX_CACHE: dict[tuple, list[tuple[str, list[tuple[str, int, int]]]]] = {}


def _index_entries(idx_path: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(ext, offset, size), ...]) per sample of a DALI index (``wds2idx`` v1.2), cached per process."""
    st = os.stat(idx_path)
    tag = (idx_path, st.st_mtime_ns, st.st_size)  # a rewritten index is read again
    entries = _INDEX_CACHE.get(tag)
    if entries is None:
        entries = sf.read_index(idx_path)
        if len(_INDEX_CACHE) >= 4096:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[tag] = entries
    return entries


def read_indexed(url: str, idx: str, start: int, stop: int, counters: _Counters, first_pass: bool = True,
                 exts: frozenset[str] | None = None) -> Iterator[dict]:
    """:func:`read_segment` for a local tar with its index: samples before ``start`` are not read at all, and
    of the others only the members in ``exts`` (one read per sample, no tar header parsing). A sample with
    a member beyond the end of the file ends the tar there (truncated), as in :func:`read_segment`."""
    seen, last_key, error = start, None, None
    try:
        entries = _index_entries(idx)
        with open(url, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for i in range(start, min(stop, len(entries))):
                key, members = entries[i]
                if max(o + n for _, o, n in members) > size:
                    error = "tar ended early"
                    break
                want = [m for m in members if exts is None or m[0] in exts]
                sample: dict = {"__key__": key, "__url__": url}
                if want:
                    lo, hi = min(o for _, o, _ in want), max(o + n for _, o, n in want)
                    f.seek(lo)
                    buf = f.read(hi - lo)
                    if len(buf) < hi - lo:
                        error = "tar ended early"
                        break
                    for ext, o, n in want:
                        sample[ext] = buf[o - lo:o - lo + n]
                seen, last_key = i + 1, key
                yield sample
    except Exception as e:  # unreadable index or tar
        error = e
    missing = stop - seen
    if missing > 0 and first_pass:
        after = f"after sample {last_key!r}" if last_key else "at its start" if not start else f"from sample {start}"
        counters.missing += missing
        counters.record(url, f"<{missing} samples {after}>", f"tar unreadable: {error or 'index lists fewer samples'}")


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


def worker_plan(cfg, counts: list[int], epoch: int, rank: int,
                world_size: int) -> list[list[tuple[int, int, int]]] | None:
    """Per plan worker, the (shard, start, stop) segments of one rank's epoch (None: resample mode)."""
    if cfg.epoch_mode == "resample":
        return None
    order = shard_order(len(counts), cfg.seed, epoch, cfg.do_shuffle)
    a, b = split_range(sum(counts), rank, world_size)
    W = cfg.readers_per_rank
    return [segments(order, counts, a + lo, a + hi) for lo, hi in (split_range(b - a, w, W) for w in range(W))]


# ------------------------------------------------------------------------------------- re-sharded resume
#
# The samples an epoch has left are a pure function of the saved positions: reader k (rank-major, then worker) of
# the plan reads its range through the seeded shuffle buffer, and its saved ``pos`` counts how many of that
# shuffled sequence it has consumed; the rest, concatenated in reader order, is what the epoch has left. A
# re-sharded epoch splits that remainder contiguously over the new ranks × workers, each reading its part in
# order (it is shuffled already). Another interruption inside it appends one more event to the chain.


def _plan_sequences(counts: list[int], seed: int, epoch: int, shuffle: bool, buffer: int, world: int,
                    readers: int) -> list[np.ndarray]:
    """Global sample ids (shard offset + index, shards in manifest order) every reader of a normal epoch
    consumes, in the order it consumes them (after the shuffle buffer), readers rank-major."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = shard_order(len(counts), seed, epoch, shuffle)
    out = []
    for r in range(world):
        a, b = split_range(int(offsets[-1]), r, world)
        for w in range(readers):
            lo, hi = split_range(b - a, w, readers)
            segs = segments(order, counts, a + lo, a + hi)
            raw = [int(offsets[i]) + j for i, s0, s1 in segs for j in range(s0, s1)]
            if shuffle and buffer:
                rng = np.random.default_rng(seed_for(seed, TAG_WDS_SHUFFLE, epoch, r, w, 0))
                raw = list(shuffle_buffer(iter(raw), buffer, rng))
            out.append(np.asarray(raw, dtype=np.int64))
    return out


def remaining_samples(counts: list[int], seed: int, epoch: int, shuffle: bool, chain: list[dict]) -> np.ndarray:
    """The global sample ids ``epoch`` has left after the interruptions in ``chain`` (oldest first)."""
    first = chain[0]
    seqs = _plan_sequences(counts, seed, epoch, shuffle, int(first["buffer"]), int(first["world_size"]),
                           int(first["readers"]))
    rest = np.zeros(0, np.int64)
    for i, ev in enumerate(chain):
        if i:
            n = int(ev["world_size"]) * int(ev["readers"])
            seqs = [rest[a:b] for a, b in (split_range(len(rest), k, n) for k in range(n))]
        if len(ev["pos"]) != len(seqs):
            raise LoaderError(f"re-sharded loader state: {len(ev['pos'])} reader positions for {len(seqs)} readers")
        rest = np.concatenate([seq[min(int(p), len(seq)):] for seq, p in zip(seqs, ev["pos"])]) if seqs else \
            np.zeros(0, np.int64)
    return rest


def reshard_plan(counts: list[int], seed: int, epoch: int, shuffle: bool, chain: list[dict], rank: int,
                 world: int, readers: int, batch_size: int) -> tuple[int, list[list[tuple[int, int, int]]]]:
    """(batches per rank in the re-sharded epoch, per worker of ``rank`` its (shard, start, stop) runs)."""
    rest = remaining_samples(counts, seed, epoch, shuffle, chain)
    n = world * readers
    quota = (len(rest) // n) // batch_size
    offsets = np.concatenate([[0], np.cumsum(counts)])
    plans = []
    for w in range(readers):
        a, b = split_range(len(rest), rank * readers + w, n)
        ids = rest[a:b]
        shard = np.searchsorted(offsets, ids, side="right") - 1
        local = ids - offsets[shard]
        runs: list[tuple[int, int, int]] = []
        for i, j in zip(shard.tolist(), local.tolist()):
            if runs and runs[-1][0] == i and runs[-1][2] == j:
                runs[-1] = (i, runs[-1][1], j + 1)
            else:
                runs.append((i, j, j + 1))
        plans.append(runs)
    return readers * quota, plans


class _Stream(IterableDataset):
    """One rank's batches from (epoch, start_batch) on, epoch after epoch, endlessly.

    Each DataLoader worker slot plays one plan worker per epoch: batch i of an epoch belongs to plan worker
    i % W, and the DataLoader takes batches from slots round robin, so slot s serves plan worker (s - g) % W
    in an epoch whose first batch is number g of the stream (g < 0 for a resumed epoch). Workers thus run
    into the next epoch without waiting for the main process (no restart bubble); the main process takes
    exactly one epoch per ``iter(loader)``.
    """

    def __init__(self, cfg, urls: list[str], counts: list[int], indexes: list[str | None], epoch: int, rank: int,
                 world_size: int, steps: int, start_batch: int, pos: list[int], bad: list[int],
                 busy: torch.Tensor | None = None, reshard: dict | None = None):
        self.cfg, self.urls, self.counts, self.indexes = cfg, urls, counts, indexes
        self.exts = frozenset(["jpg", "ids", "flags"] + (["json"] if cfg.labels else []))
        self.busy = busy  # shared (worker slots, ring slots) int32 flags of the batch buffer ring, or None
        self._ring: list | None = None
        self._next = 0
        self.epoch, self.rank, self.world_size = epoch, rank, world_size
        self.steps, self.start_batch = steps, start_batch
        self.pos, self.bad = pos, bad
        self.readers = cfg.readers_per_rank
        self.reshard = reshard  # {"epoch", "steps", "plans"}: the first epoch is a re-sharded remainder

    def _read(self, i: int, start: int, stop: int, counters: _Counters, first_pass: bool = True) -> Iterator[dict]:
        """Samples ``[start, stop)`` of shard ``i``: by its index when local (fast), else through webdataset."""
        url, idx = self.urls[i], self.indexes[i]
        if idx is not None and is_local(url):
            return read_indexed(url, idx, start, stop, counters, first_pass, self.exts)
        return read_segment(url, start, stop, counters, first_pass)

    # raw samples of plan worker w, endless (passes over its range, or resampled shards)
    def _raw(self, epoch: int, plan, w: int, counters: _Counters) -> Iterator[dict]:
        cfg = self.cfg
        buf = cfg.shuffle_buffer if cfg.do_shuffle else 0
        if plan is None:  # resample: whole shards drawn with replacement
            pick = np.random.default_rng(seed_for(cfg.seed, TAG_RESAMPLE, epoch, self.rank, w))

            def drawn():
                while True:
                    i = int(pick.integers(len(self.urls)))
                    yield from self._read(i, 0, self.counts[i], counters)

            rng = np.random.default_rng(seed_for(cfg.seed, TAG_WDS_SHUFFLE, epoch, self.rank, w))
            yield from shuffle_buffer(drawn(), buf, rng) if buf else drawn()
            return
        segs = plan[w]
        resharded = self.reshard is not None and epoch == self.reshard["epoch"]
        for rnd in itertools.count():
            if rnd == 1:
                log.warning("wds: rank %d worker %d ran short of samples after skipping bad ones; re-reading "
                            "its range to fill its quota", self.rank, w)
            src = itertools.chain.from_iterable(self._read(i, a, b, counters, rnd == 0)
                                                for i, a, b in segs)
            if buf and not (resharded and rnd == 0):  # a re-sharded remainder is in shuffled order already
                src = shuffle_buffer(src, buf, np.random.default_rng(
                    seed_for(cfg.seed, TAG_WDS_SHUFFLE, epoch, self.rank, w, rnd)))
            n = 0
            for sample in src:
                n += 1
                sample["__pass__"] = rnd
                yield sample
            if n == 0:
                names = ", ".join(self.urls[i] for i, _, _ in segs)
                raise ShardDataError(f"wds: rank {self.rank} worker {w} read no sample from {names}; "
                                     "run `mrm-scale verify` on the shard folder")

    def _batches(self, epoch: int, w: int, todo: int, pos: int, bad: int) -> Iterator[dict]:
        """``todo`` batches of plan worker ``w`` in ``epoch``, after its first ``pos`` raw samples."""
        cfg = self.cfg
        B, S, L = cfg.batch_size, cfg.image_size, cfg.max_tokens
        if todo <= 0:
            return
        if self.reshard is not None and epoch == self.reshard["epoch"]:
            plan = self.reshard["plans"]
        else:
            plan = worker_plan(cfg, self.counts, epoch, self.rank, self.world_size)
        counters = _Counters(bad)
        stream = self._raw(epoch, plan, w, counters)
        for _ in range(pos):  # resume: skip what this worker already delivered, without decoding
            next(stream)
        limit = (sum(b - a for _, a, b in plan[w]) if plan else 0) + cfg.shuffle_buffer + B
        for _ in range(todo):
            ring, (image, ids, flags) = self._buffers()
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
                    img_np[n, 0] = decode_image(sample["jpg"], key, S, cfg.do_augment, cfg.seed, epoch,
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
            # raw gray bytes and token members: the main process normalises / widens them once per batch
            batch = {"image": image, "ids": ids, "flags": flags, "key": keys}
            if cfg.labels:
                batch["labels"] = labels_value(metas, cfg.labels)
            batch["__meta__"] = {"epoch": epoch, "worker": w, "pos": pos, "bad": counters.bad,
                                 "missing": counters.missing, "events": counters.events, "ring": ring}
            counters.events = []
            yield batch
        stream.close()

    def _buffers(self) -> tuple[tuple[int, int] | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batch buffers (image uint8 (B, 1, S, S), ids int32 (B, L), flags uint8 (B, L)) to collate into.

        In a worker process they live in shared memory and are reused round robin (``cfg.buffer_ring``):
        the main process copies a batch out as soon as it arrives and marks its slot free in ``busy``, so
        the pages are faulted in once instead of for every batch. Should a slot stay busy (it cannot while
        the protocol holds), a one-off buffer is used. Returns ((worker slot, ring slot) or None, buffers).
        """
        cfg = self.cfg
        shapes = (((cfg.batch_size, 1, cfg.image_size, cfg.image_size), torch.uint8),
                  ((cfg.batch_size, cfg.max_tokens), torch.int32), ((cfg.batch_size, cfg.max_tokens), torch.uint8))
        info = get_worker_info()
        if info is None:  # in-process (workers=0): plain memory
            return None, tuple(torch.empty(shape, dtype=dt) for shape, dt in shapes)
        if self.busy is None or not cfg.buffer_ring:
            return None, tuple(_shared_empty(shape, dtype=dt) for shape, dt in shapes)
        if self._ring is None:
            self._ring, self._next = [None] * self.busy.shape[1], 0
        k = self._next
        flag = self.busy[info.id, k]
        deadline = None
        while int(flag) != 0:  # freed by the main process right after it copied the batch out
            now = time.monotonic()
            deadline = deadline or now + RING_WAIT_S
            if now > deadline:
                return None, tuple(_shared_empty(shape, dtype=dt) for shape, dt in shapes)
            time.sleep(0.0005)
        if self._ring[k] is None:
            self._ring[k] = tuple(_shared_empty(shape, dtype=dt) for shape, dt in shapes)
        flag.fill_(1)
        self._next = (k + 1) % len(self._ring)
        return (info.id, k), self._ring[k]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = info.id if info is not None else 0
        W = self.readers
        epoch, g, lo = self.epoch, -self.start_batch, self.start_batch
        pos, bad = self.pos, self.bad
        while True:
            steps = self.reshard["steps"] if self.reshard is not None and epoch == self.reshard["epoch"] \
                else self.steps
            w = (slot - g) % W
            todo = reader_quota(steps, W, w) - reader_quota(lo, W, w)
            yield from self._batches(epoch, w, todo, pos[w], bad[w])
            epoch, g, lo = epoch + 1, g + steps, 0
            pos, bad = [0] * W, [0] * W


def _leave_stopping_to_the_rank(_worker_id: int) -> None:
    """Workers ignore the stop signals (SIGTERM, SIGINT, SIGUSR1) their process group or a launcher's
    ``terminate`` sends: the rank decides when to stop, and may still need batches for its last step before it
    saves. A worker ends with its rank (the DataLoader's watchdog)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class WdsLoader(StreamingLoader):
    backend = "wds"

    def __init__(self, cfg, shardset, rank, world_size):
        super().__init__(cfg, shardset, rank, world_size)
        W = cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        self._skipped_before = 0
        self.bad_samples: list[tuple[str, str, str]] = []  # (shard, key, reason), most recent last
        self._stream = None  # the DataLoader iterator, kept across epochs (workers run ahead)
        self._busy: torch.Tensor | None = None  # its workers' batch buffer ring flags (shared memory)
        self._ring_refs: dict[tuple[int, int], tuple] = {}  # the ring buffers as mapped here
        self._stream_at: tuple[int, int] | None = None  # (epoch, batch) it delivers next
        self._normal_steps = self.steps
        self._resplit: dict | None = None  # the current epoch re-splits what an interrupted run left ("chain")

    @property
    def skipped(self) -> int:
        return self._skipped_before + sum(self._bad) + sum(self._missing)

    @skipped.setter
    def skipped(self, value: int) -> None:  # set by the base class on init / restore
        self._skipped_before = value - sum(getattr(self, "_bad", [])) - sum(getattr(self, "_missing", []))

    def load_state_dict(self, state: dict) -> None:
        self.close()
        W = self.cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        chain = (state.get("reshard") or {}).get("chain") if isinstance(state, dict) else None
        if chain and int(state.get("batch", 0)):
            self._set_reshard(int(state["epoch"]), chain)  # the saved epoch was a re-split remainder
        else:
            self._set_reshard(None, None)
        super().load_state_dict(state)

    def _same_setup(self, state: dict) -> bool:
        if (state.get("reshard") or {}).get("chain"):  # its batches per epoch follow from the chain
            return not self._differences(state, [k for k in self._setup_names() if k != "steps"])
        return super()._same_setup(state)

    def _buffer(self) -> int:
        return self.cfg.shuffle_buffer if self.cfg.do_shuffle else 0

    def _backend_state(self) -> dict:
        out = {"wds": {"pos": list(self._pos), "bad": list(self._bad), "missing": list(self._missing),
                       "buffer": self._buffer()}}
        if self._resplit is not None:
            out["reshard"] = {"chain": self._resplit["chain"]}
        return out

    def _set_reshard(self, epoch: int | None, chain: list[dict] | None) -> None:
        if chain is None:
            self._resplit, self.steps = None, self._normal_steps
            return
        steps, plans = reshard_plan(self.shardset.counts, self.cfg.seed, epoch, self.cfg.do_shuffle, chain,
                                    self.rank, self.world_size, self.cfg.readers_per_rank, self.cfg.batch_size)
        self._resplit = {"epoch": epoch, "chain": chain, "steps": steps, "plans": plans}
        self.steps = steps

    def _reshard(self, states: list[dict], epoch: int) -> None:
        """Re-split what the saved run's readers left of ``epoch`` over this run's ranks × workers."""
        bad = [s.url for s in self.shardset.shards if not is_local(s.url) or s.index is None]
        if bad:
            raise LoaderError(f"{bad[0]}: re-splitting a mid-epoch position over another number of ranks or "
                              "workers reads samples by offset, which needs local tars with their .idx index; "
                              f"resume with {len(states)} ranks and the same --workers")
        old = states[0]
        if self.cfg.epoch_mode == "resample":
            raise LoaderError(f"loader state was saved mid-epoch ({epoch}, batch {old['batch']}) in resample mode, "
                              "whose epochs draw whole shards at random: what such an epoch has left cannot be "
                              f"re-split; resume with {len(states)} ranks and the same --workers")
        if any(s.get("backend") != "wds" or not isinstance(s.get("wds"), dict) for s in states):
            super()._reshard(states, epoch)  # not a wds position: refused, naming the way out
        chain = list((old.get("reshard") or {}).get("chain") or [])
        chain.append({"world_size": len(states), "readers": int(old["readers"]), "batch_size": int(old["batch_size"]),
                      "buffer": int(old["wds"].get("buffer", self._buffer())),
                      "pos": [int(p) for s in states for p in s["wds"]["pos"]]})
        self.close()
        W = self.cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        mine = states[self.rank] if self.rank < len(states) else {}
        self.skipped = int(mine.get("skipped", 0))
        self._set_reshard(epoch, chain)
        self.epoch, self.batch = epoch, 0
        log.info("wds: re-split the rest of epoch %d (%d ranks x %d workers before, %d x %d now): %d batches "
                 "per rank left", epoch, len(states), int(old["readers"]), self.world_size, W, self.steps)

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
        self.close()

    def _next_epoch(self) -> None:
        self._skipped_before = self.skipped
        W = self.cfg.readers_per_rank
        self._pos, self._bad, self._missing = [0] * W, [0] * W, [0] * W
        if self._resplit is not None:
            self._resplit, self.steps = None, self._normal_steps
        super()._next_epoch()

    def close(self) -> None:
        """Stop the worker processes now (the next ``iter()`` starts them again from the current position)."""
        it, self._stream, self._stream_at = self._stream, None, None
        self._ring_refs = {}
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _open_stream(self):
        cfg = self.cfg
        shards = self.shardset.shards
        # batch buffer ring: a worker has at most `prefetch` batches queued plus one being copied out here
        self._busy = None
        if cfg.workers > 0:
            slots = max(1, cfg.prefetch) + RING_SLOTS_EXTRA
            self._busy = torch.zeros((cfg.workers, slots), dtype=torch.int32).share_memory_()
        ds = _Stream(cfg, [s.url for s in shards], self.shardset.counts, [s.index for s in shards], self.epoch,
                     self.rank, self.world_size, self._normal_steps, self.batch, list(self._pos), list(self._bad),
                     self._busy, None if self._resplit is None else
                     {k: self._resplit[k] for k in ("epoch", "steps", "plans")})
        kw = {}
        if cfg.workers > 0:
            kw = {"prefetch_factor": max(1, cfg.prefetch), "multiprocessing_context": cfg.mp_context,
                  "worker_init_fn": _leave_stopping_to_the_rank}
        # pin_memory is applied after normalising (the float image is made in this process)
        self._stream = iter(DataLoader(ds, batch_size=None, num_workers=cfg.workers, persistent_workers=False, **kw))
        self._stream_at = (self.epoch, self.batch)

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= self.steps:
            self._next_epoch()
        cfg = self.cfg
        if self._stream is None or self._stream_at != (self.epoch, self.batch):
            self.close()
            self._open_stream()
        while self.batch < self.steps:
            try:
                batch = next(self._stream)
            except StopIteration:
                self.close()
                raise ShardDataError(f"wds: rank {self.rank} epoch {self.epoch} ended after {self.batch} of "
                                     f"{self.steps} batches") from None
            except BaseException:
                self.close()
                raise
            meta = batch.pop("__meta__")
            if meta["epoch"] != self.epoch:  # cannot happen unless the round robin broke
                self.close()
                raise ShardDataError(f"wds: rank {self.rank} got a batch of epoch {meta['epoch']} while reading "
                                     f"epoch {self.epoch}, batch {self.batch}")
            raw = (batch["image"], batch["ids"], batch["flags"])
            batch["image"] = normalise_gray(batch["image"], cfg.channels, pin=cfg.pin_memory)
            tokens = token_tensors(batch.pop("ids"), batch.pop("flags"))
            if meta["ring"] is not None:  # copied out: the worker may refill these buffers
                slot, k = int(meta["ring"][0]), int(meta["ring"][1])
                self._ring_refs[slot, k] = raw  # keeps the mapping: the next batch in it arrives without a remap
                self._busy[slot, k] = 0
            batch = {"image": batch.pop("image"), **tokens, **batch}
            if cfg.pin_memory and torch.cuda.is_available():
                batch.update({k: v.pin_memory() for k, v in batch.items() if k != "image" and torch.is_tensor(v)})
            w = meta["worker"]
            self._pos[w], self._bad[w], self._missing[w] = meta["pos"], meta["bad"], meta["missing"]
            for shard, key, why in meta["events"]:  # logged here: worker processes may not share our handlers
                log.warning("wds: skipped %s of shard %s (%s); run `mrm-scale verify` on %s", key, shard, why,
                            self.shardset.root)
                self.bad_samples.append((shard, key, why))
            del self.bad_samples[:-MAX_EVENTS]
            self.batch += 1
            self._stream_at = (self.epoch, self.batch)
            yield batch
        self._next_epoch()
        if self._stream is not None:
            self._stream_at = (self.epoch, 0)  # the workers are already on the next epoch

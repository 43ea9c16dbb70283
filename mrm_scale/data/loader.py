"""Streaming input: one factory, two backends (DALI, WebDataset), the same batches (README, "Architecture").

``build_loader(cfg, rank, world_size, state=None)`` returns an iterable; each ``iter()`` runs (the rest of)
one epoch and yields batch dicts:

- ``image``          float32 (B, C, S, S), normalised with ``IMAGE_MEAN``/``IMAGE_STD`` (:mod:`mrm_scale.data.transforms`) (C=3: gray replicated
                     as an ``expand`` view, stride 0 over C: no copy; ``.contiguous()`` where dense memory is needed)
- ``input_ids``      int64 (B, L)         ``attention_mask`` int64 (B, L)        ``word_start`` bool (B, L)
- ``key``            list[str]            ``labels`` (only when ``cfg.labels`` is set)
- ``source``         list[str], the shard set of each sample (only from a mix, ``cfg.mix``)

Epochs
    One epoch shows every sample of the split once across all ranks. The order is a pure function of
    ``(seed, epoch, rank, world_size)`` (and the worker count for ``wds``): the shard order is permuted with a
    seeded RNG, the permuted shards are read as one sample sequence of N samples, and rank r takes the
    contiguous range ``[N*r//k, N*(r+1)//k)`` (k = world size; the formula DALI's reader uses). ``wds``
    splits a rank's range the same way among its W workers; a worker reads only the tars overlapping its
    range. Samples are then shuffled within a seeded buffer (``shuffle_buffer``) that never mixes epochs.

Partial batches
    Dropped, so that every rank yields the same number of full batches (``len(loader)``) and no collective
    ever waits for a rank that ran out: ``dali`` yields ``(N // k) // B`` batches per rank, ``wds`` yields
    ``W * ((N // (k*W)) // B)`` (each worker delivers the same number of batches, in-order round robin).
    The samples left over (fewer than ``k*B`` resp. ``k*W*B`` per epoch, chosen by the shuffle) are the
    only ones an epoch does not show. ``epoch_mode="resample"`` instead draws shards with replacement,
    endlessly, and calls every ``epoch_length`` batches an epoch.

Resume
    ``loader.state_dict()`` is small and JSON-serialisable (epoch, batches consumed in the epoch, seed,
    world size, backend, ...). ``build_loader(..., state=s)`` continues with exactly the batches an
    uninterrupted run would have produced next: ``dali`` restores the pipeline from DALI's own checkpoint
    (``pipe.checkpoint()``); ``wds`` stores per worker how many raw samples it consumed and skips them
    again without decoding images. ``build_loader(..., states=[every rank's state])`` resumes under another
    world size, worker count or batch size: at an epoch boundary the plan is recomputed; mid-epoch (``wds``,
    local indexed shards) the samples the epoch has left are re-split. What is left is a pure function of the
    saved positions: every old reader's shuffled sequence after its ``pos``, concatenated in reader order
    (rank-major, then worker); the new ranks × workers take contiguous parts of it in that order (no new
    shuffle) for the rest of the epoch, and the next epoch follows the normal plan of the new setup. So over
    the interrupted epoch no sample is shown twice; the ones not shown are the old readers' tails an
    uninterrupted epoch would have dropped too, plus fewer than ``k*W*B`` of the remainder (partial batches).
    The order after the resume is the uninterrupted run's remaining order per old reader, read by new readers
    in turn, not the order an uninterrupted run would have used. ``dali`` refuses a mid-epoch re-split (its
    reader position lives in DALI's own checkpoint), naming the world size to resume with.

Mixing
    ``cfg.mix`` (a list of ``{name, path, weight}``, :func:`mrm_scale.data.mixing.parse_mix`) reads several shard
    sets as one weighted stream, each source with its own loader of the chosen backend: the per-source shares,
    the epoch of a mix, resume and the tokenizer check are in :mod:`mrm_scale.data.mixing`.

Workers
    ``loader.close()`` stops worker processes / pipelines kept between iterations (``wds`` keeps its workers
    across epochs, running ahead into the next one); the position is kept, so iterating again continues.

Checks before work (``LoaderError``)
    missing manifest or split (run ``mrm-scale prep``), ``max_tokens`` or tokenizer (sha256 / vocabulary
    size) different from the run's, index files whose sample counts differ from the manifest or that list a
    key of another shard (``check_unique_keys``, run once by the trainer), fewer shards than readers (ranks for ``dali``, ranks × workers for
    ``wds``), missing shard or index files, a batch larger than what one reader gets per epoch.

Bad data at run time
    ``wds`` skips an undecodable sample (or one with malformed token members) and the unreadable rest of a
    truncated tar, logs shard and key (logger ``mrm_scale.data.loader``, warning) and counts each skipped
    sample once (``loader.skipped``, ``loader.bad_samples``, ``state["skipped"]``). A worker that ran short
    re-reads its own range (reshuffled) to deliver its quota, so ranks stay in step. ``dali`` stops with
    ``ShardDataError`` naming the shard and key (run ``mrm-scale verify DIR``).
"""

from __future__ import annotations

from .streaming import (  # the loader's public surface; the backends and the plan live beside it
    BACKENDS, EPOCH_MODES, LoaderConfig, LoaderError, ShardDataError, ShardSet, StreamingLoader, labels_value,
    resolve_shards, check_config, check_unique_keys, steps_per_epoch,
)
from .transforms import normalise_gray

__all__ = ["BACKENDS", "EPOCH_MODES", "LoaderConfig", "LoaderError", "ShardDataError", "ShardSet", "StreamingLoader",
           "build_loader", "check_config", "check_unique_keys", "labels_value", "normalise_gray", "resolve_shards", "steps_per_epoch"]


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1, state: dict | None = None,
                 states: list[dict] | None = None):
    """The one factory: check everything, then build the chosen backend, optionally resumed from ``state``
    (this rank's own) or ``states`` (every rank's of the saved run, any world size: see "Resume")."""
    if cfg.backend not in BACKENDS:
        raise LoaderError(f"backend={cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    if cfg.mix:  # several shard sets, weighted: one loader per source under a mixer (mrm_scale.data.mixing)
        from mrm_scale.data.mixing import MixedLoader

        loader = MixedLoader(cfg, rank, world_size, build_loader)
    else:
        shardset = resolve_shards(cfg)
        check_config(cfg, shardset, rank, world_size)
        if cfg.backend == "dali":
            from mrm_scale.data.dali_loader import DaliLoader as cls
        else:
            from mrm_scale.data.wds_loader import WdsLoader as cls
        loader = cls(cfg, shardset, rank, world_size)
    if states:
        loader.resume_from(states)
    elif state:
        loader.load_state_dict(state)
    return loader


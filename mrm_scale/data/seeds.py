"""Seeds of the input pipeline: every random stream (shard order, shuffles, augmentation, resampling) is a pure
function of the run seed, a purpose tag and integers such as epoch, rank and the sample key."""

from __future__ import annotations

import zlib

import numpy as np

# purpose tags, so that streams never share seeds
TAG_SHARD_ORDER, TAG_DALI_READER, TAG_DALI_PIPE, TAG_WDS_SHUFFLE, TAG_AUGMENT, TAG_RESAMPLE, TAG_MIX = range(1, 8)


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from integer parts (the run seed, a purpose tag, epoch, rank, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0]) & 0x7FFFFFFF


def key_hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))

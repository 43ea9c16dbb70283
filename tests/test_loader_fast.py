"""Fast path of the loaders (issue 3): uint8 transfer + per-batch normalisation, the 3-channel view, wds
workers kept across epochs, the shared-memory buffer ring, indexed tar reads, the torch resize."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import time

import numpy as np
import pytest
import torch

from mrm_scale.data import transforms
from mrm_scale.data import wds_loader
from mrm_scale.data.loader import build_loader, normalise_gray
from test_loader import BACKENDS, _truncate, cfg, epoch, keys_of, make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast64")
    make_shards(d, 64, 16)
    return str(d)


def _same(a: list[dict], b: list[dict]) -> None:
    assert keys_of(a) == keys_of(b)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["input_ids"], y["input_ids"])
        assert torch.equal(x["attention_mask"], y["attention_mask"]) and torch.equal(x["word_start"], y["word_start"])


def test_normalise_gray():
    g = torch.arange(256, dtype=torch.uint8).repeat(2, 1, 1, 1)  # (2, 1, 1, 256)
    out = normalise_gray(g, 3)
    assert out.shape == (2, 3, 1, 256) and out.dtype == torch.float32 and out.stride(1) == 0
    want = (torch.arange(256) / 255.0 - transforms.IMAGE_MEAN) / transforms.IMAGE_STD
    assert torch.allclose(out[0, 2, 0], want, atol=1e-6)
    one = normalise_gray(g.numpy(), 1)
    assert one.shape == (2, 1, 1, 256) and one.is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_is_a_view_of_normalised_gray_bytes(shards, backend):
    batch = next(iter(build_loader(cfg(shards, backend), 0, 1)))
    img = batch["image"]
    assert img.shape == (8, 3, 64, 64) and img.stride(1) == 0  # expand view: no copy per channel
    levels = (img[:, 0] * transforms.IMAGE_STD + transforms.IMAGE_MEAN) * 255.0
    assert (levels - levels.round()).abs().max() < 1e-3  # exactly normalised 8-bit gray
    assert torch.equal(img.contiguous(), img[:, :1].repeat(1, 3, 1, 1))


def test_decode_image_is_crop_then_bicubic():
    """The torch resize matches PIL's bicubic on the same crop (torchvision's resized_crop) to within rounding."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base = (rng.random((90, 120)) * 40 + np.linspace(0, 200, 120)[None]).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    decoded = Image.open(io.BytesIO(data)).convert("L")
    for size in (48, 160):  # down- and upscaling
        out = transforms.decode_image(data, "k", size, False, 0, 0, (0.2, 1.0), (3 / 4, 4 / 3))
        assert out.shape == (size, size) and out.dtype == np.uint8
        x = (120 - 90) // 2
        ref = np.asarray(decoded.crop((x, 0, x + 90, 90)).resize((size, size), Image.BICUBIC), dtype=np.int16)
        assert np.abs(out.astype(np.int16) - ref).mean() < 0.5
    # a JPEG much larger than the crop is decoded at a reduced DCT scale: still the same picture
    big = np.asarray(Image.fromarray(base).resize((1200, 900), Image.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=95)
    out = transforms.decode_image(buf.getvalue(), "k", 64, False, 0, 0, (0.2, 1.0), (3 / 4, 4 / 3))
    x = (1200 - 900) // 2
    ref = np.asarray(Image.fromarray(big).crop((x, 0, x + 900, 900)).resize((64, 64), Image.BICUBIC), dtype=np.int16)
    assert np.abs(out.astype(np.int16) - ref).mean() < 2.0


def test_wds_workers_run_across_epochs(shards):
    """Workers kept across epochs give the very batches of workers restarted every epoch."""
    for kw in ({}, {"epoch_mode": "resample", "epoch_length": 3}):  # 3 batches, 2 workers: rotation per epoch
        c = cfg(shards, "wds", workers=2, **kw)
        kept = build_loader(c, 0, 1)
        a = [b for _ in range(3) for b in epoch(kept)]
        restarted = build_loader(c, 0, 1)
        b = []
        for _ in range(3):
            b += epoch(restarted)
            restarted.close()
        _same(a, b)
        assert kept.state_dict() == restarted.state_dict()
        kept.close()


def test_wds_interrupted_iteration_continues(shards):
    c = cfg(shards, "wds", workers=2, batch_size=4)  # 16 batches per epoch
    ref = epoch(build_loader(c, 0, 1))
    loader = build_loader(c, 0, 1)
    got = []
    for b in loader:  # abandon the iterator mid-epoch: the next iter() continues
        got.append(b)
        if len(got) == 5:
            break
    it = iter(loader)
    got += [next(it) for _ in range(4)]
    del it
    loader.close()  # workers stopped: the next iter() restarts them at the position
    got += epoch(loader)
    _same(got, ref)


def test_wds_buffer_ring_keeps_batches_intact(shards):
    """Reused shared-memory buffers (smallest ring: prefetch 1) never hand out a batch overwritten early."""
    c = cfg(shards, "wds", workers=2, batch_size=4, prefetch=1)
    loader = build_loader(c, 0, 1)
    ring = []
    for i in range(2):
        for b in loader:
            ring.append(b)
            if len(ring) % 5 == 0:
                time.sleep(0.05)  # let the workers fill their queues
    assert len(loader._ring_refs) >= 2 and loader._busy.shape == (2, 3)  # buffers were reused
    loader.close()
    loader = build_loader(dataclasses.replace(c, buffer_ring=False), 0, 1)  # fresh buffers per batch
    fresh = [b for _ in range(2) for b in epoch(loader)]
    assert not loader._ring_refs
    _same(ring, fresh)


def test_indexed_reads_match_webdataset(shards, tmp_path):
    tar = os.path.join(shards, "train-000001.tar")
    idx = tar[:-4] + ".idx"
    exts = frozenset(["jpg", "ids", "flags"])
    c1, c2 = wds_loader._Counters(), wds_loader._Counters()
    fast = list(wds_loader.read_indexed(tar, idx, 3, 16, c1, exts=exts))
    slow = list(wds_loader.read_segment(tar, 3, 16, c2))
    assert [s["__key__"] for s in fast] == [s["__key__"] for s in slow] and len(fast) == 13
    assert all(f[e] == s[e] for f, s in zip(fast, slow) for e in exts)
    assert "txt" not in fast[0]  # only the members the loader uses
    # a truncated tar: the same samples come back and the same ones are counted missing
    d = tmp_path / "cut"
    shutil.copytree(shards, d)
    _, lost = _truncate(str(d), "train-000001.tar", 0.5)
    tar, idx = str(d / "train-000001.tar"), str(d / "train-000001.idx")
    c1, c2 = wds_loader._Counters(), wds_loader._Counters()
    fast = [s["__key__"] for s in wds_loader.read_indexed(tar, idx, 0, 16, c1, exts=exts)]
    slow = [s["__key__"] for s in wds_loader.read_segment(tar, 0, 16, c2)]
    assert fast == slow and not (lost & set(fast)) and c1.missing == c2.missing == len(lost)

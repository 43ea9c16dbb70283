"""Streaming loader (issue 3): contract, agreement of the backends, epoch coverage, exact resume, bad data,
checks before work. Shards come from the real prep (synthetic source), small: 64 px crops, batch 8."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mrm_scale.formats import shards as sf
from mrm_scale.data import transforms
from mrm_scale.data.loader import LoaderConfig, LoaderError, ShardDataError, build_loader
from mrm_scale.data.prep import PrepOptions, run_prep

BACKENDS = ("dali", "wds")
S = 64


def make_shards(out: str, num: int, shard_size: int, val_fraction: float = 0.0, size: int = 96) -> dict:
    run_prep(PrepOptions(source="synthetic", out=str(out), num=num, shard_size=shard_size, synthetic_size=size,
                         val_fraction=val_fraction, vocab_size=500, progress=False))
    with open(os.path.join(out, sf.MANIFEST)) as f:
        return json.load(f)


def truth(folder: str, split: str = "train") -> dict[str, dict]:
    """key -> {'shard', 'ids', 'mask', 'ws'} read straight from the tars."""
    with open(os.path.join(folder, sf.MANIFEST)) as f:
        manifest = json.load(f)
    out = {}
    for e in manifest["splits"][split]["shards"]:
        for key, parts in sf.iter_tar_samples(os.path.join(folder, e["tar"])):
            ids, mask, ws = sf.decode_tokens(parts["ids"], parts["flags"])
            out[key] = {"shard": e["tar"], "ids": ids, "mask": mask, "ws": ws}
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 train samples in 4 shards of 16 (no val split)."""
    d = tmp_path_factory.mktemp("shards64")
    make_shards(d, 64, 16)
    return str(d)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """80 records, 20% val: uneven shard sizes (the last train shard is short)."""
    d = tmp_path_factory.mktemp("uneven")
    m = make_shards(d, 80, 16, val_fraction=0.2)
    assert len({s["samples"] for s in m["splits"]["train"]["shards"]}) > 1
    return str(d)


@pytest.fixture(scope="module")
def gt(shards):
    return truth(shards)


def cfg(shards, backend, **kw):
    base = dict(shards=shards, backend=backend, batch_size=8, image_size=S, workers=2, seed=3, shuffle_buffer=24)
    base.update(kw)
    return LoaderConfig(**base)


def epoch(loader) -> list[dict]:
    return list(loader)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ------------------------------------------------------------------------------------------ contract

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_contract(shards, gt, backend):
    loader = build_loader(cfg(shards, backend), rank=0, world_size=1)
    assert len(loader) == 8
    batch = next(iter(loader))
    assert set(batch) == {"image", "input_ids", "attention_mask", "word_start", "key"}
    B, L = 8, 100
    assert batch["image"].shape == (B, 3, S, S) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].shape == (B, L) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (B, L) and batch["attention_mask"].dtype == torch.int64
    assert batch["word_start"].shape == (B, L) and batch["word_start"].dtype == torch.bool
    assert isinstance(batch["key"], list) and len(batch["key"]) == B and all(k in gt for k in batch["key"])
    img = batch["image"]
    lo, hi = (0 - transforms.IMAGE_MEAN) / transforms.IMAGE_STD, (1 - transforms.IMAGE_MEAN) / transforms.IMAGE_STD
    assert img.min() >= lo - 0.05 and img.max() <= hi + 0.05 and img.std() > 0.1
    assert torch.equal(img[:, 0], img[:, 1]) and torch.equal(img[:, 0], img[:, 2])  # gray replicated
    with open(os.path.join(shards, sf.MANIFEST)) as f:
        tok = json.load(f)["tokenizer"]
    assert (batch["input_ids"][:, 0] == tok["cls_id"]).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok["pad_id"]).all()
    assert not (batch["word_start"] & (batch["attention_mask"] == 0)).any()
    assert batch["word_start"].any(dim=1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_channel_and_labels(shards, backend):
    loader = build_loader(cfg(shards, backend, channels=1, labels=["edema", "cardiomegaly", "nope"], workers=1),
                          rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (8, 1, S, S)
    lab = batch["labels"]
    assert lab.shape == (8, 3) and lab.dtype == torch.float32
    assert torch.isnan(lab[:, 2]).all() and not torch.isnan(lab[:, :2]).any()
    assert set(lab[:, :2].flatten().tolist()) <= {0.0, 1.0}


def test_backends_agree(shards, gt):
    """Same keys per epoch, the stored tokens for every key, and close pixels without augmentation."""
    seen = {}
    for backend in BACKENDS:
        batches = epoch(build_loader(cfg(shards, backend), rank=0, world_size=1))
        keys = keys_of(batches)
        assert sorted(keys) == sorted(gt), backend  # 64 samples, batch 8: nothing dropped
        for b in batches:
            for i, k in enumerate(b["key"]):
                assert np.array_equal(b["input_ids"][i].numpy(), gt[k]["ids"]), (backend, k)
                assert np.array_equal(b["attention_mask"][i].numpy(), gt[k]["mask"]), (backend, k)
                assert np.array_equal(b["word_start"][i].numpy(), gt[k]["ws"]), (backend, k)
        plain = next(iter(build_loader(cfg(shards, backend, augment=False, shuffle=False, workers=1),
                                       rank=0, world_size=1)))
        seen[backend] = plain
        augmented = {k: b["image"][i] for b in batches for i, k in enumerate(b["key"])}
        assert not torch.allclose(augmented[plain["key"][0]], plain["image"][0], atol=0.05)  # crops/flips happen
    a, b = seen["dali"], seen["wds"]
    assert a["key"] == b["key"]  # no shuffle: manifest order for both
    assert (a["image"] - b["image"]).abs().mean() < 0.02  # same resize + centre crop, two implementations


# ------------------------------------------------------------------------------------ epochs & ranks

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_two_workers_cover_epoch_once(shards, uneven, gt, backend):
    per_rank = [keys_of(epoch(build_loader(cfg(shards, backend), rank=r, world_size=2))) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 32
    assert sorted(per_rank[0] + per_rank[1]) == sorted(gt)  # every key exactly once
    # deterministic: the same order again; another epoch, another order
    loader = build_loader(cfg(shards, backend), rank=0, world_size=2)
    e0, e1 = keys_of(epoch(loader)), keys_of(epoch(loader))
    assert e0 == per_rank[0] and len(e1) == 32 and e1 != e0
    assert loader.epoch == 2
    # uneven shards (69 samples): equal full batches per rank, no repeats, only the documented remainder dropped
    n = sum(1 for _ in truth(uneven))
    got = [keys_of(epoch(build_loader(cfg(uneven, backend), rank=r, world_size=2))) for r in (0, 1)]
    steps = (n // 2) // 8 if backend == "dali" else 2 * ((n // 4) // 8)
    assert len(got[0]) == len(got[1]) == steps * 8
    allk = got[0] + got[1]
    assert len(set(allk)) == len(allk) and set(allk) <= set(truth(uneven))
    assert n - len(allk) < (2 * 8 if backend == "dali" else 4 * 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resample_mode(shards, backend):
    c = cfg(shards, backend, epoch_mode="resample", epoch_length=3, workers=1)
    a, b = build_loader(c, rank=1, world_size=2), build_loader(c, rank=1, world_size=2)
    ea, eb = epoch(a), epoch(b)
    assert len(ea) == 3 and keys_of(ea) == keys_of(eb)
    assert keys_of(epoch(a)) != keys_of(ea)
    with pytest.raises(LoaderError, match="epoch_length"):
        build_loader(cfg(shards, backend, epoch_mode="resample"), rank=0, world_size=1)


# -------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_resume(shards, backend):
    c = cfg(shards, backend, workers=2, batch_size=4)
    ref_loader = build_loader(c, rank=1, world_size=2)  # 8 batches per epoch per rank
    ref = epoch(ref_loader)
    it = iter(ref_loader)
    ref += [next(it) for _ in range(3)]
    del it

    loader = build_loader(c, rank=1, world_size=2)
    it = iter(loader)
    first = [next(it) for _ in range(3)]  # odd: the wds worker rotation matters
    assert keys_of(first) == keys_of(ref[:3])
    state = json.loads(json.dumps(loader.state_dict()))
    del it, loader
    assert state["epoch"] == 0 and state["batch"] == 3 and state["backend"] == backend
    assert len(json.dumps(state)) < 4096

    resumed = build_loader(c, rank=1, world_size=2, state=state)
    rest = epoch(resumed)
    it = iter(resumed)
    rest += [next(it) for _ in range(3)]
    assert keys_of(rest) == keys_of(ref[3:])
    for x, y in zip(rest, ref[3:]):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["input_ids"], y["input_ids"])

    # a state saved at an epoch boundary
    done = build_loader(c, rank=1, world_size=2)
    epoch(done)
    st = done.state_dict()
    assert (st["epoch"], st["batch"]) == (1, 0)
    again = build_loader(c, rank=1, world_size=2, state=st)
    assert keys_of([next(iter(again))]) == keys_of(ref[8:9])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_other_world_size(shards, backend):
    c = cfg(shards, backend, workers=1)
    loader = build_loader(c, rank=0, world_size=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    with pytest.raises(LoaderError, match=r"world size 2.*world size 1"):
        build_loader(c, rank=0, world_size=1, state=state)
    # at an epoch boundary the plan is simply recomputed for the new world size
    edge = dict(state, epoch=1, batch=0)
    fresh = build_loader(c, rank=0, world_size=1, state=edge)
    assert fresh.epoch == 1 and len(fresh) == 8


def states_mid_epoch(c: LoaderConfig, batches: int = 1, world: int = 2) -> tuple[list[dict], list[str]]:
    """Every rank's loader state after ``batches`` batches on each of ``world`` ranks, and the keys they yielded."""
    loaders = [build_loader(c, rank=r, world_size=world) for r in range(world)]
    its = [iter(x) for x in loaders]
    keys = [k for _ in range(batches) for it in its for k in next(it)["key"]]
    states = [x.state_dict() for x in loaders]
    for x in loaders:
        x.close()
    return states, keys


def test_wds_resharded_resume_shows_each_key_at_most_once(shards):
    """Interrupted mid-epoch on 2 ranks x 2 workers, resumed on 1 rank x 1 worker with another batch size, interrupted
    again and resumed on 2 ranks x 1 worker: over the epoch no key twice, and only partial-batch tails unseen."""
    states, seen = states_mid_epoch(cfg(shards, "wds", workers=2), batches=2)
    one = build_loader(cfg(shards, "wds", workers=1, batch_size=4), rank=0, world_size=1, states=states)
    assert len(one) == (64 - 32) // 4  # the 32 samples the epoch has left, in batches of 4
    it = iter(one)
    seen += [k for _ in range(3) for k in next(it)["key"]]
    chained = [one.state_dict()]
    assert len(chained[0]["reshard"]["chain"]) == 1
    one.close()
    again = one.state_dict()  # the same setup again: this very position, exact
    same = build_loader(cfg(shards, "wds", workers=1, batch_size=4), rank=0, world_size=1, states=[again])
    nxt = next(iter(same))["key"]
    same.close()
    rest = []
    for r in range(2):
        x = build_loader(cfg(shards, "wds", workers=1, batch_size=4), rank=r, world_size=2, states=chained)
        assert len(x) == (32 - 12) // 2 // 4
        rest.append(keys_of(epoch(x)))
        assert x.epoch == 1 and len(x) == 8  # the next epoch follows the normal plan of the new setup
    assert nxt == rest[0][:4]
    seen += rest[0] + rest[1]
    assert len(seen) == len(set(seen)) == 64 - 4  # 20 left over 2 ranks: 2 full batches each, 4 unseen
    # the order after the resume is each old reader's own remaining order
    assert set(seen) <= set(truth(shards))


def test_dali_refuses_a_mid_epoch_reshard(shards):
    c = cfg(shards, "dali", workers=1)
    states, _ = states_mid_epoch(c)
    with pytest.raises(LoaderError, match="cannot re-split its position over another setup.*resume with 2 ranks"):
        build_loader(c, rank=0, world_size=1, states=states)
    with pytest.raises(LoaderError, match="cannot re-split"):  # nor hand a DALI position to the wds backend
        build_loader(cfg(shards, "wds", workers=1), rank=0, world_size=1, states=states)


def test_resample_mode_refuses_a_mid_epoch_reshard(shards):
    c = cfg(shards, "wds", workers=1, epoch_mode="resample", epoch_length=4)
    states, _ = states_mid_epoch(c)
    with pytest.raises(LoaderError, match="resample mode.*cannot be\nre-split|resample mode.*re-split"):
        build_loader(c, rank=0, world_size=1, states=states)


def test_duplicate_keys_across_shards_are_refused(shards, tmp_path):
    from mrm_scale.data.loader import check_unique_keys, resolve_shards

    d = tmp_path / "dup"
    shutil.copytree(shards, d)
    check_unique_keys(resolve_shards(cfg(str(d), "wds")))  # intact: nothing to say
    names = [e["tar"] for e in json.loads((d / sf.MANIFEST).read_text())["splits"]["train"]["shards"]]
    shutil.copy(d / sf.index_name(names[0]), d / sf.index_name(names[2]))
    shutil.copy(d / names[0], d / names[2])
    with pytest.raises(LoaderError, match=f"is in both {names[0]} and {names[2]}.*mrm-scale verify"):
        check_unique_keys(resolve_shards(cfg(str(d), "wds")))


def test_wds_resume_other_workers(shards):
    loader = build_loader(cfg(shards, "wds", workers=2), rank=0, world_size=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    with pytest.raises(LoaderError, match="workers per rank 2.*workers per rank 1"):
        build_loader(cfg(shards, "wds", workers=1), rank=0, world_size=1, state=state)


# ------------------------------------------------------------------------------------------- bad data

def _entries(folder: str, tar: str) -> list[list[str]]:
    with open(os.path.join(folder, sf.index_name(tar))) as f:
        return [line.split() for line in f.read().splitlines()[1:]]


def _corrupt_jpeg(folder: str, tar: str, sample: int) -> str:
    fields = _entries(folder, tar)[sample]
    off = int(fields[fields.index("jpg") + 1])
    with open(os.path.join(folder, tar), "r+b") as f:
        f.seek(off + 2)
        f.write(b"\0" * 300)
    return fields[3].split(".")[0]


def _truncate(folder: str, tar: str, frac: float) -> tuple[int, set[str]]:
    """Cut a tar; returns its new size and the keys no longer fully inside it."""
    path = os.path.join(folder, tar)
    size = int(os.path.getsize(path) * frac)
    os.truncate(path, size)
    lost = set()
    for f in _entries(folder, tar):
        ends = [int(f[i + 1]) + int(f[i + 2]) for i in range(0, len(f), 4)]
        if max(ends) > size:
            lost.add(f[3].split(".")[0])
    return size, lost


@pytest.fixture()
def damaged(shards, tmp_path):
    d = str(tmp_path / "damaged")
    shutil.copytree(shards, d)
    return d


def test_wds_skips_and_counts_bad_samples(damaged, caplog):
    bad_key = _corrupt_jpeg(damaged, "train-000001.tar", 5)
    _, lost = _truncate(damaged, "train-000003.tar", 0.6)
    assert 0 < len(lost) < 16
    loader = build_loader(cfg(damaged, "wds", workers=2), rank=0, world_size=1)
    with caplog.at_level("WARNING", logger="mrm_scale.data.loader"):
        batches = epoch(loader)
    assert len(batches) == len(loader) == 8  # the run goes on, every batch full (short workers re-read)
    keys = keys_of(batches)
    assert bad_key not in keys and not (lost & set(keys))
    assert loader.skipped == 1 + len(lost)
    assert any(k == bad_key and s.endswith("train-000001.tar") for s, k, _ in loader.bad_samples)
    assert any(s.endswith("train-000003.tar") for s, _, _ in loader.bad_samples)
    assert bad_key in caplog.text and "train-000003.tar" in caplog.text
    assert loader.state_dict()["skipped"] == 1 + len(lost)


def test_dali_names_shard_and_key_of_corrupt_jpeg(damaged):
    bad_key = _corrupt_jpeg(damaged, "train-000002.tar", 7)
    loader = build_loader(cfg(damaged, "dali", workers=1), rank=0, world_size=1)
    with pytest.raises(ShardDataError) as e:
        epoch(loader)
    msg = str(e.value)
    assert "train-000002.tar" in msg and bad_key in msg and "mrm-scale verify" in msg


def test_dali_names_shard_and_key_of_truncated_tar(damaged):
    _, lost = _truncate(damaged, "train-000000.tar", 0.5)
    loader = build_loader(cfg(damaged, "dali", workers=1), rank=0, world_size=1)
    with pytest.raises(ShardDataError) as e:
        epoch(loader)
    msg = str(e.value)
    assert "train-000000.tar" in msg and any(k in msg for k in lost) and "mrm-scale verify" in msg


# --------------------------------------------------------------------------------- checks before work

def test_checks_before_work(shards, tmp_path):
    with pytest.raises(LoaderError, match="mrm-scale prep"):
        build_loader(cfg(str(tmp_path), "wds"), 0, 1)  # no manifest
    with pytest.raises(LoaderError, match=r"'val'.*mrm-scale prep"):
        build_loader(cfg(shards, "wds", split="val"), 0, 1)
    with pytest.raises(LoaderError, match=r"100 tokens.*max_tokens=128"):
        build_loader(cfg(shards, "dali", max_tokens=128), 0, 1)
    with pytest.raises(LoaderError, match="tokenizer sha256"):
        build_loader(cfg(shards, "wds", tokenizer_sha256="0" * 64), 0, 1)
    with pytest.raises(LoaderError, match=r"vocab_size.*vocab_size=30522"):
        build_loader(cfg(shards, "dali", vocab_size=30522), 0, 1)
    with pytest.raises(LoaderError, match=r"4 shards.*8 readers \(2 ranks × 4 workers\).*--shard-size"):
        build_loader(cfg(shards, "wds", workers=4), 0, 2)
    with pytest.raises(LoaderError, match=r"4 shards.*5 readers.*--shard-size"):
        build_loader(cfg(shards, "dali"), 0, 5)
    with pytest.raises(LoaderError, match="batch_size=64"):
        build_loader(cfg(shards, "dali", batch_size=64), 0, 2)
    with pytest.raises(LoaderError, match="backend"):
        build_loader(cfg(shards, "tfrecord"), 0, 1)
    # a missing shard file is named before any work
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    os.remove(broken / "train-000002.idx")
    with pytest.raises(LoaderError, match=r"train-000002\.idx.*mrm-scale verify"):
        build_loader(cfg(str(broken), "dali"), 0, 1)


def test_wds_urls_patterns_and_pipes(shards):
    """Brace patterns and pipe: URLs read the same samples as the folder (manifest found next to the tars)."""
    c = dict(workers=0, batch_size=16)
    ref = keys_of(epoch(build_loader(cfg(shards, "wds", **c), 0, 1)))
    pattern = os.path.join(shards, "train-{000000..000003}.tar")
    assert keys_of(epoch(build_loader(cfg(pattern, "wds", **c), 0, 1))) == ref
    pipes = [f"pipe:cat {os.path.join(shards, sf.shard_name('train', i))}" for i in range(4)]
    with pytest.raises(LoaderError, match="manifest="):
        build_loader(cfg(pipes, "wds", **c), 0, 1)
    got = keys_of(epoch(build_loader(cfg(pipes, "wds", manifest=os.path.join(shards, sf.MANIFEST), **c), 0, 1)))
    assert got == ref
    with pytest.raises(LoaderError, match="dali backend reads local tars"):
        build_loader(cfg(pipes, "dali", manifest=shards), 0, 1)

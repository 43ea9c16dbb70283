"""Weighted mixing of shard sets (mrm_scale.data.mixing): the shares, the mix's epoch, exact resume, disjoint
ranks × workers, both backends, and the refusals."""

import collections
import json
import os

import pytest

from mrm_scale.data.loader import LoaderConfig, LoaderError, build_loader
from mrm_scale.data.mixing import allocate, parse_mix
from mrm_scale.data.prep import PrepOptions, run_prep

WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


@pytest.fixture(scope="module")
def mix_root(tmp_path_factory):
    """Three synthetic shard sets of different sizes, tokenised with one vocabulary (a's)."""
    root = tmp_path_factory.mktemp("mix")
    sizes = {"a": 240, "b": 160, "c": 120}
    for i, (name, n) in enumerate(sizes.items()):
        run_prep(PrepOptions(source="synthetic", num=n, seed=10 + i, synthetic_size=48, shard_size=10, val_fraction=0.0,
                             out=str(root / name), progress=False,
                             tokenizer="train" if name == "a" else str(root / "a" / "tokenizer.json")))
    return root


def mix_cfg(root, backend="wds", workers=1, **kw):
    sources = parse_mix(",".join(f"{n}={w}" for n, w in WEIGHTS.items()), shards_root=str(root))
    return LoaderConfig(shards=str(root / "a"), mix=[s.to_dict() for s in sources], backend=backend, batch_size=8,
                        image_size=32, workers=workers, seed=5, **kw)


def draw(loader, n_batches):
    """(source, key) of each sample of the next ``n_batches`` batches, crossing epochs as the trainer does."""
    out, it = [], iter(loader)
    while len(out) < n_batches:
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        out.append(list(zip(b["source"], b["key"])))
    return out


def test_allocation_never_a_sample_off_its_share():
    w = [0.5, 0.3, 0.2]
    drawn = [0, 0, 0]
    for t in range(1, 1001):
        c = allocate(w, drawn, 1)
        drawn = [d + x for d, x in zip(drawn, c)]
        assert all(abs(d - wk * t) < 1 for d, wk in zip(drawn, w)), (t, drawn)
    assert allocate([1 / 3] * 3, [0, 0, 0], 8) in ([3, 3, 2], [3, 2, 3], [2, 3, 3])


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_shares_epoch_and_exact_resume(mix_root, backend):
    cfg = mix_cfg(mix_root, backend)
    loader = build_loader(cfg, 0, 1)
    per_source = {n: len(x) for n, x in loader.loaders.items()}
    assert len(loader) == sum(per_source.values()) == 30 + 20 + 15  # the mix's epoch: the sources' batches together
    seen = draw(loader, 125)  # 1,000 samples, across a mix epoch boundary; c (120 samples, 200 drawn) cycles
    counts = collections.Counter(s for batch in seen for s, _ in batch)
    for name, w in WEIGHTS.items():
        assert abs(counts[name] / 1000 - w) < 0.03, counts
        assert abs(loader.drawn[name] - 1000 * w) < 1
    assert len(set(s for s, _ in seen[0])) == 3  # every batch mixes the sources
    # a source cycles at its own length: within its first pass no key repeats, then its next epoch starts
    c_keys = [k for batch in seen for s, k in batch if s == "c"]
    assert len(set(c_keys[:120])) == 120 and set(c_keys[120:]) <= set(c_keys[:120])
    # save after k batches, restore (through JSON, as a checkpoint does): the same next keys
    loader.close()
    loader = build_loader(cfg, 0, 1)
    head = draw(loader, 37)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["drawn"] == loader.drawn and sum(state["drawn"].values()) == 37 * 8
    tail = draw(loader, 20)
    loader.close()
    resumed = build_loader(cfg, 0, 1, state=state)
    assert draw(resumed, 20) == tail
    assert head + tail == seen[:57]  # and the uninterrupted order is the same run to run
    resumed.close()


def test_two_ranks_two_workers_disjoint_and_resplit(mix_root):
    cfg = mix_cfg(mix_root, "wds", workers=2)
    loaders = [build_loader(cfg, r, 2) for r in (0, 1)]
    # within the first pass of the smallest source (c: 120 samples over 2 ranks)
    per_rank = [draw(x, 14) for x in loaders]
    sets = [set(s for batch in seen for s in batch) for seen in per_rank]
    assert all(len(s) == 14 * 8 for s in sets) and not sets[0] & sets[1]
    assert [sum(len(b) for b in seen) for seen in per_rank] == [112, 112]
    states = [x.state_dict() for x in loaders]
    # the very same setup continues exactly; another world size re-splits each source's remaining epoch
    nxt = [draw(x, 3) for x in loaders]
    for x in loaders:
        x.close()
    again = [build_loader(cfg, r, 2, states=states) for r in (0, 1)]
    assert [draw(x, 3) for x in again] == nxt
    for x in again:
        x.close()
    one = build_loader(cfg, 0, 1, states=states)
    rest = set(s for batch in draw(one, 10) for s in batch)
    assert not rest & (sets[0] | sets[1])  # nothing seen before is shown again in that source epoch
    one.close()


def test_mix_specs_and_refusals(mix_root, tmp_path):
    got = parse_mix("a=2,b=1,c=1", shards_root=str(mix_root))
    assert [(s.name, s.weight) for s in got] == [("a", 0.5), ("b", 0.25), ("c", 0.25)]
    assert got[0].path == os.path.join(str(mix_root), "a")
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"sources": [{"name": "mimic", "path": str(mix_root / "a"), "weight": 0.7},
                                         {"path": str(mix_root / "b"), "weight": 0.3}]}))
    assert [(s.name, s.path, s.weight) for s in parse_mix(str(f))] == [
        ("mimic", str(mix_root / "a"), 0.7), ("b", str(mix_root / "b"), 0.3)]
    y = tmp_path / "mix.yaml"
    y.write_text(f"{mix_root / 'a'}: 1\n{mix_root / 'c'}: 3\n")
    assert [(s.name, s.weight) for s in parse_mix(str(y))] == [("a", 0.25), ("c", 0.75)]
    for spec, msg in (("a=0.5,b=x", "weight 'x' is not a number"), ("a=0.5,b=0", "must be a positive number"),
                      ("a=0.5,a=0.5", "given twice"), ("a,b=1", "'a' is not NAME=WEIGHT")):
        with pytest.raises(LoaderError, match=msg):
            parse_mix(spec, shards_root=str(mix_root))
    cfg = mix_cfg(mix_root)
    missing = LoaderConfig(**{**cfg.to_dict(), "mix": cfg.mix + [{"name": "d", "path": str(tmp_path / "d"), "weight": 0.1}]})
    with pytest.raises(LoaderError, match=r"mix source 'd'.*no shard manifest"):
        build_loader(missing, 0, 1)
    # a state of one shard folder is not a mix position (and the reverse), named
    single = build_loader(LoaderConfig(shards=str(mix_root / "a"), backend="wds", batch_size=8, image_size=32,
                                       workers=1), 0, 1)
    it = iter(single)
    next(it), next(it)
    with pytest.raises(LoaderError, match="not a mix state"):
        build_loader(cfg, 0, 1, state=single.state_dict())
    single.close()

import os
import pathlib

import pytest

REALDATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def realdata():
    if not REALDATA.is_dir():
        pytest.skip("../shared/realdata is absent (only on project machines)")
    return REALDATA


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The trainer tests' corpus: 160 synthetic records (144 train, 16 val) in shards of 8, prepared once per
    test module. Modules that need another corpus define their own ``shards`` fixture, which takes precedence."""
    from mrm_scale.data.prep import PrepOptions, run_prep

    out = tmp_path_factory.mktemp("shards") / "syn"
    run_prep(PrepOptions(source="synthetic", out=str(out), num=160, synthetic_size=160, shard_size=8,
                         val_fraction=0.1, progress=False, workers=2))
    return str(out)

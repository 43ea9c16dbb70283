import gc
import os
import pathlib

import pytest

REALDATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    """Objects a test leaves in reference cycles are destroyed here, in the pytest process, and not later in a
    forked DataLoader worker of another test: a DALI pipeline destroyed in a fork waits forever for executor
    threads that the fork does not have (seen as a hung ``pt_data_worker`` holding the GIL)."""
    yield
    gc.collect()


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

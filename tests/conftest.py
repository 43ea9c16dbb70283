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

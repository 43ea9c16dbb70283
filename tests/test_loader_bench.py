"""Smoke test of `mrm-scale bench loader` (no timing asserts): both sides run, the last line is the JSON."""

from __future__ import annotations

import json

import pytest

from mrm_scale.cli import main
from test_loader import make_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_shards")
    make_shards(d, 32, 16, size=80)
    return str(d)


@pytest.mark.parametrize("backend", ("dali", "wds"))
def test_bench_loader_smoke(shards, tmp_path, capsys, backend):
    args = ["bench", "loader", "--shards", shards, "--backend", backend, "--workers", "1", "--batches", "2",
            "--runs", "2", "--warmup", "1", "--batch-size", "8", "--image-size", "48"]
    if backend == "wds":
        args += ["--export-baseline", str(tmp_path / "baseline")]
    else:  # the mixer against one folder: the same shards under two names, weighted 3:1
        mix = tmp_path / "mix.json"
        mix.write_text(json.dumps({"x": {"path": shards, "weight": 3}, "y": {"path": shards, "weight": 1}}))
        args += ["--mix", str(mix)]
    assert main(args) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["backend"] == backend and last["workers"] == 1
    assert last["samples_per_s"] > 0 and len(last["runs_samples_per_s"]) == 2
    if backend == "wds":
        assert last["baseline_samples_per_s"] > 0 and last["ratio"] > 0
        assert len(last["ratio_runs"]) == len(last["baseline_runs_samples_per_s"]) == 2  # interleaved rounds
        assert (tmp_path / "baseline" / "baseline.csv").read_text().count("\n") == 33  # header + 32 rows
    else:
        assert last["mix"] == [["x", 0.75], ["y", 0.25]] and last["mix_samples_per_s"] > 0 and last["mix_ratio"] > 0


def test_bench_loader_reports_config_errors(tmp_path, capsys):
    assert main(["bench", "loader", "--shards", str(tmp_path)]) == 2
    assert "mrm-scale prep" in capsys.readouterr().err

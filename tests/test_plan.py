"""`mrm-scale plan` and the activation-memory model under it: the formula against a measured CPU peak (tiny), the
model states against DeepSpeed's own estimators, and the planner's choices where memory is short."""

from __future__ import annotations

import json

import pytest

from mrm_scale import host_memory
from mrm_scale.cli import main
from mrm_scale.model import get_preset
from mrm_scale.model.memory import activation_bytes, measure_activation_bytes
from mrm_scale.model.presets import preset_names
from mrm_scale.train import plan


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.heap_in_use() is None, reason="needs glibc's mallinfo2 to measure the peak")
def test_activation_formula_agrees_with_the_measured_cpu_peak_on_tiny():
    cfg = get_preset("tiny")
    m = measure_activation_bytes(cfg)
    assert m["peaks"][8] > m["peaks"][4] > 0  # the peak grows with the batch
    f = activation_bytes(cfg, masked_tokens=m["masked_tokens_per_sample"], text_attention=m["text_attention"])
    assert f["total"] == pytest.approx(m["per_sample"], rel=0.15), (f, m)
    ck = measure_activation_bytes(cfg.replace(grad_checkpointing=True))
    fk = activation_bytes(cfg, masked_tokens=ck["masked_tokens_per_sample"], text_attention=ck["text_attention"],
                          grad_checkpointing=True)
    assert fk["total"] == pytest.approx(ck["per_sample"], rel=0.15), (fk, ck)


def test_checkpointing_keeps_block_inputs_only():
    cfg = get_preset("base")
    full, ckpt = activation_bytes(cfg), activation_bytes(cfg, grad_checkpointing=True)
    assert ckpt["encoder"] < full["encoder"] / 4 and ckpt["decoder"] < full["decoder"] / 4
    assert ckpt["recompute"] > 0 and full["recompute"] == 0
    assert ckpt["losses"] == full["losses"]  # the heads are not checkpointed


def test_model_states_are_deepspeeds_estimates():
    params, largest = 140_000_000, 12_000_000
    assert plan.model_state_bytes(2, params, largest, 8, 8) == 2 * params + int(18 * params / 8)
    assert plan.model_state_bytes(3, params, largest, 8, 8) == 4 * largest + int(18 * params / 8)
    assert plan.model_state_bytes(1, params, largest, 8, 8) > plan.model_state_bytes(2, params, largest, 8, 8)
    assert plan.model_state_bytes(3, params, largest, 16, 8) < plan.model_state_bytes(3, params, largest, 8, 8)


def test_plan_runs_for_every_preset_on_8_x_80gb(capsys):
    assert main(["plan", "--preset", "all", "--gpus", "8", "--gpu-mem", "80"]) == 0
    rows = last_json(capsys.readouterr().out)["rows"]
    assert [r["preset"] for r in rows] == preset_names()
    for r in rows:
        assert r["fits"] and r["zero"] in (2, 3) and 1 <= r["micro_batch"] <= r["largest_micro_batch"]
        assert r["gpu_memory_used_gib"] <= 80
        # one pass of MIMIC-CXR at 40% of 8 x 989 TFLOP/s: samples x FLOPs / rate
        rate = 8 * 989e12 * 0.4
        assert r["epoch_s"] == pytest.approx(377110 * r["model_gflop_per_sample"] * 1e9 / rate, rel=1e-9)
    by = {r["preset"]: r for r in rows}
    assert by["giant"]["largest_micro_batch"] < by["base"]["largest_micro_batch"]


def test_plan_turns_to_checkpointing_then_says_what_does_not_fit(capsys):
    assert main(["plan", "--preset", "giant", "--gpus", "8", "--gpu-mem", "24", "--micro-batch", "64"]) == 0
    r = last_json(capsys.readouterr().out)
    no_ckpt = [o for o in r["options"] if not o["grad_checkpointing"]]
    assert all(o["largest_micro_batch"] < 64 for o in no_ckpt)  # 64 needs checkpointing on 24 GiB
    assert r["fits"] and r["grad_checkpointing"] and r["micro_batch"] == 64
    assert main(["plan", "--preset", "giant", "--gpus", "1", "--gpu-mem", "16"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and last_json(out)["fits"] is False


def test_plan_refuses_an_unknown_gpu(capsys):
    assert main(["plan", "--preset", "base", "--gpu", "K80"]) == 2
    assert "--gpu 'K80'" in capsys.readouterr().err

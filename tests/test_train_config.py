"""Flags → resolved DeepSpeed config (no processes started): batch arithmetic, lr scaling, schedule."""

import argparse
import json
import os

import deepspeed
import pytest

from mrm_scale.train.config import PretrainArgs, RunConfigError, add_arguments, resolve_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZERO2 = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))


def resolve(flags, world=2, steps_per_epoch=100, ds=ZERO2):
    parser = argparse.ArgumentParser(conflict_handler="resolve")
    args = PretrainArgs.from_namespace(add_arguments(deepspeed.add_config_arguments(parser)).parse_args(flags))
    return resolve_ds_config(ds, args.train, world, steps_per_epoch, "/tmp/run")[0]


def test_batch_flags_fill_the_json_and_lr_scales_with_the_global_batch():
    cfg = resolve(["--micro-batch", "4", "--global-batch", "32", "--blr", "1e-3", "--max-steps", "100"])
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 4, 32)
    assert cfg["optimizer"]["params"]["lr"] == pytest.approx(1e-3 * 32 / 256)
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100 and cfg["scheduler"]["params"]["warmup_num_steps"] == 5
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95] and cfg["zero_optimization"]["stage"] == 2


def test_epochs_derive_steps_from_the_loader_length():
    cfg = resolve(["--micro-batch", "4", "--grad-accum", "2", "--epochs", "3"], steps_per_epoch=50)
    assert cfg["scheduler"]["params"]["total_num_steps"] == 3 * 50 // 2


def test_saved_warmup_is_what_deepspeed_runs():
    """DeepSpeed's WarmupCosineLR warms up for at least 2 steps (and refuses 0): the saved config says 2."""
    for flags in (["--max-steps", "10"], ["--max-steps", "10", "--warmup-steps", "0"]):
        cfg = resolve(["--micro-batch", "2", *flags])
        assert cfg["scheduler"]["params"]["warmup_num_steps"] == 2
    with pytest.raises(RunConfigError, match="--warmup-steps 20 exceeds --max-steps 10"):
        resolve(["--micro-batch", "2", "--max-steps", "10", "--warmup-steps", "20"])


def test_contradictions_are_refused_naming_the_field():
    with pytest.raises(RunConfigError, match="train_batch_size 64 in the DeepSpeed JSON"):
        resolve(["--max-steps", "5"], ds={**ZERO2, "train_batch_size": 64})
    with pytest.raises(RunConfigError, match="--grad-accum 3 contradicts --global-batch 32"):
        resolve(["--micro-batch", "4", "--global-batch", "32", "--grad-accum", "3", "--max-steps", "5"])
    with pytest.raises(RunConfigError, match="pass --max-steps"):
        resolve(["--micro-batch", "4"], steps_per_epoch=None)

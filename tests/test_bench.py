"""Smoke tests of `mrm-scale bench step`, `mrm-scale bench scaling` and `launch/bench_gpu.sh` (no timing asserts:
the figures depend on the machine; only that every field is there and positive)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mrm_scale.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_SCRIPT = os.path.join(REPO, "launch", "bench_gpu.sh")
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
STEP_FIELDS = ("samples_per_s", "model_gflop_per_sample", "achieved_gflop_s", "peak_gflop_s", "mfu", "step_s")


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ("bf16", "fp32"))
def test_bench_step_prints_every_field(capsys, precision):
    args = ["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
            "--precision", precision]
    assert main(args) == 0
    r = last_json(capsys.readouterr().out)
    for k in STEP_FIELDS:
        assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r[k])
    assert r["preset"] == "tiny" and r["batch"] == 2 and r["precision"] == precision
    assert len(r["step_s_all"]) == 2
    assert r["mfu"] == pytest.approx(r["achieved_gflop_s"] / r["peak_gflop_s"], rel=1e-2)
    assert r["achieved_gflop_s"] == pytest.approx(r["samples_per_s"] * r["model_gflop_per_sample"], rel=1e-2)


def test_bench_step_ab_alternates_two_builds_in_one_process(capsys):
    from mrm_scale.model import get_preset

    rule = get_preset("tiny").cpu_math_attention_max_tokens
    base = ["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1"]
    assert main(base) == 0
    plain = last_json(capsys.readouterr().out)
    assert main([*base, "--against", "--set report_weight=0 --cpu-math-attention-max-tokens 0"]) == 0
    r = last_json(capsys.readouterr().out)
    assert r["bench"] == "step-ab" and r["a"]["step_s"] > 0 and r["b"]["step_s"] > 0
    assert r["b_over_a"] == pytest.approx(r["b"]["step_s"] / r["a"]["step_s"], rel=1e-3)
    assert r["a"]["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-5)  # A is the flags as given
    assert r["b"]["loss_first"] < r["a"]["loss_first"] - 5  # B really is the variant: no report loss (~ln vocab)
    assert get_preset("tiny").cpu_math_attention_max_tokens == rule  # the variant's setting is not left behind
    assert main([*base, "--against", "--preset small"]) == 2
    assert "may not change --preset" in capsys.readouterr().err


def test_bench_step_engine_times_the_trainers_deepspeed_engine_on_the_same_step():
    """--engine: the same model and batch through DeepSpeed (ZeRO-2, bf16, world of one), in its own process (it
    starts a process group)."""
    cmd = [sys.executable, "-m", "mrm_scale.cli", "bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "2",
           "--warmup", "1", "--engine"]
    p = subprocess.run(cmd, cwd=REPO, env=dict(ENV, DS_ACCELERATOR="cpu"), capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = last_json(p.stdout)
    e = r["engine"]
    assert e["config"] == "zero2.json" and e["zero_stage"] == 2 and e["bf16"] is True
    assert e["optimizer"] == "DeepSpeedZeroOptimizer" and len(e["step_s_all"]) == 2
    assert e["loss_first"] == pytest.approx(r["loss_first"], rel=1e-4)  # same weights, same batch, same masks
    assert r["engine_over_plain"] == pytest.approx(r["step_s"] / e["step_s"], rel=1e-3)
    assert r["host_malloc"] == "retain"


def test_bench_step_original_times_the_original_codes_step_beside_ours(capsys):
    """--original: the original MRM step (fp32 weights under autocast, report loss at every position) at the same
    sizes on the same batch, in its own process, with the speed-up of ours."""
    args = ["bench", "step", "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--original"]
    assert main(args) == 0
    r = last_json(capsys.readouterr().out)
    o = r["original"]
    assert o["report_loss"] == "every position" and len(o["step_s_all"]) == 2 and o["step_s"] > 0
    assert r["plain_over_original"] == pytest.approx(o["step_s"] / r["step_s"], rel=1e-3)
    assert o["mfu"] == pytest.approx(r["mfu"] * r["step_s"] / o["step_s"], rel=1e-3)  # same model FLOPs
    assert main([*args, "--against=--compile"]) == 2
    assert "separate comparisons" in capsys.readouterr().err


def test_original_step_trains_and_scores_every_report_position():
    import torch

    from mrm_scale.bench.original import OriginalStep
    from mrm_scale.formats.tokenizer import TokenizerIdentity
    from mrm_scale.model import get_preset
    from mrm_scale.model.flops import synthetic_batch

    cfg, vocab = get_preset("tiny"), 1000
    ids = TokenizerIdentity.canonical(vocab).model_ids()
    batch = synthetic_batch(cfg, 4, vocab_size=vocab, seed=0)
    step = OriginalStep(cfg, batch, vocab, ids, "bf16", seed=0)
    assert all(p.dtype == torch.float32 for p in step.model.parameters())  # fp32 weights, autocast
    masked = step.batch["masked_ids"] == ids["mask_token_id"]
    assert 0.3 < float(masked[batch["attention_mask"].bool()].float().mean()) < 0.7  # half of the words masked
    for g in step.opt.param_groups:
        g["lr"] = 1e-3
    losses = [step.step(seed) for seed in range(12)]
    assert losses[-1] < losses[0] - 0.5, losses  # a real training step: the loss falls on a repeated batch
    assert step.grad_norm > 0


@pytest.mark.realdata
def test_original_model_has_every_key_and_shape_of_the_official_state_dict(realdata):
    """The baseline is the paper's model: its state dict (BERT under the original's bert_encoder.model. prefix)
    has exactly the keys and shapes of the official checkpoint's (official-mrm-keys.tsv)."""
    from mrm_scale.bench.original import OriginalMRM
    from mrm_scale.model import get_preset

    official = {}
    for line in (realdata / "official-mrm-keys.tsv").read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        official[key] = tuple(int(x) for x in shape.strip("()").split(",") if x.strip())
    vocab = official["bert_encoder.model.bert.embeddings.word_embeddings.weight"][0]
    sd = OriginalMRM(get_preset("base"), vocab, 0).state_dict()
    ours = {("bert_encoder.model." + k[len("bert."):] if k.startswith("bert.") else k): tuple(v.shape)
            for k, v in sd.items()}
    assert ours == official


def test_bench_step_refuses_bad_input(capsys):
    assert main(["bench", "step", "--preset", "nope", "--steps", "1"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert main(["bench", "step", "--preset", "tiny", "--device", "cuda", "--steps", "1"]) == 2
        assert "--device cpu" in capsys.readouterr().err


def test_step_bench_and_prep_import_no_deepspeed_or_dali(tmp_path):
    """The GPU script's machine has neither: `bench step` and `prep` must not import them."""
    code = (
        "import sys; from mrm_scale.cli import main\n"
        f"assert main(['prep', '--source', 'synthetic', '--num', '6', '--synthetic-size', '64', '--shard-size', '4', "
        f"'--out', {str(tmp_path / 'shards')!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'torch', 'nvidia'))\n"
        "assert not heavy, heavy  # prep: numpy, pillow, tokenizers only\n"
        "assert main(['bench', 'step', '--preset', 'tiny', '--batch', '1', '--steps', '1', '--warmup', '0']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'nvidia'))\n"
        "assert not heavy, heavy\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
                       check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.slow
def test_bench_scaling_one_and_two_ranks(capsys):
    args = ["bench", "scaling", "--preset", "tiny", "--micro-batch", "2", "--steps", "4", "--warmup", "1",
            "--image-size", "64", "--image-side", "96"]
    assert main(args) == 0
    r = last_json(capsys.readouterr().out)
    for k in ("samples_per_s_1rank", "samples_per_s_2rank", "per_rank_samples_per_s_2rank", "scaling_efficiency"):
        assert r[k] > 0, (k, r[k])
    assert 0 <= r["data_wait_fraction_1rank"] < 1 and 0 <= r["data_wait_fraction_2rank"] < 1
    assert [x["ranks"] for x in r["runs"]] == [1, 2]
    assert r["scaling_efficiency"] == pytest.approx(r["samples_per_s_2rank"] / (2 * r["samples_per_s_1rank"]), rel=1e-2)


def test_gpu_script_parses():
    subprocess.run(["bash", "-n", GPU_SCRIPT], check=True)


def test_bench_finetune_prints_decode_per_format_and_the_paper_step(capsys):
    assert main(["bench", "finetune", "--preset", "tiny", "--batch", "2", "--steps", "1", "--images", "2"]) == 0
    r = last_json(capsys.readouterr().out)
    formats = r["decode_ms_per_image_one_core"]
    assert {"nih_png_1024", "chexpert_jpeg_390x320", "covid_jpeg_512"} <= set(formats)
    assert any(k.startswith("rsna_dicom_1024") for k in formats)
    assert all(v["eval"] > 0 and v["train"] > 0 for v in formats.values())
    st = r["step"]
    assert st["preset"] == "tiny" and st["batch"] == 2 and st["train_images_per_s"] > 0 < st["score_images_per_s"]
    assert st["train_tflop_s"] == pytest.approx(3 * st["forward_gflop_per_image"] * st["train_images_per_s"] / 1e3,
                                                rel=1e-2)


def test_gpu_script_refuses_without_a_gpu():
    env = dict(ENV, CUDA_VISIBLE_DEVICES="")  # no GPU visible, whatever the machine has
    p = subprocess.run(["bash", GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 3
    assert "no CUDA GPU" in p.stderr and "--device cpu" in p.stderr
    assert "bench step" not in p.stdout  # refused before any work


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    """Every step of the GPU script (step bench, bf16 vs fp32 losses, prep + JPEG decode) on the CPU, with its
    table last: the script that will meet a GPU has run end to end."""
    p = subprocess.run(["bash", GPU_SCRIPT, "--device", "cpu", "--out", str(tmp_path)], env=ENV, capture_output=True,
                       text=True, timeout=600, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    table = p.stdout[p.stdout.index("mrm-scale GPU benchmark - cpu dry run"):]
    assert "FAILED" not in table
    assert "step tiny bf16" in table and "losses bf16 vs fp32" in table and "-> ok" in table
    assert re.search(r"decode_jpeg \d+ JPEGs +\| CPU \d+ img/s", table), table
    assert re.search(r"mrm-paper fine-tune step \(tiny, 224 px\) +\| batch 2: train [\d.]+ img/s", table), table
    assert re.search(r"the original code's step: [\d.]+ samples/s, ours [\d.]+x", table), table  # --original
    for name in ("step_tiny.json", "losses.json", "decode.json", "finetune.json"):
        assert (tmp_path / name).is_file()


def test_cpu_attention_kernel_rule_keeps_the_numbers():
    """Fast path of `bench step`: half-precision CPU stacks on short sequences use the math SDPA kernel (fp32 inside);
    losses and gradients stay those of the flash kernel, also under activation checkpointing (recompute)."""
    import torch

    import mrm_scale.model.mrm as mrm
    from mrm_scale.model import build_model
    from mrm_scale.model.flops import synthetic_batch

    ids = dict(vocab_size=300, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
    torch.manual_seed(0)
    model = build_model("tiny", **ids, text_dropout=0.0).to(torch.bfloat16)  # no dropout draws between the calls
    batch = synthetic_batch(model.cfg, 2, vocab_size=300)
    batch["image"] = batch["image"].to(torch.bfloat16)
    x = torch.zeros(1, 50, 8, dtype=torch.bfloat16)
    assert not isinstance(mrm.attention_kernels(x, 128), __import__("contextlib").nullcontext)
    assert isinstance(mrm.attention_kernels(x.float(), 128), __import__("contextlib").nullcontext)

    def loss_and_grads(threshold, ckpt=False):
        old = model.cfg.cpu_math_attention_max_tokens
        model.set_cpu_math_attention(threshold)
        model.set_grad_checkpointing(ckpt)
        try:
            model.zero_grad(set_to_none=True)
            out = model(batch, seed=3)
            out.loss.backward()
            return out.loss.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()])
        finally:
            model.set_cpu_math_attention(old)
            model.set_grad_checkpointing(False)

    flash_loss, flash_grad = loss_and_grads(0)
    math_loss, math_grad = loss_and_grads(128)
    ckpt_loss, ckpt_grad = loss_and_grads(128, ckpt=True)
    for loss, grad in ((math_loss, math_grad), (ckpt_loss, ckpt_grad)):
        torch.testing.assert_close(loss, flash_loss, rtol=1e-2, atol=0)
        cos = torch.nn.functional.cosine_similarity(grad, flash_grad, dim=0)
        assert cos > 0.99, float(cos)


def test_host_memory_policy_for_training_ranks(monkeypatch):
    from mrm_scale import host_memory

    if host_memory.apply("default") is None:
        pytest.skip("malloc is not glibc's")
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert host_memory.apply_for_training(2) is None and host_memory.current() == "default"  # untouched
    assert host_memory.apply_for_training(1) == "retain" == host_memory.current()
    monkeypatch.setenv(host_memory.ENV, "default")
    assert host_memory.apply_for_training(1) == "default" == host_memory.current()
    monkeypatch.setenv(host_memory.ENV, "keep")
    with pytest.raises(ValueError, match="MRM_HOST_MALLOC='keep'"):
        host_memory.apply_for_training(1)
    with pytest.raises(ValueError, match="retain"):
        host_memory.apply("keep")
    host_memory.apply("default")

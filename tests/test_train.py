"""The main job: `deepspeed launch/pretrain.py --deepspeed ds_configs/zeroN.json` with real multi-rank DeepSpeed
engines on CPU, real shards, real TensorBoard event files and checkpoints. The jobs are started the way every
caller starts them, through `mrm_scale.train.launcher` (`deepspeed --module mrm_scale.train.main`); the launch
scripts themselves keep a test each (torchrun + `launch/pretrain.py` here, `launch/slurm.sbatch` in
test_resilience.py)."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mrm_scale.ports import free_port
from mrm_scale.train.launcher import ENTRY, pretrain_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
PRETRAIN = os.path.join(REPO, "launch", "pretrain.py")  # the launch script (torchrun and SLURM tests)
# the tests' folder on the children's path: an `entry=` module of the tests (fault injection) is importable there
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join([TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]))
COMMON = ["--preset", "tiny", "--micro-batch", "4", "--log-every", "1", "--workers", "1"]

pytestmark = pytest.mark.slow


def launcher(nproc: int = 2, *, entry: str = ENTRY) -> list[str]:
    """The trainer's command without its flags (append them): the deepspeed launcher on a free rendezvous port
    (tests may run beside other jobs) running ``entry``; a plain ``python -m entry`` for one rank."""
    return pretrain_command([], nproc, entry=entry)


def deepspeed_cmd(config: str, *args, nproc: int = 2, entry: str = ENTRY) -> list[str]:
    return pretrain_command(["--deepspeed", os.path.join(REPO, "ds_configs", config), *COMMON, *args], nproc,
                            entry=entry)


def run(cmd, cwd=REPO, timeout=600, check=True, env=ENV):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        pytest.fail(f"exit {p.returncode}: {' '.join(cmd)}\n{out[-6000:]}")
    return p.returncode, out


def read_trace(run_dir):
    steps, final = {}, {}
    for path in sorted(glob.glob(os.path.join(run_dir, "trace", "rank*.jsonl"))):
        rank = int(os.path.basename(path)[4:-6])
        for line in open(path):
            rec = json.loads(line)
            if rec.get("final"):
                final[rank] = rec
            else:
                steps.setdefault(rank, {})[rec["step"]] = rec
    return steps, final


def tb_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {run_dir}/tb"
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


SCALARS = ["loss/total", "loss/image", "loss/report", "lr", "grad_norm", "throughput/samples_per_s",
           "throughput/tflops_per_device", "throughput/mfu", "time/data_wait_fraction", "memory/max_allocated_gb"]


def test_zero2_two_ranks_tensorboard_and_checkpoint(shards, tmp_path):
    cmd = deepspeed_cmd("zero2.json", "--shards", shards, "--out-root", str(tmp_path), "--name", "z2",
                        "--max-steps", "6", "--vis-every", "3", "--save-every", "3", "--keep-last", "1")
    _, out = run(cmd)
    port = cmd[cmd.index("--master_port") + 1]
    # DeepSpeed's CPU all-reduce buffers (one /dev/shm file per rank) are not left behind
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    run_dir = tmp_path / "z2"
    acc = tb_tags(str(run_dir))
    tags = acc.Tags()
    for s in SCALARS:
        assert s in tags["scalars"], f"{s} missing from TensorBoard; have {tags['scalars']}"
        assert [e.step for e in acc.Scalars(s)] == [1, 2, 3, 4, 5, 6]
    assert "vis/reconstruction" in tags["images"]
    assert any("vis/report" in t for t in tags["tensors"])  # text summaries are stored as tensors
    assert acc.Scalars("loss/total")[-1].value > 0
    # the image-use probe: every --vis-every steps and at the end, on the fixed val batch
    for key in ("loss_own_image", "loss_shuffled_image", "image_gain", "masked_accuracy",
                "image_gain_finding_words", "masked_accuracy_finding_words"):
        assert [e.step for e in acc.Scalars(f"report/{key}")] == [3, 6], key
    use = json.loads((run_dir / "image_use.json").read_text())
    n_val = json.loads((Path(shards) / "manifest.json").read_text())["splits"]["val"]["samples"]
    assert use["step"] == 6 and use["split"] == "val" and use["samples"] == min(32, n_val) >= 2
    assert use["masked_finding_tokens"] > 0
    assert use["image_gain"] == pytest.approx(use["loss_shuffled_image"] - use["loss_own_image"])
    assert acc.Scalars("report/image_gain")[-1].value == pytest.approx(use["image_gain"], rel=1e-5, abs=1e-6)
    assert f"image use ({use['samples']} val records" in out
    # keep-last 1: only the final checkpoint stays, complete
    assert sorted(d for d in os.listdir(run_dir / "checkpoints") if d.startswith("step")) == ["step00000006"]
    assert (run_dir / "checkpoints" / "step00000006" / "COMPLETE.json").is_file()
    cfg = json.loads((run_dir / "ds_config.json").read_text())
    assert cfg["train_batch_size"] == 8 and cfg["zero_optimization"]["stage"] == 2
    assert "step      6/6" in out and "resolved DeepSpeed config" in out


def test_two_ranks_over_a_weighted_mix(shards, tmp_path):
    """--shards NAME=WEIGHT,...: three shard sets with one tokenizer; per-source counts in TensorBoard, the
    checkpoint and the model card; a resume continues the mixed stream."""
    from mrm_scale.data.prep import PrepOptions, run_prep

    tok = os.path.join(shards, "tokenizer.json")
    for i, name in enumerate(("b", "c")):
        run_prep(PrepOptions(source="synthetic", num=48, seed=20 + i, synthetic_size=96, shard_size=8, val_fraction=0.0,
                             tokenizer=tok, out=str(tmp_path / name), progress=False))
    mix = f"{shards}=0.5,{tmp_path / 'b'}=0.3,{tmp_path / 'c'}=0.2"
    args = ["--shards", mix, "--out-root", str(tmp_path), "--name", "mix", "--vis-every", "0", "--trace"]
    _, out = run(deepspeed_cmd("zero2.json", *args, "--max-steps", "5", "--save-every", "5"))
    assert "samples per source (all ranks): syn 20, b 12, c 8" in out  # 5 steps x 8 samples, 0.5/0.3/0.2
    _, out = run(deepspeed_cmd("zero2.json", *args, "--max-steps", "10", "--save-every", "5"))
    assert "at step 5" in out and "samples per source (all ranks): syn 40, b 24, c 16" in out
    acc = tb_tags(str(tmp_path / "mix"))
    assert [(e.step, e.value) for e in acc.Scalars("data/samples/b")][-1] == (10, 24.0)
    assert acc.Scalars("data/share/c")[-1].value == pytest.approx(0.2)
    steps, _ = read_trace(str(tmp_path / "mix"))
    drawn = [(src, k) for r in (0, 1) for st in steps[r].values() for src, k in zip(st["sources"], st["keys"])]
    assert len(drawn) == 80 == len(set(drawn))  # no sample twice across ranks and the resume
    rec = json.loads((tmp_path / "mix" / "checkpoints" / "step00000010" / "COMPLETE.json").read_text())
    assert {n: sum(st["drawn"][n] for st in rec["loader"]) for n in ("syn", "b", "c")} == {"syn": 40, "b": 24, "c": 16}
    run([sys.executable, "-m", "mrm_scale.cli", "export", str(tmp_path / "mix"), "--out", str(tmp_path / "exp")])
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "a weighted mix of 3 shard sets" in card and "`b` weight 0.300" in card
    assert "mrm-scale synthetic corpus" in card and "licence: generated by mrm-scale" in card
    # the same run folder with one shard set is refused before compute, naming the mix
    code, out = run(deepspeed_cmd("zero2.json", "--shards", shards, "--out-root", str(tmp_path), "--name", "mix",
                                  "--max-steps", "12"), check=False)
    assert code != 0 and "trained on a mix of syn, b, c" in out and "Traceback" not in out


@pytest.mark.parametrize("config", ["zero1.json", "zero3.json", "zero3_offload.json"])
def test_other_zero_stages_train_and_checkpoint(shards, tmp_path, config):
    path = os.path.join(REPO, "ds_configs", config)
    if config == "zero1.json":  # also: DeepSpeed's own TensorBoard monitor switched on beside ours
        cfg = json.load(open(path))
        cfg["tensorboard"]["enabled"] = True
        path = str(tmp_path / "zero1_tb.json")
        json.dump(cfg, open(path, "w"))
    run([*launcher(2), "--deepspeed", path, *COMMON, "--shards", shards, "--out-root", str(tmp_path),
         "--name", "r", "--max-steps", "3", "--vis-every", "3", "--backend", "dali"])
    acc = tb_tags(str(tmp_path / "r"))
    tags = acc.Tags()
    for s in SCALARS:  # every scalar, the image and the text, under every stage (offload included)
        assert [e.step for e in acc.Scalars(s)] == [1, 2, 3], f"{s} under {config}"
    assert all(e.value > 0 for s in ("loss/total", "grad_norm", "throughput/mfu") for e in acc.Scalars(s))
    assert "vis/reconstruction" in tags["images"] and any("vis/report" in t for t in tags["tensors"])
    assert (tmp_path / "r" / "checkpoints" / "step00000003" / "COMPLETE.json").is_file()
    if config == "zero1.json":
        assert glob.glob(str(tmp_path / "r" / "tb_deepspeed" / "**" / "events.out.tfevents.*"), recursive=True)


@pytest.mark.parametrize("backend", ["wds", "dali"])
def test_killed_run_resumes_with_same_keys_and_losses(shards, tmp_path, backend):
    args = ["--shards", shards, "--out-root", str(tmp_path), "--max-steps", "8", "--save-every", "4", "--trace",
            "--backend", backend, "--vis-every", "0"]
    run(deepspeed_cmd("zero2.json", *args, "--name", "full"))
    code, _ = run(deepspeed_cmd("zero2.json", *args, "--name", "crash", "--crash-at", "5", entry="faulty_pretrain"),
                  check=False)
    assert code != 0
    assert [d for d in os.listdir(tmp_path / "crash" / "checkpoints") if d.startswith("step")] == ["step00000004"]
    interrupted = tmp_path / "crash" / "checkpoints" / "step00000006"  # a newer save that never finished
    interrupted.mkdir()
    (interrupted / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    _, out = run(deepspeed_cmd("zero2.json", *args, "--name", "crash", "--resume", "auto"))
    assert "resumed from" in out and "at step 4" in out
    assert not interrupted.exists()  # pruned once step 8 was complete
    full, full_final = read_trace(str(tmp_path / "full"))
    resumed, resumed_final = read_trace(str(tmp_path / "crash"))
    for rank in (0, 1):
        for step in range(5, 9):
            assert resumed[rank][step]["keys"] == full[rank][step]["keys"], (rank, step)
            for k in ("loss", "image_loss", "report_loss"):
                assert resumed[rank][step][k] == pytest.approx(full[rank][step][k], rel=2e-2, abs=2e-3), (rank, step, k)
    assert resumed_final[0]["param_sha256"] == resumed_final[1]["param_sha256"]
    if backend == "wds":  # resumes that would be silently wrong are refused before compute, naming what differs
        code, out = run(deepspeed_cmd("zero2.json", *args, "--name", "crash", "--resume", "auto", "--image-size", "64"),
                        check=False)
        assert code != 0 and "img_size=128 (this run: 64)" in out and "Traceback" not in out, out[-3000:]


def test_two_nodes_on_localhost(shards, tmp_path):
    """Two launcher processes (one rank each) meeting at a shared rendezvous on 127.0.0.1."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, PRETRAIN,
               "--deepspeed", os.path.join(REPO, "ds_configs", "zero2.json"), *COMMON, "--shards", shards,
               "--out-root", str(tmp_path), "--name", "nodes", "--max-steps", "3", "--trace", "--vis-every", "0"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    steps, final = read_trace(str(tmp_path / "nodes"))
    assert sorted(final) == [0, 1] and all(f["world_size"] == 2 for f in final.values())
    keys0 = {k for s in steps[0].values() for k in s["keys"]}
    keys1 = {k for s in steps[1].values() for k in s["keys"]}
    assert keys0 and keys1 and not keys0 & keys1  # each rank reads different shards
    assert final[0]["param_sha256"] == final[1]["param_sha256"]  # replicas agree after training


def test_nan_loss_is_skipped_then_repeated_nans_stop_the_run(shards, tmp_path):
    args = ["--shards", shards, "--out-root", str(tmp_path), "--vis-every", "0", "--backend", "wds"]
    _, out = run(deepspeed_cmd("zero2.json", *args, "--name", "once", "--max-steps", "4", "--nan-steps", "2",
                               "--trace", entry="faulty_pretrain"))
    assert "non-finite loss" in out
    acc = tb_tags(str(tmp_path / "once"))
    assert [e.value for e in acc.Scalars("train/bad_steps")] == [0, 1, 1, 1]
    steps, _ = read_trace(str(tmp_path / "once"))
    assert sorted(steps[0]) == [1, 2, 3, 4]  # the step still completed, with the next batch
    code, out = run(deepspeed_cmd("zero2.json", *args, "--name", "many", "--max-steps", "6",
                                  "--nan-steps", "2,2,2", "--max-bad-steps", "3", entry="faulty_pretrain"), check=False)
    assert code != 0
    assert "NaN/inf for 3 consecutive batches" in out and "--blr" in out, out[-3000:]


def test_default_shards_demo_is_prepared_on_first_use(tmp_path):
    """Only --deepspeed given (plus a tiny preset to keep CI short): shards/demo is prepared by rank 0."""
    cmd = [*launcher(2), "--deepspeed",
           os.path.join(REPO, "ds_configs", "zero2.json"), "--preset", "tiny", "--max-steps", "2", "--demo-num", "96",
           "--micro-batch", "2", "--vis-every", "0"]
    _, out = run(cmd, cwd=str(tmp_path))
    assert "preparing the built-in synthetic corpus" in out
    assert (tmp_path / "shards" / "demo" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "mrm-tiny" / "checkpoints" / "step00000002" / "COMPLETE.json").is_file()


def _single(args, cwd=REPO):
    return run(pretrain_command(args, 1), cwd=cwd, check=False)


def test_checks_before_compute(shards, tmp_path):
    ds = os.path.join(REPO, "ds_configs", "zero2.json")
    base = ["--deepspeed", ds, "--preset", "tiny", "--shards", shards, "--out-root", str(tmp_path)]
    code, out = _single([*base[:-4], "--preset", "vit-mega", "--shards", shards])
    assert code == 2 and "unknown model preset 'vit-mega'" in out
    code, out = _single([*base, "--micro-batch", "4", "--global-batch", "10"])
    assert code == 2 and "--global-batch 10 is not divisible by micro batch 4" in out
    code, out = _single(["--deepspeed", ds, "--preset", "tiny", "--shards", str(tmp_path / "nowhere")])
    assert code == 2 and "no manifest.json there" in out and "mrm-scale prep" in out
    other = tmp_path / "other_tokenizer.json"
    shutil.copy(os.path.join(shards, "tokenizer.json"), other)
    other.write_text(other.read_text().replace('"[UNK]"', '"[UNK]" ', 1))
    code, out = _single([*base, "--tokenizer", str(other)])
    assert code == 2 and "tokenizer sha256" in out
    code, out = _single([*base, "--backend", "wds", "--workers", "64"])
    assert code == 2 and "fewer than the 64 readers" in out
    code, out = _single([*base, "--set", "text_dropout=lots"])
    assert code == 2 and "--set 'text_dropout=lots': field 'text_dropout' takes a number" in out, out[-2000:]
    code, out = _single([*base, "--set", "text_widht=128"])
    assert code == 2 and "unknown config field 'text_widht'" in out and "Traceback" not in out
    assert not (tmp_path / "mrm-tiny" / "checkpoints").exists()  # nothing trained

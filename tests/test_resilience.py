"""Training that survives a cluster, with real multi-rank DeepSpeed runs on CPU: resume under another world size and
ZeRO stage (DeepSpeed's universal checkpoints, the epoch's remaining samples re-split), preemption signals, a
launcher killed, a rank killed, a full disk, damaged checkpoints and shard folders refused before compute."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import psutil
import pytest
import torch

from mrm_scale.data.loader import LoaderConfig, build_loader
from mrm_scale.formats import shards as sf
from mrm_scale.ports import free_port
from mrm_scale.train.checkpoint import find_resume
from mrm_scale.train.launcher import ENTRY, pretrain_command, start_pretraining, stop
from mrm_scale.train.preemption import EXIT_PREEMPTED
from test_train import COMMON, ENV, REPO, deepspeed_cmd, read_trace, run

pytestmark = pytest.mark.slow

CFG = {n: os.path.join(REPO, "ds_configs", n) for n in ("zero1.json", "zero2.json", "zero3.json")}
TRAIN_SAMPLES = 144  # 160 records, 10% val


def single(*flags, entry=ENTRY, check=True):
    """One rank: the launcher's `python -m entry` (the trainer makes a world of one)."""
    return run(pretrain_command(list(flags), 1, entry=entry), check=check)


def keys_per_step(run_dir):
    steps, _ = read_trace(str(run_dir))
    out = {}
    for rank, by_step in steps.items():
        for step, rec in by_step.items():
            out.setdefault(step, {})[rank] = rec["keys"]
    return out


def wait_for_step(run_dir, step, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        steps, _ = read_trace(str(run_dir)) if os.path.isdir(os.path.join(run_dir, "trace")) else ({}, {})
        if any(s >= step for by in steps.values() for s in by):
            return
        if proc.poll() is not None:
            pytest.fail(f"the trainer ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.3)
    pytest.fail(f"no step {step} within {timeout} s")


def rank_processes(proc):
    """The trainer's rank processes under a launcher (not their loader workers)."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any(a.startswith("--local_rank") for a in p.cmdline()) and \
                    not any(a.startswith("--local_rank") for a in p.parent().cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def alive(procs):
    return [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_resume_on_another_world_size_and_zero_stage(shards, tmp_path):
    """2 ranks ZeRO-2 -> 1 rank ZeRO-3 -> 2 ranks ZeRO-1 through one epoch: the fp32 master weights, Adam moments
    and step carry over exactly, and every training key of the epoch is seen exactly once."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    flags = ["--shards", shards, "--out-root", str(tmp_path), "--name", "w", "--save-every", "4", "--keep-last",
             "10", "--trace", "--backend", "wds", "--vis-every", "0"]
    code, _ = run(deepspeed_cmd("zero2.json", *flags, "--max-steps", "40", "--crash-at", "5",
                                entry="faulty_pretrain"), check=False)
    assert code != 0
    ckpt = tmp_path / "w" / "checkpoints"
    # 144 samples: 2 ranks x 4 = 18 steps per epoch; 4 done. 1 rank gets the 112 left: 28 steps, 4 of them here
    _, out = single("--deepspeed", CFG["zero3.json"], *COMMON, *flags, "--max-steps", "40", "--crash-at", "9",
                    "--dump-after-resume", str(tmp_path / "after4.pt"), entry="faulty_pretrain", check=False)
    assert "2 ranks -> 1, ZeRO stage 2 -> 3" in out and "through DeepSpeed's universal checkpoint" in out, out[-3000:]
    assert (ckpt / "step00000004" / "universal" / "zero").is_dir()  # kept beside the tag
    # the inspection names what the next resume will do
    _, table = run([sys.executable, "-m", "mrm_scale.cli", "checkpoint", "inspect", str(tmp_path / "w"),
                    "--nproc", "2", "--deepspeed", CFG["zero1.json"]])
    assert "step00000008" in table and "universal form kept" in table
    assert "takes step00000008: loads it through DeepSpeed's universal form (1 ranks -> 2, ZeRO stage 3 -> 1" in table
    # 96 samples left: 2 ranks x 4 = 12 more steps end the epoch at step 20
    _, out = run(deepspeed_cmd("zero1.json", *flags, "--max-steps", "20", "--dump-after-resume",
                               str(tmp_path / "after8.pt"), entry="faulty_pretrain"))
    assert "resumed from" in out and "at step 8" in out
    for tag, dump in (("step00000004", "after4.pt"), ("step00000008", "after8.pt")):
        saved = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        loaded = torch.load(tmp_path / dump, weights_only=False)
        assert loaded["step"] == int(tag[4:]) and loaded["adam_steps"] == [int(tag[4:])]
        assert loaded["fp32"], "no parameters dumped"
        for name, value in loaded["fp32"].items():
            assert torch.equal(saved[name].float(), value), (tag, name)
        for name in ("exp_avg", "exp_avg_sq"):  # the moments as DeepSpeed's universal form holds them
            for pname, value in loaded[name].items():
                form = torch.load(ckpt / tag / "universal" / "zero" / pname / f"{name}.pt", weights_only=False)
                form = form["param"] if isinstance(form, dict) else form
                assert torch.equal(form.float().reshape(value.shape), value), (tag, name, pname)
        assert any(v.abs().sum() > 0 for v in loaded["exp_avg"].values())
    seen = Counter(k for by_rank in keys_per_step(tmp_path / "w").values() for keys in by_rank.values() for k in keys)
    assert max(seen.values()) == 1, [k for k, v in seen.items() if v > 1][:5]
    assert len(seen) == TRAIN_SAMPLES  # nothing skipped either: 4*8 + 4*4 + 12*8 = 144
    steps = keys_per_step(tmp_path / "w")
    assert sorted(steps) == list(range(1, 21))
    assert [len(steps[s]) for s in (4, 5, 8, 9)] == [2, 1, 1, 2]


def test_slurm_preemption_checkpoints_requeues_and_resumes_with_the_same_keys(shards, tmp_path):
    """launch/slurm.sbatch as SLURM runs it: srun starts one task per rank (a stand-in that sets SLURM_PROCID & co.);
    SIGUSR1 to the ranks (what --signal=USR1@120 does) -> a complete checkpoint at the next step, exit 75, scontrol
    requeue; the requeued job resumes by itself and sees exactly the keys an uninterrupted run would have."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = show ] && echo 127.0.0.1\nexit 0\n')
    (bin_dir / "srun").write_text(f"#!{sys.executable}\n" + '''import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
n = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                         SLURM_NTASKS_PER_NODE=str(n))) for i in range(n)]
sys.exit(max(p.wait() for p in procs))
''')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(ENV, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{ENV['PATH']}", SLURM_JOB_NODELIST="node1",
               SLURM_NNODES="1", SLURM_NTASKS="2", SLURM_JOB_ID="4242", MASTER_PORT=str(free_port()),
               RUN_NAME="pre", PYTHONPATH=os.pathsep.join([REPO, ENV["PYTHONPATH"]]))
    flags = [*COMMON, "--shards", shards, "--out-root", str(tmp_path), "--max-steps", "12", "--vis-every", "0",
             "--trace", "--backend", "wds", "--save-every", "100", f"--deepspeed={CFG['zero1.json']}"]
    script = ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *flags]
    proc = subprocess.Popen(script, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_step(tmp_path / "pre", 2, proc)
        me = ["-u", "launch/pretrain.py"]  # a rank; its loader workers are forks of it (same command line)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if p.cmdline()[1:3] == me and p.parent().cmdline()[1:3] != me]
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        for p in ranks:
            p.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert "requeue 4242" in calls.read_text() and "requeueing job 4242" in out
    stopped = [t for t in os.listdir(tmp_path / "pre" / "checkpoints") if t.startswith("step")]
    assert len(stopped) == 1 and f"stopped at step {int(stopped[0][4:])} on SIGUSR1" in out, out[-3000:]
    assert 2 <= int(stopped[0][4:]) < 12
    assert (tmp_path / "pre" / "checkpoints" / stopped[0] / "COMPLETE.json").is_file()
    assert "Traceback" not in out, out[-3000:]
    code, out = run(script, env=env)  # the requeued job: the same command
    assert "resumed from" in out and f"at step {int(stopped[0][4:])}" in out
    ds = json.loads((tmp_path / "pre" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_batch_size"] == 8  # the given config, 2 ranks
    # what an uninterrupted run sees: the plan of the run's own loader config, iterated here
    record = json.loads((tmp_path / "pre" / "run_config.json").read_text())
    cfg = LoaderConfig(**{k: tuple(v) if k in ("crop_scale", "crop_ratio") else v
                          for k, v in record["loader"].items()})
    steps = keys_per_step(tmp_path / "pre")
    assert sorted(steps) == list(range(1, 13))
    for rank in (0, 1):
        loader = build_loader(cfg, rank, 2)
        expected = [b["key"] for _, b in zip(range(12), loader)]
        loader.close()
        assert [steps[s][rank] for s in range(1, 13)] == expected, rank


def test_sigterm_to_the_deepspeed_launcher_stops_every_rank_with_a_checkpoint(shards, tmp_path):
    log = tmp_path / "job.log"
    proc = start_pretraining(["--deepspeed", CFG["zero2.json"], *COMMON, "--shards", shards, "--out-root",
                              str(tmp_path), "--name", "t", "--max-steps", "400", "--save-every", "1000", "--trace",
                              "--vis-every", "0", "--backend", "wds"], 2, log_path=str(log), env=ENV)
    try:
        wait_for_step(tmp_path / "t", 2, proc)
        ranks = rank_processes(proc)
        assert len(ranks) == 2
        proc.send_signal(signal.SIGTERM)  # the runner alone: it does not pass SIGTERM on
        proc.wait(timeout=60)
        deadline = time.time() + 60  # the ranks notice within a second and stop after their next step
        while alive(ranks) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive(ranks), "ranks kept running after the launcher was terminated"
    finally:
        stop(proc)
    text = log.read_text()
    assert "stopped at step" in text and ("the deepspeed launcher" in text or "stop request" in text), text[-3000:]
    tags = [t for t in os.listdir(tmp_path / "t" / "checkpoints") if t.startswith("step")]
    assert len(tags) == 1 and (tmp_path / "t" / "checkpoints" / tags[0] / "COMPLETE.json").is_file()


def test_a_killed_rank_ends_the_job_naming_it(shards, tmp_path):
    log = tmp_path / "job.log"
    proc = start_pretraining(["--deepspeed", CFG["zero2.json"], *COMMON, "--shards", shards, "--out-root",
                              str(tmp_path), "--name", "k", "--max-steps", "400", "--trace", "--vis-every", "0",
                              "--backend", "wds"], 2, log_path=str(log), env=ENV)
    try:
        wait_for_step(tmp_path / "k", 2, proc)
        ranks = rank_processes(proc)
        victim = next(p for p in ranks if "--local_rank=1" in p.cmdline())
        victim.kill()
        t0 = time.time()
        code = proc.wait(timeout=120)  # the documented bound: the launcher's 30 s grace (README, "Resilience")
        took = time.time() - t0
    finally:
        stop(proc)
    text = log.read_text()
    assert code != 0 and took < 120
    assert f"rank 1 (pid {victim.pid}" in text and "is gone" in text, text[-3000:]
    assert not alive(ranks)


def test_full_disk_during_a_save_names_the_path_and_the_previous_checkpoint_loads(shards, tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI and project machines have it)")
    try:
        flags = ["--shards", shards, "--name", "f", "--save-every", "4", "--vis-every", "0", "--backend", "wds"]
        code, out = run(deepspeed_cmd("zero2.json", *flags, "--out-root", str(disk), "--max-steps", "12"), check=False)
        tag8 = disk / "f" / "checkpoints" / "step00000008"
        assert code == 2, out[-3000:]
        assert f"error: writing checkpoint {tag8} failed: the disk is full" in out and "free of 7.0 MB" in out
        assert "step00000004, is intact" in out and "Traceback" not in out, out[-3000:]
        assert not tag8.exists()  # the partial tag gave its space back
        _, out = run(deepspeed_cmd("zero2.json", *flags, "--out-root", str(tmp_path), "--max-steps", "5",
                                   "--resume", str(disk / "f" / "checkpoints" / "step00000004")))
        assert "at step 4" in out and (tmp_path / "f" / "checkpoints" / "step00000005" / "COMPLETE.json").is_file()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_damaged_newest_checkpoint_falls_back_and_another_zero_stage_resumes(shards, tmp_path):
    flags = ["--shards", shards, "--out-root", str(tmp_path), "--name", "d", "--save-every", "4", "--vis-every", "0",
             "--backend", "wds"]
    run(deepspeed_cmd("zero2.json", *flags, "--max-steps", "8"))
    ckpt = tmp_path / "d" / "checkpoints"
    lost = ckpt / "step00000008" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    lost.unlink()
    with pytest.raises(FileNotFoundError, match=f"{lost} is missing.*--resume auto"):  # asked for by name: refused
        find_resume(str(ckpt), str(ckpt / "step00000008"))
    _, out = run(deepspeed_cmd("zero2.json", *flags, "--max-steps", "9", "--save-every", "100"))
    assert f"warning: checkpoint {ckpt / 'step00000008'} is damaged: {lost} is missing" in out, out[-3000:]
    assert "resumed from" in out and "at step 4" in out
    assert (ckpt / "step00000008.damaged").is_dir() and not (ckpt / "step00000008").exists()  # set aside, not lost
    # the very re-run of the issue: the same --name with zero3.json resumes instead of DeepSpeed's AssertionError
    _, out = run(deepspeed_cmd("zero3.json", *flags, "--max-steps", "10", "--save-every", "100"))
    assert "ZeRO stage 2 -> 3" in out and "at step 9" in out and "AssertionError" not in out
    assert (ckpt / "step00000010" / "COMPLETE.json").is_file()


def test_shard_folder_faults_are_refused_before_compute(shards, tmp_path):
    base = ["--deepspeed", CFG["zero2.json"], *COMMON, "--out-root", str(tmp_path), "--vis-every", "0"]
    dup = tmp_path / "dup"
    shutil.copytree(shards, dup)
    manifest = json.loads((dup / "manifest.json").read_text())
    a, b = [e["tar"] for e in manifest["splits"]["train"]["shards"][:2]]
    shutil.copy(dup / a, dup / b)  # a shard replaced by a copy of another, with its index
    shutil.copy(dup / a.replace(".tar", ".idx"), dup / b.replace(".tar", ".idx"))
    code, out = single(*base, "--shards", str(dup), "--backend", "wds", check=False)
    assert code == 2 and f"is in both {a} and {b}" in out and "mrm-scale verify" in out, out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "mrm-tiny" / "checkpoints").exists()
    notok = tmp_path / "notok"
    shutil.copytree(shards, notok)
    (notok / "tokenizer.json").unlink()
    code, out = single(*base, "--shards", str(notok), check=False)
    assert code == 2 and f"{notok / 'tokenizer.json'}: the shards' tokenizer is missing" in out, out[-3000:]
    # a shard DALI cannot decode: one line naming shard and key, no traceback
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    for e in manifest["splits"]["train"]["shards"]:
        with open(bad / e["tar"], "r+b") as f:
            for key, members in sf.read_index(str(bad / sf.index_name(e["tar"]))):
                off = next(o for ext, o, _ in members if ext == "jpg")
                f.seek(off + 2)
                f.write(b"\0" * 300)
    code, out = single(*base, "--shards", str(bad), "--backend", "dali", "--max-steps", "2", check=False)
    assert code == 2 and "error: " in out and "mrm-scale verify" in out and "Traceback" not in out, out[-3000:]
    assert any(f"{e['tar']}" in out for e in manifest["splits"]["train"]["shards"])
    # a mid-epoch DALI position cannot be re-split: refused before compute, naming the way out
    run(deepspeed_cmd("zero2.json", "--shards", shards, "--out-root", str(tmp_path), "--name", "dl", "--max-steps",
                      "2", "--vis-every", "0", "--backend", "dali"))
    code, out = single(*base, "--shards", shards, "--name", "dl", "--max-steps", "4", "--backend", "dali",
                       check=False)
    assert code == 2 and "cannot re-split" in out and "resume with 2 ranks" in out, out[-3000:]
    assert "Traceback" not in out

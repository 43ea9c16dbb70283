"""The pretraining job with faults injected, for tests only (the production job has no such flags).

    deepspeed ... --module faulty_pretrain --crash-at 5 <the job's flags>     hard exit before step 5 (a killed job)
    deepspeed ... --module faulty_pretrain --nan-steps 2,2,3 <flags>          the next two batches tried for step 2
                                                                              and the next one for step 3 are NaN
    deepspeed ... --module faulty_pretrain --dump-after-resume F.pt <flags>   right after a resume, rank 0 saves the
                                                                              full fp32 master weights, Adam moments
                                                                              and lr (every rank takes part: ZeRO-3)
"""

import argparse
import os
from collections import Counter

from mrm_scale.train.loop import LoopHooks
from mrm_scale.train.main import main


class Faults(LoopHooks):
    def __init__(self, crash_at: int | None, nan_steps: str, dump: str | None = None):
        self.crash_at = crash_at
        self.nan = Counter(int(s) for s in nan_steps.split(",") if s.strip())
        self.dump = dump

    def after_resume(self, engine, step: int) -> None:
        if not self.dump:
            return
        import torch
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out = {"step": step, "lr": engine.get_lr()[0], "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for name, p in engine.module.named_parameters():  # collective under ZeRO-3: every rank calls it
            out["fp32"][name] = safe_get_full_fp32_param(p).float().cpu().clone()
            out["exp_avg"][name] = safe_get_full_optimizer_state(p, "exp_avg").float().cpu().clone()
            out["exp_avg_sq"][name] = safe_get_full_optimizer_state(p, "exp_avg_sq").float().cpu().clone()
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch/DeepSpeed Adam under ZeRO
        out["adam_steps"] = sorted({int(s["step"]) for s in inner.state.values() if "step" in s})
        if engine.global_rank == 0:
            torch.save(out, self.dump)

    def before_step(self, step: int) -> None:
        if self.crash_at is not None and step >= self.crash_at:
            os._exit(137)  # no clean-up, no checkpoint: like a job killed by the scheduler

    def loss(self, step: int, loss):
        if self.nan[step] > 0:
            self.nan[step] -= 1
            return loss * float("nan")
        return loss


if __name__ == "__main__":
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--crash-at", type=int, default=None)
    p.add_argument("--nan-steps", default="")
    p.add_argument("--dump-after-resume", default=None)
    faults, rest = p.parse_known_args()
    main(rest, hooks=Faults(faults.crash_at, faults.nan_steps, faults.dump_after_resume))

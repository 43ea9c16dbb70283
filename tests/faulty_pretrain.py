"""The pretraining job with faults injected, for tests only (the production job has no such flags).

    deepspeed ... --module faulty_pretrain --crash-at 5 <the job's flags>     hard exit before step 5 (a killed job)
    deepspeed ... --module faulty_pretrain --nan-steps 2,2,3 <flags>          the next two batches tried for step 2
                                                                              and the next one for step 3 are NaN
"""

import argparse
import os
from collections import Counter

from mrm_scale.train.loop import LoopHooks
from mrm_scale.train.main import main


class Faults(LoopHooks):
    def __init__(self, crash_at: int | None, nan_steps: str):
        self.crash_at = crash_at
        self.nan = Counter(int(s) for s in nan_steps.split(",") if s.strip())

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
    faults, rest = p.parse_known_args()
    main(rest, hooks=Faults(faults.crash_at, faults.nan_steps))

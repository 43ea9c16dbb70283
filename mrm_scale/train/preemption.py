"""Stopping cleanly: preemption signals, a launcher that went away, and a rank that died.

Preemption
    SIGTERM (``scancel``, ``kill``, DeepSpeed's launcher passing on Ctrl-C), SIGUSR1 (``#SBATCH --signal=USR1@120``)
    and SIGINT (Ctrl-C) only set a flag. At the next step boundary the ranks agree (one all-reduce: any rank's
    flag counts), write a complete checkpoint and exit with :data:`EXIT_PREEMPTED` (75, ``EX_TEMPFAIL``: try
    again), which ``launch/slurm.sbatch`` answers with ``scontrol requeue``; the requeued job resumes by itself
    (``--resume auto``). A second SIGINT stops at once, without a checkpoint.

The launcher went away
    ``deepspeed`` (DeepSpeed's runner) dies of SIGTERM without passing it on, leaving its ``launch`` process and
    the ranks running. Each rank started by it watches the runner (a daemon thread, once a second) and treats its
    end like SIGTERM.

A dead rank
    Every rank notes every rank's host and pid at the start. When a collective fails (gloo: "Connection closed by
    peer"; NCCL: its timeout, ``--dist-timeout``), :func:`lost_ranks_message` names the ranks of this host whose
    process is gone, for the one-line error.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped on request with a complete checkpoint; run again to continue
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint
SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGINT: "SIGINT"}


class StopRequest:
    """The flag the signal handlers set; :meth:`agreed` is the collective check at a step boundary."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict = {}
        self._watch: threading.Thread | None = None

    def install(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._watch_launcher()
        return self

    def uninstall(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason is not None and self.reason.startswith("SIGINT"):
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.reason is None:
            self.reason = SIGNALS.get(signum, f"signal {signum}")

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def agreed(self, device: str) -> str | None:
        """Collective: the reason to stop when any rank was asked to, else None (every rank gets the same)."""
        flag = torch.tensor([1.0 if self.reason else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return self.reason or "a stop request on another rank"
        return None

    # -- DeepSpeed's runner
    def _watch_launcher(self) -> None:
        runner = _deepspeed_runner()
        if runner is None:
            return
        launch_pid, runner_pid = runner

        def watch():
            import time

            import psutil

            while self.reason is None:
                try:
                    gone = psutil.Process(launch_pid).ppid() != runner_pid or not psutil.pid_exists(runner_pid)
                except psutil.Error:
                    gone = True
                if gone:
                    self.request(f"the deepspeed launcher (pid {runner_pid}) ended")
                    return
                time.sleep(1.0)

        self._watch = threading.Thread(target=watch, name="mrm-launcher-watch", daemon=True)
        self._watch.start()


def _deepspeed_runner() -> tuple[int, int] | None:
    """(launch pid, runner pid) when this rank was started by DeepSpeed's single-node ``launch`` under its runner."""
    try:
        import psutil

        launch = psutil.Process(os.getppid())
        if not any("deepspeed.launcher.launch" in a for a in launch.cmdline()):
            return None
        runner = psutil.Process(launch.ppid())
        cmd = " ".join(runner.cmdline())
        if "deepspeed.launcher.runner" in cmd or os.path.basename(runner.cmdline()[1] if len(runner.cmdline()) > 1
                                                                   else "") == "deepspeed":
            return launch.pid, runner.pid
    except Exception:  # noqa: BLE001 - no psutil, a process gone: no watch
        return None
    return None


# ------------------------------------------------------------------------------------------------ lost ranks

_PEERS: list[tuple[str, int]] = []


def note_peers() -> None:
    """Collective, once at the start: every rank's (host, pid)."""
    me = (socket.gethostname(), os.getpid())
    if not dist.is_initialized():
        _PEERS[:] = [me]
        return
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    _PEERS[:] = out


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - gone (or psutil missing: fall back to kill 0)
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def lost_ranks() -> list[int]:
    """Ranks on this host whose process is gone."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_PEERS) if h == host and pid != os.getpid() and not _alive(pid)]


def lost_ranks_message(error: BaseException, rank: int, timeout_s: float) -> str | None:
    """The one line for a collective that failed because a rank died; None when no rank is known to be lost and
    the error does not look like a lost peer."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lost = lost_ranks()
    peerish = any(s in str(error) for s in ("Connection closed by peer", "Connection reset", "Broken pipe",
                                            "Timed out", "timed out", "Timeout", "NCCL", "gloo", "recv", "send"))
    if not lost and not peerish:
        return None
    if lost:
        who = ", ".join(f"rank {r} (pid {_PEERS[r][1]} on {_PEERS[r][0]})" for r in lost)
        head = f"{who} {'is' if len(lost) == 1 else 'are'} gone"
    elif len(_PEERS) > 1:
        head = (f"a rank on another host stopped answering (no rank of {socket.gethostname()} is gone; "
                f"--dist-timeout {timeout_s:.0f} s)")
    else:
        head = "a collective failed"
    return (f"{head}; rank {rank} stopped ({type(error).__name__}: {text[:200]}). See the lost rank's own log "
            "(killed, out of memory?); --resume auto continues from the newest complete checkpoint")

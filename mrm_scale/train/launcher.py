"""Starting the pretraining job as a subprocess: the one place that builds the trainer's command line.

Every caller that runs the trainer as a child process (``mrm-scale experiment``, ``mrm-scale bench scaling``,
the tests) goes through here, so the job starts the same way from a checkout and from an installed package:

- :func:`pretrain_command`   the argv: ``python -m deepspeed.launcher.runner --num_gpus N --master_port P
                             --module mrm_scale.train.main FLAGS`` for N > 1 ranks (DeepSpeed's launcher starts each
                             rank as ``python -u -m mrm_scale.train.main --local_rank=R FLAGS``), ``python -m
                             mrm_scale.train.main FLAGS`` for one rank (the trainer makes a world of one itself).
                             No path to ``launch/pretrain.py``: the entry is a module of the installed package.
- :func:`packaged_ds_config` the DeepSpeed JSONs shipped inside the package (``mrm_scale/ds_configs/``; the
                             checkout's ``ds_configs/`` is a link to them), e.g. ``packaged_ds_config("zero2.json")``.
- :func:`trainer_env`        the child's environment (threads per rank, unbuffered output, CPU accelerator when
                             there is no GPU, the same ``mrm_scale`` as the caller's).
- :func:`start_pretraining`  start it (log to a file), :func:`run_pretraining` run it to the end (output captured),
                             :func:`stop` end it with every rank.

``entry`` names the module that runs the job (default :data:`ENTRY`); a test passes its own module (one that
calls :func:`mrm_scale.train.main.main` with fault-injecting hooks) and puts that module's folder on the
child's path with ``pythonpath=[folder]``.

The launcher runs DeepSpeed's runner with *this* interpreter (``sys.executable -m deepspeed.launcher.runner``,
the same code as the ``deepspeed`` console script) rather than whatever ``deepspeed`` is first on PATH: the runner
starts the ranks with its own interpreter, so a ``deepspeed`` script of another Python (a pyenv shim, a system
install beside a virtual environment) would train with another copy of ``mrm_scale``. For the same reason the
child gets ``PYTHONSAFEPATH=1`` (``python -m`` would otherwise put the working folder first on ``sys.path``, and a
checkout there would shadow the installed package) and, when the caller's ``mrm_scale`` is not in a
site-packages folder (an editable install, a checkout on ``sys.path``), that folder on ``PYTHONPATH``.

Imports nothing heavy (torch only inside :func:`trainer_env`, to ask whether there is a GPU).
"""

from __future__ import annotations

import os
import pathlib
import site
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources

ENTRY = "mrm_scale.train.main"  # the production job: flags -> run config -> set-up -> the loop
DS_CONFIGS_DIR = "ds_configs"  # inside the mrm_scale package
RUNNER = ("-m", "deepspeed.launcher.runner")  # DeepSpeed's launcher, what the `deepspeed` command runs

# Kept open for the life of the process when the package is not a plain folder (a zip): see packaged_ds_config.
_EXTRACTED: dict[str, str] = {}


class TrainerError(RuntimeError):
    """The trainer exited with an error; ``returncode``, ``cmd`` and ``output`` (stdout + stderr) say how."""

    def __init__(self, returncode: int, cmd: list[str], output: str):
        self.returncode, self.cmd, self.output = returncode, cmd, output
        super().__init__(f"the trainer failed (exit {returncode}): {' '.join(cmd)}\n{output[-4000:]}")


# ---------------------------------------------------------------------------------------------- DeepSpeed configs


def _configs_folder():
    return resources.files("mrm_scale").joinpath(DS_CONFIGS_DIR)


def shipped_ds_configs() -> list[str]:
    """Names of the DeepSpeed JSONs shipped in the package (``zero1.json``, ``zero2.json``, ...)."""
    folder = _configs_folder()
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".json") and p.is_file())


def packaged_ds_config(name: str) -> str:
    """Absolute path of a DeepSpeed JSON shipped in the package: ``packaged_ds_config("zero2.json")``
    (``"zero2"`` works too). An unknown name raises :class:`FileNotFoundError` listing the shipped ones."""
    base = os.path.basename(name)
    candidates = [base] if base.endswith(".json") else [base, base + ".json"]
    shipped = shipped_ds_configs()
    found = next((c for c in candidates if c in shipped), None)
    if base != name or found is None:
        raise FileNotFoundError(
            f"no DeepSpeed config {name!r} in the mrm_scale package; it ships "
            f"{', '.join(shipped) if shipped else 'none (a broken install: reinstall mrm-scale)'} "
            "(or give the path of your own JSON)")
    res = _configs_folder().joinpath(found)
    if isinstance(res, pathlib.Path):  # the usual case: the package is a folder on disk
        return str(res.resolve())
    if found not in _EXTRACTED:  # a zipped package: extract once, keep the file for this process
        import atexit
        import contextlib

        stack = contextlib.ExitStack()
        atexit.register(stack.close)
        _EXTRACTED[found] = str(stack.enter_context(resources.as_file(res)))
    return _EXTRACTED[found]


# ---------------------------------------------------------------------------------------------------- command line


def pretrain_command(flags: Sequence[object], nproc: int = 1, *, master_port: int | None = None,
                     entry: str = ENTRY) -> list[str]:
    """The argv that runs the trainer (``entry``) with ``flags`` on ``nproc`` local ranks.

    ``nproc > 1``: DeepSpeed's launcher, ``--module entry``, on ``master_port`` (a free port when None).
    ``nproc == 1``: ``python -m entry``; the trainer sets up a world of one on a free port of its own, so
    ``master_port`` is not used. ``flags`` may hold numbers and paths; they are passed as strings.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a whole number >= 1, got {nproc!r}")
    if not entry or "/" in entry or os.sep in entry or entry.endswith(".py"):
        raise ValueError(f"entry {entry!r}: give a module name (e.g. {ENTRY!r}), not a script path")
    flags = [os.fspath(f) if isinstance(f, os.PathLike) else str(f) for f in flags]
    if nproc == 1:
        return [sys.executable, "-m", entry, *flags]
    if master_port is None:
        from mrm_scale.ports import free_port

        master_port = free_port()
    return [sys.executable, *RUNNER, "--num_gpus", str(nproc), "--master_port", str(master_port),
            "--module", entry, *flags]


# ---------------------------------------------------------------------------------------------------- environment


def _site_dirs() -> set[str]:
    dirs = {sysconfig.get_paths().get(k) for k in ("purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:  # some embedded interpreters lack it
        pass
    dirs.add(site.getusersitepackages())
    return {os.path.realpath(d) for d in dirs if d}


def _package_root() -> str:
    import mrm_scale

    return os.path.dirname(os.path.dirname(os.path.abspath(mrm_scale.__file__)))


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, a broken driver: no GPU for the trainer either
        return False


def trainer_env(nproc: int, extra: Mapping[str, str] | None = None, *, pythonpath: Iterable[str] = ()) -> dict:
    """The trainer's environment: this process's, plus

    - ``TOKENIZERS_PARALLELISM=false``, ``PYTHONUNBUFFERED=1`` (logs arrive as they are written);
    - ``OMP_NUM_THREADS`` = cores // ``nproc`` (at least 1) unless set;
    - ``DS_ACCELERATOR=cpu`` when torch sees no GPU, unless set;
    - ``PYTHONSAFEPATH=1`` and, for a caller whose ``mrm_scale`` is not installed in site-packages, that copy's
      folder first on ``PYTHONPATH`` (the child imports the caller's ``mrm_scale``, whatever its working folder);
    - ``pythonpath`` folders first on ``PYTHONPATH`` (e.g. the tests' folder for a test-side ``entry``);
    - ``extra`` last: it overrides all of the above (a whole environment may be given).
    """
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    if "DS_ACCELERATOR" not in env and not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    path = [os.path.abspath(p) for p in pythonpath]
    root = _package_root()
    if os.path.realpath(root) not in _site_dirs():
        path.append(root)
    old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    path += [p for p in old if p not in path]
    if path:
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


# ------------------------------------------------------------------------------------------------ start / run / stop


def start_pretraining(flags: Sequence[object], nproc: int = 1, *, log_path: str | None = None,
                      cwd: str | None = None, env: Mapping[str, str] | None = None, entry: str = ENTRY,
                      master_port: int | None = None, pythonpath: Iterable[str] = ()) -> subprocess.Popen:
    """Start the trainer and return at once. With ``log_path`` its stdout and stderr go there (appended, after a
    ``$ command`` line); otherwise they are this process's. ``env`` is laid over :func:`trainer_env`. End it with
    :func:`stop` (every rank), wait for it with ``proc.wait()``."""
    cmd = pretrain_command(flags, nproc, master_port=master_port, entry=entry)
    child_env = trainer_env(nproc, env, pythonpath=pythonpath)
    if log_path is None:
        return subprocess.Popen(cmd, cwd=cwd, env=child_env)
    folder = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(folder, exist_ok=True)
    with open(log_path, "a") as log:  # the child keeps its own descriptor; ours closes here
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=log, stderr=subprocess.STDOUT)


def run_pretraining(flags: Sequence[object], nproc: int = 1, *, timeout: float | None, cwd: str | None = None,
                    env: Mapping[str, str] | None = None, entry: str = ENTRY, check: bool = True,
                    master_port: int | None = None,
                    pythonpath: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """Run the trainer to the end and return its exit code and output (``stdout``, ``stderr``: text).

    ``timeout`` (seconds): past it every rank is stopped and :class:`subprocess.TimeoutExpired` is raised (with
    the output so far). ``check``: a non-zero exit raises :class:`TrainerError` (the command and the output's
    tail in its message)."""
    cmd = pretrain_command(flags, nproc, master_port=master_port, entry=entry)
    proc = subprocess.Popen(cmd, cwd=cwd, env=trainer_env(nproc, env, pythonpath=pythonpath),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except BaseException:  # Ctrl-C, ...: no rank is left behind
        stop(proc)
        raise
    if check and proc.returncode != 0:
        raise TrainerError(proc.returncode, cmd, (out or "") + (err or ""))
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a started trainer and every process under it (the launcher's ranks, their loader workers):
    SIGTERM, then SIGKILL for what is left after ``grace`` seconds. Nothing happens when it already ended.
    Ranks answer SIGTERM by checkpointing at their next step boundary (exit 75) when that fits in ``grace``."""
    if proc.poll() is not None:
        return
    try:
        import psutil  # a DeepSpeed dependency

        procs = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - no psutil, or the process just ended
        psutil, procs = None, []
    for p in procs:
        try:
            p.terminate()
        except Exception:  # noqa: BLE001 - already gone
            pass
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if psutil is not None:
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass

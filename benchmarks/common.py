"""Shared plumbing for the benchmark suites: launching jobs with hard limits, machine facts, tables.

Every launch goes through mpi_sfl.launcher: bounded twice (MPIEXEC_TIMEOUT for mpiexec,
`timeout -k 10` around it), with this checkout as the working directory and first on PYTHONPATH
(so the worktree's mpi_sfl and benchmarks are measured, not an installed copy), one at a time.
MPI workers are modules of this package, launched as `-m benchmarks._NAME`.

The suites import this module; it imports none of them.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from mpi_sfl import launcher

if TYPE_CHECKING:
    from benchmarks._warm import Warm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Shared by the suites that train: a small synthetic job, and the split server's state modes.
SYNTH = {"data.dataset": "synthetic", "data.test_samples": 100, "model.name": "cnn"}
STATES = ("file", "memory", "graph")


class BenchError(launcher.LaunchError):
    """A launched job failed; carries its command and output tail."""


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --tiny (the tests): mpi_sfl jobs run in warm launches, one per rank count, kept for the whole
# driver (benchmarks/_warm.py): a job's start-up is most of a tiny job's cost. None: a launch per job.
_warm: dict[int, "Warm"] | None = None


def warm_launches(on: bool) -> None:
    """Run the mpi_sfl jobs that follow in warm launches (on: the ones running stay), or end those
    and launch each job on its own again (off). Only for settings whose timings and peak memory mean
    nothing (--tiny)."""
    global _warm
    if on:
        _warm = {} if _warm is None else _warm
        return
    for w in (_warm or {}).values():
        w.close()
    _warm = None


def _warm_run(n: int, argv: list[str], limit: float) -> subprocess.CompletedProcess:
    from benchmarks._warm import Warm
    if n not in _warm:
        _warm[n] = Warm(n, root=REPO)
    done = _warm[n].run(argv[2:], limit)  # argv: -m mpi_sfl COMMAND ...
    if done.returncode != 0:
        raise BenchError(launcher.failure(argv, done))
    return done


def mpi(n: int, argv: list[str], limit: float = 240) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m mpi4py ARGV...` (-m benchmarks._worker ..., or -m mpi_sfl ...);
    mpiexec ends the job at `limit` seconds, `timeout` 15 s later. Raises BenchError if it fails."""
    if _warm is not None and argv[:2] == ["-m", "mpi_sfl"]:
        return _warm_run(n, argv, limit)
    try:
        return launcher.mpi(n, argv, limit, root=REPO, check=True)
    except launcher.LaunchError as e:
        raise BenchError(str(e)) from None


def python(argv: list[str], limit: float = 240) -> subprocess.CompletedProcess:
    """`python ARGV...`, one process, under the same limits as mpi()."""
    if _warm is not None and argv[:2] == ["-m", "mpi_sfl"]:  # a baseline: a warm launch of one rank
        return _warm_run(1, argv, limit)
    try:
        return launcher.python(argv, limit, root=REPO, check=True)
    except launcher.LaunchError as e:
        raise BenchError(str(e)) from None


def overrides(settings: dict) -> list[str]:
    """{'train.rounds': 2, 'data.dataset': 'synthetic'} -> ['train.rounds=2', 'data.dataset="synthetic"']."""
    def toml(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)
    return [f"{k}={toml(v)}" for k, v in settings.items()]


def model_settings(args) -> dict:
    """The --model of a suite that takes one: resnet18 on synthetic 3x32x32 images (CIFAR's shape),
    the others on synthetic 1x28x28 (SYNTH)."""
    name = getattr(args, "model", None) or SYNTH["model.name"]
    return {"model.name": name, **({"data.shape": [3, 32, 32]} if name == "resnet18" else {})}


def sets(settings: dict) -> list[str]:
    """The same as --set arguments."""
    return [a for o in overrides(settings) for a in ("--set", o)]


def train(ranks: int, settings: dict, out_dir: Path, limit: float = 240) -> dict:
    """One SFL training job; returns {'summary': ..., 'metrics': [rows]} from its outputs.
    A benchmark re-measures: it replaces whatever an earlier invocation left in out_dir."""
    settings = {**settings, "run.out_dir": str(out_dir), "run.progress": "none"}
    mpi(ranks, ["-m", "mpi_sfl", "train", *sets(settings), "--overwrite"], limit)
    return read_run(out_dir)


def train_grouped(ranks: int, jobs: list[tuple[dict, Path]], limit: float = 300) -> list[dict]:
    """Independent SFL jobs of `ranks` ranks each, side by side in one launch (benchmarks._group_train).
    Only for figures that concurrency does not change (per-process peak memory), never timings."""
    argv = ["-m", "benchmarks._group_train", "--ranks", str(ranks)]  # its jobs overwrite, as train()'s
    for settings, out_dir in jobs:
        full = {**settings, "run.out_dir": str(out_dir), "run.progress": "none"}
        if any(";" in o for o in overrides(full)):
            raise ValueError("';' in a grouped job's settings")
        argv += ["--job", ";".join(overrides(full))]
    mpi(ranks * len(jobs), argv, limit)
    return [read_run(out_dir) for _, out_dir in jobs]


def baseline(settings: dict, out_dir: Path, limit: float = 240) -> dict:
    """The single-process unsplit reference on the same config (replacing an earlier invocation's)."""
    settings = {**settings, "run.out_dir": str(out_dir), "run.progress": "none"}
    python(["-m", "mpi_sfl", "baseline", *sets(settings), "--overwrite"], limit)
    return read_run(out_dir)


@contextlib.contextmanager
def nudged_weights(n: int):
    """Inside: every model built (models.Spec.build) starts from its initial weights each moved one
    ulp, up or down as a generator seeded with n draws it; n = 0 changes nothing. The control that
    measures a configuration's sensitivity to round-off (tests/conftest.roundoff_bound,
    benchmarks/gpu_check.py): run the baseline nudged and see how far it lands."""
    import torch

    from mpi_sfl import models
    build = models.Spec.build

    def nudged(self, seed):
        parts = build(self, seed)
        g = torch.Generator().manual_seed(n)
        with torch.no_grad():
            for p in parts.parameters():
                p.copy_(torch.nextafter(p, torch.where(torch.rand(p.shape, generator=g) < 0.5, -math.inf, math.inf)))
        return parts

    if n:
        models.Spec.build = nudged
    try:
        yield
    finally:
        models.Spec.build = build


def read_run(out_dir: Path) -> dict:
    metrics = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"summary": json.loads((out_dir / "summary.json").read_text()), "metrics": metrics}


def machine() -> dict:
    """Where and with what the numbers were taken."""
    import mpi4py
    import numpy
    import torch
    mpi4py.rc.initialize = False  # only ask the library its version; the driver is not an MPI rank
    from mpi4py import MPI
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=REPO, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", None
    return {
        "hostname": socket.gethostname(),
        "cores": cores(),
        "cpu": _cpu_model(),
        "memory_gb": _mem_gb(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpiexec": launcher.mpiexec_path(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


# -- statistics and formatting -------------------------------------------------------------------
def median(xs) -> float:
    return float(statistics.median(xs))


def mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return float(statistics.fmean(xs)), (float(statistics.stdev(xs)) if len(xs) > 1 else 0.0)


def slope(xs, ys) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5:
            return f"{v:.3g}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None, title: str = "") -> str:
    """A plain aligned text table of `rows` (dicts) over `columns`."""
    if not rows:
        return f"{title}\n(no rows)\n" if title else "(no rows)\n"
    columns = columns or list(rows[0])
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, width)))
    lines.append("  ".join("-" * w for w in width))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, width)) for row in cells]
    return "\n".join(lines) + "\n"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

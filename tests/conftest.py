"""Helpers to launch real MPI jobs from serial pytest tests, with hard time limits."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else shutil.which("mpiexec")
REPO = Path(__file__).resolve().parents[1]

# Small and fast: synthetic data, a few steps. Tests add to these.
TINY = ["data.dataset=\"synthetic\"", "data.train_samples=240", "data.test_samples=200",
        "train.rounds=2", "train.batch_size=16", "train.lr=0.05", "train.momentum=0.0",
        "run.progress=\"none\"", "run.threads=1"]


def sets(items) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(MPIEXEC_TIMEOUT="120", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return e


def mpirun(n: int, *args: str, timeout: float = 150, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m mpi4py -m mpi_sfl args...`; a hang fails the test instead of CI."""
    cmd = ["timeout", "-k", "10", str(timeout), MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py",
           "-m", "mpi_sfl", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**(extra_env or {})), cwd=REPO,
                          timeout=timeout + 20)


def mpiscript(n: int, script: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "10", str(timeout), MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py",
           str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout + 20)


def baseline(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "mpi_sfl", "baseline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout + 20)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    return proc


def load_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path

"""Helpers to launch real MPI jobs from serial pytest tests, with hard time limits (mpi_sfl.launcher)."""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from mpi_sfl import launcher

MPIEXEC = launcher.mpiexec_path()
REPO = Path(__file__).resolve().parents[1]
MPIEXEC_TIMEOUT = 120  # mpiexec's own limit; each helper's `timeout` (below it or not) is the hard one

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
    """The tests' jobs: no Slurm variables at all, one OpenMP thread whatever the caller's shell says."""
    return launcher.child_env(MPIEXEC_TIMEOUT, root=REPO, slurm="all", **{"OMP_NUM_THREADS": "1", **extra})


def mpirun(n: int, *args: str, timeout: float = 150, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m mpi4py -m mpi_sfl args...`; a hang fails the test instead of CI."""
    return launcher.mpi(n, ["-m", "mpi_sfl", *args], timeout, env=env(**(extra_env or {})), root=REPO, grace=0)


def start(n: int, *args: str, timeout: float = 150, extra_env: dict | None = None) -> subprocess.Popen:
    """`mpirun` that returns at once: the running mpiexec, to signal or to watch."""
    return launcher.start_mpi(n, ["-m", "mpi_sfl", *args], timeout, env=env(**(extra_env or {})), root=REPO)


def mpiscript(n: int, script: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return launcher.mpi(n, [str(script), *args], timeout, env=env(), root=REPO, grace=0)


def baseline(*args: str, timeout: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return launcher.python(["-m", "mpi_sfl", "baseline", *args], timeout, env=env(**(extra_env or {})), root=REPO, grace=0)


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


# -- nothing left behind ----------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path_factory, monkeypatch):
    """Each test's temporary directory (TMPDIR for its jobs, tempfile's for itself) is a fresh one
    under pytest's base temp, not /tmp: what lands there (a killed split server's scratch dir, a
    benchmark's work dir) goes when pytest prunes its old base temps, and nothing reaches /tmp."""
    tmp = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))


LITTER_OK = re.compile(r"(^|/)(__pycache__|\.pytest_cache|[^/]*\.egg-info)(/|$)")


def repo_entries() -> set[str] | None:
    """What the checkout holds beyond its tracked files: git's untracked and ignored entries, and
    runs/ two levels deep (a job without run.out_dir writes runs/default; runs/ is ignored and may
    exist already). None when git cannot tell (not a checkout)."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    entries = {line[3:] for line in proc.stdout.splitlines() if line[:2] in ("??", "!!")}
    runs = REPO / "runs"
    if runs.is_dir():
        entries |= {str(p.relative_to(REPO)) for pattern in ("*", "*/*") for p in runs.glob(pattern)}
    return {e for e in entries if not LITTER_OK.search(e)}


def pytest_sessionstart(session):
    session.config._repo_before = repo_entries()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if a test wrote into the checkout (outside tmp_path). Something else run in
    this checkout meanwhile (a `make run`) would be reported too: the message names the paths."""
    before = getattr(session.config, "_repo_before", None)
    after = repo_entries() if before is not None else None
    if after is None or not after - before:
        return
    new = sorted(after - before)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = (f"tests left {len(new)} new path(s) in the checkout {REPO} (write under tmp_path instead): "
            + ", ".join(new[:20]))
    if reporter is not None:
        reporter.write("\n" + text + "\n", red=True)
    else:
        print(text)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""Helpers to launch real MPI jobs from serial pytest tests, with hard time limits (mpi_sfl.launcher)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks._warm import Warm
from benchmarks.common import nudged_weights
from mpi_sfl import baseline as _baseline, config as _config, launcher

MPIEXEC = launcher.mpiexec_path()
REPO = Path(__file__).resolve().parents[1]
MPIEXEC_TIMEOUT = 120  # mpiexec's own limit; each helper's `timeout` (below it or not) is the hard one

# Small and fast: synthetic data, a few steps. Tests add to these.
TINY = ["data.dataset=\"synthetic\"", "data.train_samples=240", "data.test_samples=200",
        "train.rounds=2", "train.batch_size=16", "train.lr=0.05", "train.momentum=0.0",
        "run.progress=\"none\"", "run.threads=1"]


# -- the quick tier -------------------------------------------------------------------------------
# A test that launches a job (mpiexec, or a process of its own) is marked `mpi`; `make check` runs
# the tests marked `quick` (one real job per variant among them) and every test not marked `mpi`.
# The launch helpers below refuse to start a job for a test without the marker, so an unmarked
# launching test cannot slip into the quick tier.
_current: list = [None]  # the test being set up or run


def pytest_runtest_setup(item):
    _current[0] = item


def launching() -> None:
    item = _current[0]
    assert item is None or item.get_closest_marker("mpi"), (
        f"{item.nodeid} launches a job: mark it @pytest.mark.mpi (or the module: pytestmark = pytest.mark.mpi)")


def sets(items) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def env(**extra: str) -> dict:
    """The tests' jobs: no Slurm variables at all, one OpenMP thread whatever the caller's shell says."""
    return launcher.child_env(MPIEXEC_TIMEOUT, root=REPO, slurm="all", **{"OMP_NUM_THREADS": "1", **extra})


# The session's warm launches (benchmarks/_warm.py), one per rank count: the tests' jobs run one
# after another in them, each rank importing torch once for the session instead of once per job.
_warm: dict[int, Warm] = {}


def warm(n: int) -> Warm:
    if n not in _warm:
        _warm[n] = Warm(n, env=env(), root=REPO)
    return _warm[n]


def mpirun(n: int, *args: str, timeout: float = 150, extra_env: dict | None = None,
           own_launch: bool = False) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m mpi4py -m mpi_sfl args...` as far as the job can tell (it runs in the
    session's warm launch of n ranks; with extra_env, or own_launch for jobs that must run at the same
    time, in a launch of its own); a hang fails the test instead of CI (its exit code is 124 then)."""
    launching()
    if extra_env or own_launch:
        return launcher.mpi(n, ["-m", "mpi_sfl", *args], timeout, env=env(**(extra_env or {})), root=REPO, grace=0)
    return warm(n).run(list(args), timeout)


def start(n: int, *args: str, timeout: float = 150, extra_env: dict | None = None) -> subprocess.Popen:
    """`mpirun` that returns at once: the running mpiexec, to signal or to watch."""
    launching()
    return launcher.start_mpi(n, ["-m", "mpi_sfl", *args], timeout, env=env(**(extra_env or {})), root=REPO)


def mpiscript(n: int, script: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    launching()
    return launcher.mpi(n, [str(script), *args], timeout, env=env(), root=REPO, grace=0)


def mpijobs(n: int, *jobs: list[str], timeout: float | None = None, prelude: Path | None = None,
            extra_env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Several jobs (each an `mpi-sfl` argv: ["train", "--set", ...]) one after another in the
    session's warm launch of n ranks (mpirun), or, with a prelude (a Python file every rank runs
    first: a test's patch) or extra_env, in a warm launch of their own. One CompletedProcess per job
    (benchmarks._warm.Warm.run): its exit code, its ranks' stdout and stderr (rank 0's first) and
    .seconds, its own time. `timeout` bounds each job (default 150 s, what a job takes on a loaded
    2-core machine with room to spare; a deadlock still ends)."""
    launching()
    limit = 150 if timeout is None else timeout
    if not prelude and not extra_env:
        return [warm(n).run(list(argv), limit) for argv in jobs]
    with Warm(n, env=env(**(extra_env or {})), root=REPO, prelude=prelude) as own:
        return [own.run(list(argv), limit) for argv in jobs]


class Runs:
    """Finished SFL jobs that a module's tests read (see `run_jobs`): `out[name]` is a job's run.out_dir."""

    def __init__(self, out: dict[str, Path], procs: dict[str, subprocess.CompletedProcess]):
        self.out, self.procs = out, procs

    def into(self, name: str, dest: Path) -> Path:
        """A copy of job `name`'s outputs in `dest` (made if need be), for a test that reads its
        run from its own directory."""
        shutil.copytree(self.out[name], dest, dirs_exist_ok=True)
        return dest


def run_jobs(tmp_path_factory, jobs: dict[str, tuple[int, list[str]]], extra_env: dict | None = None) -> Runs:
    """Every `train` job of `jobs` (name -> (ranks, settings)), each into its own run.out_dir, all
    jobs with the same -n one after another in ONE launch (mpijobs); every one must succeed. For a
    module's fixture: the jobs run once, before its first test, and each test checks its own."""
    with private_tmpdir(tmp_path_factory) as tmp:
        out = {name: tmp / name.replace("/", "-") for name in jobs}
        procs = {}
        for ranks in sorted({r for r, _ in jobs.values()}):
            names = [name for name, (r, _) in jobs.items() if r == ranks]
            done = mpijobs(ranks, *[["train", *sets(jobs[n][1] + [f'run.out_dir="{out[n]}"'])] for n in names],
                           extra_env=extra_env)
            for name, proc in zip(names, done):
                procs[name] = ok(proc)
    return Runs(out, procs)


def baseline_process(*args: str, timeout: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mpi_sfl baseline ARGS` as its own process (the command line itself)."""
    launching()
    return launcher.python(["-m", "mpi_sfl", "baseline", *args], timeout, env=env(**(extra_env or {})), root=REPO, grace=0)


def baseline(*args: str, timeout: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpi-sfl baseline ARGS` run in this process (mpi_sfl.cli.main: the same code as the command,
    which is one process and never touches MPI) instead of a new interpreter that imports torch again.
    Its output is captured, its exit code returned as a CompletedProcess's; it runs under a SIGALRM
    limit of `timeout` seconds. extra_env's PYTHONPATH entries go on sys.path for the run (user models)."""
    from mpi_sfl import cli
    out, err = io.StringIO(), io.StringIO()
    paths = [p for p in (extra_env or {}).get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    threads = torch.get_num_threads()

    def too_long(signum, frame):
        raise TimeoutError(f"baseline ran past its {timeout} s limit")
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    sys.path[:0] = paths
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(["baseline", *args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        for p in paths:
            sys.path.remove(p)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["mpi-sfl", "baseline", *args], code, out.getvalue(), err.getvalue())


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


# -- tolerances from a measured control (no test may depend on which CPU kernels torch picks) ----------
# SFL and the baseline compute the same model with different float32 round-off (a client's chunk
# against the concatenated batch, other summation orders, whatever kernels this CPU dispatches to).
# Where round-off can flip a threshold (a ReLU or max-pool's gradient path, a value rounded to a
# narrow wire format at the cut), one flip moves the weights by far more than round-off, and whether
# a flip happens depends on the kernels. So no fixed number: `roundoff_bound` trains the same
# baseline twice more in this process with every initial weight moved one ulp, each up or down at
# random (two seeds: round-off has no preferred sign; moving all of them up is a systematic shift
# that flipped a max-pool/ReLU in the cnn where no round-off did), and takes K times the larger
# distance from the reference as the bound: the sensitivity of this very
# configuration (model, data, wire, steps) to round-off, measured under this CPU's kernels. Where no
# flip amplifies round-off the spread is a few ulps and the floor (FLOOR_ULPS ulps of the largest
# weight: a few ulps per update over a few dozen updates, no amplification) is the bound.
ROUNDOFF_K = 10  # SFL landed 1.9x the larger control spread (bfloat16 mlp, scalar kernels): room for 5x more
FLOOR_ULPS = 64
_controls: dict[tuple, float] = {}


def baseline_here(config: str | None, settings, out: Path, nudge: int = 0) -> dict[str, torch.Tensor]:
    """`mpi-sfl baseline [config] --set settings...` in this process (no interpreter to start),
    writing `out`; nudge = n > 0 first moves every initial weight one ulp, up or down as a
    generator seeded with n draws it."""
    cfg = _config.load(config, list(settings) + [f'run.out_dir="{out}"'])
    with nudged_weights(nudge):
        _baseline.run(cfg, start="overwrite")
    return load_model(out)


def roundoff_bound(tmp: Path, ref: dict[str, torch.Tensor], config: str | None = None, settings=(),
                   what: str = "") -> float:
    """The tolerance for comparing a run with `ref`, the baseline of `config` + `settings`: ROUNDOFF_K
    times how far the same baseline lands from `ref` when its initial weights move one ulp (two
    draws of the signs), at least FLOOR_ULPS ulps of the largest weight. Measured once per configuration per session
    (the key ignores run.out_dir)."""
    text = "" if config is None else "\n".join(line for line in Path(config).read_text().splitlines()
                                              if not line.startswith("out_dir"))
    key = (text, tuple(s for s in settings if not s.startswith("run.out_dir")))
    if key not in _controls:
        spread = max(max_diff(baseline_here(config, settings, tmp / f"nudge{n}", n), ref) for n in (1, 2))
        top = max(float(v.abs().max()) for v in ref.values() if v.is_floating_point() and v.numel())
        floor = FLOOR_ULPS * float(torch.nextafter(torch.tensor(top), torch.tensor(math.inf)) - top)
        _controls[key] = max(ROUNDOFF_K * spread, floor)
        record(what or "control", spread=spread, floor=floor, bound=_controls[key])
    return _controls[key]


def record(what: str, **figures) -> None:
    """Print a test's measured figures (pytest -rA shows them) and append them to $MPI_SFL_TOL_LOG."""
    line = json.dumps({"test": what, "cpu": torch.backends.cpu.get_cpu_capability(), **figures})
    print(line)
    if os.environ.get("MPI_SFL_TOL_LOG"):
        with open(os.environ["MPI_SFL_TOL_LOG"], "a") as f:
            f.write(line + "\n")


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], bound: float, what: str) -> float:
    """max_diff(a, b), recorded with its bound and asserted below it."""
    diff = max_diff(a, b)
    record(what, diff=diff, bound=bound)
    assert diff < bound, f"{what}: differs by {diff}, more than the round-off bound {bound}"
    return diff

class TinyRun:
    """A finished SFL job: TINY with 2 logical clients on `mpiexec -n 3` (fed server, split server,
    one client rank), 2 rounds, written to `out`. Read it as is; `copy` it to change it."""
    settings = TINY + ["train.clients=2"]

    def __init__(self, out: Path):
        self.out = out

    def copy(self, dest: Path) -> Path:
        """The run's files in `dest`, its config.toml naming `dest` as run.out_dir: what the same job
        with run.out_dir = dest would have left."""
        shutil.copytree(self.out, dest)
        toml = dest / "config.toml"
        toml.write_text(toml.read_text().replace(json.dumps(str(self.out)), json.dumps(str(dest))))
        return dest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One launch for the session; tests that need a finished small run to resume, refuse or
    overwrite start from a copy of it (test_resilience, test_run, test_outdir)."""
    with private_tmpdir(tmp_path_factory):
        out = tmp_path_factory.mktemp("tiny_run") / "run"
        ok(mpirun(3, "train", *sets(TinyRun.settings + [f'run.out_dir="{out}"'])))
    return TinyRun(out)


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path


# -- nothing left behind ----------------------------------------------------------------------------
@contextlib.contextmanager
def private_tmpdir(tmp_path_factory):
    """A fresh temporary directory (TMPDIR for jobs, tempfile's for this process) under pytest's base
    temp, not /tmp: what lands there (a killed split server's scratch dir, a benchmark's work dir)
    goes when pytest prunes its old base temps, and nothing reaches /tmp. For the fixtures that run
    jobs for a whole module or session (set up before a test's own _private_tmpdir)."""
    tmp = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))
        yield tmp


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path_factory):
    """Each test's temporary directory is a fresh one (private_tmpdir)."""
    with private_tmpdir(tmp_path_factory) as tmp:
        yield tmp


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
    """End the warm launches; fail the session if a test wrote into the checkout (outside tmp_path).
    Something else run in this checkout meanwhile (a `make run`) would be reported too: the message
    names the paths."""
    for w in _warm.values():
        w.close()
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

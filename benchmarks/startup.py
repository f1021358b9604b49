"""startup suite: a tiny job's wall time against `mpiexec -n 4 python -c "import torch"` beside it,
and where each role's time to its first step goes.

The job: 4 ranks, the default model (cnn), 256 synthetic samples, one round. Each repetition runs
the bare import, the job (and with --against CHECKOUT, the same job from that checkout: e.g. a
`git worktree add /tmp/orig <commit>`), interleaved, the order flipped every other repetition;
figures are medians. The phases come from the run itself (summary.json["startup"], written by
mpi_sfl/startup.py: each role's slowest rank); launch and exit are measured here around mpiexec.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import REPO, median, table
from mpi_sfl import launcher, startup

LEVELS = {"full": {"reps": 5}, "quick": {"reps": 3}, "tiny": {"reps": 1}}
RANKS = 4
JOB = {"data.dataset": "synthetic", "data.train_samples": 256, "data.test_samples": 256, "train.rounds": 1,
       "run.progress": "none"}
ROLES = ("fed_server", "split_server", "client")
LIMIT = 240


def _launch(argv: list[str], root: Path) -> float:
    """Wall seconds of `mpiexec -n 4 python ARGV` from checkout `root` (on PYTHONPATH, the cwd)."""
    cmd = [launcher.mpiexec_path(), "-n", str(RANKS), sys.executable, *argv]
    t0 = time.time()
    proc = launcher.run(cmd, LIMIT, root=root)
    wall = time.time() - t0
    if proc.returncode:
        raise common.BenchError(launcher.failure(cmd, proc))
    return wall


def _job(root: Path, out: Path) -> tuple[float, float, dict]:
    """(start time, wall seconds, summary) of the tiny job run from checkout `root`."""
    settings = {**JOB, "run.out_dir": str(out)}
    t0 = time.time()
    wall = _launch(["-m", "mpi4py", "-m", "mpi_sfl", "train", *common.sets(settings), "--overwrite"], root)
    return t0, wall, json.loads((out / "summary.json").read_text())


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    against = Path(args.against).resolve() if getattr(args, "against", None) else None
    runs = [("import", None), ("job", REPO)] + ([("against", against)] if against else [])
    rows, phases = [], []
    for rep in range(s["reps"]):
        for name, root in (runs if rep % 2 == 0 else runs[::-1]):
            if name == "import":
                rows.append({"rep": rep, "run": name, "wall_s": _launch(["-c", "import torch"], REPO)})
                continue
            t0, wall, summ = _job(root, work / f"{name}-{rep}")
            rows.append({"rep": rep, "run": name, "wall_s": wall})
            st = summ.get("startup")
            if name == "job" and st:  # the phases, with launch and exit measured around mpiexec
                for role in ROLES:
                    if role in st:
                        r = st[role]
                        phases.append({"rep": rep, "role": role, "launch": r["process_start"] - t0, **r["seconds"],
                                       "to_first_step": r["to_first_step"]})
                phases.append({"rep": rep, "role": "fed_server (end)", "outputs": st["finished_at"] - st["trained_at"],
                               "exit": t0 + wall - st["finished_at"]})

    def med(run_name: str) -> float:
        return median([r["wall_s"] for r in rows if r["run"] == run_name])

    cols = ["launch", *startup.PHASES, "to_first_step"]
    breakdown = []
    for role in ROLES:
        pts = [p for p in phases if p["role"] == role]
        if pts:
            breakdown.append({"role": role, **{c: median([p[c] for p in pts if p.get(c) is not None]) for c in cols}})
    ends = [p for p in phases if p["role"] == "fed_server (end)"]
    summary = {"job_wall_s": med("job"), "import_wall_s": med("import")}
    summary["job_minus_import_s"] = summary["job_wall_s"] - summary["import_wall_s"]
    summary["to_first_step_s"] = max(b["to_first_step"] for b in breakdown)
    summary["outputs_s"] = median([p["outputs"] for p in ends])
    summary["exit_s"] = median([p["exit"] for p in ends])
    if against:
        summary["against_wall_s"] = med("against")
        summary["against_minus_import_s"] = summary["against_wall_s"] - summary["import_wall_s"]
    notes = [f"Job: mpiexec -n {RANKS} python -m mpi4py -m mpi_sfl train {' '.join(common.sets(JOB))} (default "
             f"cnn, 4 logical clients); bare: mpiexec -n {RANKS} python -c 'import torch'. Both through "
             "mpi_sfl.launcher (timeout, OMP_NUM_THREADS=1), interleaved, order flipped every other "
             f"repetition; medians of {s['reps']}.",
             "Phases (seconds, medians; each role's slowest rank to its first step): launch = its process "
             "start after mpiexec was started; the rest as mpi_sfl/startup.py defines them (they add up "
             "to to_first_step). outputs = rank 0 from the end of training to summary.json (the last "
             "evaluation, checkpoint, model.pt); exit = from summary.json to mpiexec's return (final "
             "barrier, MPI_Finalize, process exit: python -m mpi_sfl skips the interpreter teardown, cli.exit_now)."]
    if against:
        notes.append(f"against: the same job from {against}, interleaved with the others.")
    text = (table(rows, ["rep", "run", "wall_s"], "startup: wall seconds, tiny job vs bare import")
            + "\n" + table(breakdown, ["role", *cols], "startup: seconds to the first step by phase (medians)")
            + f"\nrank 0 after training (medians): outputs {summary['outputs_s']:.3f} s, exit {summary['exit_s']:.3f} s")
    return {"settings": {**s, "job": JOB, "ranks": RANKS, "against": str(against) if against else None},
            "results": {"walls": rows, "phases": breakdown}, "summary": summary, "notes": notes, "text": text}

"""Several mpi_sfl jobs one after another in the same ranks, so torch is imported once per launch:

    mpiexec -n N python -m mpi4py tests/mpi_jobs.py SPEC.json      (conftest.mpijobs writes SPEC and reads back)

SPEC.json: {"jobs": [ARGV, ...], "results": DIR, "prelude": PATH or null}. Each ARGV (e.g.
["train", "--set", "train.rounds=2", ...]) runs through mpi_sfl.cli.main on COMM_WORLD, as
`mpiexec -n N python -m mpi4py -m mpi_sfl ARGV` would run it, with each rank's stdout and stderr
(file descriptors 1 and 2) going to DIR/JOB.RANK.out and .err, and its exit code and seconds (0, or the code
of the SystemExit the job ended with: 2 refused at set-up, 3 stopped, 4 failed) to DIR/JOB.RANK.code.
A job that ends in an orderly way (those codes) calls MPI.Finalize on every rank before its exit:
here that finalize is put off to the end of the launch, so the next job can run. A crash or a peer
timeout (MPI_Abort) ends the whole launch: the jobs after it leave no .code files. mpiexec's
MPIEXEC_TIMEOUT (conftest) ends a launch that hangs. PRELUDE, a Python file, runs first on every
rank (e.g. tests/mpi_nan_check.py's patch that poisons one batch).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

from mpi4py import MPI


def run_job(argv: list[str]) -> int:
    from mpi_sfl import cli
    try:
        cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def redirected(fd: int, path: Path):
    """Point `fd` at `path` until the returned function is called (which points it back)."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with open(path, "w") as f:
        os.dup2(f.fileno(), fd)

    def restore():
        (sys.stdout if fd == 1 else sys.stderr).flush()
        os.dup2(saved, fd)
        os.close(saved)
    return restore


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = Path(spec["results"])
    world = MPI.COMM_WORLD
    if spec.get("prelude"):
        runpy.run_path(spec["prelude"], run_name="prelude")
    finalize = MPI.Finalize
    MPI.Finalize = lambda: None  # a job's orderly exit finalizes; the next job still needs MPI
    try:
        for i, argv in enumerate(spec["jobs"]):
            world.Barrier()  # every rank has finished the job before
            back = [redirected(fd, results / f"{i}.{world.rank}.{name}") for fd, name in ((1, "out"), (2, "err"))]
            t0 = time.monotonic()
            try:
                code = run_job(argv)
            finally:
                for restore in back:
                    restore()
            (results / f"{i}.{world.rank}.code").write_text(f"{code} {time.monotonic() - t0:.2f}")
    finally:
        MPI.Finalize = finalize
    world.Barrier()


if __name__ == "__main__":
    main()

"""A warm launch: `mpi-sfl` jobs one after another in the same N ranks, so each rank imports torch
once for all of them instead of once per job (a second of CPU per rank, and ranks outnumber cores
here). For the tests and the --tiny benchmarks, whose jobs are small enough that start-up would be
most of their cost; never for a measurement (a job's start-up and peak RSS are not its own here).

    with Warm(4) as w:                       # mpiexec -n 4 python -m mpi4py -m benchmarks._warm DIR
        done = w.run(["train", "--set", "train.rounds=1"], limit=120)   # a CompletedProcess
        done.returncode, done.stdout, done.stderr, done.seconds

Job i is DIR/i.json ({"argv": [...]} or {"stop": true}), written by Warm. Every rank waits for it
by polling the directory (no MPI call while idle: an idle rank sleeps), runs the argv through
mpi_sfl.cli.main on COMM_WORLD, as `mpiexec -n N python -m mpi4py -m mpi_sfl ARGV` would, with its
stdout and stderr (file descriptors 1 and 2) in DIR/i.RANK.out and .err, then writes its exit code
and seconds to DIR/i.RANK.code (0, or the code of the SystemExit the job ended with: 2 refused at
set-up, 3 stopped, 4 failed). A job that ends in an orderly way calls MPI.Finalize: here that is put
off to the end of the launch, so the next job can run. A crash or a peer timeout (MPI_Abort) ends
the launch: Warm reports that job with the launch's exit code and output, and the next job starts a
fresh launch. A job past its limit ends the launch too (the whole process group). --prelude FILE
runs first on every rank (a test's patch).
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpi_sfl.outdir import pid_alive

POLL_S = 0.01  # an idle rank's sleep between looks for the next job


# -- the ranks' side --------------------------------------------------------------------------------
def _redirected(fd: int, path: Path):
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


def _next_job(folder: Path, i: int, owner: int) -> dict:
    """Job i, or a stop once the process that owns this launch (Warm's) is gone: a driver that dies
    without closing its launches leaves no ranks behind."""
    path = folder / f"{i}.json"
    looks = 0
    while not path.exists():
        time.sleep(POLL_S)
        looks += 1
        if looks % 100 == 0 and owner and not pid_alive(owner):
            return {"stop": True}
    return json.loads(path.read_text())


def _serve(folder: Path, prelude: str | None) -> None:
    from mpi4py import MPI

    from mpi_sfl import cli
    world = MPI.COMM_WORLD
    if prelude:
        runpy.run_path(prelude, run_name="prelude")
    finalize = MPI.Finalize
    MPI.Finalize = lambda: None  # a job's orderly exit finalizes; the next job still needs MPI
    try:
        i = 0
        while True:
            job = _next_job(folder, i, int(os.environ.get("MPI_SFL_WARM_OWNER", "0")))
            if job.get("stop"):
                break
            world.Barrier()  # every rank has finished the job before
            back = [_redirected(fd, folder / f"{i}.{world.rank}.{name}") for fd, name in ((1, "out"), (2, "err"))]
            t0 = time.monotonic()
            try:
                cli.main(job["argv"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                for restore in back:
                    restore()
            tmp = folder / f"{i}.{world.rank}.code.tmp"
            tmp.write_text(f"{code} {time.monotonic() - t0:.2f}")
            os.replace(tmp, folder / f"{i}.{world.rank}.code")
            i += 1
    finally:
        MPI.Finalize = finalize
    world.Barrier()


# -- the caller's side ------------------------------------------------------------------------------
class Warm:
    """N ranks kept running between jobs (see the module's docstring). `env` is the launch's
    environment (default mpi_sfl.launcher.child_env), `root` the checkout it runs from."""

    def __init__(self, n: int, *, env: dict | None = None, root: Path | None = None, prelude: Path | None = None):
        from mpi_sfl import launcher
        self.n, self.prelude = n, prelude
        self.root = Path(root) if root else launcher.ROOT
        # mpiexec's own limit is the launch's lifetime; each job's limit is enforced here (run).
        self.env = dict(env if env is not None else launcher.child_env(0, root=self.root))
        self.env["MPIEXEC_TIMEOUT"] = str(24 * 3600)
        self.env["MPI_SFL_WARM_OWNER"] = str(os.getpid())  # idle ranks stop once this process is gone
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.i = 0

    def _start(self) -> None:
        from mpi_sfl import launcher
        self.folder, self.i = Path(tempfile.mkdtemp(prefix="warm-")), 0
        cmd = [launcher.mpiexec_path(), "-n", str(self.n), sys.executable, "-m", "mpi4py", "-m", "benchmarks._warm",
               str(self.folder)] + (["--prelude", str(self.prelude)] if self.prelude else [])
        self._out, self._err = (open(self.folder / f"launch.{k}", "w+") for k in ("out", "err"))
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, env=self.env, cwd=self.root,
                                     start_new_session=True)  # its own process group: killed whole

    def _submit(self, job: dict) -> None:
        tmp = self.folder / f"{self.i}.json.tmp"
        tmp.write_text(json.dumps(job))
        os.replace(tmp, self.folder / f"{self.i}.json")

    def run(self, argv: list[str], limit: float) -> subprocess.CompletedProcess:
        """Job `argv` (an mpi-sfl command line) on these ranks: its exit code (every rank's must
        agree; if the job ended the launch, a crash for one, the launch's exit code, and 124 if it
        ran past `limit` seconds), its ranks' stdout and stderr (rank 0's first, then the launch's
        own output if it ended), and `.seconds`, the job's own (start-up excluded; None if it did not
        finish)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        i, folder = self.i, self.folder
        self._submit({"argv": list(argv)})
        self.i += 1
        codes_at = [folder / f"{i}.{r}.code" for r in range(self.n)]
        deadline = time.monotonic() + limit
        ended = code = None
        while not all(p.exists() for p in codes_at):
            if self.proc.poll() is not None:
                ended, code = f"the launch ended with exit {self.proc.returncode}", self.proc.returncode or 1
                break
            if time.monotonic() > deadline:
                ended, code = f"the job ran past its {limit} s limit; its launch was killed", 124
                self._kill()
                break
            time.sleep(POLL_S)
        text = {k: "".join((folder / f"{i}.{r}.{k}").read_text() for r in range(self.n)
                           if (folder / f"{i}.{r}.{k}").exists()) for k in ("out", "err")}
        if ended:
            self.proc.wait()
            self._out.seek(0), self._err.seek(0)
            text["err"] += f"\n[{ended}]\n{self._out.read()[-3000:]}\n{self._err.read()[-5000:]}"
            self._cleanup()
            done = subprocess.CompletedProcess(list(argv), code, text["out"], text["err"])
            done.seconds = None
            return done
        codes = [p.read_text().split() for p in codes_at]
        if len({c for c, _ in codes}) != 1:
            raise RuntimeError(f"job {argv}: the ranks exited with different codes {codes}\n{text['err'][-3000:]}")
        done = subprocess.CompletedProcess(list(argv), int(codes[0][0]), text["out"], text["err"])
        done.seconds = max(float(s) for _, s in codes)
        return done

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _cleanup(self) -> None:
        self._out.close(), self._err.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.proc = None

    def close(self) -> None:
        """Stop the ranks (they finalize MPI and exit); kill them if they do not within 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._submit({"stop": True})
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
                self.proc.wait()
        self._cleanup()

    def __enter__(self) -> "Warm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--prelude")
    a = p.parse_args()
    _serve(Path(a.folder), a.prelude)

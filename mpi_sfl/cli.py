"""Command line: `mpi-sfl train|baseline [CONFIG.toml] [--set section.key=value ...] [--resume|--overwrite]`,
`mpi-sfl plot`, `mpi-sfl checkpoint OUT`, `mpi-sfl status OUT`.

    mpiexec -n 4 python -m mpi4py -m mpi_sfl train            # the default job
    mpiexec -n 4 python -m mpi4py -m mpi_sfl train --resume   # ...continued after an interruption
    mpi-sfl baseline runs/default/config.toml                 # its single-process reference
    mpi-sfl plot runs/default runs/baseline                   # their curves, as a PNG
    mpi-sfl checkpoint runs/default                           # what a --resume would continue from
    mpi-sfl status runs/default                               # running, stopped, finished or failed
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import os
import sys
import traceback
from pathlib import Path

from . import startup
from .errors import EXIT_USER_ERROR, UserError

# Set in a process that an MPI launcher started (MPICH/Intel hydra, Open MPI, PMIx, srun with PMI).
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


class CommandLineError(UserError):
    """A command line argparse refuses (an unknown option, --resume with --overwrite, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its usage and exiting: under mpiexec every rank
    parses the same line, and the job must say it once (main)."""

    def error(self, message: str):
        raise CommandLineError(f"{message} (see {self.prog} --help)")

    def print_help(self, file=None):
        """--help: printed by the first rank only (every rank of a job parses the same line)."""
        if launcher_rank() in (None, 0):
            super().print_help(file)


# What MPI launchers tell each process of its rank (MPICH/Intel hydra and PMI, Open MPI, PMIx).
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launcher_rank() -> int | None:
    """This process's rank as its launcher set it, read without starting MPI; None if not launched."""
    for v in RANK_VARS:
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return None


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpi-sfl", description="Split Federated Learning over MPI.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "SFL training; launch with mpiexec -n N python -m mpi4py -m mpi_sfl train"),
                       ("baseline", "single-process, unsplit training of the same model on the same data")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("config", nargs="?", help="TOML config (default: the packaged default.toml)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable")
        start = s.add_mutually_exclusive_group()
        if name == "train":
            start.add_argument("--resume", action="store_true",
                               help="continue the interrupted run in run.out_dir from its checkpoint")
        start.add_argument("--overwrite", action="store_true",
                           help="replace an earlier run's results in run.out_dir (removes only the files "
                                "mpi-sfl writes); without it, or --resume, such a directory is refused")
    s = sub.add_parser("plot", help="loss and accuracy curves of finished runs (PNG)",
                       description="loss and accuracy curves from the metrics.jsonl of one or more runs")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's out_dir (holds metrics.jsonl)")
    s.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/curves.png of the first run)")
    s = sub.add_parser("checkpoint", help="what the checkpoints in a run's out_dir hold, and whether they are intact",
                       description="print each checkpoint of RUN_DIR (position, layout that wrote it, logical "
                                   "clients, size) after checking every file; reads files only")
    s.add_argument("run", metavar="RUN_DIR", help="a run's out_dir")
    s = sub.add_parser("status", help="where a run stands: running, stopped and resumable, finished or failed",
                       description="state, round and step, last metrics, samples/s and ETA, last checkpoint of "
                                   "the run in RUN_DIR; reads files only (works from a login node, never takes the lock)")
    s.add_argument("run", metavar="RUN_DIR", help="a run's out_dir")
    return p


def main(argv: list[str] | None = None, quick_exit: bool = False) -> None:
    """The command line. quick_exit (python -m mpi_sfl, which ends through exit_now): the process
    will end without torch's C++ teardown either (skip_teardown)."""
    try:
        args = parser().parse_args(argv)
    except CommandLineError as exc:
        refuse(str(exc))
    start = "resume" if getattr(args, "resume", False) else "overwrite" if getattr(args, "overwrite", False) else "new"
    if args.command in ("baseline", "plot", "checkpoint", "status"):
        try:
            if args.command == "checkpoint":
                from . import checkpoint
                print(checkpoint.describe(args.run))
            elif args.command == "status":
                from . import progress
                print(progress.status(args.run))
            elif args.command == "baseline":
                from . import baseline, config
                if quick_exit:
                    skip_teardown()
                baseline.run(config.load(args.config, args.overrides), start=start)
            else:
                from . import plot
                print(plot.plot(args.runs, args.out or str(Path(args.runs[0]) / "curves.png")))
                for run in args.runs:  # and each training run's partition, where it wrote one
                    drawn = plot.plot_partition(run)
                    if drawn:
                        print(drawn)
        except UserError as exc:
            print(f"mpi-sfl: error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        return
    import torch  # noqa: F401 - before MPI starts (skip_teardown); timed apart from MPI_Init_thread
    startup.mark("imports")
    if quick_exit:
        skip_teardown()
    from mpi4py import MPI  # noqa: F401 - MPI_Init_thread
    from . import train
    startup.mark("mpi_init")
    try:
        train.main(args.config, args.overrides, start=start)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        # Also when not started under `python -m mpi4py`: one rank's crash must end the job, not hang it.
        from mpi4py import MPI
        print(f"mpi-sfl: error: rank {MPI.COMM_WORLD.rank} crashed; ending the job (traceback below)",
              file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


def refuse(message: str) -> None:
    """End on a user error found before any set-up: one line, exit 2 — printed once per job when
    this process is one rank of several (every rank finds the same error: errors.exit_job)."""
    world = _world()
    if world is not None:
        from .errors import exit_job
        exit_job(world, message)
    print(f"mpi-sfl: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _world():
    """COMM_WORLD if this process is one rank of a job of several, else None. MPI is started only
    when a launcher started us or it already is (python -m mpi4py): a plain `mpi-sfl baseline`
    never touches MPI."""
    if "mpi4py.MPI" not in sys.modules and not any(v in os.environ for v in LAUNCHER_VARS):
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD if MPI.COMM_WORLD.size > 1 else None


def skip_teardown() -> None:
    """Make this process's C-level exit end with _exit once the exit handlers registered after this
    call have run: torch's C++ static destructors, registered when torch was imported (before this
    call), then never run; they deregister its thousands of operators, about 0.15 s of CPU per
    process after its work is done. The MPI library's own exit handlers, registered when MPI starts
    (after this call), still run: MPICH's PMI client announces the rank's end from one, and without
    that announcement MPICH's launcher SIGKILLs every rank of the job still running. The handler is
    libc's _exit itself, not Python code: it also runs after an interpreter teardown (an error's
    exit), and it keeps the exit status."""
    libc = ctypes.CDLL(None)
    libc.on_exit(ctypes.cast(libc._exit, ctypes.c_void_p), None)


def exit_now() -> None:
    """`python -m mpi_sfl`, once a command has finished (its files written and closed): run the
    atexit handlers, finalize MPI, flush, and end the process through the C library's exit()
    without the interpreter's teardown of torch's thousand-odd modules, which costs each rank a few
    tenths of a second of CPU after its work is done (ranks outnumber cores here). Not called by
    cli.main itself: it is also called in-process (tests).

    MPI_Finalize is called here because mpi4py leaves it to a Py_AtExit hook that only the
    interpreter's teardown runs; and exit(), not os._exit(), because the PMI client announces the
    rank's end from a C exit handler: without it MPICH's launcher SIGKILLs every rank still running
    the moment one rank's PMI connection closes, and a rank still writing its results, or merely
    slower to reach its exit, was killed. skip_teardown (registered by main) cuts that exit() short
    after the MPI library's handlers."""
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).exit(0)

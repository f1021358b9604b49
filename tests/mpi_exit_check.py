"""Run by tests/test_startup.py under mpiexec: every rank ends as `python -m mpi_sfl` does
(cli.skip_teardown before MPI starts, cli.exit_now at the end). The last rank is still at work in its exit a second after the others
have gone: a C atexit handler (what the PMI client and torch run there) that waits, then writes
that rank's file. A rank killed when the first one left (MPICH's launcher SIGKILLs every rank still
running once one rank's PMI connection closes unannounced), or one that skips the C library's
exit, leaves its file missing."""
import ctypes
import sys
import time
from pathlib import Path

from mpi_sfl.cli import exit_now, skip_teardown

skip_teardown()
from mpi4py import MPI  # noqa: E402 - after skip_teardown, as in cli.main

comm = MPI.COMM_WORLD
out = Path(sys.argv[1]) / f"rank{comm.rank}"
delay = 1.0 if comm.rank == comm.size - 1 else 0.0


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p)
def at_c_exit(status, arg):
    time.sleep(delay)
    out.write_text("done")


ctypes.CDLL(None).on_exit(at_c_exit, None)  # glibc's atexit with the status
comm.Barrier()
exit_now()

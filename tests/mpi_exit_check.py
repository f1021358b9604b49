"""Run by tests/test_startup.py under mpiexec: every rank ends through cli.exit_now (what
`python -m mpi_sfl` does), the last rank a second after the others. Each rank writes its file only
after that wait, so a rank killed when the first one left (MPICH's launcher ends every rank still
running once one exits without MPI_Finalize) leaves its file missing."""
import sys
import time
from pathlib import Path

from mpi4py import MPI

from mpi_sfl.cli import exit_now

comm = MPI.COMM_WORLD
comm.Barrier()
if comm.rank == comm.size - 1:
    time.sleep(1.0)
(Path(sys.argv[1]) / f"rank{comm.rank}").write_text("done")
exit_now()

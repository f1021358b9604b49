"""Prelude (tests/test_resilience.py): on rank 2 (a client rank), a wait on rank 1 (its split server)
fails the way MPICH fails a transfer with a process that was killed (an MPI.Exception from the
request: in life "process_vm_readv failed (errno 3)"), once the job is well under way."""
from mpi4py import MPI

import mpi_sfl.waiting as waiting

if MPI.COMM_WORLD.rank == 2:
    real, calls = waiting._wait, [0]

    def failing(reqs, any_, status, who, collective, patience, *rest):
        calls[0] += 1
        if calls[0] >= 300 and (who() if callable(who) else who).startswith("rank 1 "):
            raise MPI.Exception(MPI.ERR_OTHER)
        return real(reqs, any_, status, who, collective, patience, *rest)

    waiting._wait = failing

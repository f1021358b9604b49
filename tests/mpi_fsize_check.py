"""Prelude (tests/test_resilience.py): rank 0 may write no file larger than 64 KiB, so the first
model.pt write fails the way a disk that fills up makes it fail (an OSError from write: here EFBIG
with SIGXFSZ ignored, on a full disk ENOSPC); the other outputs of the tiny job are smaller."""
import resource
import signal

from mpi4py import MPI

if MPI.COMM_WORLD.rank == 0:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

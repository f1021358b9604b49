"""User-facing errors, and how an MPI job ends on one without a traceback per rank."""
from __future__ import annotations

import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake the user can fix (config, data, launch). Printed as one line, never a traceback."""


def fail_together(comm, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank of `comm`; if it raised UserError on any rank, end the job cleanly.

    The set-up phase is collective: one rank may lack a data file while the others are fine.
    Every rank learns of every error, rank 0 prints the first one once, and all ranks finalize
    and exit 2 together — no MPI_Abort noise, no rank left waiting. Not for the per-batch path.
    """
    try:
        result, err = fn(), None
    except UserError as exc:
        result, err = None, str(exc)
    errors = comm.allgather(err)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        exit_job(comm, first)
    return result  # type: ignore[return-value]


def exit_job(comm, message: str) -> None:
    """Print `message` on rank 0, then finalize and exit 2 on every rank. Collective."""
    from mpi4py import MPI

    if comm.rank == 0:
        print(f"mpi-sfl: error: {message}", file=sys.stderr, flush=True)
    comm.Barrier()
    MPI.Finalize()
    sys.exit(EXIT_USER_ERROR)

"""Stopping together: stop signals, problems found mid-run, and the once-per-step agreement.

Every rank calls `Control.step_done()` once at every step boundary (the fed server too: it runs the
same step loop). Each call contributes this rank's reason to stop to a 1-int Iallreduce(MAX) on a
communicator of its own and completes the one posted at the previous boundary, so the agreement
costs no extra round trip: a signal that arrives during step k is seen by every rank at the end of
step k+1, and all ranks stop at that same boundary (docs/design.md §7).

Reasons, the larger wins:
- SIGNAL: SIGTERM, SIGINT or SIGUSR1 on any rank (mpiexec and srun forward them to every rank):
  the ranks write a checkpoint and exit EXIT_STOPPED; `--resume` continues bit for bit.
- FAILED: a problem one rank found (a non-finite loss or gradient, a full scratch or output disk):
  no new checkpoint (the state may be poisoned); the last good one and model.pt stay; EXIT_FAILED.
A peer that stops answering is not agreed on (it cannot take part): the first rank whose wait
exceeds run.timeout_s names the peer and aborts the job with EXIT_TIMEOUT (train.py).
"""
from __future__ import annotations

import signal

import numpy as np
from mpi4py import MPI

from .waiting import polite_wait

EXIT_STOPPED = 3   # stopped on a signal; a checkpoint was written; rerun with --resume
EXIT_FAILED = 4    # a problem found mid-run (non-finite training, disk full); last good outputs kept
EXIT_TIMEOUT = 5   # a peer stopped answering for run.timeout_s (stuck or dead), or is gone (an MPI error); the job was aborted
GO, SIGNAL, FAILED = 0, 1, 2
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGUSR1: "SIGUSR1"}


class Stop(Exception):
    """Raised by `step_done` on every rank at the boundary where the ranks agreed to stop."""

    def __init__(self, reason: int):
        super().__init__(reason)
        self.reason = reason


_signal: str | None = None  # the first stop signal this process received


def install_handlers() -> None:
    """SIGTERM/SIGINT/SIGUSR1 ask for a stop at the next step boundary instead of killing
    (installed first thing, so a signal during set-up is not lost). A fresh start: no signal
    received yet (a process that runs several jobs in turn, tests/mpi_jobs.py, starts each clean)."""
    global _signal
    _signal = None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def _on_signal(signum, frame) -> None:
    global _signal
    _signal = _signal or STOP_SIGNALS.get(signum, str(signum))


def received() -> str | None:
    return _signal


class Control:
    def __init__(self, comm: MPI.Comm):
        self.comm = comm.Dup()  # its own communicator: never ordered against the training's collectives
        self.problems: list[tuple[tuple, str]] = []  # (where, one-line message), where sorts by time
        self._mine = np.zeros(1, np.int32)
        self._all = np.zeros(1, np.int32)
        self._req: MPI.Request | None = None
        self.position = (0, 0)  # (round, steps done in it) at the last boundary

    def fail(self, where: tuple, message: str) -> None:
        """Record a problem (e.g. a non-finite loss at `where` = (round, step, client)); the ranks
        stop at the next boundary and the earliest problem is reported."""
        self.problems.append((where, message))

    def reason(self) -> int:
        return FAILED if self.problems else SIGNAL if _signal else GO

    def step_done(self, rnd: int, steps_done: int) -> None:
        """A step boundary (collective, same count on every rank). Raises Stop where the ranks agree."""
        self.position = (rnd, steps_done)
        agreed = self._complete()
        if agreed:
            raise Stop(agreed)
        self._mine[0] = self.reason()
        self._req = self.comm.Iallreduce(self._mine, self._all, op=MPI.MAX)

    def drain(self) -> int:
        """At the end of the run: complete the last agreement; the reason it carries (or GO)."""
        return self._complete()

    def _complete(self) -> int:
        if self._req is None:
            return GO
        polite_wait(self._req, who="every rank to reach the same step (the stop agreement)", collective=True)
        self._req = None
        return int(self._all[0])

    def agree(self, value: int) -> int:
        """The max of `value` over all ranks (collective; bounded by run.timeout_s like every wait)."""
        mine, out = np.array([int(value)], np.int64), np.zeros(1, np.int64)
        polite_wait(self.comm.Iallreduce(mine, out, op=MPI.MAX), who="every rank to reach the checkpoint", collective=True)
        return int(out[0])

    def first_problem(self) -> str:
        """The earliest problem of any rank (collective, once, after a FAILED agreement)."""
        everyone = [p for ps in self.comm.allgather(self.problems) for p in ps]
        return min(everyone)[1] if everyone else "a rank reported a problem"

    def who_signalled(self) -> str:
        """'SIGTERM on rank 2' (collective, once, after a SIGNAL agreement)."""
        got = self.comm.allgather(_signal)
        return next((f"{s} on rank {r}" for r, s in enumerate(got) if s), "a signal")


def nonfinite_message(what: str, rnd: int, step: int, cid: int, among: tuple[int, ...] = ()) -> str:
    """`among`: the other clients whose batches the split server ran as one with cid's (the gradient
    does not say whose batch made it)."""
    who = f" or one batched with it ({', '.join(map(str, among))})" if among else ""
    return (f"non-finite {what} in round {rnd + 1}, step {step + 1}, logical client {cid}{who} (training "
            "diverged: lower train.lr, or set train.on_nonfinite = 'skip' to drop such batches)")

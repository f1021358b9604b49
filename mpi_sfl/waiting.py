"""How a rank waits for its peers: spin or poll (run.wait), bounded by run.timeout_s, and what a
failed or endless wait raises. The transport, the aggregation and the stop agreement all wait here."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from mpi4py import MPI

from .doorbell import Doorbells

BELL_NAPS = (1e-3, 8e-3)  # a bell's sleep: first timeout and cap (it only bounds a ring that never came)
_poll = True      # set by set_wait_mode at start-up
_timeout = 0.0    # run.timeout_s: the longest wait on a peer; 0 = no limit


class PeerGone(Exception):
    """An MPI error while waiting on a peer: that peer's process is gone (killed, its node lost)."""


class PeerTimeout(Exception):
    """A wait on a peer lasted longer than run.timeout_s: that peer is stuck or dead."""

    def __init__(self, message: str, collective: bool):
        super().__init__(message)
        self.collective = collective  # a collective cannot tell which rank is missing


def set_wait_mode(mode: str, ranks_here: int, cores: int, timeout_s: float = 0.0, idle: bool = False) -> None:
    """run.wait: "spin" waits without sleeping (lowest latency), "poll" sleeps between tests,
    "auto" polls on a rank that is `idle` (the fed server: off the per-batch path) and where this
    node's ranks, the fed server included (`ranks_here`), outnumber its `cores`. run.timeout_s
    bounds every wait."""
    global _poll, _timeout
    _poll = mode == "poll" or (mode == "auto" and (ranks_here > cores or idle))
    _timeout = float(timeout_s)
    if _poll:
        fine_sleeps()


def polling() -> bool:
    """Whether this rank's waits sleep (set_wait_mode decided)."""
    return _poll


def fine_sleeps(slack_ns: int = 1000) -> bool:
    """Linux: let this thread's short sleeps end within `slack_ns` of their time instead of the
    default 50 us timer slack (a 10 us sleep took 70 us here, 20 us with 1 us slack). A polling
    rank then sees its message about when it comes, and still leaves the core to working ranks.
    Returns whether the kernel took it."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(29, slack_ns, 0, 0, 0) == 0  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        return False


def polite_wait(reqs: Sequence[MPI.Request] | MPI.Request, any_: bool = False,
                status: MPI.Status | None = None, who: str | Callable[[], str] = "a peer",
                collective: bool = False, patience: float = 1.0, bell: Doorbells | None = None) -> int:
    """Wait for all of `reqs` (or, with any_=True, one: its index); returns that index or -1.

    In poll mode, a wait for messages from peers that ring this rank's `bell` (doorbell.py) sleeps
    until one rings: one wake-up per message. MPI takes a message over more than one test (MPICH:
    one beyond a shared-memory cell is there at the second test after its ring, measured), so a wait
    tests twice before its first sleep and up to four times after a ring; the sleep's timeout
    (BELL_NAPS) only bounds a ring that never came. Any other wait tests and sleeps 40 us doubling to
    200 us (1 us timer slack, fine_sleeps): each sleep costs about 25 us of CPU whatever its length
    on a 2-core VM, and a shorter one lasted 40 us anyway. In spin mode it tests without sleeping (a
    blocking MPI wait could not be bounded). Past run.timeout_s it raises PeerTimeout naming `who`
    (a string, or a function that makes one), after `patience` x run.timeout_s. A collective waits twice as long, and a client waiting on its split
    server 1.5x (Transport.patience): the split server, which waits on the clients themselves,
    then times out first and names the client that stopped answering.
    """
    if isinstance(reqs, MPI.Request):
        reqs, any_ = [reqs], True
    try:
        return _wait(reqs, any_, status, who, collective, patience, bell if _poll else None)
    except MPI.Exception as exc:  # a peer's process is gone: MPICH fails the transfer (process_vm_readv)
        raise PeerGone(f"saw an MPI transfer with {who() if callable(who) else who} fail "
                       f"('{exc.Get_error_string().splitlines()[0].strip()}'): that process is gone "
                       "(killed, or its node lost)") from None


def _wait(reqs, any_: bool, status, who, collective: bool, patience: float, bell: Doorbells | None) -> int:
    if not _poll and not _timeout:
        if any_:
            return MPI.Request.Waitany(reqs, status)
        MPI.Request.Waitall(reqs)
        return -1
    limit = _timeout * (2 if collective else patience) or float("inf")
    delay, deadline = (4e-5 if _poll else 0.0), time.monotonic() + limit
    nap, quick = BELL_NAPS[0], 1
    while True:
        if any_:
            idx, done = MPI.Request.Testany(reqs, status)
            if done:
                return idx
        elif MPI.Request.Testall(reqs):
            return -1
        if bell is not None:
            if quick:  # MPI takes a message over more than one test: test again before sleeping
                quick -= 1
            elif bell.sleep(nap):
                quick = 3
            else:
                quick, nap = 1, min(nap * 2, BELL_NAPS[1])
        elif delay:
            time.sleep(delay)
            delay = min(delay * 2, 2e-4)
        if time.monotonic() > deadline:
            raise PeerTimeout(f"waited {limit:g} s for {who() if callable(who) else who}", collective)

"""Doorbells: a polling rank sleeps until a peer on its node says that a message is there.

With more ranks than cores a rank that waits for a message polls (waiting.polite_wait): it tests,
sleeps, tests again. Each wake-up costs about 25 us of CPU on a shared core, so an mlp step's dozen
short waits cost 6-9 % of a core per rank, and a longer sleep would answer later. A doorbell removes
the guessing for messages between ranks of one node: each polling rank owns a FIFO (a named pipe in
a private temporary directory, unlinked as soon as its peers have it open); a sender writes one byte
to the pipe of the peer it just posted a message to, and a rank that waits only on ringing peers
blocks in poll() on its own pipe: one wake-up when a message comes. The wait's timeout bounds what
a bell could miss (a message MPI queued on the sender's side); a full pipe is already ringing.

A wake-up costs both sides (a ring that wakes a sleeper ~14 us of the sender's CPU, the sleep ~22 us,
measured on this 2-core VM), so a sender may defer a ring to the end of a burst of messages that the
receiver takes together: one wake-up for the burst. It rings what it owes before it waits for
anything itself (Transport does, in every wait) and at every step boundary (Job.step_done).

Set up collectively (every rank of the communicator), at start-up only. Ranks on other nodes, a
spinning rank, or a rank whose pipe cannot be made poll with plain sleeps as before.
"""
from __future__ import annotations

import os
import select
import tempfile

from mpi4py import MPI


class Doorbells:
    """This rank's own bell (if it listens) and the bells of the peers it rings."""

    def __init__(self, comm: MPI.Comm, listen: bool):
        self.fd: int | None = None
        self.out: dict[int, int] = {}       # peer rank -> write end of its pipe
        self.owed: set[int] = set()         # peers whose ring was deferred (ring(later=True))
        path = None
        if listen:
            try:
                path = os.path.join(tempfile.mkdtemp(prefix="mpi_sfl-bell-"), "bell")
                os.mkfifo(path, 0o600)
                self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # RDWR: open does not wait for a writer
            except OSError:  # no bell: this rank polls with plain sleeps
                if path:
                    _remove(path)
                path = None
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        for rank, peer_path in node.allgather((comm.rank, path)):
            if peer_path and rank != comm.rank:
                try:
                    self.out[rank] = os.open(peer_path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    pass
        rings = comm.allgather(sorted(self.out))
        self.ringers = frozenset(r for r, peers in enumerate(rings) if comm.rank in peers)  # who rings this rank
        node.Barrier()  # every peer has its write end open: the name can go
        node.Free()
        if path:
            _remove(path)
        self._poller = None
        if self.fd is not None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)

    def covers(self, sources) -> bool:
        """Whether every rank in `sources` rings this rank's bell (a wait on them may sleep on it)."""
        return self._poller is not None and all(s in self.ringers for s in sources)

    def ring(self, dest: int, later: bool = False) -> None:
        """Tell `dest` that a message to it was posted (after the MPI send call). `later`: at this
        rank's next ring_owed() instead, so that a burst of messages wakes its receiver once."""
        fd = self.out.get(dest)
        if fd is None:
            return
        if later:
            self.owed.add(dest)
            return
        self.owed.discard(dest)
        try:
            os.write(fd, b"\1")
        except OSError:  # full: it is ringing already; gone: nobody left to wake
            pass

    def ring_owed(self) -> None:
        """Ring every bell deferred with ring(later=True): before this rank waits for anything, and
        at the end of a burst."""
        while self.owed:
            self.ring(self.owed.pop())

    def sleep(self, timeout_s: float) -> bool:
        """Sleep until a peer rings (or `timeout_s`), and silence the bell; whether it rang."""
        if not self._poller.poll(timeout_s * 1e3):
            return False
        try:
            os.read(self.fd, 1 << 16)
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        """Close this rank's ends (a warm launch runs many jobs in one process)."""
        for fd in [self.fd, *self.out.values()]:
            if fd is not None:
                os.close(fd)
        self.fd, self.out, self._poller = None, {}, None


def _remove(path: str) -> None:
    """The pipe's name and its private directory (open ends stay valid)."""
    for remove, p in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        try:
            remove(p)
        except OSError:
            pass

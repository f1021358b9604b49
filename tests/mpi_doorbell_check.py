"""Run under mpiexec -n N (N >= 2), polling: a token goes round the ranks through Transport, and
each rank waits for it asleep on its doorbell (rank 0 pauses before each send, so the others are
asleep when it comes). Payloads: inside the header's message, at that limit, after it, and large
(MPI takes those over two tests). Every wait must be woken by its ring, none by its timeout, which
is set to 5 s here: a missed ring would be a 5 s wait, counted. Then the control: the same laps with
nobody ringing and a 50 ms timeout; every message still arrives, and the waits end by timeouts,
so the count can see a missed ring. In between, bursts: each rank forwards the token as one message
of every size, all sent with ring=False; its next wait must ring what it owes, once per burst (no
wait may end by its timeout there either). Prints OK with the counts."""
import os
import sys
import time

import torch
from mpi4py import MPI

from mpi_sfl import waiting
from mpi_sfl.doorbell import Doorbells
from mpi_sfl.transport import ACT, INLINE_BYTES, Transport

comm = MPI.COMM_WORLD
waiting.set_wait_mode("poll", comm.size, 1)
t = Transport(comm, torch.device("cpu"))
t.bells = Doorbells(comm, listen=True)
assert t.bell_for([(comm.rank - 1) % comm.size]) is t.bells, "no bell: the FIFO could not be made"
woke = {"ring": 0, "timeout": 0, "rang": 0}
sleep = t.bells.sleep


def counted(timeout: float) -> bool:
    rang = sleep(timeout)
    woke["ring" if rang else "timeout"] += 1
    return rang


t.bells.sleep = counted
ring = t.bells.ring


def counted_ring(dest: int, later: bool = False) -> None:
    woke["rang"] += not later  # a ring written now, not deferred
    ring(dest, later)


t.bells.ring = counted_ring
nxt, prev = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
sizes = [10, INLINE_BYTES // 4, INLINE_BYTES // 4 + 1, 100_000]  # float32 elements


def laps(n: int) -> None:
    for lap in range(n):
        for i, size in enumerate(sizes):
            x = torch.arange(size, dtype=torch.float32) + lap
            if comm.rank == 0:
                time.sleep(0.003)
                t.isend(x, nxt, ACT, lap, i, 0)
            header, y = t.recv(prev, ACT)
            if not torch.equal(y, x) or (header.rnd, header.step) != (lap, i):
                print(f"rank {comm.rank}: lap {lap} size {size}: wrong message", flush=True)
                sys.exit(1)
            if comm.rank:
                t.isend(y.clone(), nxt, ACT, lap, i, 0)
            t.wait_sends()


def bursts(n: int) -> None:
    for lap in range(n):
        xs = [torch.arange(size, dtype=torch.float32) + lap for size in sizes]
        if comm.rank == 0:
            time.sleep(0.003)
            for i, x in enumerate(xs):
                t.isend(x, nxt, ACT, lap, i, 0, ring=False)
        got = [t.recv(prev, ACT) for _ in xs]  # rank 0: this wait rings what it owes
        if [(h.rnd, h.step) for h, _ in got] != [(lap, i) for i in range(len(xs))] or not all(
                torch.equal(y, x) for (_, y), x in zip(got, xs)):
            print(f"rank {comm.rank}: burst {lap}: wrong messages", flush=True)
            sys.exit(1)
        if comm.rank:
            for i, (_, y) in enumerate(got):
                t.isend(y.clone(), nxt, ACT, lap, i, 0, ring=False)
        t.wait_sends()  # the others: this wait rings what they owe


waiting.BELL_NAPS = (5.0, 5.0)
laps(5)
rung = dict(woke)
comm.Barrier()
woke.update(ring=0, timeout=0, rang=0)
bursts(3)
burst = dict(woke)
comm.Barrier()
waiting.BELL_NAPS = (0.05, 0.05)
for fd in t.bells.out.values():  # the control: nobody rings
    os.close(fd)
t.bells.out = {}
woke.update(ring=0, timeout=0)
laps(1)
silent = dict(woke)
t.bells.close()
counts = comm.gather((rung, silent, burst), root=0)
if comm.rank == 0:
    print(f"OK rung={[c[0] for c in counts]} silent={[c[1] for c in counts]} burst={[c[2] for c in counts]}",
          flush=True)

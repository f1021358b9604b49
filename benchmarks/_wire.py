"""Wire benchmark worker (2 ranks): ping-pong of one float32 tensor, three ways, interleaved.

    mpiexec -n 2 python -m mpi4py -m benchmarks._wire --sizes 4096,1048576 --reps 5 --out wire.json

- transport: mpi_sfl's Transport as training uses it: isend(header + payload) + wait_sends on the
  sender, recv (header, then the payload into a pooled buffer) on the receiver, with the wait mode
  training picks for this layout (run.wait = auto: block in MPI when each rank has a core);
- transport_poll: the same with run.wait = poll and no doorbells (each wait tests and sleeps);
- transport_bell: run.wait = poll with doorbells, what training uses when ranks outnumber cores
  (a wait for a message sleeps until its sender rings; a wait for a send to complete polls);
- raw:       mpi4py uppercase Send/Recv of the same bytes from a numpy buffer (no header);
- pickle:    mpi4py lowercase send/recv of the same torch tensor (pickled, FedML style).
For every size and repetition the variants run back to back in a rotating order; each
measurement is `iters` round trips (per variant, sized to ~`target` seconds) timed on rank 0
after an untimed round trip. Rank 0 writes the
per-repetition round-trip seconds; the wire suite (benchmarks/wire.py) takes medians.
"""
from __future__ import annotations

import argparse
import json

import os

import mpi_sfl  # noqa: F401  (before torch allocates: mpi_sfl turns on THP for torch tensors)
import numpy as np
import torch
from mpi4py import MPI

from mpi_sfl import waiting as tr
from mpi_sfl.doorbell import Doorbells
from mpi_sfl.transport import ACT, OUT, Transport

VARIANTS = ("transport", "transport_poll", "transport_bell", "raw", "pickle")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True, help="comma-separated payload bytes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target", type=float, default=0.05, help="seconds per measurement (sets iters)")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("the wire benchmark needs exactly 2 ranks")
    torch.set_num_threads(1)
    rank, peer = comm.rank, 1 - comm.rank
    t = Transport(comm, torch.device("cpu"))
    bells = Doorbells(comm, listen=True)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        n = size // 4
        x = torch.arange(n, dtype=torch.float32)
        raw_send = x.numpy().copy()
        raw_recv = np.empty_like(raw_send)

        node_ranks, cores = comm.Split_type(MPI.COMM_TYPE_SHARED).size, len(os.sched_getaffinity(0))

        def transport_rt():
            if rank == 0:
                t.isend(x, peer, ACT, 0, 0, 0)
                t.wait_sends()
                t.recv(peer, OUT)
            else:
                _, y = t.recv(peer, ACT)
                t.isend(y, peer, OUT, 0, 0, 0)
                t.wait_sends()

        def raw_rt():
            if rank == 0:
                comm.Send(raw_send, peer, tag=7)
                comm.Recv(raw_recv, peer, tag=8)
            else:
                comm.Recv(raw_recv, peer, tag=7)
                comm.Send(raw_recv, peer, tag=8)

        def pickle_rt():
            if rank == 0:
                comm.send(x, peer, tag=9)
                comm.recv(source=peer, tag=10)
            else:
                y = comm.recv(source=peer, tag=9)
                comm.send(y, peer, tag=10)

        fns = {"transport": transport_rt, "transport_poll": transport_rt, "transport_bell": transport_rt,
               "raw": raw_rt, "pickle": pickle_rt}
        waits = {"transport_poll": ("poll", None), "transport_bell": ("poll", bells)}

        def use(v: str) -> None:
            """The variant's wait mode and doorbells (set before its round trips, not inside them)."""
            mode, t.bells = waits.get(v, ("auto", None))
            tr.set_wait_mode(mode, node_ranks, cores)
        # Iterations per measurement, per variant, from one timed round trip each (rank 0 decides).
        for v, fn in fns.items():
            use(v)
            fn()  # warm-up: pools, connections, page faults
        guess = {}
        for v, fn in fns.items():
            use(v)
            comm.Barrier()
            t0 = MPI.Wtime()
            fn()
            guess[v] = max(1, min(args.max_iters, int(args.target / max(MPI.Wtime() - t0, 1e-6))))
        iters = comm.bcast(guess, root=0)
        samples = {v: [] for v in VARIANTS}
        for rep in range(args.reps):
            k = rep % len(VARIANTS)
            order = VARIANTS[k:] + VARIANTS[:k]
            for v in order:
                use(v)
                fns[v]()  # one untimed round trip right before, so neither side starts cold
                comm.Barrier()
                t0 = MPI.Wtime()
                for _ in range(iters[v]):
                    fns[v]()
                samples[v].append((MPI.Wtime() - t0) / iters[v])
        # Correctness: the transport round trip returns the same bytes.
        use("transport")
        if rank == 0:
            t.isend(x, peer, ACT, 0, 0, 0)
            t.wait_sends()
            _, back = t.recv(peer, OUT)
            assert torch.equal(back, x), "transport round trip changed the payload"
        else:
            _, y = t.recv(peer, ACT)
            t.isend(y, peer, OUT, 0, 0, 0)
            t.wait_sends()
        results.append({"bytes": size, "iters": iters, "rtt_seconds": samples})
    bells.close()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"results": results}, f)


if __name__ == "__main__":
    main()

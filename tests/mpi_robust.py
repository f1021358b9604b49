"""SPMD check of the robust aggregators' collectives, at any -n: every rank makes a seeded number of
rows (some none), the clients combine them decentralized (Allgatherv) and centralized (Gatherv at
rank 0, which contributes nothing, then Bcast); each must give the bits of robust_combine on all
the rows concatenated in rank order. Prints one line per check; exits 1 on a mismatch."""
import sys

import numpy as np
from mpi4py import MPI

from mpi_sfl import aggregation
from mpi_sfl.timing import Timers

comm = MPI.COMM_WORLD
width = int(sys.argv[1]) if len(sys.argv) > 1 else 37
aggregation.BUCKET = 64  # small buckets: several collectives per combine, a short last one
rows_of = [np.random.default_rng([r, 11]).normal(size=(r % 3, width)).astype(np.float32) for r in range(comm.size)]
for rows in rows_of:
    rows[:, -1] = 5.0  # the sample-count slot
bad = 0
for kind, trim, f, select in (("median", 0, 0, 1), ("trimmed-mean", 0.2, 0, 1), ("krum", 0, 1, 1), ("krum", 0, 1, 0)):
    for mode in ("decentralized", "centralized"):
        clients = comm.Split(0 if mode == "centralized" or comm.rank else 1, comm.rank)  # decentralized: no rank 0
        everyone = rows_of if mode == "centralized" else rows_of[1:]
        allrows = np.concatenate([r for r in everyone])
        expect = np.zeros(width, np.float32)
        if len(allrows):
            blocks = [allrows[:, a:a + 64] for a in range(0, width, 64)]
            blocks[-1] = blocks[-1][:, :-1]
            expect[:-1] = np.concatenate(aggregation.robust_combine(kind, [b for b in blocks if b.shape[1]], trim, f, select))
            expect[-1] = allrows[:, -1].sum()
        agg = aggregation.Aggregator(mode, clients, Timers(), kind, trim, f, select)
        out = np.zeros(width, np.float32)
        if mode == "decentralized" and comm.rank == 0:
            clients.Free()
            continue
        if mode == "centralized" and comm.rank == 0:
            agg.combine_at_root(out)
        else:
            agg.combine(rows_of[comm.rank], out)
        same = np.array_equal(out, expect)
        bad += not same
        print(f"rank {comm.rank} {kind} trim={trim} f={f} select={select} {mode}: {'same bits' if same else 'DIFFERENT'}")
        clients.Free()
sys.exit(1 if comm.allreduce(bad) else 0)

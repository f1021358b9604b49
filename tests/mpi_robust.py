"""SPMD check of the robust aggregators' collectives, at any -n: every rank makes a seeded number of
rows (some none), the clients combine them decentralized (Allgatherv) and centralized (Gatherv at
rank 0, which contributes nothing, then Bcast); each must give the bits of robust_combine on all
the rows concatenated in rank order. Prints one line per check; exits 1 on a mismatch.

Usage: mpi_robust.py WIDTH [SIZES]: SIZES (e.g. 3,4,5; default the launch's -n) runs the checks on
the first N ranks of COMM_WORLD for each N in turn (one launch for several -n; the others wait).
Each line starts with n=N."""
import sys

import numpy as np
from mpi4py import MPI

from mpi_sfl import aggregation
from mpi_sfl.timing import Timers

world = MPI.COMM_WORLD
width = int(sys.argv[1]) if len(sys.argv) > 1 else 37
sizes = [int(n) for n in sys.argv[2].split(",")] if len(sys.argv) > 2 else [world.size]
aggregation.BUCKET = 64  # small buckets: several collectives per combine, a short last one


def check(comm) -> tuple[int, int]:
    """Every check on `comm`, as if it were COMM_WORLD; this rank's (checks with the same bits, mismatches)."""
    rows_of = [np.random.default_rng([r, 11]).normal(size=(r % 3, width)).astype(np.float32) for r in range(comm.size)]
    for rows in rows_of:
        rows[:, -1] = 5.0  # the sample-count slot
    good = bad = 0
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
            good += same
            print(f"n={comm.size} rank {comm.rank} {kind} trim={trim} f={f} select={select} {mode}: "
                  f"{'same bits' if same else 'DIFFERENT'}", flush=True)
            clients.Free()
    return good, bad


bad = 0
for n in sizes:
    comm = world.Split(0 if world.rank < n else MPI.UNDEFINED, world.rank)
    good = 0
    if comm != MPI.COMM_NULL:
        good, wrong = check(comm)
        bad += wrong
        comm.Free()
    counts = world.gather((good, bad), root=0)
    if world.rank == 0:  # one line per size (the per-check lines of several ranks can interleave)
        print(f"summary n={n}: {sum(g for g, _ in counts)} same bits, {sum(b for _, b in counts)} different", flush=True)
sys.exit(1 if world.allreduce(bad) else 0)

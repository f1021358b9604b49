"""Several independent `mpi_sfl train` jobs side by side in one mpiexec launch (memory suite only).

    mpiexec -n G*R python -m mpi4py -m benchmarks._group_train --ranks R --job 'k=v;k=v' --job ...

COMM_WORLD is split into G groups of R consecutive ranks; group g runs mpi_sfl.train.main on its
own communicator with the g-th job's --set overrides. The jobs share the cores, so their timings mean nothing; their per-process
peak RSS is theirs alone. It saves the per-launch start-up (a torch import per rank) that would
otherwise dominate the memory suite's quick mode.
"""
from __future__ import annotations

import argparse

from mpi4py import MPI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, required=True, help="ranks per job")
    p.add_argument("--job", action="append", required=True, help="';'-separated section.key=value overrides")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    if world.size != args.ranks * len(args.job):
        raise SystemExit(f"need {args.ranks} x {len(args.job)} ranks, got {world.size}")
    g = world.rank // args.ranks
    sub = world.Split(g, world.rank)
    from mpi_sfl import train
    train.main(None, [s for s in args.job[g].split(";") if s], comm=sub, start="overwrite")  # benchmarks re-measure
    world.Barrier()


if __name__ == "__main__":
    main()

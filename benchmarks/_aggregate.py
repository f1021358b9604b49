"""Aggregation benchmark worker: client-side FedAvg of one model's weights, three ways, two designs.

    mpiexec -n 4 python -m mpi4py -m benchmarks._aggregate --params 100000,1000000 --reps 5 --out agg.json

Designs (all ranks of COMM_WORLD take part):
- centralized:   rank 0 is the fed server (Aggregator.average_at_root), the others are clients
                 (Aggregator.average): Reduce(SUM) to rank 0, divide, Bcast;
- decentralized: every rank is a client: Allreduce(SUM), divide locally.
Variants:
- flat:                mpi_sfl's Aggregator on one flat float32 buffer [sum n_i W_i, sum n_i]
                       (P + 1 floats, as 8 MiB slices: one nonblocking collective each, posted
                       together, completed by polite_wait);
- flat_blocking:       the whole flat buffer in one blocking uppercase Reduce/Bcast/Allreduce (for
                       reference: what slicing and polite waiting change);
- per_tensor:          one uppercase nonblocking collective per tensor of a ResNet-like layer
                       list (plus one for the count), all posted at once, one polite_wait per phase;
- per_tensor_blocking: one blocking uppercase collective per tensor, one after another;
- pickle:              lowercase (pickled) reduce + bcast / allreduce of the list of torch tensors,
                       with a Python element-wise sum as the op (what pickle-based FL frameworks do).
Each timing is the slowest rank's time for one averaging; variants rotate within each repetition.
Every variant's result is checked against the exact average.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from mpi4py import MPI

from mpi_sfl.aggregation import Aggregator
from mpi_sfl.timing import Timers
from mpi_sfl.waiting import polite_wait

VARIANTS = ("flat", "flat_blocking", "per_tensor", "per_tensor_blocking", "pickle")


def layer_shapes(params: int) -> list[tuple[int, ...]]:
    """Parameter tensor shapes of a ResNet-like conv net with about `params` parameters.

    Each conv layer brings three tensors (3x3 weight, norm scale, norm shift), then a linear
    classifier (weight, bias). Depth grows with size like real models: 8 convs up to 0.2M params,
    16 up to 2M, 20 (ResNet-18: 62 tensors) up to 20M, 53 beyond (ResNet-50: 161 tensors).
    Channels double over four stages; the base width is solved for the parameter count.
    """
    depth = 8 if params <= 200_000 else 16 if params <= 2_000_000 else 20 if params <= 20_000_000 else 53
    mult = [2 ** (4 * i // depth) for i in range(depth)]  # four stages: x1, x2, x4, x8

    def build(w):
        shapes, c_in = [], 3
        for m in mult:
            c_out = max(1, int(w * m))
            shapes += [(c_out, c_in, 3, 3), (c_out,), (c_out,)]
            c_in = c_out
        return shapes + [(10, c_in), (10,)]

    lo, hi = 1.0, 4096.0
    for _ in range(60):  # bisection on the base width
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(math.prod(s) for s in build(mid)) < params else (lo, mid)
    return build(hi)


def timed(comm, fn) -> float:
    polite_wait(comm.Ibarrier())
    t0 = MPI.Wtime()
    fn()
    return comm.allreduce(MPI.Wtime() - t0, op=MPI.MAX)


def run_mode(mode: str, world: MPI.Comm, shapes, reps: int) -> dict:
    comm = world
    rank = comm.rank
    root = mode == "centralized" and rank == 0
    weight = 0.0 if root else float(rank + 1)                   # n_i: samples this client trained on
    total_w = sum(float(r + 1) for r in range(comm.size) if not (mode == "centralized" and r == 0))
    numel = [math.prod(s) for s in shapes]
    P = sum(numel)
    # client i holds W_i = base * (i + 1) with base = linspace(-1, 1); the exact average is
    # base * sum(n_i^2) / sum(n_i)
    mine = torch.linspace(-1, 1, P, dtype=torch.float32).mul_(float(rank + 1))
    avg_factor = sum(float(r + 1) ** 2 for r in range(comm.size)
                     if not (mode == "centralized" and r == 0)) / total_w / float(rank + 1)
    agg = Aggregator(mode, comm, Timers())
    flat = torch.zeros(P + 1)
    root_buf = np.zeros(P + 1 if root else 1, np.float32)
    tensors = [torch.zeros(s) for s in shapes] + [torch.zeros(1)]
    nps = [t.numpy() for t in tensors]
    sum_op = lambda a, b: [x + y for x, y in zip(a, b)]  # noqa: E731 - lowercase reduce with a Python op

    def fill_flat():
        flat[:-1].copy_(mine).mul_(weight)
        flat[-1] = weight

    def fill_list():
        off = 0
        for t, n in zip(tensors[:-1], numel):
            t.reshape(-1).copy_(mine[off:off + n]).mul_(weight)
            off += n
        tensors[-1][0] = weight

    def flat_fn():
        if root:
            agg.average_at_root(root_buf)
        else:
            agg.average(flat)

    def flat_blocking_fn():
        if mode == "centralized":
            if root:
                root_buf[:] = 0
                comm.Reduce(MPI.IN_PLACE, root_buf, op=MPI.SUM, root=0)
                root_buf[:-1] /= root_buf[-1]
                comm.Bcast(root_buf, root=0)
            else:
                data = flat.numpy()
                comm.Reduce(data, None, op=MPI.SUM, root=0)
                comm.Bcast(data, root=0)
        else:
            data = flat.numpy()
            comm.Allreduce(MPI.IN_PLACE, data, op=MPI.SUM)
            data[:-1] /= data[-1]

    def per_tensor_blocking_fn():
        if mode == "centralized":
            for a in nps:
                if root:
                    a[:] = 0
                    comm.Reduce(MPI.IN_PLACE, a, op=MPI.SUM, root=0)
                else:
                    comm.Reduce(a, None, op=MPI.SUM, root=0)
            if root:
                for a in nps[:-1]:
                    a /= nps[-1][0]
            for a in nps:
                comm.Bcast(a, root=0)
        else:
            for a in nps:
                comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
            for a in nps[:-1]:
                a /= nps[-1][0]

    def per_tensor_fn():
        if mode == "centralized":
            if root:
                for a in nps:
                    a[:] = 0
                polite_wait([comm.Ireduce(MPI.IN_PLACE, a, op=MPI.SUM, root=0) for a in nps])
                n = nps[-1][0]
                for a in nps[:-1]:
                    a /= n
            else:
                polite_wait([comm.Ireduce(a, None, op=MPI.SUM, root=0) for a in nps])
            polite_wait([comm.Ibcast(a, root=0) for a in nps])
        else:
            polite_wait([comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM) for a in nps])
            n = nps[-1][0]
            for a in nps[:-1]:
                a /= n

    result = {}

    def pickle_fn():
        if mode == "centralized":
            contrib = [torch.zeros_like(t) for t in tensors] if root else tensors
            summed = comm.reduce(contrib, op=sum_op, root=0)
            if root:
                n = summed[-1][0]
                summed = [t / n for t in summed[:-1]] + [summed[-1]]
            out = comm.bcast(summed, root=0)
        else:
            out = comm.allreduce(tensors, op=sum_op)
            out = [t / out[-1][0] for t in out[:-1]] + [out[-1]]
        result["pickle"] = out

    def check(v):
        if v in ("flat", "flat_blocking"):
            got = torch.from_numpy(root_buf[:-1]) if root else flat[:-1]
        elif v in ("per_tensor", "per_tensor_blocking"):
            got = torch.cat([t.reshape(-1) for t in tensors[:-1]])
        else:
            got = torch.cat([t.reshape(-1) for t in result.pop("pickle")[:-1]])
        return float((got - mine * avg_factor).abs().max())

    fns = {"flat": flat_fn, "flat_blocking": flat_blocking_fn, "per_tensor": per_tensor_fn,
           "per_tensor_blocking": per_tensor_blocking_fn, "pickle": pickle_fn}
    fills = {"flat": fill_flat, "flat_blocking": fill_flat, "per_tensor": fill_list,
             "per_tensor_blocking": fill_list, "pickle": fill_list}
    seconds = {v: [] for v in VARIANTS}
    errors = {v: 0.0 for v in VARIANTS}
    for v in VARIANTS:  # warm-up and correctness
        fills[v]()
        fns[v]()
        errors[v] = comm.allreduce(check(v), op=MPI.MAX)
    for rep in range(reps):
        k = rep % len(VARIANTS)
        for v in VARIANTS[k:] + VARIANTS[:k]:
            fills[v]()
            seconds[v].append(timed(comm, fns[v]))
    return {"mode": mode, "ranks": comm.size, "params": P, "tensors": len(shapes) + 1,
            "seconds": seconds, "max_abs_error": errors}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--params", required=True, help="comma-separated model sizes (parameters)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rows = []
    for params in (int(s) for s in args.params.split(",")):
        shapes = layer_shapes(params)
        for mode in ("centralized", "decentralized"):
            rows.append(run_mode(mode, world, shapes, args.reps))
    if world.rank == 0:
        with open(args.out, "w") as f:
            json.dump({"results": rows}, f)


if __name__ == "__main__":
    main()

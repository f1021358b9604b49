"""DDP reference worker: torch DistributedDataParallel over gloo, the same unsplit model and data.

    mpiexec -n N python -m mpi4py -m benchmarks._ddp --set data.train_samples=4096 ... --out ddp.json

mpi4py only gives rank, size and the rendezvous port (rank 0 picks a free one); torch.distributed
does the rest over gloo on 127.0.0.1. The config is mpi_sfl's (same --set keys), so the model is
`mpi_sfl.models.for_config(cfg)`'s spec and the data the same synthetic set. The training set is split
IID over the N ranks with mpi_sfl's partitioner and each rank draws batches of train.batch_size
(the SFL per-client batch) in mpi_sfl's per-round order. Throughput is counted like summary.json:
samples trained on (all ranks, all rounds) / training seconds (no evaluation; first round included).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI

from mpi_sfl import config, data, models
from mpi_sfl.layout import set_threads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    rank, world = comm.rank, comm.size
    cfg = config.load(None, args.overrides)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    threads = set_threads(cfg.run.threads, node.size)  # same rule as an SFL rank
    port = comm.bcast(free_port() if rank == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    seed, bs = cfg.run.seed, cfg.train.batch_size
    train = data.load(cfg, "train")
    shards = data.partition(train.y.numpy(), world, cfg)
    model = models.for_config(cfg)[0].build(seed).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum)
    total = len(train.y)
    round_seconds, processed = [], 0
    for rnd in range(cfg.train.rounds):
        batches = data.round_batches(shards, bs, seed, rnd, ids=[rank])[rank]
        steps = comm.allreduce(len(batches), op=MPI.MAX)  # DDP needs the same step count everywhere
        dist.barrier()
        t0 = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for step in range(steps):
            idx = torch.from_numpy(batches[step % len(batches)])  # a short shard wraps around
            x, y = train.x[idx], train.y[idx]
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        dist.barrier()
        round_seconds.append(time.perf_counter() - t0)
        processed += int(loss_sum[1])
    processed = comm.allreduce(processed, op=MPI.SUM)  # samples trained on, all ranks, all rounds
    last = comm.allreduce(loss_sum.numpy(), op=MPI.SUM)
    dist.destroy_process_group()
    if rank == 0:
        seconds = sum(round_seconds)
        with open(args.out, "w") as f:
            json.dump({"ranks": world, "threads_per_rank": threads, "per_rank_batch": bs,
                       "train_samples": total, "samples_processed": processed,
                       "rounds": len(round_seconds), "round_seconds": round_seconds, "seconds": seconds,
                       "train_samples_per_s": processed / seconds,
                       "final_train_loss": float(last[0] / last[1])}, f)


if __name__ == "__main__":
    main()

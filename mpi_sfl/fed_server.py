"""The fed server (rank 0): FedAvg root, evaluator and the only rank that writes outputs.

Per round it takes part in each centralized averaging (Reduce, divide, Bcast), then collects the
round's global model — averaged client parts (from the averaging, or from the first client rank
when decentralized) and the server part (from split server 1) — evaluates it on the test set while
the other ranks already train the next round, and writes a metrics row.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from . import models
from .aggregation import Aggregator, flatten_params
from .job import WEIGHTS_TAG, Job
from .layout import FED
from .outputs import RunWriter, evaluate, role_rows
from .transport import polite_wait


def run(job: Job) -> None:
    cfg = job.cfg
    split, centralized = cfg.model.split, cfg.sfl.aggregation == "centralized"
    model = models.build(cfg.model.name, cfg.run.seed).to(job.device)
    client_flat = flatten_params(models.client_parts(model, split), job.device)
    server_params = list(models.server_part(model, split).parameters())
    client_buf = np.zeros(client_flat.numel(), np.float32)
    server_buf = np.zeros(sum(p.numel() for p in server_params), np.float32)
    aggregator = Aggregator("centralized", job.fed_comm, job.timers)
    writer = RunWriter(cfg, cfg.train.rounds, "sfl")
    samples_per_round = sum(len(s) for s in job.shards)
    train_seconds, start = 0.0, MPI.Wtime()
    for rnd in range(cfg.train.rounds):
        t0 = MPI.Wtime()
        if centralized:
            for step in range(job.steps):
                if job.aggregate_due(step):
                    aggregator.average_at_root(client_buf)
        with job.timers.phase("idle"):
            reqs = [job.comm.Irecv(server_buf, source=1, tag=WEIGHTS_TAG)]
            if not centralized:
                reqs.append(job.comm.Irecv(client_buf[:-1], source=job.layout.client_ranks[0], tag=WEIGHTS_TAG))
            polite_wait(reqs)
        stats = job.gather_stats(job.stats(FED, 0.0, 0.0, aggregator.bytes_sent, MPI.Wtime() - t0))
        seconds = float(stats[1:, 5].max())  # the training ranks' round; eval of the last overlaps it
        train_seconds += seconds
        client_flat[:-1].copy_(torch.from_numpy(client_buf[:-1]))
        torch.nn.utils.vector_to_parameters(torch.from_numpy(server_buf).to(job.device), server_params)
        with job.timers.phase("eval"):
            test_loss, test_acc = evaluate(model, job.test.x, job.test.y, job.device)
        roles = role_rows(stats)
        writer.round({
            "round": rnd, "rounds": cfg.train.rounds,
            "train_loss": float(stats[:, 1].sum() / max(stats[:, 2].sum(), 1)),
            "test_loss": test_loss, "test_accuracy": test_acc, "seconds": round(seconds, 4),
            "samples": samples_per_round,
            "bytes_sent": {r: v["bytes_sent"] for r, v in roles.items()},
            "peak_rss_mb": {r: v["peak_rss_mb"] for r, v in roles.items()},
            "phase_seconds": {r: v["seconds"] for r, v in roles.items()},
        }, model)
    writer.finish({
        "mode": "sfl", "seconds": round(train_seconds, 3), "wall_seconds": round(MPI.Wtime() - start, 3),
        "ranks": job.comm.size,
        "train_samples_per_s": samples_per_round * cfg.train.rounds / train_seconds,
        "phase_seconds": {r: v["seconds"] for r, v in roles.items()},
    })

"""The fed server (rank 0): FedAvg root, evaluator and the only rank that writes outputs.

Per round it takes part in each centralized averaging (Reduce, divide, Bcast), then collects the
round's global model — the client parts (from the averaging, or from the client rank that has them:
the first client rank when decentralized, the holder of the relayed model in sl) and the server
part (from the first split server; none in fl) — evaluates it on the test set while the other
ranks already train the next round, and writes a metrics row.
"""
from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI

from . import data, models
from .aggregation import Aggregator, flatten_params
from .job import WEIGHTS_TAG, Job
from .layout import FED
from .outputs import RunWriter, evaluate, role_rows
from .transport import polite_wait


def run(job: Job, test: data.Split) -> None:
    cfg = job.cfg
    model = models.build(cfg.model.name, cfg.run.seed).to(job.device)
    client_flat = flatten_params(models.client_parts(model, cfg.u_shape, cfg.split), job.device)
    server_flat = flatten_params([models.server_part(model, cfg.u_shape)], job.device) if cfg.split else None
    client_buf = np.zeros(client_flat.numel(), np.float32)
    server_buf = np.zeros(server_flat.numel() - 1 if cfg.split else 0, np.float32)
    aggregator = Aggregator("centralized", job.fed_comm, job.timers)
    writer = RunWriter(cfg, cfg.train.rounds, "sfl" if cfg.split else "fl")
    train_seconds, samples, start = 0.0, 0, MPI.Wtime()
    for rnd in range(cfg.train.rounds):
        plan = job.plan(rnd)
        t0 = MPI.Wtime()
        if cfg.averages and cfg.centralized:
            for step in range(plan.steps):
                if job.aggregate_due(step, plan.steps):
                    aggregator.average_at_root(client_buf)
        with job.timers.phase("idle"):
            reqs = [job.comm.Irecv(server_buf, source=job.layout.first_server, tag=WEIGHTS_TAG)] if cfg.split else []
            source = job.client_weights_from(plan)
            if source is not None:
                reqs.append(job.comm.Irecv(client_buf[:-1], source=source, tag=WEIGHTS_TAG))
            polite_wait(reqs)
        stats = job.gather_stats(job.stats(FED, 0.0, 0.0, aggregator.bytes_sent, MPI.Wtime() - t0))
        seconds = float(stats["round_seconds"][1:].max())  # the training ranks' round; eval of the last overlaps it
        train_seconds += seconds
        samples += plan.samples
        client_flat[:-1].copy_(torch.from_numpy(client_buf[:-1]))
        if cfg.split:
            server_flat[:-1].copy_(torch.from_numpy(server_buf))
        with job.timers.phase("eval"):
            test_loss, test_acc = evaluate(model, test.x, test.y, job.device)
        roles = role_rows(stats)
        writer.round({
            "round": rnd, "rounds": cfg.train.rounds,
            "train_loss": float(stats["loss_sum"].sum() / max(stats["samples"].sum(), 1)),
            "test_loss": test_loss, "test_accuracy": test_acc, "seconds": round(seconds, 4),
            "samples": plan.samples, "clients_trained": len(plan.batches),
            "bytes_sent": {r: v["bytes_sent"] for r, v in roles.items()},
            "peak_rss_mb": {r: v["peak_rss_mb"] for r, v in roles.items()},
            "phase_seconds": {r: v["seconds"] for r, v in roles.items()},
        }, model)
    writer.finish({
        "mode": "sfl", "variant": cfg.sfl.variant, "seconds": round(train_seconds, 3),
        "wall_seconds": round(MPI.Wtime() - start, 3), "ranks": job.comm.size,
        "train_samples_per_s": samples / train_seconds,
        "phase_seconds": {r: v["seconds"] for r, v in roles.items()},
    })

"""A client rank: hosts one or more logical clients, each with its own data shard and weights.

One step, for the logical clients that still have data:
  1. draw a batch, run the encoder, send h (and, label-sharing, the labels) to the split server;
  2. U-shape: for each z that comes back (in whatever order), run the head, the loss and its
     backward, and send delta = dl/dz back;
  3. unless the encoder is frozen: for each dl/dh that comes back, finish the encoder's backward;
  4. each logical client takes an SGD step on its own gradients.
Every aggregate_every steps (and at the end of each round) the client-side weights are averaged,
sample-weighted, across all logical clients (aggregation.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from . import data, models
from .aggregation import Aggregator, flatten_params, host
from .job import WEIGHTS_TAG, Job
from .layout import CLIENT
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox, polite_wait


@dataclass
class LogicalClient:
    """One data owner: its shard, its own copy of encoder/head and its own optimizer state."""
    cid: int
    encoder: nn.Module
    head: nn.Module
    flat: torch.Tensor              # encoder+head parameters (views into it), plus a spare slot
    opt: torch.optim.Optimizer
    trained: int = 0                # samples since the last aggregation
    batch: dict = field(default_factory=dict)  # this step's tensors


def make_clients(job: Job, ids: list[int]) -> list[LogicalClient]:
    cfg = job.cfg
    base = models.build(cfg.model.name, cfg.run.seed)
    out = []
    for cid in ids:
        m = copy.deepcopy(base).to(job.device).train()
        if cfg.model.freeze_encoder:
            m.encoder.requires_grad_(False)
        parts = models.client_parts(m, cfg.model.split)
        flat = flatten_params(parts, job.device)
        trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable or [torch.zeros(1, requires_grad=True)],
                              lr=cfg.train.lr, momentum=cfg.train.momentum)
        out.append(LogicalClient(cid, m.encoder, m.head, flat, opt))
    return out


def run(job: Job) -> None:
    cfg = job.cfg
    split, frozen, seed = cfg.model.split, cfg.model.freeze_encoder, cfg.run.seed
    train = job.train
    server = job.layout.server_of(job.rank)
    clients = make_clients(job, job.layout.clients_of(job.rank))
    # Only parts that draw random numbers are seeded per batch; fixed for the run.
    job.seed_encoder, job.seed_head = models.uses_rng(clients[0].encoder), models.uses_rng(clients[0].head)
    agg_comm = job.fed_comm if cfg.sfl.aggregation == "centralized" else job.clients_comm
    aggregator = Aggregator(cfg.sfl.aggregation, agg_comm, job.timers)
    buf = torch.zeros_like(clients[0].flat)
    for rnd in range(cfg.train.rounds):
        plan = data.round_batches(job.shards, job.batch_size, seed, rnd, ids=[c.cid for c in clients])
        loss_sum = samples = 0.0
        t0 = MPI.Wtime()
        for step in range(job.steps):
            active = [c for c in clients if step < len(plan[c.cid])]
            if active:
                loss_sum += client_step(job, active, plan, train, server, rnd, step, split, frozen)
                samples += sum(c.batch["b"] for c in active)
            if job.aggregate_due(step):
                average(clients, aggregator, buf)
        if cfg.sfl.aggregation == "decentralized" and job.rank == job.layout.client_ranks[0]:
            weights = host(clients[0].flat[:-1])  # the averaged client parts, for the evaluation
            polite_wait(job.comm.Isend(weights, dest=0, tag=WEIGHTS_TAG))
        job.gather_stats(job.stats(CLIENT, loss_sum, samples if split == "u" else 0.0,
                                   job.transport.bytes_sent + aggregator.bytes_sent, MPI.Wtime() - t0))


def client_step(job: Job, active: list[LogicalClient], plan, train: data.Split, server: int,
                rnd: int, step: int, split: str, frozen: bool) -> float:
    """One synchronous step of this rank's active logical clients; returns sum of loss x batch."""
    seed = job.cfg.run.seed
    t, by_id = job.transport, {c.cid: c for c in active}
    with job.timers.phase("client_compute"):
        for c in active:
            idx = torch.from_numpy(plan[c.cid][step])
            x, y = train.x[idx].to(job.device), train.y[idx].to(job.device)
            if job.seed_encoder:
                torch.manual_seed(models.batch_seed(seed, rnd, step, c.cid, 0))
            with torch.set_grad_enabled(not frozen):
                h = c.encoder(x)
            c.batch = {"h": h, "y": y, "b": len(idx)}
            t.isend(h, server, ACT, rnd, step, c.cid)
            if split != "u":
                t.isend(y, server, LABELS, rnd, step, c.cid)
    # Whatever the server sends back first: z (U-shape: run the head, send dl/dz) or dl/dh (finish
    # the encoder). Taking dl/dh as soon as it comes lets the server release its send buffer.
    u_shape = split == "u"
    inbox = Inbox(t, {(server, OUT): len(active) if u_shape else 0, (server, GRAD_IN): 0 if frozen else len(active)})
    loss_sum = 0.0
    while inbox:
        _, kind, header = inbox.next()
        payload = t.recv_payload(header, server)
        c = by_id[int(header[3])]
        with job.timers.phase("client_compute"):
            if kind == GRAD_IN:
                c.batch["h"].backward(payload)
                continue
            z = payload.clone().requires_grad_(True)
            if job.seed_head:
                torch.manual_seed(models.batch_seed(seed, rnd, step, c.cid, 2))
            loss = F.cross_entropy(c.head(z), c.batch["y"])
            loss.backward()
            loss_sum += loss.item() * c.batch["b"]
        t.isend(z.grad, server, DELTA, rnd, step, c.cid)
    t.wait_sends()
    with job.timers.phase("client_compute"):
        for c in active:
            c.opt.step()
            c.opt.zero_grad(set_to_none=False)
            c.trained += c.batch["b"]
            c.batch = {"b": c.batch["b"]}
    return loss_sum


def average(clients: list[LogicalClient], aggregator: Aggregator, buf: torch.Tensor) -> None:
    """FedAvg of this rank's logical clients with everyone else's, weighted by samples trained."""
    buf.zero_()
    for c in clients:
        buf[:-1].add_(c.flat[:-1], alpha=float(c.trained))
        buf[-1] += c.trained
        c.trained = 0
    aggregator.average(buf)
    if buf[-1] > 0:
        for c in clients:
            c.flat[:-1].copy_(buf[:-1])

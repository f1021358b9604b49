"""A client rank: hosts one or more logical clients, each with its own data shard and weights.

One step of the split variants (sync, v1, v2: the client does the same in all three, they differ
on the split server), for this rank's logical clients that have a batch:
  1. draw a batch, run the encoder, send h (and, label-sharing, the labels) to the split server;
  2. U-shape: for each z that comes back (in whatever order), run the head, the loss and its
     backward, and send delta = dl/dz back;
  3. unless the encoder is frozen: for each dl/dh that comes back, finish the encoder's backward;
  4. each logical client takes an SGD step on its own gradients.
Every aggregate_every steps (and at the end of each round) the client-side weights are averaged,
sample-weighted, across all logical clients (aggregation.py).

sl: one logical client at a time runs those steps over its whole shard, then hands its weights and
optimizer state to the next logical client of the round's seeded order (no averaging).
fl: no split server; each logical client trains the whole model on its batch, then FedAvg as above.
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
from .config import Config
from .job import RELAY_TAG, WEIGHTS_TAG, Job
from .layout import CLIENT
from .models import Part
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox, polite_wait


@dataclass
class LogicalClient:
    """One data owner: its shard, its own copy of the client-side model and its optimizer state."""
    cid: int
    model: models.Parts             # the client uses encoder (+ head); fl uses all three parts
    flat: torch.Tensor              # the trained parts' parameters (views into it), plus a spare slot
    trainable: list[nn.Parameter]
    opt: torch.optim.Optimizer
    trained: int = 0                # samples since the last aggregation
    batch: dict = field(default_factory=dict)  # this step's tensors

    def state_vector(self) -> torch.Tensor:
        """Weights, then momentum buffers (zeros before the first step): what sl hands over."""
        vec = [self.flat[:-1]]
        if self.opt.defaults["momentum"]:
            for p in self.trainable:
                buf = self.opt.state[p].get("momentum_buffer")
                vec.append(torch.zeros_like(p).reshape(-1) if buf is None else buf.reshape(-1))
        return torch.cat(vec)

    def load_state_vector(self, vec: torch.Tensor) -> None:
        n = self.flat.numel() - 1
        self.flat[:-1].copy_(vec[:n])
        if self.opt.defaults["momentum"]:
            for p in self.trainable:
                self.opt.state[p]["momentum_buffer"] = vec[n:n + p.numel()].view_as(p).clone()
                n += p.numel()


def make_clients(cfg: Config, ids: list[int], device: torch.device) -> list[LogicalClient]:
    base = models.build(cfg.model.name, cfg.run.seed)
    out = []
    for cid in ids:
        m = copy.deepcopy(base).to(device).train()
        if cfg.model.freeze_encoder:
            m.encoder.requires_grad_(False)
        parts = models.client_parts(m, cfg.u_shape, cfg.split)
        flat = flatten_params(parts, device)
        trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable or [torch.zeros(1, requires_grad=True)],
                              lr=cfg.train.lr, momentum=cfg.train.momentum)
        out.append(LogicalClient(cid, m, flat, trainable, opt))
    return out


class ClientRank:
    def __init__(self, job: Job, train: data.Split):
        cfg = self.cfg = job.cfg
        self.job, self.train = job, train
        self.clients = make_clients(cfg, job.layout.clients_of(job.rank), job.device)
        self.by_id = {c.cid: c for c in self.clients}
        self.server = job.layout.server_of(job.rank) if cfg.split else None
        m = self.clients[0].model  # only parts that draw random numbers are seeded per batch
        self.seeded = {Part.ENCODER: models.uses_rng(m.encoder), Part.BODY: models.uses_rng(m.body),
                       Part.HEAD: models.uses_rng(m.head)}
        self.aggregator = Aggregator(cfg.sfl.aggregation, job.fed_comm if cfg.centralized else job.clients_comm,
                                     job.timers)
        self.buf = torch.zeros_like(self.clients[0].flat)
        self.relay_bytes = 0

    def run(self) -> None:
        job = self.job
        holder = None  # sl: the logical client that holds the relayed model
        for rnd in range(self.cfg.train.rounds):
            plan = job.plan(rnd)
            t0 = MPI.Wtime()
            if self.cfg.averages:
                loss_sum, samples = self.averaged_round(plan)
            else:
                loss_sum, samples, holder = self.relay_round(plan, holder)
            if job.client_weights_from(plan) == job.rank:  # the global client part, for the evaluation
                c = self.by_id[plan.order[-1]] if not self.cfg.averages else self.clients[0]
                polite_wait(job.comm.Isend(host(c.flat[:-1]), dest=0, tag=WEIGHTS_TAG))
            computes_loss = self.cfg.u_shape or not self.cfg.split
            sent = job.transport.bytes_sent + self.aggregator.bytes_sent + self.relay_bytes
            job.gather_stats(job.stats(CLIENT, loss_sum, samples if computes_loss else 0.0, sent, MPI.Wtime() - t0))

    # -- rounds ---------------------------------------------------------------------------------
    def averaged_round(self, plan: data.RoundPlan) -> tuple[float, int]:
        """sync, v1, v2, fl: every sampled client steps on its batch; FedAvg on the schedule."""
        loss_sum, samples = 0.0, 0
        for step in range(plan.steps):
            active = [self.by_id[c] for c in plan.active(step, list(self.by_id))]
            if active:
                loss_sum += (self.split_step if self.cfg.split else self.local_step)(active, plan, step)
                samples += sum(plan.batch_len(c.cid, step) for c in active)
            if self.job.aggregate_due(step, plan.steps):
                self.average()
        return loss_sum, samples

    def relay_round(self, plan: data.RoundPlan, holder: int | None) -> tuple[float, int, int]:
        """sl: the model goes from logical client to logical client in the round's order."""
        loss_sum, samples = 0.0, 0
        for cid in plan.order:
            self.hand_over(holder, cid)
            if cid in self.by_id:
                for step in range(len(plan.batches[cid])):
                    loss_sum += self.split_step([self.by_id[cid]], plan, step)
                    samples += plan.batch_len(cid, step)
            holder = cid
        return loss_sum, samples, holder

    # -- steps ----------------------------------------------------------------------------------
    def split_step(self, active: list[LogicalClient], plan: data.RoundPlan, step: int) -> float:
        """One step of `active` with the split server; returns the sum of loss x batch size."""
        job, t, rnd, server = self.job, self.job.transport, plan.rnd, self.server
        with job.timers.phase("client_compute"):
            for c in active:
                x, y = self.batch(plan, c.cid, step)
                with torch.set_grad_enabled(self.cfg.grad_input):
                    h = self.forward(Part.ENCODER, c.model.encoder, x, rnd, step, c.cid)
                c.batch = {"h": h, "y": y}
                t.isend(h, server, ACT, rnd, step, c.cid)
                if not self.cfg.u_shape:
                    t.isend(y, server, LABELS, rnd, step, c.cid)
        # Whatever the server sends back first: z (U-shape: run the head, send dl/dz) or dl/dh (finish
        # the encoder). Taking dl/dh as soon as it comes lets the server release its send buffer.
        n = len(active)
        inbox = Inbox(t, {(server, OUT): n if self.cfg.u_shape else 0, (server, GRAD_IN): n if self.cfg.grad_input else 0})
        loss_sum = 0.0
        while inbox:
            _, header = inbox.next()
            payload = t.recv_payload(header, server)
            c = self.by_id[header.client]
            with job.timers.phase("client_compute"):
                if header.kind == GRAD_IN:
                    c.batch["h"].backward(payload)
                    continue
                z = payload.clone().requires_grad_(True)
                loss = F.cross_entropy(self.forward(Part.HEAD, c.model.head, z, rnd, step, c.cid), c.batch["y"])
                loss.backward()
                loss_sum += loss.item() * len(c.batch["y"])
            t.isend(z.grad, server, DELTA, rnd, step, c.cid)
        t.wait_sends()
        with job.timers.phase("client_compute"):
            for c in active:
                self.sgd_step(c, len(c.batch["y"]))
        return loss_sum

    def local_step(self, active: list[LogicalClient], plan: data.RoundPlan, step: int) -> float:
        """fl: each logical client runs the whole model on its batch and steps."""
        loss_sum = 0.0
        with self.job.timers.phase("client_compute"):
            for c in active:
                x, y = self.batch(plan, c.cid, step)
                out = x
                for part, module in ((Part.ENCODER, c.model.encoder), (Part.BODY, c.model.body), (Part.HEAD, c.model.head)):
                    out = self.forward(part, module, out, plan.rnd, step, c.cid)
                loss = F.cross_entropy(out, y)
                loss.backward()
                loss_sum += loss.item() * len(y)
                c.batch = {"y": y}
                self.sgd_step(c, len(y))
        return loss_sum

    def batch(self, plan: data.RoundPlan, cid: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(plan.batches[cid][step])
        return self.train.x[idx].to(self.job.device), self.train.y[idx].to(self.job.device)

    def forward(self, part: Part, module: nn.Module, x: torch.Tensor, rnd: int, step: int, cid: int) -> torch.Tensor:
        if self.seeded[part]:
            torch.manual_seed(models.batch_seed(self.cfg.run.seed, rnd, step, cid, part))
        return module(x)

    @staticmethod
    def sgd_step(c: LogicalClient, samples: int) -> None:
        c.opt.step()
        c.opt.zero_grad(set_to_none=False)
        c.trained += samples
        c.batch = {}

    # -- weights between logical clients --------------------------------------------------------
    def average(self) -> None:
        """FedAvg of this rank's logical clients with everyone else's, weighted by samples trained."""
        buf = self.buf
        buf.zero_()
        for c in self.clients:
            buf[:-1].add_(c.flat[:-1], alpha=float(c.trained))
            buf[-1] += c.trained
            c.trained = 0
        self.aggregator.average(buf)
        if buf[-1] > 0:
            for c in self.clients:
                c.flat[:-1].copy_(buf[:-1])

    def hand_over(self, src: int | None, dst: int) -> None:
        """sl: logical client `dst` takes the model (weights and optimizer state) from `src`."""
        if src is None or src == dst:
            return
        rank_of, me = self.job.layout.rank_of, self.job.rank
        src_rank, dst_rank = rank_of(src), rank_of(dst)
        if src_rank == dst_rank == me:
            self.by_id[dst].load_state_vector(self.by_id[src].state_vector())
        elif src_rank == me:
            vec = host(self.by_id[src].state_vector())
            with self.job.timers.phase("p2p_wait"):
                polite_wait(self.job.comm.Isend(vec, dest=dst_rank, tag=RELAY_TAG))
            self.relay_bytes += vec.nbytes
        elif dst_rank == me:
            c = self.by_id[dst]
            vec = np.empty(c.state_vector().numel(), np.float32)
            with self.job.timers.phase("p2p_wait"):
                polite_wait(self.job.comm.Irecv(vec, source=src_rank, tag=RELAY_TAG))
            c.load_state_vector(torch.from_numpy(vec).to(self.job.device))


def run(job: Job, train: data.Split) -> None:
    ClientRank(job, train).run()

"""The split server's copies of f_s: `ServerPart` (one copy with its optimizer, over flat buffers)
and `ServerParts`, what a split server trains: the one server part, v1's per-client copies of it
(slots.py), sync's running buffers of the step, and the updates across split servers (sync's one
mean step, v1's averaging or robust combining of the copies, the Allreduce among replicas)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from . import models, slots
from .aggregation import Aggregator, attach_flat_grads, flatten_params, host, param_count
from .eager import SGD
from .job import Job
from .waiting import polite_wait


@dataclass
class ServerPart:
    """One copy of f_s with its optimizer; its weights (then running buffers) and gradients are
    views of two flat buffers, each with a spare last slot: the averaging weight, the step's sample
    count. `grad` has room for sync's sum of its clients' buffers between the two."""
    module: nn.Module
    flat: torch.Tensor
    grad: torch.Tensor
    opt: torch.optim.Optimizer
    nparams: int      # P: flat[:P] are the weights, flat[P:-1] the running buffers
    trained: int = 0  # samples since the last averaging (v1)
    cid: int = -1     # v1: the logical client this copy serves until the next averaging

    @classmethod
    def build(cls, job: Job) -> "ServerPart":
        cfg = job.cfg
        module = models.server_part(job.spec.build(cfg.run.seed), cfg.u_shape).to(job.device).train()
        params = list(module.parameters())
        flat = flatten_params([module], job.device)
        nparams = param_count([module])
        grad = attach_flat_grads(params, job.device, extra=flat.numel() - 1 - nparams)
        return cls(module, flat, grad, SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum), nparams)

    @property
    def buffers(self) -> torch.Tensor:
        """The running buffers as one flat view (empty without BatchNorm)."""
        return self.flat[self.nparams:-1]

    def set_buffers(self, values: torch.Tensor) -> None:
        """Overwrite the running buffers without tripping autograd's version check of the graphs
        kept in graph state (models.restore says why that is sound)."""
        self.flat.data[self.nparams:-1].copy_(values)

    def add_grads(self, grads: list[torch.Tensor], weight: int, buffers: torch.Tensor | None = None,
                  samples: int | None = None) -> None:
        """grad += weight x grads (and buffers); the sample count += samples (default: weight)."""
        offset = 0
        for g in grads:
            n = g.numel()
            self.grad[offset:offset + n].add_(g.reshape(-1), alpha=weight)
            offset += n
        if buffers is not None:
            self.grad[self.nparams:-1].add_(buffers, alpha=weight)
        self.grad[-1] += weight if samples is None else samples

    def step_on(self, grads: list[torch.Tensor], samples: int) -> None:
        """One optimizer step on one batch's (mean-loss) gradient."""
        self.grad.zero_()
        self.add_grads(grads, 1)
        self.opt.step()
        self.trained += samples


class ServerParts:
    """The server part of a split server and, for v1, a copy of it per logical client served since
    the last averaging; how a step's or an averaging's update reaches them across split servers."""

    def __init__(self, job: Job):
        cfg = self.cfg = job.cfg
        self.job = job
        self.main = ServerPart.build(job)
        # v1: a copy per logical client served since the last averaging (slots.py), from the last average
        self.copies = slots.Slots(lambda: ServerPart.build(job), cfg.train.client_optimizer == "keep")
        # sync with running buffers: the step's buffers, and each client's after its forward
        self.step_buffers: torch.Tensor | None = None
        self.client_buffers: dict[int, torch.Tensor] = {}
        s = cfg.sfl  # v1 with a robust aggregator: the copies are combined like the client parts
        self.copies_aggregator = Aggregator("decentralized", job.servers_comm, job.timers, s.aggregator, s.trim,
                                            s.byzantine_f, s.krum_select)

    # -- which copy serves a client ----------------------------------------------------------------
    def part_of(self, client: int) -> ServerPart:
        if self.cfg.sfl.variant != "v1":
            return self.main
        return self.copies.get(client, self.main.flat[:-1])

    # -- updates across split servers -----------------------------------------------------------
    def apply_mean_update(self) -> None:
        """sync: sum the replicas' sample-weighted gradients (and buffers) and counts, divide, step
        once; the running buffers become their average (the step's own if no batch was learnt)."""
        grad, main = self.main.grad, self.main
        self.allreduce(grad)
        with self.job.timers.phase("server_compute"):
            if grad[-1] > 0:
                grad[:-1].div_(grad[-1])
                main.opt.step()
            if self.step_buffers is not None:
                main.set_buffers(grad[main.nparams:-1] if grad[-1] > 0 else self.step_buffers)
                self.step_buffers = None

    def average_copies(self) -> None:
        """v1: the copies' sample-weighted average (over every split server) is where every next
        copy starts; with a robust sfl.aggregator, the copies that trained are combined robustly instead."""
        if self.cfg.robust:
            return self.combine_copies()
        acc = torch.zeros_like(self.main.flat)
        for _, part in self.copies.in_order():  # a fixed sum order: same bits every run
            acc[:-1].add_(part.flat[:-1], alpha=float(part.trained))
            acc[-1] += part.trained
        self.allreduce(acc)
        if acc[-1] > 0:
            self.main.flat[:-1].copy_(acc[:-1] / acc[-1])
        self.copies.release()  # the next copies start from the average

    def combine_copies(self) -> None:
        """v1, robust aggregator: every split server's trained copies, gathered (Allgatherv among
        the split servers) and combined; the next copies start from the result."""
        trained = [part for _, part in self.copies.in_order() if part.trained]
        rows = np.empty((len(trained), self.main.flat.numel()), np.float32)
        for row, part in zip(rows, trained):
            row[:-1], row[-1] = host(part.flat[:-1]), part.trained
        out = host(self.main.flat).copy()
        out[-1] = 0
        self.copies_aggregator.combine(rows, out)
        if out[-1] > 0:
            self.main.flat[:-1].copy_(torch.from_numpy(out[:-1]).to(self.main.flat.device))
        self.copies.release()

    def allreduce(self, buf: torch.Tensor) -> None:
        if self.job.layout.servers == 1:
            return
        with self.job.timers.phase("aggregation"):
            flat = host(buf)
            polite_wait(self.job.servers_comm.Iallreduce(MPI.IN_PLACE, flat, op=MPI.SUM),
                        who="the other split servers (replicas' averaging)", collective=True)
            if buf.device.type != "cpu":
                buf.copy_(torch.from_numpy(flat))

"""A client rank: hosts one or more logical clients, each with its own data shard and weights
(a working copy of the client-side model while it trains between two averagings, slots.py).

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

from . import data, eager, models, slots
from .aggregation import Aggregator, flatten_params, host
from .config import Config
from .control import nonfinite_message
from .job import RELAY_TAG, WEIGHTS_TAG, Job
from .layout import CLIENT
from .models import Part
from .serving import batches_clients, cut_groups
from .eager import SGD
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox, describe
from .waiting import polite_wait


@dataclass
class LogicalClient:
    """A working copy of the client-side model (slots.py): whichever logical client trains on it
    until the next averaging, with that client's optimizer state."""
    model: models.Parts             # the client uses encoder (+ head); fl uses all three parts
    flat: torch.Tensor              # the trained parts' parameters, then running buffers (views into it), plus a spare slot
    trainable: list[nn.Parameter]
    opt: torch.optim.Optimizer
    cid: int = -1                   # the logical client it serves this step
    trained: int = 0                # samples since the last aggregation
    batch: dict = field(default_factory=dict)  # this step's tensors

    def state_vector(self) -> torch.Tensor:
        """Weights and running buffers, then momentum buffers (zeros before the first step): what sl hands over."""
        m = slots.momentum(self.opt)
        return self.flat[:-1].clone() if m is None else torch.cat([self.flat[:-1], m])

    def load_state_vector(self, vec: torch.Tensor) -> None:
        n = self.flat.numel() - 1
        self.flat[:-1].copy_(vec[:n])
        slots.set_momentum(self.opt, vec[n:] if self.opt.defaults["momentum"] else None)


ATTACK = 7  # the seed part of a gaussian attacker's noise (models.batch_seed; parts are 0-2)


def attackers(cfg: Config) -> list[int]:
    """The logical clients that simulate an attack (train.attackers of them, a seeded choice)."""
    k = cfg.train.attackers
    if not k:
        return []
    return sorted(int(c) for c in np.random.default_rng([cfg.run.seed, 5381]).choice(cfg.train.clients, k, replace=False))


def client_copy(cfg: Config, base: models.Parts, device: torch.device) -> LogicalClient:
    """A working copy of `base`'s client side (the split variants leave the body out of it)."""
    m = copy.deepcopy(models.Parts(base.encoder, base.body if not cfg.split else nn.Identity(), base.head))
    m = m.to(device).train()
    if cfg.model.freeze_encoder:
        m.encoder.requires_grad_(False)
    parts = models.client_parts(m, cfg.u_shape, cfg.split)
    flat = flatten_params(parts, device)
    trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
    opt = SGD(trainable or [torch.zeros(1, device=device, requires_grad=True)],
                          lr=cfg.train.lr, momentum=cfg.train.momentum)
    return LogicalClient(m, flat, trainable, opt)


class ClientRank:
    def __init__(self, job: Job, train: data.Split):
        """`train`: the training samples of this rank's logical clients only (data.load(only=...))."""
        cfg = self.cfg = job.cfg
        self.job, self.train_set = job, train
        base = job.spec.build(cfg.run.seed)
        # This rank's logical clients; a working copy only for those training since the last averaging.
        self.mine = frozenset(job.layout.clients_of(job.rank))
        self.slots = slots.Slots(lambda: client_copy(cfg, base, job.device), cfg.train.client_optimizer == "keep")
        first = self.slots.new()
        self.slots.free.append(first)
        self.server = job.layout.server_of(job.rank) if cfg.split else None
        m = first.model  # only parts that draw random numbers are seeded per batch
        self.seeded = {Part.ENCODER: models.uses_rng(m.encoder), Part.BODY: models.uses_rng(m.body),
                       Part.HEAD: models.uses_rng(m.head)}
        self.aggregator = Aggregator(cfg.sfl.aggregation, job.fed_comm if cfg.centralized else job.clients_comm,
                                     job.timers, cfg.sfl.aggregator, cfg.sfl.trim, cfg.sfl.byzantine_f,
                                     cfg.sfl.krum_select)
        self.buf = torch.zeros_like(first.flat)
        # Simulated attackers (train.attackers) corrupt their update: the change since the last average.
        self.attackers = set(attackers(cfg)) & set(self.mine)
        self.batched = batches_clients(cfg, m.body)  # the split server runs this rank's batches in groups
        self.noisy = bool(cfg.sfl.noise_std or cfg.sfl.clip_norm)  # what crosses the cut is clipped / noised
        self.last_average = first.flat[:-1].clone()  # every logical client's weights after an averaging
        self.relay_bytes = 0
        job.transport.patience = 1.5  # a stuck client is named by its split server, which waits less
        self.holder: int | None = None  # sl: the logical client that holds the relayed model
        # This round so far (kept on the object: a checkpoint can fall between two steps).
        self.loss_sum, self.samples, self.skipped, self.elapsed = 0.0, 0, 0, 0.0
        self.t0 = 0.0

    def train(self) -> None:
        job = self.job
        for rnd, plan, first in job.rounds():
            self.t0 = MPI.Wtime() - self.elapsed  # elapsed: this round's seconds before a resume
            if self.cfg.averages:
                self.averaged_round(plan, first)
            else:
                self.relay_round(plan, first)
            if job.client_weights_from(plan) == job.rank:  # the global client part, for the evaluation
                weights = self.slots.held[plan.order[-1]].flat[:-1] if not self.cfg.averages else self.last_average
                polite_wait(job.comm.Isend(host(weights), dest=0, tag=WEIGHTS_TAG), who=describe(0))
            computes_loss = self.cfg.u_shape or not self.cfg.split
            sent = job.transport.bytes_sent + self.aggregator.bytes_sent + self.relay_bytes
            job.gather_stats(job.stats(CLIENT, self.loss_sum, self.samples if computes_loss else 0.0, sent,
                                       MPI.Wtime() - self.t0, self.skipped, self.slots.made))
            self.loss_sum, self.samples, self.skipped, self.elapsed = 0.0, 0, 0, 0.0
            if job.checkpoint_due(rnd):
                job.checkpoint(self.state_dict, (rnd + 1, 0))

    # -- rounds ---------------------------------------------------------------------------------
    def averaged_round(self, plan: data.RoundPlan, first: int) -> None:
        """sync, v1, v2, fl: every sampled client steps on its batch; FedAvg on the schedule."""
        for step in range(first, plan.steps):
            active = [self.working(c) for c in plan.active(step, self.mine)]
            if active:
                (self.split_step if self.cfg.split else self.local_step)(active, plan, step)
            if self.job.aggregate_due(plan, step):
                self.average(plan.rnd, step)
            self.job.step_done(plan.rnd, step + 1)

    def relay_round(self, plan: data.RoundPlan, first: int) -> None:
        """sl: the model goes from logical client to logical client in the round's order, one
        batch a step (every rank counts the steps: the stop agreement is per step)."""
        for k in range(first, len(plan.sequence)):
            cid, step = plan.sequence[k]
            self.hand_over(self.holder, cid)
            if cid in self.slots.held:
                self.split_step([self.slots.held[cid]], plan, step)
            self.holder = cid
            self.job.step_done(plan.rnd, k + 1)

    # -- steps ----------------------------------------------------------------------------------
    def split_step(self, active: list[LogicalClient], plan: data.RoundPlan, step: int) -> None:
        """One step of `active` with the split server.

        Whatever the server sends back is taken as soon as it is there, also between this rank's
        encoder forwards: z (U-shape: run the head, send dl/dz) or dl/dh (finish the encoder), dl/dh
        first when both are (the inbox tests its receives in order). The split server holds each z
        and dl/dh it sent, and (memory and graph states) each h, until this rank has taken them.
        A batch dropped for a non-finite value (train.on_nonfinite = "skip") still sends and gets
        every message, flagged `dropped`, so both sides count the same messages."""
        job, t, rnd, server, n = self.job, self.job.transport, plan.rnd, self.server, len(active)
        inbox = Inbox(t, {(server, GRAD_IN): n if self.cfg.grad_input else 0, (server, OUT): n if self.cfg.u_shape else 0})
        # The server's doorbell rings once per burst it takes together: a batched group's h (cut as
        # the server cuts a rank's batches, serving.cut_groups), else each h; label-sharing: with the labels.
        last = ({g[-1] for g in cut_groups(plan, step, [c.cid for c in active])} if self.batched
                else {c.cid for c in active})
        for c in active:
            with job.timers.phase("client_compute"):
                x, y = self.batch(plan, c.cid, step)
                with torch.set_grad_enabled(self.cfg.grad_input):
                    h = self.forward(Part.ENCODER, c.model.encoder, x, rnd, step, c.cid)
                    if self.noisy:
                        h = models.cut_noise(h, self.cfg.sfl.noise_std, self.cfg.sfl.clip_norm, self.cfg.run.seed,
                                             rnd, step, c.cid)
                c.batch = {"h": h, "y": y}
            t.isend(h, server, ACT, rnd, step, c.cid, ring=self.cfg.u_shape and c.cid in last)
            if not self.cfg.u_shape:
                t.isend(y, server, LABELS, rnd, step, c.cid, ring=c.cid in last)
            while (msg := inbox.ready()) is not None:
                self.take(plan, step, *msg)
        while inbox:
            self.take(plan, step, *inbox.next())
        t.wait_sends()
        with job.timers.phase("client_compute"):
            for c in active:
                self.sgd_step(c, rnd, step)

    def take(self, plan: data.RoundPlan, step: int, server: int, header) -> None:
        """One message of this step from the split server: dl/dh finishes a logical client's
        encoder; z runs its head and sends dl/dz back."""
        job, t, rnd = self.job, self.job.transport, plan.rnd
        payload = t.recv_payload(header, server)
        c = self.slots.held[header.client]
        with job.timers.phase("client_compute"):
            if header.kind == GRAD_IN:
                if header.dropped:
                    c.batch["dropped"] = True
                elif not c.batch.get("dropped"):
                    eager.backward(c.batch["h"], payload)
                return
            z = payload.clone().requires_grad_(True)
            loss = F.cross_entropy(self.forward(Part.HEAD, c.model.head, z, rnd, step, c.cid), c.batch["y"])
            if not torch.isfinite(loss) and self.nonfinite(c, rnd, step, "loss"):
                c.batch["dropped"] = True
                t.isend(torch.zeros_like(z), server, DELTA, rnd, step, c.cid, dropped=True, ring=not self.batched)
                return
            loss.backward()
            self.loss_sum += loss.item() * len(c.batch["y"])
            self.samples += len(c.batch["y"])
        # batched: the server takes the group's deltas together; the ring waits for this rank's next wait
        t.isend(z.grad, server, DELTA, rnd, step, c.cid, ring=not self.batched)

    def local_step(self, active: list[LogicalClient], plan: data.RoundPlan, step: int) -> None:
        """fl: each logical client runs the whole model on its batch and steps."""
        with self.job.timers.phase("client_compute"):
            for c in active:
                x, y = self.batch(plan, c.cid, step)
                out = x
                for part, module in ((Part.ENCODER, c.model.encoder), (Part.BODY, c.model.body), (Part.HEAD, c.model.head)):
                    out = self.forward(part, module, out, plan.rnd, step, c.cid)
                loss = F.cross_entropy(out, y)
                c.batch = {"y": y}
                if not torch.isfinite(loss) and self.nonfinite(c, plan.rnd, step, "loss"):
                    c.batch["dropped"] = True
                else:
                    loss.backward()
                    self.loss_sum += loss.item() * len(y)
                    self.samples += len(y)
                self.sgd_step(c, plan.rnd, step)

    def working(self, cid: int) -> LogicalClient:
        """Logical client `cid`'s working copy (from the last average when it starts training)."""
        return self.slots.get(cid, self.last_average)

    def batch(self, plan: data.RoundPlan, cid: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.train_set.rows(plan.batches[cid][step]))  # global ids -> this rank's rows
        return self.train_set.x[rows].to(self.job.device), self.train_set.y[rows].to(self.job.device)

    def forward(self, part: Part, module: nn.Module, x: torch.Tensor, rnd: int, step: int, cid: int) -> torch.Tensor:
        if self.seeded[part]:
            models.seed_rng(models.batch_seed(self.cfg.run.seed, rnd, step, cid, part))
        return module(x)

    def sgd_step(self, c: LogicalClient, rnd: int, step: int) -> None:
        """The logical client's optimizer step, unless its batch was dropped or its gradient is
        not finite (then, with train.on_nonfinite = "skip", the batch is dropped here)."""
        samples = len(c.batch["y"])
        grads = [p.grad for p in c.trainable if p.grad is not None]
        if not c.batch.get("dropped") and grads and not bool(torch.isfinite(
                torch.stack(torch._foreach_norm(grads, float("inf")))).all()):
            c.batch["dropped"] = self.nonfinite(c, rnd, step, "gradient")
        if c.batch.get("dropped"):
            self.skipped += 1
        else:
            c.opt.step()
            c.trained += samples
        c.opt.zero_grad(set_to_none=False)
        c.batch = {}

    def nonfinite(self, c: LogicalClient, rnd: int, step: int, what: str) -> bool:
        """A non-finite loss or gradient of logical client `c`: True if its batch is to be dropped
        (train.on_nonfinite = "skip"); else the run stops at the next step boundary."""
        if self.cfg.train.on_nonfinite == "skip":
            return True
        self.job.control.fail((rnd, step, c.cid), nonfinite_message(what, rnd, step, c.cid))
        return False

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"slots": self.slots.state_dict(),
                "holder": -1 if self.holder is None else self.holder,
                "last_average": self.last_average.detach().cpu().clone(),
                "round": {"loss_sum": self.loss_sum, "samples": self.samples, "skipped": self.skipped,
                          "elapsed": MPI.Wtime() - self.t0 if self.t0 else 0.0},
                "bytes": {"aggregated": self.aggregator.bytes_sent, "relayed": self.relay_bytes}}

    def load_state_dict(self, state: dict) -> None:
        self.last_average.copy_(state["last_average"])
        self.slots.load_state_dict(state["slots"], self.last_average)
        self.holder = None if state["holder"] < 0 else state["holder"]
        r = state["round"]
        self.loss_sum, self.samples, self.skipped, self.elapsed = r["loss_sum"], r["samples"], r["skipped"], r["elapsed"]
        self.aggregator.bytes_sent, self.relay_bytes = state["bytes"]["aggregated"], state["bytes"]["relayed"]

    def settle(self) -> None:
        """Nothing in flight between steps (the fed server's evaluation is)."""

    def finish(self) -> None:
        """Only the fed server writes the run's summary."""

    def close(self) -> None:
        """Nothing to clean up (the split server removes its scratch)."""

    # -- weights between logical clients --------------------------------------------------------
    def average(self, rnd: int, step: int) -> None:
        """FedAvg of this rank's logical clients with everyone else's, weighted by samples trained;
        or, with a robust sfl.aggregator, their vectors combined (clients that trained vote)."""
        buf, cfg = self.buf, self.cfg
        buf.zero_()
        held = [c for _, c in self.slots.in_order()]  # id order: the same sum every run
        if cfg.robust:
            trained = [c for c in held if c.trained]
            rows = np.empty((len(trained), buf.numel()), np.float32)
            for row, c in zip(rows, trained):
                row[:-1] = host(self.contribution(c, rnd, step))
                row[-1] = c.trained
            out = host(buf)  # on the CPU a view of buf; else a copy, written back below
            self.aggregator.combine(rows, out)
            if buf.device.type != "cpu":
                buf.copy_(torch.from_numpy(out))
        else:
            for c in held:
                if c.trained:
                    buf[:-1].add_(self.contribution(c, rnd, step), alpha=float(c.trained))
                    buf[-1] += c.trained
            self.aggregator.average(buf)
        if buf[-1] > 0:  # else no logical client anywhere trained: the last average stands
            self.last_average.copy_(buf[:-1])
        self.slots.release()  # every logical client now holds the average: no copy of its own

    def contribution(self, c: LogicalClient, rnd: int, step: int) -> torch.Tensor:
        """What logical client `c` sends to the averaging: its vector, or, for a simulated attacker,
        the last average plus its corrupted update (train.attack, train.attack_strength = s)."""
        if c.cid not in self.attackers:
            return c.flat[:-1]
        s, base = self.cfg.train.attack_strength, self.last_average
        update = c.flat[:-1] - base
        if self.cfg.train.attack == "sign-flip":
            return base - s * update
        if self.cfg.train.attack == "scale":
            return base + s * update
        g = torch.Generator(device="cpu").manual_seed(models.batch_seed(self.cfg.run.seed, rnd, step, c.cid, ATTACK))
        noise = torch.randn(update.shape, generator=g).to(update.device)
        return base + noise * (s * float(update.pow(2).mean().sqrt()))

    def hand_over(self, src: int | None, dst: int) -> None:
        """sl: logical client `dst` takes the model (weights and optimizer state) from `src`."""
        rank_of, me = self.job.layout.rank_of, self.job.rank
        if src is None:  # the run's first logical client starts from the initial model
            if rank_of(dst) == me:
                self.working(dst)
            return
        if src == dst:
            return
        src_rank, dst_rank = rank_of(src), rank_of(dst)
        if src_rank == dst_rank == me:
            self.slots.move(src, dst)
        elif src_rank == me:
            vec = host(self.slots.held[src].state_vector())
            with self.job.timers.phase("p2p_wait"):
                polite_wait(self.job.comm.Isend(vec, dest=dst_rank, tag=RELAY_TAG), who=describe(dst_rank))
            self.relay_bytes += vec.nbytes
            self.slots.drop(src)
        elif dst_rank == me:
            c = self.working(dst)
            vec = np.empty(c.state_vector().numel(), np.float32)
            with self.job.timers.phase("p2p_wait"):
                polite_wait(self.job.comm.Irecv(vec, source=src_rank, tag=RELAY_TAG), who=describe(src_rank))
            c.load_state_vector(torch.from_numpy(vec).to(self.job.device))



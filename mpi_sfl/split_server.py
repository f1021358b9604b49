"""The split server: runs f_s for the logical clients of its client ranks.

It keeps no autograd graph between a forward and its backward unless sfl.state = "graph"
(state.py). What it does with a batch's gradient depends on the variant:
- sync: accumulate it, sample-weighted, into one flat buffer; once every client of the step is in,
  Allreduce that buffer (and the sample count) across split-server replicas and take one step.
  Running buffers (BatchNorm) follow FedAvg's rule: every client's forward starts from the step's
  buffers, and the step ends with their sample-weighted average, summed in the same flat buffer;
- v1:   step the server-part copy of that logical client at once; the copies are averaged,
        sample-weighted, on the client parts' schedule (and across split servers);
- v2:   step the one server part at once; a step's clients are served one after another, in the
        round's seeded order, so each forward sees the previous client's update;
- sl:   as v2, but one logical client at a time over its whole shard.
sync and v1 forward an activation as soon as it arrives and apply backwards in logical-client
order, so that runs are bit-reproducible whatever the arrival order.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from . import data, models, slots
from .aggregation import Aggregator, attach_flat_grads, flatten_params, host, param_count
from .control import nonfinite_message
from .job import WEIGHTS_TAG, Job
from .layout import SERVER
from .models import Part
from .eager import SGD
from .state import make_state
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox, describe, polite_wait


DROPPED = object()  # a batch its client dropped (train.on_nonfinite = "skip")


def finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite (one max-abs per tensor: cheap on the per-batch path)."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


GROUP_ROWS = 256  # the most samples one batched pass runs (batch_groups); a larger client batch runs alone


def batches_clients(cfg, body: nn.Module) -> bool:
    """sfl.batch_clients: sync runs groups of a step's client batches as one batch, where that is the
    same function as one batch at a time: f_s keeps no running buffers (BatchNorm normalizes each
    client's batch by its own statistics). Dropout is exact too (each client's rows draw the masks
    of that client's seed: models.seeded with ChunkSeeds), but "auto" leaves it unbatched: the
    default job (cnn, 2 logical clients per client rank) ran 0.90x batched on 2 cores."""
    mode = cfg.sfl.batch_clients
    if mode == "off" or cfg.sfl.variant != "sync" or models.buffers(body):
        return False
    return mode != "auto" or not models.uses_rng(body)


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


class SplitServer:
    def __init__(self, job: Job, scratch: Path | None):
        cfg = self.cfg = job.cfg
        self.job, self.scratch = job, scratch
        self.main = ServerPart.build(job)
        # v1: a copy per logical client served since the last averaging (slots.py), from the last average
        self.copies = slots.Slots(lambda: ServerPart.build(job), cfg.train.client_optimizer == "keep")
        # sync with running buffers: the step's buffers, and each client's after its forward
        self.step_buffers: torch.Tensor | None = None
        self.client_buffers: dict[int, torch.Tensor] = {}
        self.state = make_state(cfg.sfl.state, cfg.grad_input, scratch, job.device, job.timers)
        self.batched = batches_clients(cfg, self.main.module)
        self.rank_of = {c: r for r in job.layout.client_ranks_of(job.rank) for c in job.layout.clients_of(r)}
        s = cfg.sfl  # v1 with a robust aggregator: the copies are combined like the client parts
        self.copies_aggregator = Aggregator("decentralized", job.servers_comm, job.timers, s.aggregator, s.trim,
                                            s.byzantine_f, s.krum_select)
        # This round so far (kept on the object: a checkpoint can fall between two steps).
        self.loss_sum, self.samples, self.skipped, self.elapsed, self.t0 = 0.0, 0, 0, 0.0, 0.0
        self.passes = 0  # f_s forward passes this round, recomputes not counted

    def train(self) -> None:
        job = self.job
        for rnd, plan, first in job.rounds():
            self.t0 = MPI.Wtime() - self.elapsed  # elapsed: this round's seconds before a resume
            if self.cfg.sfl.variant == "sl":
                self.relay_round(plan, first)
            else:
                self.stepped_round(plan, first)
            if job.rank == job.layout.first_server:  # the server part of the global model
                polite_wait(job.comm.Isend(host(self.main.flat[:-1]), dest=0, tag=WEIGHTS_TAG), who=describe(0))
            computes_loss = not self.cfg.u_shape
            job.gather_stats(job.stats(SERVER, self.loss_sum, self.samples if computes_loss else 0,
                                       job.transport.bytes_sent, MPI.Wtime() - self.t0, self.skipped,
                                       self.copies.made, self.passes, self.state.peak_bytes))
            self.loss_sum, self.samples, self.skipped, self.elapsed, self.passes = 0.0, 0, 0, 0.0, 0
            if job.checkpoint_due(rnd):
                job.checkpoint(self.state_dict, (rnd + 1, 0))

    def stepped_round(self, plan: data.RoundPlan, first: int) -> None:
        """sync, v1, v2: step by step over the round's sampled clients of this server."""
        variant, mine = self.cfg.sfl.variant, self.rank_of  # a dict: membership in O(1)
        for step in range(first, plan.steps):
            active = plan.active(step, mine)
            if variant == "v2":
                self.serve_in_order(plan, step, [c for c in plan.order if c in active])
            else:
                self.main.grad.zero_()
                if variant == "sync" and self.main.buffers.numel():
                    self.step_buffers, self.client_buffers = self.main.buffers.clone(), {}
                groups = self.batch_groups(plan, step, active) if self.batched else []
                if any(len(g) > 1 for g in groups):
                    self.serve_batched(plan, step, groups)
                else:  # one batch at a time (a group of one is that, without the copies)
                    self.serve_together(plan, step, active)
                if variant == "sync":
                    self.apply_mean_update()
                elif self.job.aggregate_due(plan, step):
                    self.average_copies()
            self.check_scratch(plan.rnd, step)
            self.job.step_done(plan.rnd, step + 1)

    def relay_round(self, plan: data.RoundPlan, first: int) -> None:
        """sl: each logical client in the round's order, over its whole shard, one batch a step."""
        for k in range(first, len(plan.sequence)):
            cid, step = plan.sequence[k]
            if cid in self.rank_of:
                self.serve_in_order(plan, step, [cid])
            self.check_scratch(plan.rnd, step)
            self.job.step_done(plan.rnd, k + 1)

    def check_scratch(self, rnd: int, step: int) -> None:
        """A scratch write that failed (disk full) kept its batch in memory; the run stops here."""
        if self.state.error and not self.job.control.problems:
            self.job.control.fail((rnd, step, -1), f"split server rank {self.job.rank}: {self.state.error}")

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def part(p: ServerPart) -> dict:
            return {"flat": p.flat.detach().cpu().clone(), "opt": p.opt.state_dict(), "trained": p.trained}
        return {"main": part(self.main), "copies": self.copies.state_dict(),
                "round": {"loss_sum": self.loss_sum, "samples": self.samples, "skipped": self.skipped,
                          "passes": self.passes,
                          "elapsed": MPI.Wtime() - self.t0 if self.t0 else 0.0}}

    def load_state_dict(self, state: dict) -> None:
        def load(p: ServerPart, saved: dict) -> ServerPart:
            p.flat.copy_(saved["flat"])
            p.opt.load_state_dict(saved["opt"])
            p.trained = saved["trained"]
            return p
        load(self.main, state["main"])
        self.copies.load_state_dict(state["copies"], self.main.flat[:-1])
        r = state["round"]
        self.loss_sum, self.samples, self.skipped, self.elapsed = r["loss_sum"], r["samples"], r["skipped"], r["elapsed"]
        self.passes = r["passes"]

    def settle(self) -> None:
        """Nothing in flight between steps (the fed server's evaluation is)."""

    def finish(self) -> None:
        """Only the fed server writes the run's summary."""

    def close(self) -> None:
        self.state.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- which copy serves a client, and what a gradient does to it ----------------------------
    def part_of(self, client: int) -> ServerPart:
        if self.cfg.sfl.variant != "v1":
            return self.main
        return self.copies.get(client, self.main.flat[:-1])

    def learn(self, client: int, grads: list[torch.Tensor], samples: int) -> None:
        if self.cfg.sfl.variant == "sync":  # sample-weighted; applied once per step
            self.main.add_grads(grads, samples, self.client_buffers.pop(client, None))
        else:
            self.part_of(client).step_on(grads, samples)
        self.samples += samples

    def seed(self, plan: data.RoundPlan, step: int, client: int) -> int:
        return models.batch_seed(self.cfg.run.seed, plan.rnd, step, client, Part.BODY)

    def group_seeds(self, plan: data.RoundPlan, step: int, members: list[int], sizes: list[int]) -> models.ChunkSeeds:
        """A batched group's seeds: each member's rows draw what its own forward would."""
        return models.ChunkSeeds(tuple(self.seed(plan, step, c) for c in members), tuple(sizes))

    def forward_from_step_buffers(self, client: int, forward):
        """sync: `forward()` of one client's batch from the step's running buffers, keeping the
        buffers it leaves for the step's average (learn). Other variants: just `forward()`."""
        self.passes += 1
        if self.step_buffers is None:
            return forward()
        self.main.set_buffers(self.step_buffers)
        out = forward()
        self.client_buffers[client] = self.main.buffers.clone()
        return out

    # -- serving ----------------------------------------------------------------------------------
    def serve_together(self, plan: data.RoundPlan, step: int, active: list[int]) -> None:
        """sync, v1: forward each activation as it arrives; apply backwards in client order."""
        t, u_shape = self.job.transport, self.cfg.u_shape
        counts = self.counts(active)
        kinds = (ACT, DELTA) if u_shape else (ACT,)
        inbox = Inbox(t, {(src, kind): n for src, n in counts.items() for kind in kinds})
        order, waiting = list(active), {}
        while inbox:
            src, header = inbox.next()
            c, key = header.client, (plan.rnd, step, header.client)
            if header.kind == ACT and u_shape:
                h = t.recv_payload(header, src)
                with self.job.timers.phase("server_compute"):
                    z = self.forward_from_step_buffers(c, lambda: self.state.forward(
                        key, self.part_of(c).module, h, self.seed(plan, step, c)))
                t.isend(z, src, OUT, plan.rnd, step, c)
                continue
            waiting[c] = self.receive_rest(header, src)
            while order and order[0] in waiting:
                c = order.pop(0)
                self.backward(plan, step, c, waiting.pop(c))
        t.wait_sends()

    def serve_batched(self, plan: data.RoundPlan, step: int, groups: list[list[int]]) -> None:
        """sync, sfl.batch_clients: the step's batches in groups, each forwarded (and backpropagated)
        as one batch; the groups are fixed by the layout, not by arrival (batch_groups), and each
        group is concatenated in client order, so runs are bit-reproducible. U-shape: a group is
        forwarded once all its activations are in, and backpropagated once all its deltas are in and
        the groups before it are done (the gradient sums in group order)."""
        t, u_shape = self.job.transport, self.cfg.u_shape
        kinds = (ACT, DELTA) if u_shape else (ACT,)
        active = [c for members in groups for c in members]
        inbox = Inbox(t, {(src, kind): n for src, n in self.counts(active).items() for kind in kinds})
        group_of = {c: g for g, members in enumerate(groups) for c in members}
        h: dict[int, torch.Tensor] = {}
        back: dict[int, object] = {}   # what the backward takes: delta, or (h, labels)
        sizes: dict[int, list[int]] = {}
        missing_h = [len(m) for m in groups]     # per group: activations still to come
        missing_back = [len(m) for m in groups]  # and deltas (label-sharing: h with labels)
        done = 0                                 # groups backpropagated so far
        while inbox:
            src, header = inbox.next()
            c, g = header.client, group_of[header.client]
            if header.kind == ACT and u_shape:
                h[c] = self.job.transport.recv_payload(header, src).clone()
                missing_h[g] -= 1
                if not missing_h[g]:
                    sizes[g] = self.forward_group(plan, step, g, groups[g], [h.pop(m) for m in groups[g]])
                continue
            back[c] = self.receive_rest(header, src)
            missing_back[g] -= 1
            while done < len(groups) and not missing_back[done]:
                members = groups[done]
                self.backward_group(plan, step, done, members, [back.pop(m) for m in members], sizes.pop(done, None))
                done += 1
        t.wait_sends()

    def batch_groups(self, plan: data.RoundPlan, step: int, active: list[int]) -> list[list[int]]:
        """sfl.batch_clients: "step": all of the step's clients on this server as one group;
        "rank" (and "auto"): one group per client rank (its logical clients), so the server forwards one rank's
        batches while the next rank is still computing its own. Either way a group is cut after
        GROUP_ROWS samples: a batched pass's activations, held all at once, stay bounded however
        many logical clients a rank hosts (the split server's memory stays flat in them)."""
        by_rank: dict[int, list[int]] = {}
        for c in active:
            by_rank.setdefault(0 if self.cfg.sfl.batch_clients == "step" else self.rank_of[c], []).append(c)
        groups = []
        for members in by_rank.values():
            rows = GROUP_ROWS  # start a new group at the first member
            for c in members:
                n = plan.batch_len(c, step)
                if rows + n > GROUP_ROWS:
                    groups.append([])
                    rows = 0
                groups[-1].append(c)
                rows += n
        return groups

    def forward_group(self, plan: data.RoundPlan, step: int, g: int, members: list[int],
                      h: list[torch.Tensor]) -> list[int]:
        """U-shape: one forward of the group's activations; each client gets its rows of z."""
        sizes = [len(x) for x in h]
        with self.job.timers.phase("server_compute"):
            z = self.state.forward((plan.rnd, step, -1 - g), self.main.module, torch.cat(h),
                                   self.group_seeds(plan, step, members, sizes))
        self.passes += 1
        for c, rows in zip(members, z.split(sizes)):
            self.job.transport.isend(rows, self.rank_of[c], OUT, plan.rnd, step, c)
        return sizes

    def backward_group(self, plan: data.RoundPlan, step: int, g: int, members: list[int], received: list,
                       sizes: list[int] | None) -> None:
        """One backward for a group. The sum of its clients' sample-weighted gradients is the
        gradient for the deltas each scaled by its client's sample count, and a client's dl/dh is its
        rows divided by that count back (design §3.12). Label-sharing: the gradient of the sum of
        every sample's loss. A non-finite parameter gradient cannot be told apart by client: it
        stops the run, or (on_nonfinite = "skip") drops the group's batches."""
        t, key, loss_sum = self.job.transport, (plan.rnd, step, -1 - g), 0.0
        with self.job.timers.phase("server_compute"):
            if self.cfg.u_shape:
                kept = [i for i, d in enumerate(received) if d is not DROPPED]
                if kept:
                    rows = None if len(kept) == len(members) else self.rows_of(sizes, kept)
                    delta = torch.cat([received[i] * sizes[i] for i in kept])
                    grads, grad_h = self.state.backward(key, self.main.module, delta, rows)
                else:
                    self.state.drop(key)
            else:
                sizes = [len(hy[0]) for hy in received]
                grads, grad_h, kept, loss_sum = self.shared_labels_backward(plan, step, members, sizes, received)
            if kept and not finite(grads) and self.nonfinite(plan, step, members[kept[0]], "gradient",
                                                             tuple(members[i] for i in kept[1:])):
                kept = []
            if kept:
                self.main.add_grads(grads, 1, samples=sum(sizes[i] for i in kept))
                self.samples += sum(sizes[i] for i in kept)
                self.loss_sum += loss_sum
        if self.cfg.grad_input:  # dl/dh back, or the drop (the client counts it)
            dl_dh = dict(zip(kept, grad_h.split([sizes[i] for i in kept]))) if kept else {}
            for i, c in enumerate(members):
                t.isend(dl_dh[i] / sizes[i] if i in dl_dh else torch.zeros(0), self.rank_of[c], GRAD_IN,
                        plan.rnd, step, c, dropped=i not in dl_dh)
            t.limit_backlog()  # see backward()
        else:
            self.skipped += len(members) - len(kept)

    @staticmethod
    def rows_of(sizes: list[int], kept: list[int]) -> torch.Tensor:
        """The sample indices of the batches `kept` in a concatenation of batches of `sizes`."""
        starts = np.cumsum([0] + sizes)
        return torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in kept]))

    def shared_labels_backward(self, plan: data.RoundPlan, step: int, active: list[int], sizes: list[int],
                               received: list) -> tuple[list[torch.Tensor], torch.Tensor | None, list[int], float]:
        """Label-sharing, batched: the gradients of every kept sample's loss, summed. A client whose
        loss is not finite stops the run, or is dropped and the rest run again without its rows (a
        NaN row would make every weight's gradient NaN). Returns grads, dl/dh (kept rows), kept and
        the kept samples' loss sum."""
        h_all, y_all = torch.cat([hy[0] for hy in received]), torch.cat([hy[1] for hy in received])
        h, y = h_all, y_all  # without a dropped client's rows after a rerun
        params = list(self.main.module.parameters())
        kept = list(range(len(active)))
        while True:
            h.requires_grad_(self.cfg.grad_input)
            with models.seeded(self.group_seeds(plan, step, [active[i] for i in kept], [sizes[i] for i in kept]),
                               self.main.module):
                losses = F.cross_entropy(self.main.module(h), y, reduction="none")
            self.passes += 1
            sums = torch.stack([s.sum() for s in losses.split([sizes[i] for i in kept])])
            bad = [i for i, ok in zip(kept, torch.isfinite(sums).tolist()) if not ok]
            if not bad or not all([self.nonfinite(plan, step, active[i], "loss") for i in bad]):
                break
            kept = [i for i in kept if i not in bad]
            if not kept:
                return [], None, [], 0.0
            rows = self.rows_of(sizes, kept)
            h, y = h_all.detach()[rows], y_all[rows]
        total = sums.sum()
        out = torch.autograd.grad(total, params + ([h] if self.cfg.grad_input else []))
        return list(out[:len(params)]), (out[-1] if self.cfg.grad_input else None), kept, float(total)

    def serve_in_order(self, plan: data.RoundPlan, step: int, clients: list[int]) -> None:
        """v2, sl: one client after another in the given order; each forward sees the update of
        the one before. Activations that arrive before their turn wait in memory."""
        t = self.job.transport
        counts = self.counts(clients)
        kinds = (ACT, DELTA) if self.cfg.u_shape else (ACT,)
        inbox = Inbox(t, {(src, kind): n for src, n in counts.items() for kind in kinds})
        arrived: dict[tuple[int, int], object] = {}

        def take(kind: int, client: int):
            while (kind, client) not in arrived:
                src, header = inbox.next()
                arrived[(header.kind, header.client)] = self.receive_rest(header, src)
            return arrived.pop((kind, client))

        for c in clients:
            key = (plan.rnd, step, c)
            if self.cfg.u_shape:
                h = take(ACT, c)
                with self.job.timers.phase("server_compute"):
                    z = self.state.forward(key, self.main.module, h, self.seed(plan, step, c))
                self.passes += 1
                t.isend(z, self.rank_of[c], OUT, plan.rnd, step, c)
                self.backward(plan, step, c, take(DELTA, c))
            else:
                self.backward(plan, step, c, take(ACT, c))
        t.wait_sends()

    def counts(self, clients: list[int]) -> dict[int, int]:
        """Messages of each kind due from each client rank."""
        out: dict[int, int] = {}
        for c in clients:
            out[self.rank_of[c]] = out.get(self.rank_of[c], 0) + 1
        return out

    def receive_rest(self, header, src: int):
        """A message's payload, kept: U-shape the delta (or h), label-sharing h with its labels;
        DROPPED for a delta the client dropped (train.on_nonfinite = "skip")."""
        payload = self.job.transport.recv_payload(header, src).clone()
        if header.dropped:
            return DROPPED
        if self.cfg.u_shape:
            return payload
        _, y = self.job.transport.recv(src, LABELS)
        return payload, y.clone()

    def backward(self, plan: data.RoundPlan, step: int, client: int, received) -> None:
        """Finish one client's batch: its gradient to `learn`, dl/dh back to the client.

        U-shape: `received` is delta = dl/dz; the state recomputes the forward (or keeps its graph).
        Label-sharing: `received` is (h, labels); forward, loss and backward happen here.
        """
        key, part = (plan.rnd, step, client), self.part_of(client)
        dropped = received is DROPPED
        with self.job.timers.phase("server_compute"):
            if dropped:
                self.state.drop(key)
            elif self.cfg.u_shape:
                grads, grad_h = self.state.backward(key, part.module, received)
                samples = received.shape[0]
                dropped = not finite(grads) and self.nonfinite(plan, step, client, "gradient")
            else:
                h, y = received
                h.requires_grad_(self.cfg.grad_input)
                params = [p for p in part.module.parameters()]
                models.seed_rng(self.seed(plan, step, client))
                loss = F.cross_entropy(self.forward_from_step_buffers(client, lambda: part.module(h)), y)
                out = torch.autograd.grad(loss, params + ([h] if self.cfg.grad_input else []))
                grads, grad_h = list(out[:len(params)]), (out[-1] if self.cfg.grad_input else None)
                samples = h.shape[0]
                dropped = not finite([loss, *grads]) and self.nonfinite(plan, step, client, "loss or gradient")
                if not dropped:
                    self.loss_sum += loss.item() * samples
            if not dropped:
                self.learn(client, grads, samples)
            elif not self.cfg.grad_input:
                self.skipped += 1  # the client cannot know; with dl/dh going back, it counts the drop
        if self.cfg.grad_input:
            self.job.transport.isend(torch.zeros(0) if dropped else grad_h, self.rank_of[client], GRAD_IN,
                                     plan.rnd, step, client, dropped=dropped)
            # The server's RAM stays flat in the batches in flight: a client that is slower to take
            # its dl/dh than the server to make them holds the server back (transport.BACKLOG_BYTES),
            # and it is in its receive loop, taking them without waiting for anything more from here.
            self.job.transport.limit_backlog()

    def nonfinite(self, plan: data.RoundPlan, step: int, client: int, what: str, among: tuple[int, ...] = ()) -> bool:
        """True if the batch is to be dropped (train.on_nonfinite = "skip"); else the run stops."""
        if self.cfg.train.on_nonfinite == "skip":
            return True
        self.job.control.fail((plan.rnd, step, client), nonfinite_message(what, plan.rnd, step, client, among))
        return False

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



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

A step, top to bottom: `SplitServer.stepped_round` (here) serves the step's clients
(serving.py: together, batched or in order; each batch's gradient comes back to `learn`), then
updates the server parts across split servers (server_part.py: sync's mean step, v1's averaging).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from mpi4py import MPI

from . import data, serving
from .aggregation import host
from .job import WEIGHTS_TAG, Job
from .layout import SERVER
from .serving import batches_clients
from .server_part import ServerPart, ServerParts
from .state import make_state
from .transport import describe
from .waiting import polite_wait


class SplitServer:
    """A split server's role: the round loop over its client ranks' logical clients, what a
    gradient does to the server parts, and its checkpoint (the parts and the round so far)."""

    def __init__(self, job: Job, scratch: Path | None):
        cfg = self.cfg = job.cfg
        self.job, self.scratch = job, scratch
        self.parts = ServerParts(job)
        self.state = make_state(cfg.sfl.state, cfg.grad_input, scratch, job.device, job.timers)
        self.batched = batches_clients(cfg, self.parts.main.module)
        self.rank_of = {c: r for r in job.layout.client_ranks_of(job.rank) for c in job.layout.clients_of(r)}
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
                polite_wait(job.comm.Isend(host(self.parts.main.flat[:-1]), dest=0, tag=WEIGHTS_TAG), who=describe(0))
            computes_loss = not self.cfg.u_shape
            job.gather_stats(job.stats(SERVER, self.loss_sum, self.samples if computes_loss else 0,
                                       job.transport.bytes_sent, MPI.Wtime() - self.t0, self.skipped,
                                       self.parts.copies.made, self.passes, self.state.peak_bytes))
            self.loss_sum, self.samples, self.skipped, self.elapsed, self.passes = 0.0, 0, 0, 0.0, 0
            if job.checkpoint_due(rnd):
                job.checkpoint(self.state_dict, (rnd + 1, 0))

    def stepped_round(self, plan: data.RoundPlan, first: int) -> None:
        """sync, v1, v2: step by step over the round's sampled clients of this server."""
        variant, mine = self.cfg.sfl.variant, self.rank_of  # a dict: membership in O(1)
        for step in range(first, plan.steps):
            active = plan.active(step, mine)
            if variant == "v2":
                serving.serve_in_order(self, plan, step, [c for c in plan.order if c in active])
            else:
                self.parts.main.grad.zero_()
                if variant == "sync" and self.parts.main.buffers.numel():
                    self.parts.step_buffers, self.parts.client_buffers = self.parts.main.buffers.clone(), {}
                groups = serving.batch_groups(self, plan, step, active) if self.batched else []
                if any(len(g) > 1 for g in groups):
                    serving.serve_batched(self, plan, step, groups)
                else:  # one batch at a time (a group of one is that, without the copies)
                    serving.serve_together(self, plan, step, active)
                if variant == "sync":
                    self.parts.apply_mean_update()
                elif self.job.aggregate_due(plan, step):
                    self.parts.average_copies()
            self.check_scratch(plan.rnd, step)
            self.job.step_done(plan.rnd, step + 1)

    def relay_round(self, plan: data.RoundPlan, first: int) -> None:
        """sl: each logical client in the round's order, over its whole shard, one batch a step."""
        for k in range(first, len(plan.sequence)):
            cid, step = plan.sequence[k]
            if cid in self.rank_of:
                serving.serve_in_order(self, plan, step, [cid])
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
        return {"main": part(self.parts.main), "copies": self.parts.copies.state_dict(),
                "round": {"loss_sum": self.loss_sum, "samples": self.samples, "skipped": self.skipped,
                          "passes": self.passes,
                          "elapsed": MPI.Wtime() - self.t0 if self.t0 else 0.0}}

    def load_state_dict(self, state: dict) -> None:
        def load(p: ServerPart, saved: dict) -> ServerPart:
            p.flat.copy_(saved["flat"])
            p.opt.load_state_dict(saved["opt"])
            p.trained = saved["trained"]
            return p
        load(self.parts.main, state["main"])
        self.parts.copies.load_state_dict(state["copies"], self.parts.main.flat[:-1])
        r = state["round"]
        self.loss_sum, self.samples, self.skipped, self.elapsed = r["loss_sum"], r["samples"], r["skipped"], r["elapsed"]
        self.passes = r["passes"]

    def settle(self) -> None:
        """Before a checkpoint or the end: the last step's replies complete (a step of sync or v1
        does not wait for its own at its end: the clients take them while the next one starts)."""
        self.job.transport.wait_sends()

    def finish(self) -> None:
        """Only the fed server writes the run's summary."""

    def close(self) -> None:
        self.state.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- what a gradient does to the server part -----------------------------------------------
    def learn(self, client: int, grads: list[torch.Tensor], samples: int) -> None:
        if self.cfg.sfl.variant == "sync":  # sample-weighted; applied once per step
            self.parts.main.add_grads(grads, samples, self.parts.client_buffers.pop(client, None))
        else:
            self.parts.part_of(client).step_on(grads, samples)
        self.samples += samples

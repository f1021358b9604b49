"""What every role of a training job shares: config, model spec, layout, communicators, data plan, device.

Role-specific things (the training set, the test set, the scratch dir) live with the role that
uses them; see train.py.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from mpi4py import MPI

from . import checkpoint, startup
from .config import Config
from .control import Control
from .data import RoundPlan
from .doorbell import Doorbells
from .layout import CLIENT, FED, SERVER, Layout
from .models import Spec
from .timing import CPU_KINDS, PHASES, Timers
from .transport import Transport
from .waiting import polite_wait, polling

# One rank's round-end row, gathered at rank 0 (named fields over a float64 buffer).
STATS = np.dtype([("role", np.float64), ("loss_sum", np.float64), ("samples", np.float64), ("skipped", np.float64),
                  ("bytes_sent", np.float64), ("peak_rss", np.float64), ("round_seconds", np.float64),
                  ("peak_device", np.float64),  # the most GPU memory torch allocated at once (0 on the CPU)
                  ("copies", np.float64),  # working copies built so far (slots.py): the most held at once
                  ("passes", np.float64),  # split server: f_s forward passes this round (sfl.batch_clients: one per group)
                  ("held", np.float64),    # bytes held for batches in flight: peak sends + receive buffers + peak state (a sum of peaks)
                  ("phases", np.float64, (len(PHASES),)),
                  ("cpu", np.float64, (len(CPU_KINDS),)),  # this round's CPU seconds by kind (timing.CPU_KINDS)
                  ("started", np.float64),  # this process's start (time.time()) and its start-up phases (startup.py)
                  ("startup", np.float64, (len(startup.PHASES),))])
WEIGHTS_TAG = 100  # round-end weights to the fed server (not on the per-batch path)
RELAY_TAG = 101    # sl: client-side weights and optimizer state to the next logical client's rank


@dataclass
class Job:
    cfg: Config
    spec: Spec                  # builds the model (models.Spec: name, cut, the data's shape and classes)
    layout: Layout
    comm: MPI.Comm              # COMM_WORLD (or a dup)
    device: torch.device
    shards: list[np.ndarray]    # every logical client's sample indices (every rank knows them)
    fed_comm: MPI.Comm | None = None      # fed server + client ranks (centralized FedAvg)
    clients_comm: MPI.Comm | None = None  # client ranks only (decentralized FedAvg)
    servers_comm: MPI.Comm | None = None  # split servers only (replicas' gradients, v1's copies)
    start: tuple[int, int] = (0, 0)       # (round, steps done in it) this run starts from (--resume)
    run_id: str = ""                      # names this run in its checkpoints (kept across resumes)
    timers: Timers = field(default_factory=Timers)
    transport: Transport = None  # type: ignore[assignment]
    control: Control = None      # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.device.type == "cuda":  # a compute phase ends when its kernels have, not when they are queued
            self.timers.sync = lambda: torch.cuda.synchronize(self.device)
        self.transport = Transport(self.comm, self.device, self.timers, self.cfg.sfl.wire_dtype)
        self.control = Control(self.comm)
        role = self.layout.role(self.rank)
        self.transport.bells = Doorbells(self.comm, listen=polling() and role != FED)
        self.fed_comm = _split(self.comm, role in (FED, CLIENT))
        self.clients_comm = _split(self.comm, role == CLIENT)
        self.servers_comm = _split(self.comm, role == SERVER)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def plan(self, rnd: int) -> RoundPlan:
        t = self.cfg.train
        return RoundPlan.make(self.shards, t.batch_size, self.cfg.run.seed, rnd, t.clients_per_round)

    def steps(self, plan: RoundPlan) -> int:
        """Step boundaries in a round (where the ranks may stop together): the averaging variants'
        steps; sl's batches, one logical client after another (plan.sequence)."""
        return plan.steps if self.cfg.averages else len(plan.sequence)

    def rounds(self):
        """(round, plan, first step) from where this run starts to the last round."""
        r0, s0 = self.start
        for rnd in range(r0, self.cfg.train.rounds):
            yield rnd, self.plan(rnd), (s0 if rnd == r0 else 0)

    def step_done(self, rnd: int, steps_done: int) -> None:
        self.transport.ring_owed()  # no rank reaches a step boundary owing a peer its doorbell
        self.control.step_done(rnd, steps_done)
        startup.mark("first_step")

    def checkpoint_due(self, rnd: int) -> bool:
        """Whether a checkpoint follows round `rnd` (run.checkpoint_every; 0: only at the end)."""
        every = self.cfg.run.checkpoint_every
        return every > 0 and (rnd + 1) % every == 0 and rnd + 1 < self.cfg.train.rounds

    def counters(self) -> dict:
        """What every role's checkpoint carries besides its weights: RNG (the CPU's, and this rank's
        GPU's), timers, bytes sent."""
        cuda = self.device.type == "cuda"
        return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
                "timers": dict(self.timers.seconds), "bytes_sent": self.transport.bytes_sent}

    def load_counters(self, state: dict) -> None:
        torch.set_rng_state(state["rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:  # a checkpoint from the CPU has none
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.timers.seconds.update(state["timers"])
        self.transport.bytes_sent = state["bytes_sent"]

    def checkpoint(self, state: Callable[[], dict], position: tuple[int, int]) -> bool:
        """Collective: write a checkpoint at `position` (round, steps done) with this rank's
        `state()`. Skipped on every rank when any rank has found a problem (its state may be
        poisoned); a failed write is such a problem. Returns whether a checkpoint was written."""
        if self.control.agree(len(self.control.problems)):
            return False
        rnd, step = position
        meta = {"round": rnd, "step": step, "config": self.cfg.as_dict(),
                "partition": checkpoint.partition_digest(self.shards), "run": self.run_id}
        identity = {"run": self.run_id, "rank": self.rank, "world": self.comm.size, "round": rnd, "step": step}
        err = checkpoint.save(self.comm, self.cfg.run.out_dir, {**state(), "counters": self.counters(),
                                                                "identity": identity}, meta, self.control.agree)
        if err:  # a rank's own error sorts before "another rank could not..."
            self.control.fail((*position, -1 if err.startswith("cannot") else 2**31), err)
        return not err

    def aggregate_due(self, plan: RoundPlan, step: int) -> bool:
        """Whether the averaging variants average after `step` (always after a round's last)."""
        return plan.averages_after(step, self.cfg.train.aggregate_every)

    def client_weights_from(self, plan: RoundPlan) -> int | None:
        """The rank that sends the global model's client part to the fed server at a round's end;
        None when the fed server has it already (centralized averaging)."""
        if not self.cfg.averages:
            return self.layout.rank_of(plan.order[-1])  # sl: whoever holds the relayed model
        return None if self.cfg.centralized else self.layout.client_ranks[0]

    def stats(self, role: int, loss_sum: float, samples: float, bytes_sent: float,
              round_seconds: float, skipped: int = 0, copies: int = 0, passes: int = 0,
              state_bytes: int = 0) -> np.ndarray:
        """This rank's row for the round-end Gather (STATS). `state_bytes`: the most the split
        server's state kept in RAM at once (state.py)."""
        row = np.zeros(1, STATS)
        row["role"], row["loss_sum"], row["samples"], row["bytes_sent"] = role, loss_sum, samples, bytes_sent
        row["skipped"], row["copies"], row["passes"] = skipped, copies, passes
        row["held"] = self.transport.buffer_bytes() + state_bytes
        row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        row["peak_device"] = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0.0
        row["round_seconds"], row["phases"] = round_seconds, self.timers.as_list()
        cpu = self.timers.cpu_window()
        row["cpu"] = [cpu[k] for k in CPU_KINDS]
        row["started"], row["startup"] = startup.STARTED, startup.seconds()
        return row

    def gather_stats(self, mine: np.ndarray) -> np.ndarray | None:
        """Round-end stats of every rank at rank 0, one STATS row per rank (uppercase Gather)."""
        width = STATS.itemsize // 8
        out = np.empty((self.comm.size, width), np.float64) if self.rank == 0 else None
        polite_wait(self.comm.Igather(mine.view(np.float64), out, root=0), who="every rank's round-end statistics", collective=True)
        return None if out is None else out.view(STATS).reshape(-1)


def _split(comm: MPI.Comm, member: bool) -> MPI.Comm | None:
    """The sub-communicator of the ranks where `member` holds (collective on every rank)."""
    sub = comm.Split(0 if member else MPI.UNDEFINED, comm.rank)
    return None if sub == MPI.COMM_NULL else sub

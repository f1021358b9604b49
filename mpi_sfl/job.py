"""What every role of a training job shares: config, layout, communicators, data plan, device."""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from .data import Split
from .layout import CLIENT, FED, SERVER, Layout
from .timing import PHASES, Timers
from .transport import Transport, polite_wait

STATS_LEN = 6 + len(PHASES)  # role, loss_sum, samples, bytes_sent, peak_rss, round_seconds, phases...
WEIGHTS_TAG = 100  # round-end weights to the fed server (not on the per-batch path)


@dataclass
class Job:
    cfg: dict
    layout: Layout
    comm: MPI.Comm              # COMM_WORLD (or a dup)
    device: torch.device
    shards: list[np.ndarray]    # every logical client's sample indices (every rank knows them)
    fed_comm: MPI.Comm | None = None      # fed server + client ranks (centralized FedAvg)
    clients_comm: MPI.Comm | None = None  # client ranks only (decentralized FedAvg)
    servers_comm: MPI.Comm | None = None  # split servers only (gradient Allreduce of replicas)
    train: "Split | None" = None          # client ranks: the training set (the shards index it)
    test: "Split | None" = None           # fed server: the test set
    scratch: "Path | None" = None         # split servers in file mode: per-job scratch dir
    seed_encoder: bool = False            # client ranks: whether the encoder / head draw randoms
    seed_head: bool = False
    timers: Timers = field(default_factory=Timers)
    transport: Transport = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.transport = Transport(self.comm, self.device, self.timers)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def batch_size(self) -> int:
        return self.cfg.train.batch_size

    @property
    def steps(self) -> int:
        """Steps per round: until the largest shard is used up (smaller ones drop out earlier)."""
        return max(math.ceil(len(s) / self.batch_size) for s in self.shards)

    def batch_len(self, client: int, step: int) -> int:
        """Samples logical client `client` trains on in `step` (0 once its shard is used up)."""
        return max(0, min(self.batch_size, len(self.shards[client]) - step * self.batch_size))

    def aggregate_due(self, step: int) -> bool:
        every = self.cfg.train.aggregate_every
        return step == self.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def stats(self, role: int, loss_sum: float, samples: float, bytes_sent: float,
              round_seconds: float) -> np.ndarray:
        """This rank's row for the round-end Gather (see STATS_LEN)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
        return np.array([role, loss_sum, samples, bytes_sent, peak, round_seconds, *self.timers.as_list()],
                        np.float64)

    def gather_stats(self, mine: np.ndarray) -> np.ndarray | None:
        """Round-end stats of every rank at rank 0, one row per rank (uppercase Gather)."""
        out = np.empty((self.comm.size, STATS_LEN), np.float64) if self.rank == 0 else None
        polite_wait(self.comm.Igather(mine, out, root=0))
        return out


def make_comms(job: Job) -> None:
    """Split COMM_WORLD into the role communicators (collective on every rank)."""
    role = job.layout.role(job.rank)
    job.fed_comm = _split(job.comm, 0 if role in (FED, CLIENT) else MPI.UNDEFINED)
    job.clients_comm = _split(job.comm, 0 if role == CLIENT else MPI.UNDEFINED)
    job.servers_comm = _split(job.comm, 0 if role == SERVER else MPI.UNDEFINED)


def _split(comm: MPI.Comm, color: int) -> MPI.Comm | None:
    sub = comm.Split(color, comm.rank)
    return None if sub == MPI.COMM_NULL else sub

"""Who does what: rank -> role, logical clients -> client ranks -> split servers, and devices.

Rank 0 is the fed server, ranks 1..S the split servers (none for the unsplit fl variant), the rest
client ranks. Logical clients are dealt to client ranks in contiguous blocks (5 clients on 2 ranks:
3 and 2), client ranks to split servers round-robin.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from .errors import UserError

FED, SERVER, CLIENT = 0, 1, 2
ROLE_NAMES = {FED: "fed_server", SERVER: "split_server", CLIENT: "client"}


@dataclass(frozen=True)
class Layout:
    world: int
    servers: int
    clients: int  # logical clients

    @classmethod
    def from_config(cls, cfg, world: int) -> "Layout":
        servers = cfg.sfl.servers
        client_ranks = world - 1 - servers
        if client_ranks < 1:
            raise UserError(f"{world} ranks leave no client rank (1 fed server + {servers} split "
                            f"server(s)); run with mpiexec -n {servers + 2} or more")
        if servers > client_ranks:
            raise UserError(f"{servers} split servers for {client_ranks} client rank(s) would leave "
                            f"servers idle; run with mpiexec -n {2 * servers + 1} or more, or lower sfl.servers")
        clients = cfg.train.clients or client_ranks
        if clients < client_ranks:
            raise UserError(f"{world} ranks give {client_ranks} client ranks but train.clients = "
                            f"{clients}; run with mpiexec -n {1 + servers + clients} or raise train.clients")
        if cfg.train.clients_per_round > clients:
            raise UserError(f"train.clients_per_round = {cfg.train.clients_per_round} exceeds the "
                            f"{clients} logical clients")
        return cls(world, servers, clients)

    @property
    def client_ranks(self) -> list[int]:
        return list(range(1 + self.servers, self.world))

    @property
    def server_ranks(self) -> list[int]:
        return list(range(1, 1 + self.servers))

    @property
    def first_server(self) -> int:
        """The split server that reports the server part of the global model."""
        return self.server_ranks[0]

    def role(self, rank: int) -> int:
        return FED if rank == 0 else SERVER if rank <= self.servers else CLIENT

    def clients_of(self, rank: int) -> list[int]:
        """Logical client ids hosted by a client rank: contiguous blocks, the first
        clients % client ranks of them one longer (numpy's array_split)."""
        k = rank - 1 - self.servers
        q, r = divmod(self.clients, len(self.client_ranks))
        start = k * q + min(k, r)
        return list(range(start, start + q + (k < r)))

    def rank_of(self, client: int) -> int:
        """The client rank that hosts logical client `client` (O(1): sl asks once per batch)."""
        q, r = divmod(self.clients, len(self.client_ranks))
        k = client // (q + 1) if client < r * (q + 1) else r + (client - r * (q + 1)) // q
        return self.client_ranks[k]

    def describe(self, rank: int) -> str:
        """'rank 3 (client: logical clients 2-3)', for messages that name a peer."""
        role = self.role(rank)
        if role != CLIENT:
            return f"rank {rank} ({ROLE_NAMES[role].replace('_', ' ')})"
        ids = self.clients_of(rank)
        return f"rank {rank} (client: logical client{'s' if len(ids) > 1 else ''} " \
               f"{ids[0]}{'-' + str(ids[-1]) if len(ids) > 1 else ''})"

    def server_of(self, rank: int) -> int:
        return self.server_ranks[(rank - 1 - self.servers) % self.servers]

    def client_ranks_of(self, server: int) -> list[int]:
        return [r for r in self.client_ranks if self.server_of(r) == server]


def check_launch(world: int) -> None:
    """Refuse N silent singletons: srun without PMI starts N one-rank jobs instead of one N-rank job."""
    if os.environ.get("MPI_SFL_SKIP_SLURM_CHECK"):
        return
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS")
    if tasks and os.environ.get("SLURM_PROCID") is not None and int(tasks) != world:
        raise UserError(f"MPI sees {world} rank(s) but Slurm started {tasks} tasks: srun is not "
                        "wiring the ranks into one job (try srun --mpi=pmix, or mpi4py built against "
                        "the site MPI); set MPI_SFL_SKIP_SLURM_CHECK=1 if this is intended")


def local_rank(comm: MPI.Comm) -> tuple[int, int, int]:
    """(rank among the ranks on this node, ranks on this node, of them training ranks: all but the
    fed server, rank 0, which waits off the per-batch path)."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    fed_here = np.zeros(1, np.int32)
    node.Allreduce(np.array([int(comm.rank == 0)], np.int32), fed_here, op=MPI.MAX)
    out = node.rank, node.size, node.size - int(fed_here[0])
    node.Free()
    return out


def pick_device(requested: str, local: int) -> torch.device:
    """One CUDA device per rank (by local rank) when there is one, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but torch sees no CUDA device; use run.device = 'auto'")
    if requested != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def set_threads(requested: int, local_size: int) -> int:
    """Torch threads per rank: by default the node's cores shared among its ranks."""
    n = requested or max(1, len(os.sched_getaffinity(0)) // local_size)
    torch.set_num_threads(n)
    return n

"""Who does what: rank -> role, logical clients -> client ranks -> split servers, and devices.

Rank 0 is the fed server, ranks 1..S the split servers (none for the unsplit fl variant), the rest
client ranks. Logical clients are dealt to client ranks in contiguous blocks (5 clients on 2 ranks:
3 and 2), client ranks to split servers round-robin.
"""
from __future__ import annotations

import os
import socket
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
    """(this rank's slot on its node: its index among the node's training ranks, the fed server
    (rank 0, which waits off the per-batch path) sharing slot 0; ranks on this node; of them
    training ranks). Split_type keeps world order, so the fed server is node rank 0 where it is."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    fed_here = np.zeros(1, np.int32)
    node.Allreduce(np.array([int(comm.rank == 0)], np.int32), fed_here, op=MPI.MAX)
    out = max(0, node.rank - int(fed_here[0])), node.size, node.size - int(fed_here[0])
    node.Free()
    return out


def pick_device(requested: str, slot: int) -> torch.device:
    """The CPU, or GPU `slot` modulo the GPUs this rank sees (run.device = "cuda", or "auto" where
    torch sees one): training ranks take their node's GPUs in turn, the fed server shares the first
    training rank's. The GPU is made current and probed with one small kernel, so that a busy,
    exclusive-mode or broken GPU ends the set-up with one line instead of a traceback later."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but torch sees no CUDA device; use run.device = 'auto'")
    count = torch.cuda.device_count()
    device = torch.device("cuda", slot % count)
    try:
        torch.cuda.set_device(device)
        torch.ones(1, device=device).add_(1).cpu()
    except (RuntimeError, AssertionError) as exc:  # busy, exclusive-mode, out of memory; a torch without CUDA
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot use GPU {device.index} (of {count} visible) on {socket.gethostname()}: {why}; "
                        "give each rank a free GPU (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES) "
                        "or set run.device = 'cpu'") from None
    return device


def set_numerics(device: torch.device, deterministic: bool) -> None:
    """run.deterministic on a GPU: cuDNN's deterministic kernels, no autotuning, no TF32 (the same
    bits on every run, and float32 arithmetic that the exactness bound assumes); off: torch's
    defaults plus cuDNN autotuning (faster, not reproducible). The CPU is always deterministic."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default: set anyway (a warm launch runs several jobs)
    torch.backends.cudnn.allow_tf32 = not deterministic


def set_threads(requested: int, local_size: int) -> int:
    """Torch threads per rank: by default the node's cores shared among its ranks."""
    n = requested or max(1, len(os.sched_getaffinity(0)) // local_size)
    torch.set_num_threads(n)
    return n

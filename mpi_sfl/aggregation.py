"""Client-side FedAvg over MPI: one flat float32 buffer per collective.

Each logical client's parameters, then its running buffers (BatchNorm statistics: FedAvg averages
them with the weights, docs/design.md §4), are views into one flat tensor with a spare last slot, so
"flatten" is free. A client rank fills the slot with the samples trained since the last averaging
and contributes sum_i n_i W_i (and sum_i n_i) in one buffer:
- centralized: Reduce(SUM) to the fed server on the fed+clients communicator, which divides and
  Bcasts the average back (master/worker);
- decentralized: Allreduce(SUM) among client ranks, each divides locally (peer to peer).
Reductions stay float32 (bf16 reductions are broken in MPI). A large buffer goes as 8 MiB slices,
one nonblocking collective each, all posted at once: MPI then pipelines them (about 1.5x faster
than one 200 MB collective at 50M parameters, centralized, on 4 ranks here).

The robust aggregators (sfl.aggregator = median | trimmed-mean | krum) need every logical client's
vector, not their sum: decentralized, an Allgatherv of the client vectors among client ranks, every
rank computing the same result; centralized, a Gatherv at the fed server, which computes and
Bcasts it. The vectors go as column buckets of BUCKET / M floats, one nonblocking collective each,
all posted at once; M vectors of P floats cost M x P x 4 bytes where they are gathered.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from . import models
from .errors import UserError
from .timing import Timers
from .waiting import polite_wait

WHO = "every client rank to join the client-side averaging"
BUCKET = 2**21  # float32 elements per collective (8 MiB)


def averaged_buffers(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The buffers FedAvg averages with the weights: floating-point ones (BatchNorm's running
    statistics) and integer scalars (its num_batches_tracked counter, held as float32 while training:
    exact up to 2**24 batches). Other integer buffers (index tables) are left alone."""
    out = []
    for mod in module.modules():
        for name, b in mod._buffers.items():
            if b is not None and models.averaged(b):
                out.append((mod, name))
    return out


def flatten_params(modules: Iterable[nn.Module], device: torch.device) -> torch.Tensor:
    """Copy the parameters, then the averaged buffers, into one float32 buffer of length P + B + 1
    and make them views of it (the last slot is the averaging weight)."""
    modules = list(modules)
    params = [p for m in modules for p in m.parameters()]
    bufs = [(mod, name) for m in modules for mod, name in averaged_buffers(m)]
    sizes = [p.numel() for p in params] + [mod._buffers[name].numel() for mod, name in bufs]
    flat = torch.zeros(sum(sizes) + 1, dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        n = p.numel()
        flat[offset:offset + n].copy_(p.detach().reshape(-1))
        p.data = flat[offset:offset + n].view_as(p)
        offset += n
    for mod, name in bufs:
        b = mod._buffers[name]
        n = b.numel()
        flat[offset:offset + n].copy_(b.detach().reshape(-1))
        # `.data`: a view of the flat storage with a version counter of its own. As plain views all
        # buffers would share the flat's counter, and a BatchNorm updating its statistics in place
        # would look to autograd like a change of every other BatchNorm's saved statistics.
        mod._buffers[name] = flat[offset:offset + n].view(b.shape).data
        offset += n
    return flat


def param_count(modules: Iterable[nn.Module]) -> int:
    """P: where the buffers begin in a flat_params buffer."""
    return sum(p.numel() for m in modules for p in m.parameters())


def attach_flat_grads(params: list[nn.Parameter], device: torch.device, extra: int = 0) -> torch.Tensor:
    """A zeroed float32 buffer of length P + extra + 1 whose first P slots are the parameters' .grad
    tensors (sync's split server sums its clients' buffers in the `extra` slots)."""
    flat = torch.zeros(sum(p.numel() for p in params) + extra + 1, dtype=torch.float32, device=device)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def host(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def buckets(data: np.ndarray) -> list[np.ndarray]:
    """Contiguous views of `data`, BUCKET elements each (the last one shorter)."""
    return [data[i:i + BUCKET] for i in range(0, len(data), BUCKET)]


# -- robust statistics (pure: every rank that computes one gets the same bits) -------------------
def robust_combine(kind: str, blocks: list[np.ndarray], trim: float, f: int, select: int) -> list[np.ndarray]:
    """The robust aggregate of M vectors given as column blocks (each M x L_k, float32), per block.

    median: coordinate-wise (mean of the middle two for even M); trimmed-mean: coordinate-wise, the
    k = floor(trim x M) smallest and largest values cut (at most (M-1)//2 each); krum: each vector
    scored by the summed squared distances to its M - f - 2 nearest others (at least 1), and the
    `select` best-scored (0: M - f; ties to the lower index) averaged. Unweighted by samples: a
    client's claimed sample count is as untrusted as its vector.
    """
    m = blocks[0].shape[0]
    if kind == "median":
        return [np.median(b, axis=0).astype(np.float32) for b in blocks]
    if kind == "trimmed-mean":
        k = min(int(trim * m), (m - 1) // 2)
        return [np.sort(b, axis=0)[k:m - k].mean(axis=0, dtype=np.float64).astype(np.float32) for b in blocks]
    if kind == "krum":
        chosen = krum_select(blocks, f, select)
        return [b[chosen].mean(axis=0, dtype=np.float64).astype(np.float32) for b in blocks]
    raise ValueError(kind)


def krum_select(blocks: list[np.ndarray], f: int, select: int) -> np.ndarray:
    """Indices of the vectors Krum / multi-Krum averages (see robust_combine), in index order."""
    m = blocks[0].shape[0]
    d2 = np.zeros((m, m))
    for b in blocks:
        x = b.astype(np.float64)
        sq = (x * x).sum(axis=1)
        d2 += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, np.inf)
    near = max(1, min(m - 1, m - f - 2))
    scores = np.sort(d2, axis=1)[:, :near].sum(axis=1)
    count = max(1, min(m, select or m - f))
    return np.sort(np.argsort(scores, kind="stable")[:count])


def check_robust(kind: str, clients: int, trim: float, f: int, floats: int, limit_mb: float) -> str:
    """Set-up: a robust aggregator that cannot work with `clients` vectors of `floats` floats ends
    the job (UserError); else the line that says what gathering costs. (A trim below 0.5, which the
    config demands, always leaves a value: 2 floor(trim M) < M.)"""
    if kind == "mean":
        return ""
    if kind == "krum" and clients <= 2 * f + 2:
        raise UserError(f"sfl.aggregator = 'krum' with sfl.byzantine_f = {f} needs more than {2 * f + 2} "
                        f"logical clients per averaging; there are {clients}: lower sfl.byzantine_f or add clients")
    mb = clients * floats * 4 / 2**20
    if mb > limit_mb:
        raise UserError(f"sfl.aggregator = {kind!r} gathers {clients} client vectors of {floats:,} floats: "
                        f"{mb:,.0f} MB where they are gathered, over sfl.gather_limit_mb = {limit_mb:g}; raise "
                        "sfl.gather_limit_mb, sample fewer clients (train.clients_per_round) or use sfl.aggregator = 'mean'")
    return f"aggregator {kind}: gathers {clients} client vectors of {floats:,} floats, {mb:,.1f} MB per gathering rank"


class Aggregator:
    """Averages weighted flat vectors across client ranks (and the fed server, if centralized), or
    combines every client's vector robustly (`combine`)."""

    def __init__(self, mode: str, comm: MPI.Comm, timers: Timers, kind: str = "mean", trim: float = 0.0,
                 f: int = 0, select: int = 1):
        self.mode, self.comm, self.timers = mode, comm, timers
        self.kind, self.trim, self.f, self.select = kind, trim, f, select
        self.bytes_sent = 0

    def average(self, buf: torch.Tensor) -> torch.Tensor:
        """Client side. `buf` holds [sum_i n_i W_i, sum_i n_i]; on return it holds [average, total]."""
        with self.timers.phase("aggregation"):
            data = host(buf)
            parts = buckets(data)
            if self.mode == "centralized":
                polite_wait([self.comm.Ireduce(p, None, op=MPI.SUM, root=0) for p in parts]
                            + [self.comm.Ibcast(p, root=0) for p in parts], who=WHO, collective=True)
            else:
                polite_wait([self.comm.Iallreduce(MPI.IN_PLACE, p, op=MPI.SUM) for p in parts], who=WHO, collective=True)
                if data[-1] > 0:
                    data[:-1] /= data[-1]
            self.bytes_sent += data.nbytes
            if buf.device.type != "cpu":
                buf.copy_(torch.from_numpy(data))
        return buf

    def average_at_root(self, data: np.ndarray) -> np.ndarray:
        """Fed server side of `average` (centralized): contributes nothing, divides, broadcasts."""
        with self.timers.phase("aggregation"):
            data[:] = 0
            parts = buckets(data)
            polite_wait([self.comm.Ireduce(MPI.IN_PLACE, p, op=MPI.SUM, root=0) for p in parts], who=WHO, collective=True)
            if data[-1] > 0:
                data[:-1] /= data[-1]
            polite_wait([self.comm.Ibcast(p, root=0) for p in parts], who=WHO, collective=True)
            self.bytes_sent += data.nbytes
        return data

    # -- robust: every vector, gathered -------------------------------------------------------
    def combine(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Client side. `rows`: this rank's contributing logical clients, one [W_i, n_i] row each
        (float32, possibly none). On return `out` holds [robust aggregate of every rank's W_i,
        sum of n_i] (unchanged when no client contributed anywhere)."""
        with self.timers.phase("aggregation"):
            root = self.mode == "centralized"
            counts = self._counts(len(rows))
            blocks = self._gather(rows, counts, out.size, root)
            if not root:
                self._reduce(blocks, out)
            else:
                polite_wait([self.comm.Ibcast(p, root=0) for p in buckets(out)], who=WHO, collective=True)
            self.bytes_sent += rows.nbytes
        return out

    def combine_at_root(self, out: np.ndarray) -> np.ndarray:
        """Fed server side of `combine` (centralized): gathers, computes, broadcasts."""
        with self.timers.phase("aggregation"):
            counts = self._counts(0)
            blocks = self._gather(np.zeros((0, out.size), np.float32), counts, out.size, True)
            self._reduce(blocks, out)
            polite_wait([self.comm.Ibcast(p, root=0) for p in buckets(out)], who=WHO, collective=True)
            self.bytes_sent += out.nbytes
        return out

    def _counts(self, mine: int) -> np.ndarray:
        """Every rank's number of rows, on every rank (all cut the columns alike)."""
        counts = np.zeros(self.comm.size, np.int64)
        polite_wait(self.comm.Iallgather(np.array([mine], np.int64), counts), who=WHO, collective=True)
        return counts

    def _gather(self, rows: np.ndarray, counts: np.ndarray, width: int, root: bool) -> list[np.ndarray]:
        """Column blocks M x L_k of every rank's rows, in rank order (at the root only, if
        centralized: elsewhere empty); about BUCKET floats a block."""
        m = int(counts.sum())
        step = max(1, BUCKET // max(1, m))
        blocks, sends, reqs = [], [], []  # the send copies live until the collectives complete
        for a in range(0, width, step):
            b = min(width, a + step)
            send = np.ascontiguousarray(rows[:, a:b])
            recv = np.empty((m if not root or self.comm.rank == 0 else 0, b - a), np.float32)
            spec = [recv, counts * (b - a), np.concatenate([[0], np.cumsum(counts)[:-1]]) * (b - a), MPI.FLOAT]
            if root:
                reqs.append(self.comm.Igatherv(send, spec if self.comm.rank == 0 else None, root=0))
            else:
                reqs.append(self.comm.Iallgatherv(send, spec))
            blocks.append(recv)
            sends.append(send)
        polite_wait(reqs, who=WHO, collective=True)
        return blocks

    def _reduce(self, blocks: list[np.ndarray], out: np.ndarray) -> None:
        """[robust aggregate, total samples] of the gathered rows into `out` (no rows: unchanged)."""
        if not blocks or blocks[0].shape[0] == 0:
            return
        samples = float(blocks[-1][:, -1].astype(np.float64).sum())
        vectors = blocks[:-1] + [blocks[-1][:, :-1]]  # the last column is n_i, not part of W_i
        vectors = [b for b in vectors if b.shape[1]]
        if vectors:
            out[:-1] = np.concatenate(robust_combine(self.kind, vectors, self.trim, self.f, self.select))
        out[-1] = samples

"""What the split server keeps between a batch's forward and its backward (docs/design.md §4).

- graph:  the autograd graph of z in memory (memory grows with batches in flight);
- memory: only the input h, recomputing z = f_s(h) when the gradient arrives;
- file:   like memory, but h goes to node-local scratch, into a UUID4-named file per batch in
          flight (reused by later batches), and is read back on the backward, so the server holds
          no per-batch tensors in RAM.
Recompute draws the same dropout masks because every forward of a (round, step, client) batch is
seeded from those numbers (models.batch_seed); the seed is stored with h. A part with running
buffers (BatchNorm) has them saved before its forward (a few floats per channel, in RAM in every
mode) and recomputes under exactly those, then gets back the ones its forward left: the recompute
gives the forward's output and updates the running statistics once, not twice.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import eager, models
from .errors import UserError
from .outdir import pid_alive
from .timing import Timers
from .transport import as_buffer

Key = tuple[int, int, int]  # (round, step, logical client)
Seed = "int | models.ChunkSeeds"  # a batch's seed, or its clients' (cross-client batching)
FILE_MAGIC = 0x5346_4C31  # "SFL1"


class GraphState:
    """Keeps z's graph; the baseline every other mode is compared against.

    Every call names the server part it runs (`body`): sync, v2 and sl have one, v1 one per
    logical client.
    """

    error: str | None = None  # FileState: a scratch write that failed (the run then stops)

    def __init__(self, grad_input: bool):
        self.grad_input = grad_input
        self._kept: dict[Key, tuple] = {}  # graph: (h, z); memory: (h, seed)
        self.bytes = 0       # bytes of the tensors it keeps in RAM: kept h (and z), read buffers
        self.peak_bytes = 0  # the most it kept at once (not counting the graphs behind z)
        self._pre: dict[Key, list[torch.Tensor]] = {}      # running buffers before a batch's forward
        self._seeds: dict[Key, models.ChunkSeeds] = {}    # graph: a batched forward's clients' seeds
        self._buffers: dict[int, list[torch.Tensor]] = {}  # id(body) -> its buffers (fixed views)

    def buffers(self, body: nn.Module) -> list[torch.Tensor]:
        bufs = self._buffers.get(id(body))
        if bufs is None:
            bufs = self._buffers[id(body)] = models.buffers(body)
        return bufs

    def hold(self, nbytes: int) -> None:
        """Count tensors kept (nbytes > 0) or let go (< 0)."""
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def keep(self, key: Key, h: torch.Tensor, other) -> None:
        self._kept[key] = (h, other)
        self.hold(h.nbytes + (other.nbytes if isinstance(other, torch.Tensor) else 0))

    def pop(self, key: Key):
        """What was kept for `key` (None if nothing), no longer counted."""
        kept = self._kept.pop(key, None)
        if kept is not None:
            h, other = kept
            self.hold(-h.nbytes - (other.nbytes if isinstance(other, torch.Tensor) else 0))
        return kept

    def forward(self, key: Key, body: nn.Module, h: torch.Tensor, seed: Seed) -> torch.Tensor:
        h = h.clone().requires_grad_(self.grad_input)  # the received buffer is reused
        with models.seeded(seed, body):
            z = body(h)
        self.keep(key, h, z)
        if isinstance(seed, models.ChunkSeeds):  # a recompute of some of its clients' rows needs them
            self._seeds[key] = seed
        return z.detach()

    def backward(self, key: Key, body: nn.Module, delta: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The parameters' gradients and dl/dh for delta = dl/dz. `rows`: backpropagate only these
        samples of h (a batch of several clients' batches, some dropped; the part then has no
        running buffers, and its dropout replays the kept clients' seeds, so the recompute is exact)."""
        h, z = self.pop(key)
        seed = self._seeds.pop(key, None)
        if rows is not None:
            h = h.detach()[rows].requires_grad_(self.grad_input)
            with torch.enable_grad(), (models.seeded(seed.rows(rows), body) if seed else nullcontext()):
                z = body(h)
        return self._grads(body, z, h, delta)

    def _grads(self, body, z, h, delta):
        params = [p for p in body.parameters() if p.requires_grad]
        grads = eager.grad(z, params + ([h] if self.grad_input else []), delta)
        return list(grads[:len(params)]), (grads[-1] if self.grad_input else None)

    def drop(self, key: Key) -> None:
        """Forget a batch whose backward will not come (its client dropped it)."""
        self.pop(key)
        self._pre.pop(key, None)
        self._seeds.pop(key, None)

    def in_flight(self) -> int:
        return len(self._kept)

    def close(self) -> None:
        self._kept.clear()
        self._pre.clear()
        self._seeds.clear()
        self.bytes = 0


class MemoryState(GraphState):
    """Keeps the input only; recomputes the forward with autograd on when delta arrives."""

    def forward(self, key: Key, body: nn.Module, h: torch.Tensor, seed: Seed) -> torch.Tensor:
        bufs = self.buffers(body)
        if bufs:
            self._pre[key] = models.snapshot(bufs)
        with torch.no_grad(), models.seeded(seed, body):
            z = body(h)
        self._put(key, h, seed)
        return z

    def backward(self, key: Key, body: nn.Module, delta: torch.Tensor, rows: torch.Tensor | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        h, seed = self._take(key)
        h = (h if rows is None else h[rows]).requires_grad_(self.grad_input)
        if rows is not None and isinstance(seed, models.ChunkSeeds):
            seed = seed.rows(rows)
        pre = self._pre.pop(key, None)
        if pre is not None:  # recompute under the buffers the forward saw, then put back what it left
            bufs = self.buffers(body)
            after = models.snapshot(bufs)
            models.restore(bufs, pre)
        with torch.enable_grad(), models.seeded(seed, body):
            z = body(h)
        grads = self._grads(body, z, h, delta)
        if pre is not None:  # after the backward, which reads the buffers its forward saw
            models.restore(bufs, after)
        return grads

    def _put(self, key: Key, h: torch.Tensor, seed: Seed) -> None:
        self.keep(key, h.clone(), seed)

    def _take(self, key: Key) -> tuple[torch.Tensor, int]:
        return self.pop(key)


@dataclass
class Slot:
    """One scratch file, opened once and reused by one batch in flight after another."""
    fd: int
    name: str


class FileState(MemoryState):
    """Keeps the input in scratch files; RAM holds only key -> (slot, seed, h's shape and dtype).

    Each batch in flight has a slot: a UUID4-named file, created (O_EXCL) the first time that many
    batches are in flight at once and then reused, so the hot path is one pwritev and one preadv at
    offset 0: no per-batch open, unlink or directory operation. A file holds [magic, seed] as int64
    and then h's raw bytes; h comes back into a read buffer reused per shape (the recompute is done
    with it before the next batch is read). Only names this server made become paths.
    """

    def __init__(self, grad_input: bool, scratch: Path, device: torch.device, timers: Timers | None = None):
        super().__init__(grad_input)
        self.scratch, self.device = scratch, device
        self.timers = timers or Timers()  # its reads and writes are the phase scratch_io
        self._names: dict[Key, tuple[Slot, int, tuple[int, ...], torch.dtype]] = {}
        self._free: list[Slot] = []
        self._slots: list[Slot] = []
        self._read: dict[tuple, torch.Tensor] = {}

    def _slot(self) -> Slot:
        if self._free:
            return self._free.pop()
        name = uuid.uuid4().hex
        slot = Slot(os.open(self.scratch / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), name)
        self._slots.append(slot)
        return slot

    def _put(self, key: Key, h: torch.Tensor, seed: Seed) -> None:
        t = h.detach().to("cpu").contiguous()
        data = memoryview(as_buffer(t)).cast("B")
        slot = None
        try:
            slot = self._slot()
            with self.timers.phase("scratch_io"):
                written = os.pwritev(slot.fd, [np.array([FILE_MAGIC, check(seed)], dtype=np.int64), data], 0)
            if written != 16 + data.nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            # Disk full or gone: keep this batch in memory so the step completes and every rank can
            # stop together at the next boundary (the split server reports `error`).
            if slot is not None:
                self._discard(slot)
            self.error = self.error or (f"cannot write to scratch {self.scratch} ({exc.strerror}); free space "
                                        "there, set run.scratch_dir to a larger disk, or use sfl.state = 'memory'")
            super()._put(key, h, seed)
            return
        self._names[key] = (slot, seed, tuple(t.shape), t.dtype)

    def _take(self, key: Key) -> tuple[torch.Tensor, int]:
        if key in self._kept:  # kept in memory after a failed write
            return super()._take(key)
        slot, seed, shape, dtype = self._names.pop(key)
        buf = self._read.get((shape, dtype))
        if buf is None:
            buf = self._read[(shape, dtype)] = torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")
            self.hold(buf.nbytes)
        magic = np.zeros(2, dtype=np.int64)
        data = memoryview(as_buffer(buf.detach())).cast("B")  # the last recompute set requires_grad
        with self.timers.phase("scratch_io"):
            got = os.preadv(slot.fd, [magic, data], 0)
        self._free.append(slot)
        if got != 16 + data.nbytes or magic[0] != FILE_MAGIC or magic[1] != check(seed):
            raise RuntimeError(f"scratch file {self.scratch / slot.name} does not hold the activation written to it")
        return (buf if self.device.type == "cpu" else buf.to(self.device)), seed

    def _discard(self, slot: Slot) -> None:
        os.close(slot.fd)
        (self.scratch / slot.name).unlink(missing_ok=True)
        self._slots.remove(slot)

    def drop(self, key: Key) -> None:
        super().drop(key)
        held = self._names.pop(key, None)
        if held is not None:
            self._free.append(held[0])

    def in_flight(self) -> int:
        return len(self._names) + len(self._kept)

    def files(self) -> int:
        """Scratch files this state holds (the most batches it had in flight at once)."""
        return len(self._slots)

    def close(self) -> None:
        super().close()
        for slot in list(self._slots):
            self._discard(slot)
        self._names.clear()
        self._free.clear()
        self._read.clear()


def check(seed: Seed) -> int:
    """The seed's int64 that a scratch file holds, to tell it was written for this batch."""
    return seed.seeds[0] if isinstance(seed, models.ChunkSeeds) else seed


MMAP_THRESHOLD = 1 << 20  # see release_large_buffers


def release_large_buffers(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc: serve every allocation of `threshold` bytes or more by its own mapping, returned to the
    system when freed. By default glibc raises this threshold to the size of the largest block freed
    so far, after which a server's per-batch tensors (h, dl/dh, the body's activations: about 1.5 MB
    each for the default job) come from the heap, whose top cannot shrink past a block still in use:
    RSS then keeps whatever peak the batches in flight reached, about 0.4 MB per batch more than the
    server holds. Returns whether the C library took it (False elsewhere than glibc)."""
    try:
        import ctypes
        return ctypes.CDLL(None).mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def make_state(mode: str, grad_input: bool, scratch: Path | None, device: torch.device, timers: Timers | None = None):
    release_large_buffers()
    if mode == "graph":
        return GraphState(grad_input)
    if mode == "memory":
        return MemoryState(grad_input)
    return FileState(grad_input, scratch, device, timers)


# -- scratch directory ------------------------------------------------------------------------
# A server's scratch dir is named mpi_sfl-<job>-<pid>@<host>: the name alone says who owns it, so a
# directory whose set-up failed half-way (disk full) can still be recognised and cleaned later.
# '@' never occurs in a host name.
PREFIX = "mpi_sfl-"


def scratch_base(configured: str) -> Path:
    return Path(configured or os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp")


def scratch_name(job: str, pid: int, host: str) -> str:
    return f"{PREFIX}{job}-{pid}@{host}"


def scratch_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a scratch dir's name, or None if it is not one of ours."""
    if not name.startswith(PREFIX) or "@" not in name:
        return None
    rest, host = name[len(PREFIX):].rsplit("@", 1)
    pid = rest.rsplit("-", 1)[-1]
    return (host, int(pid)) if host and pid.isdigit() and "-" in rest else None


def clean_stale(base: Path) -> list[Path]:
    """Remove scratch dirs of mpi_sfl servers on this host whose process is gone (killed jobs):
    only directories of this user, named by scratch_name with this host and a dead pid."""
    removed = []
    host = socket.gethostname()
    for d in base.glob(PREFIX + "*"):
        owner = scratch_owner(d.name)
        if owner is None or owner[0] != host or pid_alive(owner[1]):
            continue
        try:
            mine = d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def make_scratch(configured: str, job: str) -> Path:
    """A fresh 0700 per-job dir for this server process, after clearing stale ones. If it cannot be
    set up, nothing of it is left behind."""
    base = scratch_base(configured)
    d = base / scratch_name(job, os.getpid(), socket.gethostname())
    created = False
    try:
        base.mkdir(parents=True, exist_ok=True)
        clean_stale(base)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(mode=0o700)
        created = True
        os.chmod(d, 0o700)
    except OSError as exc:
        if created:
            shutil.rmtree(d, ignore_errors=True)
        raise UserError(f"cannot use scratch dir {d} ({exc}); set run.scratch_dir") from None
    return d

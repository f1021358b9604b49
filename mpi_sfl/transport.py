"""Point-to-point tensor transport: a fixed int64 header, and the raw payload.

Every message is an uppercase (buffer) MPI call on contiguous host memory: nothing is pickled.
The header says what the payload is (kind, round, step, logical client, dtype, shape), so the
receiver can take whichever peer is ready. A payload of up to INLINE_BYTES travels in the header's
own message (the receiver posts header receives of that size and gets the payload as a view of the
buffer it arrived in); a larger one follows its header as a second message, received into a reused
buffer of its shape. Device tensors are staged through host memory (the PyPI MPI wheels are not
CUDA-aware).

Waits for a peer spin when every rank of the node, the fed server included, has a core of its own,
and otherwise poll (run.wait): MPICH and Open MPI spin a full core in a blocking call, stealing it
from the working ranks. A polling rank waiting for messages sleeps on its doorbell (doorbell.py)
until the sender rings; other waits (a send to complete, a collective) test and sleep briefly.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, NamedTuple

import numpy as np
import torch
from mpi4py import MPI

from .doorbell import Doorbells
from .timing import Timers
from .waiting import polite_wait
from .wire import Wire

# Message kinds. The header travels on tag 2*kind, its payload on 2*kind + 1.
ACT, LABELS, OUT, DELTA, GRAD_IN = 1, 2, 3, 4, 5
HEADER_LEN = 12  # kind, round, step, client, dtype, ndim, dims[4], dropped, inline
HEADER_BYTES = HEADER_LEN * 8
INLINE_BYTES = 16 << 10  # payloads up to this size travel inside their header's message (above it the copy costs more than the message saves)
MAX_DIMS = 4
DTYPES = [torch.float32, torch.int64, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8]
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
NUMPY_VIEW = {torch.bfloat16: torch.int16}  # numpy has no bfloat16: ship its bits as int16
NUMPY_DTYPE = {torch.float32: np.float32, torch.int64: np.int64, torch.float16: np.float16,
               torch.float64: np.float64, torch.uint8: np.uint8, torch.int8: np.int8}  # the rest: torch views
FLOAT_KINDS = (ACT, OUT, DELTA, GRAD_IN)    # what sfl.wire_dtype may narrow (labels never)
REAP_BYTES = 4 << 20                        # payload bytes sent since the last sweep that trigger the next one
BACKLOG_BYTES = 2 << 20                     # what limit_backlog lets a rank hold besides its newest send


class Header(NamedTuple):
    """What a payload is: the fixed int64 header that precedes it on the wire, by name."""
    kind: int
    rnd: int
    step: int
    client: int   # logical client
    dtype: torch.dtype
    shape: tuple[int, ...]
    dropped: bool = False  # train.on_nonfinite = "skip": this batch was dropped (payload is zeros)
    inline: np.ndarray | None = None  # received: the payload's bytes, when they came in this message

    def fields(self, inline: bool = False) -> list[int]:
        """The 12 int64 values of the wire form (a list: one numpy call writes them)."""
        ndim = len(self.shape)
        if ndim > MAX_DIMS:
            raise ValueError(f"transport carries at most {MAX_DIMS} dims, got {self.shape}")
        return [self.kind, self.rnd, self.step, self.client, DTYPE_CODE[self.dtype], ndim, *self.shape,
                *(0,) * (MAX_DIMS - ndim), int(self.dropped), int(inline)]

    def encode(self, inline: bool = False) -> np.ndarray:
        return np.array(self.fields(inline), dtype=np.int64)

    @classmethod
    def decode(cls, msg: np.ndarray) -> "Header":
        """From a received message (uint8): the header, then the payload's bytes if inline."""
        kind, rnd, step, client, code, ndim, *dims = msg[:HEADER_BYTES].view(np.int64).tolist()
        dtype, shape = DTYPES[code], tuple(dims[:ndim])
        inline = None
        if dims[-1]:
            nbytes = math.prod(Wire.payload_shape(dtype, shape)) * dtype.itemsize
            inline = msg[HEADER_BYTES:HEADER_BYTES + nbytes]
        return cls(kind, rnd, step, client, dtype, shape, bool(dims[-2]), inline)


_describe: Callable[[int], str] = lambda rank: f"rank {rank}"


def set_describer(fn: Callable[[int], str]) -> None:
    """How messages name a peer rank (the layout knows its role: "rank 3 (client, logical clients 2-3)")."""
    global _describe
    _describe = fn


def describe(rank: int) -> str:
    return _describe(rank)


def as_buffer(t: torch.Tensor) -> np.ndarray:
    """A numpy view (zero copy) of a contiguous CPU tensor, for MPI."""
    t = t.view(NUMPY_VIEW.get(t.dtype, t.dtype)) if t.dtype in NUMPY_VIEW else t
    return t.numpy()


class Transport:
    """Typed tensor messages between ranks of one communicator, with byte and wait accounting."""

    def __init__(self, comm: MPI.Comm, device: torch.device, timers: Timers | None = None, wire: str = "float32"):
        self.comm = comm
        self.device = device
        self.timers = timers or Timers()
        self.wire = Wire(wire)
        self.bytes_sent = 0
        self.patience = 1.0  # x run.timeout_s for waits on a peer (clients: 1.5, see polite_wait)
        self.bells: Doorbells | None = None  # node-local wake-ups for polling ranks (Job sets them up)
        self._pool: dict[tuple, torch.Tensor] = {}
        # Outgoing sends not yet known complete, oldest first: (reqs, dest, buffers, payload bytes).
        self._sending: deque[tuple[list[MPI.Request], int, object, int]] = deque()
        self._held_bytes = 0   # their payload bytes
        self.peak_held = 0     # the most payload bytes this rank held for its sends at once
        self._sweep_at, self._sweep_bytes = 16, REAP_BYTES  # see reap()

    # -- sending -----------------------------------------------------------------------------
    def isend(self, tensor: torch.Tensor, dest: int, kind: int, rnd: int, step: int, client: int,
              dropped: bool = False, ring: bool = True) -> None:
        """Start sending `tensor`; it is kept alive until the send completes. Do not modify it.
        `ring=False`: the receiver's doorbell rings at this rank's next wait or ring_owed(), for a
        burst the receiver takes together (it wakes once)."""
        self.reap()
        t = tensor.detach().contiguous()
        shape = tuple(t.shape)
        if kind in FLOAT_KINDS:
            t = self.wire.pack(t)  # narrowed where it is: fewer bytes cross to the host
        if t.device.type != "cpu":
            t = t.to("cpu")  # host staging; the copy synchronizes with the producing stream
        header = Header(kind, rnd, step, client, t.dtype, shape, dropped)
        payload = as_buffer(t)
        if payload.nbytes <= INLINE_BYTES:  # one message: header and payload (a copy of <= 16 KiB)
            msg = np.empty(HEADER_BYTES + payload.nbytes, dtype=np.uint8)
            msg[:HEADER_BYTES].view(np.int64)[:] = header.fields(inline=True)
            msg[HEADER_BYTES:] = payload.reshape(-1).view(np.uint8)
            reqs, held = [self.comm.Isend(msg, dest, tag=2 * kind)], msg
        else:
            raw = header.encode()
            reqs = [self.comm.Isend(raw, dest, tag=2 * kind), self.comm.Isend(payload, dest, tag=2 * kind + 1)]
            held = (raw, payload)
        if self.bells:
            self.bells.ring(dest, later=not ring)
        self.bytes_sent += HEADER_BYTES + payload.nbytes
        self._sending.append((reqs, dest, held, payload.nbytes))
        self._held_bytes += payload.nbytes
        self.peak_held = max(self.peak_held, self._held_bytes)

    def ring_owed(self) -> None:
        """Ring the doorbells isend(ring=False) deferred. Every wait of this transport does it first:
        a rank never sleeps while a peer sleeps for want of its ring."""
        if self.bells and self.bells.owed:
            self.bells.ring_owed()

    def reap(self) -> None:
        """Release the buffers of sends that have completed, so that what a rank holds for its sends
        is what its peers have not taken yet, however many batches a step has in flight.

        Sends to a peer complete in the order they were posted, so each call pops completed sends
        from the front of the queue (O(1) amortized per send). A completed send behind one that is
        still in flight (another peer, or a peer that reads another kind first) waits for a sweep of
        the whole queue, done once REAP_BYTES more payload or twice as many sends are held as after
        the last sweep: completed sends held at any time stay under REAP_BYTES + one payload."""
        sending = self._sending
        while sending and MPI.Request.Testall(sending[0][0]):
            self._held_bytes -= sending.popleft()[3]
        if len(sending) >= self._sweep_at or self._held_bytes >= self._sweep_bytes:
            self._sending = sending = deque(s for s in sending if not MPI.Request.Testall(s[0]))
            self._held_bytes = sum(s[3] for s in sending)
            self._sweep_at = max(16, 2 * len(sending))
            self._sweep_bytes = self._held_bytes + REAP_BYTES

    def limit_backlog(self, limit: int = BACKLOG_BYTES) -> None:
        """Wait for the oldest sends until at most `limit` bytes are held besides the newest one:
        a rank that sends faster than its peer takes keeps a bounded backlog instead of one buffer
        per batch in flight. Only where the peer takes these sends without waiting for anything
        more from this rank (else the two would wait for each other)."""
        self.reap()

        def over() -> bool:
            return len(self._sending) > 1 and self._held_bytes - self._sending[-1][3] > limit
        if not over():
            return
        self.ring_owed()
        with self.timers.phase("p2p_wait"):
            while over():
                reqs, dest, _, nbytes = self._sending[0]
                polite_wait(reqs, who=lambda: describe(dest) + " to take this rank's messages", patience=self.patience)
                self._sending.popleft()
                self._held_bytes -= nbytes

    def buffer_bytes(self) -> int:
        """The most bytes this rank held at once for its sends, plus its reused receive buffers."""
        return self.peak_held + sum(b.nbytes for b in self._pool.values())

    def owed(self) -> list[int]:
        """The ranks whose sends from this rank are not complete (for a timeout's message: sends
        that completed stay listed until the next reap)."""
        return sorted({d for reqs, d, _, _ in self._sending if not MPI.Request.Testall(reqs)})

    def wait_sends(self) -> None:
        """Complete every outstanding send and release its buffers."""
        self.ring_owed()
        if self._sending:
            with self.timers.phase("p2p_wait"):
                polite_wait([r for reqs, _, _, _ in self._sending for r in reqs],
                            who=lambda: " and ".join(describe(d) for d in self.owed()) + " to take this rank's messages",
                            patience=self.patience)
            self._sending.clear()
            self._held_bytes = 0
            self._sweep_at, self._sweep_bytes = 16, REAP_BYTES

    # -- receiving ---------------------------------------------------------------------------
    def bell_for(self, sources) -> Doorbells | None:
        """The bell a wait for messages from `sources` may sleep on: every one of them rings it."""
        return self.bells if self.bells and self.bells.covers(sources) else None  # ANY_SOURCE rings no bell

    def irecv_header(self, source: int, kind: int) -> tuple[MPI.Request, np.ndarray]:
        """A receive of the next header of `kind` from `source`, with room for an inline payload
        (a fresh buffer: an inline payload is handed out as a view of it)."""
        msg = np.empty(HEADER_BYTES + INLINE_BYTES, dtype=np.uint8)
        return self.comm.Irecv(msg, source, tag=2 * kind), msg

    def recv_payload(self, header: Header, source: int) -> torch.Tensor:
        """The payload announced by `header`, in a reused buffer of its shape, on this rank's device
        (with a narrowed sfl.wire_dtype, activations and gradients come back as new float32 tensors).

        The tensor stays valid until the next payload of the same kind and shape arrives: copy it
        to keep it longer.
        """
        shape = Wire.payload_shape(header.dtype, header.shape)
        if header.inline is not None:  # it came with the header: a view of that message's buffer
            np_dtype = NUMPY_DTYPE.get(header.dtype)
            buf = (torch.from_numpy(header.inline.view(np_dtype).reshape(shape)) if np_dtype is not None
                   else torch.from_numpy(header.inline).view(header.dtype).reshape(shape))
        else:
            key = (header.kind, header.shape, header.dtype)
            buf = self._pool.get(key)
            if buf is None:
                buf = self._pool[key] = torch.empty(shape, dtype=header.dtype, pin_memory=self.device.type == "cuda")
            self.ring_owed()
            with self.timers.phase("p2p_wait"):
                polite_wait(self.comm.Irecv(as_buffer(buf), source, tag=2 * header.kind + 1),
                            who=lambda: describe(source), patience=self.patience)
        if self.device.type != "cpu":
            buf = buf.to(self.device)  # the narrow form crosses to the GPU, widened there
        if header.kind in FLOAT_KINDS and self.wire.fmt != "float32":
            buf = Wire.unpack(buf, header.dtype, header.shape)
        return buf

    def recv(self, source: int, kind: int) -> tuple[Header, torch.Tensor]:
        """Header and payload of the next `kind` message from `source` (MPI.ANY_SOURCE allowed)."""
        status = MPI.Status()
        req, msg = self.irecv_header(source, kind)
        self.wait(req, status, who=lambda: describe(source), bell=self.bell_for([source]))
        header = Header.decode(msg)
        return header, self.recv_payload(header, status.Get_source())

    def wait(self, req: MPI.Request, status: MPI.Status | None = None, who="a peer", bell: Doorbells | None = None) -> None:
        self.ring_owed()
        with self.timers.phase("p2p_wait"):
            polite_wait(req, status=status, who=who, patience=self.patience, bell=bell)


class Inbox:
    """The header receives a rank still expects, one pending per (source, kind).

    `next()` returns whichever header arrives first, so a rank serves ready peers in any order,
    and re-arms that (source, kind) while more messages of it are due.
    """

    def __init__(self, transport: Transport, due: dict[tuple[int, int], int]):
        self.t = transport
        self.left = {key: n for key, n in due.items() if n > 0}
        self.reqs: list[MPI.Request] = []
        self.meta: list[tuple[int, int, np.ndarray]] = []
        for src, kind in self.left:
            req, header = transport.irecv_header(src, kind)
            self.reqs.append(req)
            self.meta.append((src, kind, header))
        self.bell = transport.bell_for({src for src, _ in self.left})

    def __len__(self) -> int:
        return sum(self.left.values())

    def owing(self) -> str:
        """The peers whose messages are still due (for a timeout's message)."""
        owed: dict[int, int] = {}
        for (src, _), n in self.left.items():
            owed[src] = owed.get(src, 0) + n
        return " and ".join(f"{describe(src)} ({n} message(s))" for src, n in sorted(owed.items()) if n)

    def next(self) -> tuple[int, Header]:
        """(source, header) of the next message; receive its payload with recv_payload."""
        if self.t.bells and self.t.bells.owed:  # ring what this rank owes, unless a message is here already
            got = self.ready()
            if got is not None:
                return got
            self.t.ring_owed()
        with self.t.timers.phase("p2p_wait"):
            idx = polite_wait(self.reqs, any_=True, who=self.owing, patience=self.t.patience, bell=self.bell)
        return self._take(idx)

    def ready(self) -> tuple[int, Header] | None:
        """(source, header) of a message that has arrived, or None at once if none has."""
        if not self:
            return None
        idx, done = MPI.Request.Testany(self.reqs)
        return self._take(idx) if done and idx != MPI.UNDEFINED else None

    def _take(self, idx: int) -> tuple[int, Header]:
        src, kind, header = self.meta[idx]
        self.left[(src, kind)] -= 1
        if self.left[(src, kind)]:
            self.reqs[idx], new_header = self.t.irecv_header(src, kind)
            self.meta[idx] = (src, kind, new_header)
        else:
            self.reqs[idx] = MPI.REQUEST_NULL
        return src, Header.decode(header)

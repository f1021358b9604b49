"""Per-phase timers, wall clock (MPI.Wtime) and CPU time: cheap enough to stay on, per rank, always.

Phases nest: a stretch spent in an inner phase counts there and not in the phase around it, so a
rank's phases never add up to more than its time. Each thread keeps its own open phases (the fed
server evaluates in a thread of its own).

CPU time is the process's (user + system, all its threads: time.process_time), or, on a rank that
runs phases in more than one thread (the fed server), each thread's own (`Timers.clock`).
`cpu_window()` splits the CPU a rank burned since the last call into CPU_KINDS: compute (forward,
recompute, backward, optimizer), scratch_io (the file state's reads and writes), waiting (for a
peer or a collective: polling, sleeping, spinning), aggregation, eval, and other: the CPU in no
phase at all, which on a training rank is its Python between the phases (message headers, packing,
queues, bookkeeping) and on the fed server mostly writing the outputs.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from mpi4py import MPI

PHASES = ("client_compute", "server_compute", "scratch_io", "p2p_wait", "aggregation", "eval", "idle")
DEVICE_PHASES = ("client_compute", "server_compute", "eval")  # the phases that queue GPU kernels
CPU_KINDS = ("compute", "scratch_io", "other", "waiting", "aggregation", "eval", "total")
KIND = {"client_compute": "compute", "server_compute": "compute", "scratch_io": "scratch_io",
        "p2p_wait": "waiting", "idle": "waiting", "aggregation": "aggregation", "eval": "eval"}


class Timers:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.sync = sync  # on a GPU: waits for its queued kernels (Job sets it)
        self.clock: Callable[[], float] = time.process_time  # a phase's CPU clock (see the module's doc)
        self._local = threading.local()  # per thread: the open phases, innermost last, [name, wall, cpu]
        self._mark = time.process_time()  # cpu_window's last call
        self._mark_phases = dict(self.cpu)

    def _open(self) -> list[list]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _credit(self, stack: list[list]) -> tuple[float, float]:
        """Credit the innermost open phase with its stretch up to now; (wall, cpu) now."""
        wall, cpu = MPI.Wtime(), self.clock()
        if stack:
            top = stack[-1]
            self.seconds[top[0]] += wall - top[1]
            self.cpu[top[0]] += cpu - top[2]
            top[1], top[2] = wall, cpu
        return wall, cpu

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; a device phase on a GPU is bracketed by syncs, so that its kernels count
        in it and not in whichever phase next waits for them."""
        sync = self.sync if name in DEVICE_PHASES else None
        if sync:
            sync()
        stack = self._open()
        wall, cpu = self._credit(stack)
        stack.append([name, wall, cpu])
        try:
            yield
        finally:
            if sync:
                sync()
            wall, cpu = self._credit(stack)
            stack.pop()
            if stack:  # the outer phase resumes now
                stack[-1][1], stack[-1][2] = wall, cpu

    def cpu_window(self) -> dict[str, float]:
        """This process's CPU seconds since the last call (or since the timers were made), by
        CPU_KINDS; phases still open are counted up to now."""
        self._credit(self._open())
        now = time.process_time()
        out = dict.fromkeys(CPU_KINDS, 0.0)
        for p in PHASES:
            out[KIND[p]] += self.cpu[p] - self._mark_phases[p]
        out["total"] = now - self._mark
        out["other"] = max(0.0, out["total"] - sum(v for k, v in out.items() if k not in ("other", "total")))
        self._mark, self._mark_phases = now, dict(self.cpu)
        return out

    def as_list(self) -> list[float]:
        return [self.seconds[p] for p in PHASES]

"""Per-phase wall-clock timers (MPI.Wtime): cheap enough to stay on, per rank, always."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from mpi4py import MPI

PHASES = ("client_compute", "server_compute", "p2p_wait", "aggregation", "eval", "idle")


DEVICE_PHASES = ("client_compute", "server_compute", "eval")  # the phases that queue GPU kernels


class Timers:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.sync = sync  # on a GPU: waits for its queued kernels (Job sets it)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; a device phase on a GPU is bracketed by syncs, so that its kernels count
        in it and not in whichever phase next waits for them."""
        sync = self.sync if name in DEVICE_PHASES else None
        if sync:
            sync()
        t0 = MPI.Wtime()
        try:
            yield
        finally:
            if sync:
                sync()
            self.seconds[name] += MPI.Wtime() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def as_list(self) -> list[float]:
        return [self.seconds[p] for p in PHASES]

"""Per-phase wall-clock timers (MPI.Wtime): cheap enough to stay on, per rank, always."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mpi4py import MPI

PHASES = ("client_compute", "server_compute", "p2p_wait", "aggregation", "eval", "idle")


class Timers:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = MPI.Wtime()
        try:
            yield
        finally:
            self.seconds[name] += MPI.Wtime() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def as_list(self) -> list[float]:
        return [self.seconds[p] for p in PHASES]

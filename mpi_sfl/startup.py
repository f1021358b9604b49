"""Where a rank's time to its first training step goes: a few timestamps, taken as it passes them.

    interpreter    process start -> mpi_sfl imported (Python, site, mpi4py's runner)
    imports        numpy and torch (before MPI starts: cli.skip_teardown)
    mpi_init       import mpi4py.MPI: the MPI library and MPI_Init_thread; then mpi_sfl's modules
    node           the ranks on this node (Split_type, Allreduce): the first collective, where the
                   ranks that imported faster wait for the others
    setup          config, layout, the model built and a dummy batch through it, out_dir checked
    setup_wait     ...the other ranks' set-up (allgather of errors)
    prepare        rank 0 finds or checks the data; then prepare_wait
    data           labels, partition, this rank's samples (or test set, or scratch); then data_wait
    communicators  the sub-communicators split (collective)
    build          this role's model copies and optimizers
    announce       ranks.tsv (a gather at rank 0)
    first_step     training starts -> its first step boundary (the first optimizer step, the
                   first messages and collectives, the stop agreement)

Each phase is the time from the previous mark, so they add up to the rank's time from process
start to its first step boundary. The round-end statistics carry them to rank 0 (job.STATS), which
writes the slowest rank of each role to summary.json["startup"] (`python -m benchmarks startup`
reads it). The process start is the kernel's (/proc/self/stat), to 10 ms; NaN where there is none.
"""
from __future__ import annotations

import os
import time

PHASES = ("interpreter", "imports", "mpi_init", "node", "setup", "setup_wait", "prepare", "prepare_wait", "data",
          "data_wait", "communicators", "build", "announce", "first_step")


def process_start() -> float:
    """When this process started, as a time.time() value (the kernel's start time, clock ticks since boot)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


STARTED = process_start()
_marks: dict[str, float] = {"interpreter": time.time()}  # this module is imported with mpi_sfl


def mark(phase: str) -> None:
    """`phase` ends now (the first time only: later calls cost a dict lookup)."""
    if phase not in _marks:
        _marks[phase] = time.time()


def timed(fn, phase: str):
    """`fn`, marking `phase` when it returns (the work of a collective set-up step, before its wait)."""
    def run():
        out = fn()
        mark(phase)
        return out
    return run


def seconds() -> list[float]:
    """Each phase's seconds, in PHASES order (NaN for a phase not reached)."""
    out, last = [], STARTED
    for p in PHASES:
        t = _marks.get(p)
        out.append(float("nan") if t is None else t - last)
        last = last if t is None else t
    return out


def summary(rows, roles: dict[int, str]) -> dict:
    """summary.json's "startup": per role, its slowest rank to the first step (rank, process start,
    phase seconds). `rows`: the gathered job.STATS rows of the first round this run trained."""
    import numpy as np

    out = {}
    for code, name in roles.items():
        ranks = np.flatnonzero(rows["role"] == code)
        if len(ranks):
            totals = np.nansum(rows["startup"][ranks], axis=1)
            r = int(ranks[int(np.argmax(totals))])
            out[name] = {"rank": r, "process_start": float(rows["started"][r]), "to_first_step": round(float(totals.max()), 4),
                         "seconds": {p: round(float(v), 4) for p, v in zip(PHASES, rows["startup"][r])}}
    return out

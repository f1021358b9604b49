"""The per-phase timers, in-process: phases nest without counting twice, and the CPU a rank burns
is split by kind with nothing lost (timing.py)."""
from __future__ import annotations

import threading
import time

import pytest

from mpi_sfl.timing import CPU_KINDS, Timers


def burn(seconds: float, clock=time.process_time) -> None:
    """Spend `seconds` of CPU (by `clock`), whatever else the machine runs."""
    end = clock() + seconds
    while clock() < end:
        pass


def test_nested_phases_count_once_and_the_rest_is_other():
    """A wait inside a compute phase counts as waiting, not twice; CPU in no phase is `other`; the
    kinds add up to the total. (Each phase burns a fixed amount of CPU: the figures are CPU seconds,
    not wall time, so a busy machine changes nothing but the slack for the timers' own calls.)"""
    t = Timers()
    t.cpu_window()
    t0 = time.perf_counter()
    with t.phase("client_compute"):
        burn(0.04)
        with t.phase("p2p_wait"):
            burn(0.02)
        burn(0.01)
    outer = time.perf_counter() - t0
    with t.phase("scratch_io"):
        burn(0.01)
    burn(0.03)  # in no phase
    w = t.cpu_window()
    slack = 0.005
    assert list(w) == list(CPU_KINDS)
    assert 0.05 <= w["compute"] < 0.05 + slack and 0.02 <= w["waiting"] < 0.02 + slack
    assert 0.01 <= w["scratch_io"] < 0.01 + slack and 0.03 <= w["other"] < 0.03 + slack
    assert w["total"] == pytest.approx(sum(v for k, v in w.items() if k != "total"))
    assert t.seconds["client_compute"] + t.seconds["p2p_wait"] <= outer + 1e-4  # wall time counted once too
    again = t.cpu_window()  # a new window: what the last one counted is not counted again
    assert again["compute"] == again["waiting"] == 0.0 and again["total"] < slack


def test_a_phase_in_another_thread_counts_that_threads_cpu():
    """The fed server evaluates in a thread while its main thread waits: with the per-thread clock
    each phase counts its own thread's CPU, and the two threads' open phases do not mix."""
    t = Timers()
    t.clock = time.thread_time
    t.cpu_window()
    started = threading.Event()

    def evaluate():
        with t.phase("eval"):
            started.set()
            burn(0.05, time.thread_time)

    worker = threading.Thread(target=evaluate)
    with t.phase("idle"):
        worker.start()
        started.wait()
        burn(0.02, time.thread_time)
        worker.join()
    w = t.cpu_window()
    assert 0.05 <= w["eval"] < 0.055 and 0.02 <= w["waiting"] < 0.025
    assert w["total"] >= 0.07

"""The tensor transport under a real 2-rank MPI job."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import mpiscript, ok


@pytest.mark.mpi
def test_round_trip_dtypes_shapes_and_transposed_views():
    proc = ok(mpiscript(2, Path(__file__).with_name("mpi_transport_check.py")))
    assert "OK 10" in proc.stdout


def test_polling_ranks_sleep_with_fine_timer_slack():
    """run.wait = poll: short sleeps end within 1 us of their time (Linux timer slack) instead of
    the default 50 us late; ranks that block in MPI keep the slack they had. "auto" polls where the
    node's ranks, the fed server included, outnumber its cores: `-n 3` on 2 cores polls (it spun
    when only the training ranks were counted, and ran 2.4x slower: the spinning ranks left the
    fed server, which takes part in every step's stop agreement, no core)."""
    import subprocess
    import sys

    # One interpreter (one torch import), and for each case a fork of it that has not set its slack yet.
    code = """if True:
        import os
        from mpi_sfl import transport
        for mode, ranks in (("poll", 1), ("auto", 3), ("spin", 3), ("auto", 2)):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                transport.set_wait_mode(mode, ranks, 2)
                os.write(w, open("/proc/self/timerslack_ns").read().strip().encode())
                os._exit(0)
            os.waitpid(pid, 0)
            print(mode, ranks, os.read(r, 64).decode())
        """
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           timeout=120).stdout.splitlines()
    after = {tuple(line.split()[:2]): line.split()[2] for line in lines}

    def slack_after(mode: str, ranks: int) -> str:  # on 2 cores
        return after[(mode, str(ranks))]

    inherited = Path("/proc/self/timerslack_ns").read_text().strip()
    assert slack_after("poll", 1) == slack_after("auto", 3) == "1000"
    assert slack_after("spin", 3) == slack_after("auto", 2) == inherited


def test_a_rank_holds_only_the_sends_its_peer_has_not_taken():
    """The split server's RAM must not grow with the batches in flight: what Transport holds for
    its sends is bounded by what the peer has not taken yet, plus REAP_BYTES and one payload of
    completed sends. In-process on COMM_SELF (the rank sends to itself), so completion is exact."""
    import torch
    from mpi4py import MPI

    from mpi_sfl.transport import ACT, OUT, REAP_BYTES, Transport

    t = Transport(MPI.COMM_SELF, torch.device("cpu"))
    x = torch.ones(1 << 18)  # 1 MiB of float32: a payload after its header, held until taken
    mib = x.nbytes
    for i in range(32):      # a step whose 32 sends nobody takes yet: all 32 are held
        t.isend(x, 0, ACT, 0, 0, i)
    assert t._held_bytes == 32 * mib
    for i in range(32):
        assert t.recv(0, ACT)[0].client == i
    t.wait_sends()
    assert t._held_bytes == 0
    for i in range(64):      # then steps whose sends are taken at once: they are let go at once
        t.isend(x, 0, ACT, 1, 0, i)
        assert t._held_bytes <= 2 * mib, f"send {i}: {t._held_bytes / mib:g} MiB held"
        t.recv(0, ACT)
    t.wait_sends()
    t.isend(x, 0, OUT, 2, 0, 0)  # one send nobody takes, then many that are taken: the completed
    for i in range(64):          # ones behind it are let go by the sweeps
        t.isend(x, 0, ACT, 2, 0, i)
        assert t._held_bytes <= mib + REAP_BYTES + mib, f"send {i}: {t._held_bytes / mib:g} MiB held"
        t.recv(0, ACT)
    t.recv(0, OUT)
    t.wait_sends()
    assert t._held_bytes == 0 and t.peak_held == 32 * mib  # the metrics' held_mb comes from it

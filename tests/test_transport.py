"""The tensor transport under a real 2-rank MPI job."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import mpiscript, ok


@pytest.mark.mpi
def test_round_trip_dtypes_shapes_and_transposed_views():
    proc = ok(mpiscript(2, Path(__file__).with_name("mpi_transport_check.py")))
    assert "OK 10" in proc.stdout


@pytest.mark.mpi
def test_a_rank_asleep_on_its_doorbell_is_woken_by_each_message_not_by_its_timeout():
    """Polling ranks sleep on a doorbell that the sender rings after posting a message (doorbell.py).
    A token goes round 3 ranks with payloads inline, at the inline limit, after the header and large
    (MPI takes those over two tests); each rank waits asleep. No wait may end by its timeout (5 s):
    that would be a ring missed, or a message MPI had not finished taking when the rank went back
    to sleep (without the re-tests after a ring, rank 0 timed out 9 times of 20). Control: with
    nobody ringing the waits do end by timeouts (50 ms there), and every message still arrives.
    Bursts: messages sent with their rings deferred (isend ring=False) are rung once per burst by
    the sender's next wait, before it sleeps itself."""
    import ast

    proc = ok(mpiscript(3, Path(__file__).with_name("mpi_doorbell_check.py")))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("OK"))
    rung = ast.literal_eval(line.split("rung=")[1].split(" silent=")[0])
    silent = ast.literal_eval(line.split("silent=")[1].split(" burst=")[0])
    burst = ast.literal_eval(line.split("burst=")[1])
    assert all(c["timeout"] == 0 for c in rung), rung
    # Bursts sent with ring=False: each rank's next wait rang its peer once per burst of 4 messages
    # (3 bursts), and nobody slept until a timeout for want of it.
    assert all(c["rang"] == 3 and c["timeout"] == 0 for c in burst), burst
    assert all(c["ring"] >= 1 for c in burst[1:]), burst
    assert all(c["ring"] >= 1 for c in rung[1:]), rung  # ranks 1, 2 waited ~3 ms for rank 0: asleep
    assert all(c["ring"] == 0 and c["timeout"] >= 1 for c in silent[1:]), silent


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
        from mpi_sfl import waiting
        for mode, ranks in (("poll", 1), ("auto", 3), ("spin", 3), ("auto", 2)):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                waiting.set_wait_mode(mode, ranks, 2)
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

"""The tensor transport under a real 2-rank MPI job."""
from __future__ import annotations

from pathlib import Path

from conftest import mpiscript, ok


def test_round_trip_dtypes_shapes_and_transposed_views():
    proc = ok(mpiscript(2, Path(__file__).with_name("mpi_transport_check.py")))
    assert "OK 10" in proc.stdout


def test_polling_ranks_sleep_with_fine_timer_slack():
    """run.wait = poll: short sleeps end within 1 us of their time (Linux timer slack) instead of
    the default 50 us late; ranks that block in MPI keep the slack they had."""
    import subprocess
    import sys

    def slack_after(mode: str, oversubscribed: bool) -> str:
        code = (f"from mpi_sfl import transport; transport.set_wait_mode({mode!r}, {oversubscribed}); "
                "print(open('/proc/self/timerslack_ns').read().strip())")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    inherited = Path("/proc/self/timerslack_ns").read_text().strip()
    assert slack_after("poll", False) == slack_after("auto", True) == "1000"
    assert slack_after("spin", True) == slack_after("auto", False) == inherited

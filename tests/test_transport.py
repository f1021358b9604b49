"""The tensor transport under a real 2-rank MPI job."""
from __future__ import annotations

from pathlib import Path

from conftest import mpiscript, ok


def test_round_trip_dtypes_shapes_and_transposed_views():
    proc = ok(mpiscript(2, Path(__file__).with_name("mpi_transport_check.py")))
    assert "OK 6" in proc.stdout

"""Start-up: no rank imports torch's compiler stack (torch._dynamo: about 1.2 s of CPU per process;
sympy), and summary.json says where each role's time to its first step went (mpi_sfl/startup.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import mpiscript, ok

from mpi_sfl import startup

pytestmark = pytest.mark.mpi  # it launches a job (conftest: the quick tier)


def test_no_compiler_imports_and_startup_phases(tmp_out):
    """Every rank of a run (fed server, split server, client ranks) and the baseline train without
    importing torch._dynamo or sympy: a plain torch.optim.SGD, or a tensor.backward(grad), would.
    eager.SGD's state_dict round trip keeps it so, and its steps equal torch.optim.SGD's bit for bit."""
    proc = ok(mpiscript(4, Path(__file__).with_name("mpi_startup_check.py"), str(tmp_out), timeout=120))
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LOADED "))
    rows = json.loads(line[len("LOADED "):])
    assert len(rows) == 4
    for rank, stages in enumerate(rows):
        assert stages["train"] == [], f"rank {rank} imported {stages['train']} by the end of training"
    assert rows[0]["baseline"] == [] and rows[0]["state_dict"] == [], rows[0]
    assert rows[0]["same_bits"] is True

    got = json.loads((tmp_out / "sfl" / "summary.json").read_text())["startup"]
    assert set(got) == {"fed_server", "split_server", "client", "trained_at", "finished_at"}
    for role in ("fed_server", "split_server", "client"):
        r = got[role]
        assert list(r["seconds"]) == list(startup.PHASES)
        # Run as a script, not through the cli: mpi_init and imports are not marked (null), the rest are.
        timed = {p: v for p, v in r["seconds"].items() if p not in ("mpi_init", "imports")}
        assert all(v is not None and math.isfinite(v) and v >= 0 for v in timed.values()), r
        assert r["to_first_step"] > 0 and r["process_start"] < got["trained_at"] <= got["finished_at"]
    assert got["fed_server"]["rank"] == 0 and got["split_server"]["rank"] == 1 and got["client"]["rank"] in (2, 3)


def test_no_rank_is_killed_by_a_faster_one_leaving(tmp_out):
    """`python -m mpi_sfl` ends through cli.exit_now (skipping the interpreter's teardown of torch).
    A rank that is slower to finish must not be killed by a faster one's exit: MPICH's launcher
    SIGKILLs every rank still running once one rank's PMI connection closes without its end being
    announced, which os._exit (with or without MPI_Finalize first) did; CI saw 'Killed (signal 9)'."""
    proc = ok(mpiscript(3, Path(__file__).with_name("mpi_exit_check.py"), str(tmp_out), timeout=60))
    assert sorted(p.name for p in tmp_out.iterdir()) == ["rank0", "rank1", "rank2"], proc.stdout[-2000:]
    assert "BAD TERMINATION" not in proc.stdout + proc.stderr

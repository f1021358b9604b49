"""The benchmark driver runs every suite end to end (at --tiny sizes) and reports every figure.

Timings are not asserted — they depend on the machine and its load — only that each suite writes
its JSON with the machine description, result rows, and every named summary field finite and > 0.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from conftest import launching, private_tmpdir
from mpi_sfl import launcher

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

REPO = Path(__file__).resolve().parents[1]

FIELDS = {
    "wire": ["wire_vs_raw_min_1mib", "wire_vs_pickle_1mib"],
    "aggregate": ["flat_vs_per_tensor", "flat_vs_pickle"],
    "throughput": ["sfl_vs_baseline_file", "sfl_vs_baseline_memory", "sfl_vs_baseline_graph", "sfl_vs_ddp"],
    "memory": ["growth_file", "growth_memory", "growth_graph", "mb_per_inflight_batch_graph"],
    "scaling": ["strong_efficiency", "weak_efficiency", "max_ranks"],
    "variants": ["baseline_final_accuracy_iid", "fl_final_accuracy_iid", "sl_final_accuracy_iid",
                 "v1_final_accuracy_iid", "v2_final_accuracy_iid", "sync_final_accuracy_iid",
                 "sl_seconds_over_sync_iid", "sync_vs_baseline_samples_per_s_iid"],
    "cpu": ["mlp_sfl_file_cpu_vs_1_thread", "mlp_sfl_graph_cpu_vs_1_thread", "mlp_sfl_file_vs_baseline_speed",
            "mlp_sfl_graph_vs_baseline_speed", "mlp_sfl_file_waiting_pct_max", "mlp_sfl_graph_waiting_pct_max"],
    "startup": ["job_wall_s", "import_wall_s", "to_first_step_s", "outputs_s", "exit_s"],
    "model": ["t_client_us_per_sample", "t_server_us_per_sample_file", "link_latency_us", "link_GBps",
              "check_median_abs_error", "projected_speedup_1024_s1", "projected_speedup_1024_s64"],
}
MACHINE = ("hostname", "cores", "python", "torch", "mpi4py", "mpi_library", "date")


@pytest.fixture(scope="module")
def suites(tmp_path_factory) -> Path:
    """`python -m benchmarks all --tiny` once for the module (model reads that run's wire and
    scaling): every suite's JSON and plot in the returned directory. A suite that fails is reported
    and the others still run; its test fails with the driver's output."""
    out = tmp_path_factory.mktemp("bench")
    with private_tmpdir(tmp_path_factory):
        # The driver's own environment is the caller's (it sets up its jobs' itself); `timeout` ends
        # a hung run with its whole process group, mpiexec and ranks included.
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        launching()
        proc = launcher.python(["-m", "benchmarks", "all", "--tiny", "--out-dir", str(out)], 600,
                               env=env, root=REPO, grace=0)
    (out / "driver.log").write_text(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
    return out


def bench(suites: Path, suite: str) -> dict:
    doc = suites / f"{suite}-tiny.json"
    assert doc.is_file(), f"no {doc.name}: {(suites / 'driver.log').read_text()[-6000:]}"
    assert f"{suite}: " in (suites / "driver.log").read_text()  # its table and summary were printed
    return json.loads(doc.read_text())


def check_doc(doc: dict, suite: str) -> None:
    assert doc["suite"] == suite and doc["level"] == "tiny"
    for key in MACHINE:
        assert doc["machine"].get(key), f"machine.{key} missing"
    assert doc["results"], "no result rows"
    for name in FIELDS[suite]:
        v = doc["summary"].get(name)
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{name} = {v!r}"
        # growth_* is peak RSS at the most batches in flight over that at one, minus 1: about 0 for
        # a flat state (the file state's goal), and RSS noise can make it slightly negative
        assert math.isfinite(v) and v > (-1 if name.startswith("growth_") else 0), f"{name} = {v}"


@pytest.mark.parametrize("suite", ["wire", "aggregate", "throughput", "memory", "variants"])
def test_suite(suite, suites):
    doc = bench(suites, suite)
    check_doc(doc, suite)
    if suite == "aggregate":  # every variant computed the right average
        assert all(r["max_abs_error"] < 1e-4 for r in doc["results"])
    if suite == "variants":  # every method ran, measured bytes sit beside the paper's formula, a plot
        assert [r["method"] for r in doc["results"]] == ["baseline", "fl", "sl", "v1", "v2", "sync"]
        split = [r for r in doc["results"] if r["method"] in ("sl", "v1", "v2", "sync")]
        assert all(r["MB_total_per_round"] > 0 and r["paper_MB_per_round"] > 0 for r in split)
        assert Path(doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attacks(suites):
    """Every aggregator ran against the attackers, beside the run without them."""
    doc = bench(suites, "attacks")
    assert doc["suite"] == "attacks" and doc["level"] == "tiny"
    assert [r["aggregator"] for r in doc["results"]] == ["mean, no attackers", "mean", "median", "trimmed-mean",
                                                         "krum", "multi-krum"]
    assert [r["attackers"] for r in doc["results"]] == [0] + [2] * 5
    assert all(0 <= v <= 1 for v in doc["summary"].values())
    assert all(r["aggregation_s_per_round"] > 0 for r in doc["results"])


def test_noise(suites):
    """Each noise level trained and had its leakage measured; the plot is written."""
    doc = bench(suites, "noise")
    assert [r["noise_std"] for r in doc["results"]] == [0.0, 4.0]
    assert all(0 <= r["distance_correlation"] <= 1 and 0 <= r["final_accuracy"] <= 1 for r in doc["results"])
    assert doc["results"][1]["distance_correlation"] < doc["results"][0]["distance_correlation"]
    assert Path(doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clients(suites):
    """Hosting more clients measured beside 10, with the copies bounded by the sampled ones; each
    aggregator timed with every client voting."""
    doc = bench(suites, "clients")
    host, tog = doc["results"]["hosting"], doc["results"]["together"]
    assert [r["clients"] for r in host] == [10, 60] and host[0]["ms_per_hosted_client"] == 0.0
    assert all(1 <= r["working_copies"] <= 10 and r["setup_s"] > 0 and r["round_s"] > 0 for r in host)
    assert [r["aggregator"] for r in tog] == ["mean", "median"] and all(r["aggregation_s"] > 0 for r in tog)
    assert doc["results"]["accuracy"] == [] and doc["summary"]["hosted_clients_max"] == 60


def test_precision(suites):
    """Every wire format trained; the narrowed ones send fewer bytes, int8 the fewest."""
    doc = bench(suites, "precision")
    rows = {r["wire_dtype"]: r for r in doc["results"]}
    assert list(rows) == ["float32", "float16", "bfloat16", "int8"] and rows["float32"]["bytes_vs_float32"] == 1.0
    assert 0.4 < rows["float16"]["bytes_vs_float32"] < 0.6 and 0.4 < rows["bfloat16"]["bytes_vs_float32"] < 0.6
    assert 0.2 < rows["int8"]["bytes_vs_float32"] < 0.35
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())


def test_step(suites):
    """Each piece of the step timed; the step measured in every state mode and the baseline."""
    doc = bench(suites, "step")
    (row,) = doc["results"]
    assert row["model"] == "mlp" and row["h_bytes"] == row["z_bytes"] == 64 * 64 * 4
    pieces = [k for k in row if k.endswith("_us") and not k.startswith(("step_", "baseline", "other"))]
    assert len(pieces) == 10 and all(row[k] > 0 for k in pieces)
    assert all(row[f"step_{m}_us"] > 0 for m in ("file", "memory", "graph")) and row["baseline_us"] > 0
    assert row["other_us"] == pytest.approx(row["step_file_us"] - sum(row[k] for k in pieces if k != "memory_state_copy_us"))


def test_batching(suites):
    """Every batching mode ran against the baseline, with one server pass per group."""
    doc = bench(suites, "batching")
    rows = {r["run"]: r for r in doc["results"]}
    assert list(rows) == ["off", "rank", "step", "baseline"] and all(r["samples_per_s"] > 0 for r in rows.values())
    steps = 256 // 2 // 64  # 2 clients of 128 samples (one per client rank), batch 64
    assert [rows[m]["server_passes_per_round"] for m in ("off", "rank", "step")] == [2 * steps, 2 * steps, steps]
    assert all(math.isfinite(v) and v > 0 for v in doc["summary"].values())


def test_cpu(suites):
    """Each run's own CPU accounting, side by side: SFL's CPU per sample by role and kind adds up
    to its summary's figure; each role's waiting share of its ranks' time is a percentage."""
    doc = bench(suites, "cpu")
    check_doc(doc, "cpu")
    runs = {r["run"]: r for r in doc["results"]["runs"]}
    assert set(runs) == {"sfl_file", "sfl_graph", "baseline", "baseline_1t"}
    assert runs["baseline_1t"]["cpu_vs_1_thread"] == 1.0
    for state in ("file", "graph"):
        parts = [p for p in doc["results"]["breakdown"] if p["state"] == state]
        assert {p["role"] for p in parts} == {"fed_server", "split_server", "client"}
        assert sum(p["total"] for p in parts) == pytest.approx(runs[f"sfl_{state}"]["cpu_us_per_sample"], rel=1e-3)
        split = next(p for p in parts if p["role"] == "split_server")
        assert split["compute"] > 0 and (split["scratch_io"] > 0) == (state == "file")
        waits = {w["role"]: w["waiting_pct"] for w in doc["results"]["waiting"] if w["state"] == state}
        assert set(waits) == {"fed_server", "split_server", "client"} and all(0 <= w < 100 for w in waits.values())
        assert max(waits.values()) == doc["summary"][f"mlp_sfl_{state}_waiting_pct_max"]


def test_startup(suites):
    """The tiny job timed beside the bare import; every role's phases, read from the run itself."""
    doc = bench(suites, "startup")
    check_doc(doc, "startup")
    assert [r["run"] for r in doc["results"]["walls"]] == ["import", "job"]
    phases = {r["role"]: r for r in doc["results"]["phases"]}
    assert list(phases) == ["fed_server", "split_server", "client"]
    for r in phases.values():  # every phase measured (through the cli: mpi_init and imports too)
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("interpreter", "imports", "mpi_init", "setup",
                                                               "data", "build", "first_step")), r
        assert r["to_first_step"] > r["imports"]


def test_scaling_then_model(suites):
    """Scaling writes its plot; the cost model checks itself against that scaling run."""
    scaling = bench(suites, "scaling")
    check_doc(scaling, "scaling")
    png = Path(scaling["plot"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = {(r["kind"], r["client_ranks"]) for r in scaling["results"]}
    assert kinds == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    model = bench(suites, "model")
    check_doc(model, "model")
    assert len(model["results"]["check"]) == len(scaling["results"])
    assert {r["clients"] for r in model["results"]["projection"]} == {2 ** i for i in range(11)}


def processes_under(folder: Path) -> list[str]:
    """The command lines of running processes that name `folder` (a warm launch's ranks do)."""
    found = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmd:
            found.append(cmd)
    return found


@pytest.mark.quick
def test_a_warm_launch_ends_when_its_owner_dies(tmp_path):
    """A driver that dies without closing its warm launch (here: os._exit after one job) leaves no
    ranks behind: idle ranks look for their owner about once a second and stop when it is gone.
    (Without that look they polled for ever: every test session left two launches behind.)"""
    code = ("import os, sys\nfrom benchmarks._warm import Warm\nw = Warm(2)\n"
            "done = w.run(['train', '--help'], 60)\nprint(w.folder, done.returncode, flush=True)\nos._exit(0)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    launching()
    proc = launcher.python(["-c", code], 120, env=env, root=REPO, grace=0)
    folder, rc = proc.stdout.split()
    assert proc.returncode == 0 and rc == "0", proc.stderr[-3000:]
    t0 = time.monotonic()
    while processes_under(Path(folder)) and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    assert not processes_under(Path(folder)), processes_under(Path(folder))


@pytest.mark.quick
def test_gpu_check_dry_run_on_the_cpu(tmp_path_factory):
    """benchmarks/gpu_check.py --device cpu --quick: every section runs and says so in its JSON
    (on a GPU machine the same script is the measurement; here only its machinery)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    with private_tmpdir(tmp_path_factory) as tmp:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        launching()
        proc = launcher.python(["-m", "benchmarks.gpu_check", "--device", "cpu", "--quick", "--out", str(out)], 300,
                               env=env, root=REPO, grace=0)
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not processes_under(tmp), "gpu_check left warm launches running"
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["failed"] == [] and doc["finished"]
    assert set(doc["inprocess"]) == {"batchnorm_average", "placeholder_optimizer", "int8_wire_bits", "numerics"}
    assert all(r["ok"] for section in ("inprocess", "exact", "repro") for r in doc[section].values())
    assert doc["exact"]["mlp-int8"]["diff"] < doc["exact"]["mlp-int8"]["bound"]
    assert doc["repro"]["rerun"]["diff"] == doc["repro"]["resume"]["diff"] == 0.0
    assert {"baseline", "sfl_memory", "sfl_file"} <= set(doc["speed"]) and doc["speed"]["baseline"]["samples_per_s"] > 0
    assert doc["speed"]["ratios"]["sfl_file_vs_baseline"] > 0

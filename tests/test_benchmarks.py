"""The benchmark driver runs every suite end to end (at --tiny sizes) and reports every figure.

Timings are not asserted — they depend on the machine and its load — only that each suite writes
its JSON with the machine description, result rows, and every named summary field finite and > 0.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

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
    "startup": ["job_wall_s", "import_wall_s", "to_first_step_s", "outputs_s", "exit_s"],
    "model": ["t_client_us_per_sample", "t_server_us_per_sample_file", "link_latency_us", "link_GBps",
              "check_median_abs_error", "projected_speedup_1024_s1", "projected_speedup_1024_s64"],
}
MACHINE = ("hostname", "cores", "python", "torch", "mpi4py", "mpi_library", "date")


def bench(suite: str, out: Path, *extra: str, timeout: float = 240) -> dict:
    # The driver's own environment is the caller's (it sets up its jobs' itself); `timeout` ends a
    # hung suite with its whole process group, mpiexec and ranks included.
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = launcher.python(["-m", "benchmarks", suite, "--tiny", "--out", str(out), *extra], timeout,
                           env=env, root=REPO, grace=0)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    assert "summary:" in proc.stdout  # the readable table and summary were printed
    return json.loads(out.read_text())


def check_doc(doc: dict, suite: str) -> None:
    assert doc["suite"] == suite and doc["level"] == "tiny"
    for key in MACHINE:
        assert doc["machine"].get(key), f"machine.{key} missing"
    assert doc["results"], "no result rows"
    for name in FIELDS[suite]:
        v = doc["summary"].get(name)
        assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{name} = {v!r}"
        assert math.isfinite(v) and v > 0, f"{name} = {v}"


@pytest.mark.parametrize("suite", ["wire", "aggregate", "throughput", "memory", "variants"])
def test_suite(suite, tmp_path):
    doc = bench(suite, tmp_path / f"{suite}.json")
    check_doc(doc, suite)
    if suite == "aggregate":  # every variant computed the right average
        assert all(r["max_abs_error"] < 1e-4 for r in doc["results"])
    if suite == "variants":  # every method ran, measured bytes sit beside the paper's formula, a plot
        assert [r["method"] for r in doc["results"]] == ["baseline", "fl", "sl", "v1", "v2", "sync"]
        split = [r for r in doc["results"] if r["method"] in ("sl", "v1", "v2", "sync")]
        assert all(r["MB_total_per_round"] > 0 and r["paper_MB_per_round"] > 0 for r in split)
        assert Path(doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attacks(tmp_path):
    """Every aggregator ran against the attackers, beside the run without them."""
    doc = bench("attacks", tmp_path / "attacks.json")
    assert doc["suite"] == "attacks" and doc["level"] == "tiny"
    assert [r["aggregator"] for r in doc["results"]] == ["mean, no attackers", "mean", "median", "trimmed-mean",
                                                         "krum", "multi-krum"]
    assert [r["attackers"] for r in doc["results"]] == [0] + [2] * 5
    assert all(0 <= v <= 1 for v in doc["summary"].values())
    assert all(r["aggregation_s_per_round"] > 0 for r in doc["results"])


def test_noise(tmp_path):
    """Each noise level trained and had its leakage measured; the plot is written."""
    doc = bench("noise", tmp_path / "noise.json")
    assert [r["noise_std"] for r in doc["results"]] == [0.0, 4.0]
    assert all(0 <= r["distance_correlation"] <= 1 and 0 <= r["final_accuracy"] <= 1 for r in doc["results"])
    assert doc["results"][1]["distance_correlation"] < doc["results"][0]["distance_correlation"]
    assert Path(doc["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clients(tmp_path):
    """Hosting more clients measured beside 10, with the copies bounded by the sampled ones; each
    aggregator timed with every client voting."""
    doc = bench("clients", tmp_path / "clients.json")
    host, tog = doc["results"]["hosting"], doc["results"]["together"]
    assert [r["clients"] for r in host] == [10, 60] and host[0]["ms_per_hosted_client"] == 0.0
    assert all(1 <= r["working_copies"] <= 10 and r["setup_s"] > 0 and r["round_s"] > 0 for r in host)
    assert [r["aggregator"] for r in tog] == ["mean", "median"] and all(r["aggregation_s"] > 0 for r in tog)
    assert doc["results"]["accuracy"] == [] and doc["summary"]["hosted_clients_max"] == 60


def test_precision(tmp_path):
    """Every wire format trained; the narrowed ones send fewer bytes, int8 the fewest."""
    doc = bench("precision", tmp_path / "precision.json")
    rows = {r["wire_dtype"]: r for r in doc["results"]}
    assert list(rows) == ["float32", "float16", "bfloat16", "int8"] and rows["float32"]["bytes_vs_float32"] == 1.0
    assert 0.4 < rows["float16"]["bytes_vs_float32"] < 0.6 and 0.4 < rows["bfloat16"]["bytes_vs_float32"] < 0.6
    assert 0.2 < rows["int8"]["bytes_vs_float32"] < 0.35
    assert all(0 <= r["test_accuracy"] <= 1 for r in rows.values())


def test_step(tmp_path):
    """Each piece of the step timed; the step measured in every state mode and the baseline."""
    doc = bench("step", tmp_path / "step.json")
    (row,) = doc["results"]
    assert row["model"] == "mlp" and row["h_bytes"] == row["z_bytes"] == 64 * 64 * 4
    pieces = [k for k in row if k.endswith("_us") and not k.startswith(("step_", "baseline", "other"))]
    assert len(pieces) == 10 and all(row[k] > 0 for k in pieces)
    assert all(row[f"step_{m}_us"] > 0 for m in ("file", "memory", "graph")) and row["baseline_us"] > 0
    assert row["other_us"] == pytest.approx(row["step_file_us"] - sum(row[k] for k in pieces if k != "memory_state_copy_us"))


def test_batching(tmp_path):
    """Every batching mode ran against the baseline, with one server pass per group."""
    doc = bench("batching", tmp_path / "batching.json")
    rows = {r["run"]: r for r in doc["results"]}
    assert list(rows) == ["off", "rank", "step", "baseline"] and all(r["samples_per_s"] > 0 for r in rows.values())
    steps = 256 // 2 // 64  # 2 clients of 128 samples (one per client rank), batch 64
    assert [rows[m]["server_passes_per_round"] for m in ("off", "rank", "step")] == [2 * steps, 2 * steps, steps]
    assert all(math.isfinite(v) and v > 0 for v in doc["summary"].values())


def test_startup(tmp_path):
    """The tiny job timed beside the bare import; every role's phases, read from the run itself."""
    doc = bench("startup", tmp_path / "startup.json")
    check_doc(doc, "startup")
    assert [r["run"] for r in doc["results"]["walls"]] == ["import", "job"]
    phases = {r["role"]: r for r in doc["results"]["phases"]}
    assert list(phases) == ["fed_server", "split_server", "client"]
    for r in phases.values():  # every phase measured (through the cli: mpi_init and imports too)
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("interpreter", "imports", "mpi_init", "setup",
                                                               "data", "build", "first_step")), r
        assert r["to_first_step"] > r["imports"]


def test_scaling_then_model(tmp_path):
    """Scaling writes its plot; the cost model checks itself against that scaling run."""
    scaling = bench("scaling", tmp_path / "scaling.json")
    check_doc(scaling, "scaling")
    png = Path(scaling["plot"])
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = {(r["kind"], r["client_ranks"]) for r in scaling["results"]}
    assert kinds == {("strong", 1), ("strong", 2), ("weak", 1), ("weak", 2)}
    model = bench("model", tmp_path / "model.json", "--scaling", str(tmp_path / "scaling.json"))
    check_doc(model, "model")
    assert len(model["results"]["check"]) == len(scaling["results"])
    assert {r["clients"] for r in model["results"]["projection"]} == {2 ** i for i in range(11)}

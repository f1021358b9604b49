"""aggregate suite: flat-buffer FedAvg (mpi_sfl Aggregator) vs per-tensor vs pickled collectives (4 ranks).

The measurement runs in the MPI worker benchmarks/_aggregate.py; this module sets its sizes per
level, takes medians and ratios, and makes the table.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common
from benchmarks.common import cores, median, table

LEVELS = {
    "full": {"params": [100_000, 1_000_000, 10_000_000, 50_000_000], "reps": 5, "ranks": 4},
    "quick": {"params": [100_000, 1_000_000, 4_000_000], "reps": 3, "ranks": 4},
    "tiny": {"params": [100_000, 1_000_000], "reps": 2, "ranks": 4},
}
VARIANTS = ("flat", "flat_blocking", "per_tensor", "per_tensor_blocking", "pickle")


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    out = work / "aggregate-raw.json"
    common.mpi(s["ranks"], ["-m", "benchmarks._aggregate", "--params", ",".join(map(str, s["params"])),
                            "--reps", str(s["reps"]), "--out", str(out)], limit=600)
    rows = []
    for r in json.loads(out.read_text())["results"]:
        med = {v: median(ts) for v, ts in r["seconds"].items()}
        row = {"mode": r["mode"], "params": r["params"], "tensors": r["tensors"], "ranks": r["ranks"],
               "MB": (r["params"] + 1) * 4 / 1e6}
        row.update({f"{v}_ms": med[v] * 1e3 for v in VARIANTS})
        # like against like: the same waiting (polite nonblocking, as training uses it) ...
        row["flat_vs_per_tensor"] = med["per_tensor"] / med["flat"]
        # ... and both blocking (spinning), for reference
        row["blocking_flat_vs_per_tensor"] = med["per_tensor_blocking"] / med["flat_blocking"]
        row["flat_vs_pickle"] = med["pickle"] / med["flat"]
        row["flat_vs_flat_blocking"] = med["flat_blocking"] / med["flat"]
        row["max_abs_error"] = max(r["max_abs_error"].values())
        rows.append(row)
    largest = [r for r in rows if r["params"] == max(x["params"] for x in rows)]
    summary = {
        "flat_vs_per_tensor": min(r["flat_vs_per_tensor"] for r in largest),
        "blocking_flat_vs_per_tensor": min(r["blocking_flat_vs_per_tensor"] for r in largest),
        "flat_vs_pickle": min(r["flat_vs_pickle"] for r in largest),
        "largest_params": largest[0]["params"],
        "flat_ms_largest_centralized": next(r["flat_ms"] for r in largest if r["mode"] == "centralized"),
        "flat_ms_largest_decentralized": next(r["flat_ms"] for r in largest if r["mode"] == "decentralized"),
        "flat_vs_one_blocking_largest": min(r["flat_vs_flat_blocking"] for r in largest),
    }
    notes = [f"{s['ranks']} ranks: centralized = rank 0 fed server + {s['ranks'] - 1} clients "
             f"(Ireduce + Ibcast); decentralized = {s['ranks']} clients (Iallreduce).",
             "flat = mpi_sfl Aggregator (one flat buffer, as 8 MiB slices posted together); per_tensor = one nonblocking collective per tensor (posted "
             "together, one polite wait); per_tensor_blocking = blocking collectives one by one; "
             "pickle = lowercase reduce+bcast / allreduce of the tensor list; flat_blocking (the whole "
             "flat buffer in one blocking collective) is for reference. "
             "Tensor lists are ResNet-like (3 tensors per conv; 62 tensors at 10M params, 161 at 50M). "
             "Time = slowest rank, median.",
             "flat_vs_per_tensor compares like with like: flat and per_tensor both nonblocking with "
             "polite waits (as training waits); blocking_flat_vs_per_tensor compares the two blocking "
             "variants. Summary figures are the lower of the two modes at the largest model.",
             "max_abs_error: every variant's result against the exact average (float32)."]
    if s["ranks"] > cores():
        notes.append(f"{s['ranks']} ranks on {cores()} cores: oversubscribed; blocking variants spin.")
    text = table(rows, ["mode", "params", "tensors", "flat_ms", "flat_blocking_ms", "per_tensor_ms",
                        "per_tensor_blocking_ms", "pickle_ms", "flat_vs_per_tensor", "blocking_flat_vs_per_tensor",
                        "flat_vs_pickle"],
                 "aggregate: client-side FedAvg, medians")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

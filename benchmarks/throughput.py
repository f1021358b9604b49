"""throughput suite: SFL samples/s (file/memory/graph state) vs `mpi_sfl baseline` and vs torch DDP (gloo).

DDP runs in the MPI worker benchmarks/_ddp.py.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common
from benchmarks.common import STATES, SYNTH, cores, median, table

LEVELS = {
    "full": {"client_ranks": 2, "batch": 32, "train_samples": 4096, "rounds": 3, "repeats": 2},
    "quick": {"client_ranks": 2, "batch": 32, "train_samples": 768, "rounds": 2, "repeats": 1},
    "tiny": {"client_ranks": 2, "batch": 32, "train_samples": 256, "rounds": 1, "repeats": 1},
}
def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    ranks = s["client_ranks"] + 2
    cfg = {**SYNTH, **common.model_settings(args), "data.train_samples": s["train_samples"], "train.rounds": s["rounds"],
           "train.batch_size": s["batch"], "train.clients": s["client_ranks"]}
    variants = [*STATES, "baseline", "baseline_1t", "ddp"]
    samples: dict[str, list[float]] = {k: [] for k in variants}
    extra: dict[str, dict] = {}
    for rep in range(s["repeats"]):
        k = rep % len(variants)
        order = variants[k:] + variants[:k]  # rotate so no variant is always first
        for v in order:
            d = work / f"tp-{v}-{rep}"
            if v in STATES:
                res = common.train(ranks, {**cfg, "sfl.state": v}, d)
                samples[v].append(res["summary"]["train_samples_per_s"])
            elif v.startswith("baseline"):
                res = common.baseline({**cfg, "run.threads": 1} if v == "baseline_1t" else cfg, d)
                samples[v].append(res["summary"]["train_samples_per_s"])
            else:
                out = work / f"ddp-{rep}.json"
                # the same global batch per step as SFL and the baseline, split over the DDP ranks
                ddp_cfg = {**cfg, "train.batch_size": max(1, s["client_ranks"] * s["batch"] // ranks)}
                common.mpi(ranks, ["-m", "benchmarks._ddp", *common.sets(ddp_cfg), "--out", str(out)])
                res = json.loads(out.read_text())
                samples[v].append(res["train_samples_per_s"])
                extra["ddp"] = res
    # The reference is the faster baseline: all cores (mpi_sfl's default threads) or one thread
    # (multi-threaded torch can collapse when other processes load the cores).
    base = max(median(samples["baseline"]), median(samples["baseline_1t"]))
    rows = []
    for v, xs in samples.items():
        sps = median(xs)
        if v in STATES:
            desc, procs, glob = f"SFL sync, state={v}", ranks, s["client_ranks"] * s["batch"]
        elif v.startswith("baseline"):
            threads = 1 if v == "baseline_1t" else cores()
            desc, procs, glob = (f"mpi_sfl baseline (1 process, unsplit, {threads} thread{'s' * (threads > 1)})",
                                 1, s["client_ranks"] * s["batch"])
        else:
            desc, procs, glob = ("torch DDP over gloo (unsplit)", ranks,
                                 ranks * max(1, s["client_ranks"] * s["batch"] // ranks))
        rows.append({"variant": v, "what": desc, "processes": procs, "batch_per_step": glob,
                     "samples_per_s": sps, "vs_baseline": sps / base, "runs": len(xs)})
    by = {r["variant"]: r["samples_per_s"] for r in rows}
    summary = {f"sfl_vs_baseline_{m}": by[m] / base for m in STATES}
    summary["sfl_vs_ddp"] = by["file"] / by["ddp"]
    summary["baseline_samples_per_s"] = base
    summary["baseline_threads"] = cores() if by["baseline"] >= by["baseline_1t"] else 1
    notes = [f"SFL: 1 fed server + 1 split server + {s['client_ranks']} client ranks ({ranks} processes), "
             f"{s['client_ranks']} logical clients x batch {s['batch']}; baseline: one process, the "
             f"concatenated batch of {s['client_ranks'] * s['batch']}; DDP: {ranks} processes x batch "
             f"{max(1, s['client_ranks'] * s['batch'] // ranks)} (the same global batch per step).",
             "samples/s = training samples x rounds / training seconds (summary.json; eval excluded, "
             "first round included), median over repeats. Threads: mpi_sfl's rule (cores / ranks on "
             "the node, at least 1) for SFL and DDP; the baseline runs with all cores and with one "
             "thread, and vs_baseline divides by the faster of the two.",
             f"Synthetic {'x'.join(map(str, cfg.get('data.shape', [1, 28, 28])))} data, model {cfg['model.name']}, "
             f"{s['train_samples']} samples, {s['rounds']} round(s)."]
    if ranks > cores():
        notes.append(f"{ranks} processes on {cores()} cores: SFL and DDP are oversubscribed; the "
                     "baseline is not.")
    if by["baseline"] < 0.5 * by["baseline_1t"]:
        notes.append(f"The {cores()}-thread baseline ran {by['baseline_1t'] / by['baseline']:.0f}x slower than "
                     "the 1-thread one: multi-threaded torch collapses when other processes load the cores "
                     "(see machine.load_avg_1m).")
    text = table(rows, ["variant", "what", "processes", "batch_per_step", "samples_per_s", "vs_baseline"],
                 "throughput: training samples/s")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

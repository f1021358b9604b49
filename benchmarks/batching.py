"""batching suite: sync with the split server running groups of client batches as one batch
(sfl.batch_clients = "rank": a client rank's; "step": the whole step's) against one at a time
("off"), all against `mpi-sfl baseline`.

For each job (lenet5, whose server part has neither dropout nor BatchNorm): label-sharing and
U-shaped with 2 client ranks of one logical client each, batch 64 (the lenet5 label-sharing speed
target), and U-shaped with 8 logical clients of batch 16 on the 2 client ranks. The three modes of a
repeat and the baselines run one after another, rotated between repeats; samples/s is each run's
training samples per training second (summary.json), median over repeats. The baseline is the
faster of its all-cores and 1-thread runs (as the throughput suite).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import SYNTH, median, table

JOBS = {  # name: (split, logical clients, batch)
    "label-sharing-2x64": ("label-sharing", 2, 64),
    "u-2x64": ("u", 2, 64),
    "u-8x16": ("u", 8, 16),
}
LEVELS = {
    "full": {"jobs": list(JOBS), "train_samples": 8192, "rounds": 2, "repeats": 3},
    "quick": {"jobs": ["label-sharing-2x64", "u-8x16"], "train_samples": 1024, "rounds": 2, "repeats": 1},
    "tiny": {"jobs": ["label-sharing-2x64"], "train_samples": 256, "rounds": 1, "repeats": 1},
}


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    rows, summary = [], {}
    for job in s["jobs"]:
        split, clients, batch = JOBS[job]
        cfg = {**SYNTH, "model.name": "lenet5", "model.split": split, "train.clients": clients,
               "train.batch_size": batch, "data.train_samples": s["train_samples"], "train.rounds": s["rounds"]}
        runs = ["off", "rank", "step", "baseline", "baseline_1t"]
        sps: dict[str, list[float]] = {r: [] for r in runs}
        passes: dict[str, int] = {}
        for rep in range(s["repeats"]):
            k = rep % len(runs)
            for r in runs[k:] + runs[:k]:
                d = work / f"{job}-{r}-{rep}"
                if r.startswith("baseline"):
                    res = common.baseline({**cfg, "run.threads": 1} if r == "baseline_1t" else cfg, d)
                else:
                    res = common.train(4, {**cfg, "sfl.batch_clients": r}, d)
                    passes[r] = res["metrics"][-1]["server_passes"]
                sps[r].append(res["summary"]["train_samples_per_s"])
        base = max(median(sps["baseline"]), median(sps["baseline_1t"]))
        for r in ("off", "rank", "step"):
            rows.append({"job": job, "run": r, "samples_per_s": median(sps[r]), "vs_baseline": median(sps[r]) / base,
                         "server_passes_per_round": passes[r], "runs": len(sps[r]), "each_run": sps[r]})
        rows.append({"job": job, "run": "baseline", "samples_per_s": base, "vs_baseline": 1.0,
                     "server_passes_per_round": 0, "runs": len(sps["baseline"]),
                     "each_run": sps["baseline"] if base == median(sps["baseline"]) else sps["baseline_1t"]})
        key = job.replace("-", "_")
        for r in ("off", "rank", "step"):
            summary[f"{r}_vs_baseline_{key}"] = median(sps[r]) / base
        for r in ("rank", "step"):
            summary[f"{r}_vs_off_{key}"] = median(sps[r]) / median(sps["off"])
    notes = ["4 processes (fed server, split server, 2 client ranks) on "
             f"{common.cores()} cores; synthetic 1x28x28 data, lenet5, {s['train_samples']} samples, "
             f"{s['rounds']} round(s), first round included; median of {s['repeats']} repeat(s).",
             "server_passes_per_round: the split server's forward passes in the last round "
             "(metrics.jsonl server_passes): one per group batched, one per client batch with batching off."]
    text = table(rows, ["job", "run", "samples_per_s", "vs_baseline", "server_passes_per_round"],
                 "batching: samples/s, the split server batching a rank's or a step's clients, or not")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

"""cpu suite: where each rank's CPU goes, SFL against the single-process baseline.

For mlp, lenet5 and cnn on the default job's shape (`-n 4`: fed server, split server, 2 client
ranks, 4 logical clients, batch 32): SFL with the file state and the graph state, and `mpi-sfl
baseline` with all cores and with one thread, run one after another (the order rotated per
model). Every run's own CPU accounting (timing.py: user + system seconds, metrics.jsonl
`cpu_seconds`, summary.json `cpu_seconds_per_sample`) gives the figures: CPU per sample against the
one-thread baseline's, samples/s against the all-core baseline's, and SFL's CPU per sample by role
and kind (compute, scratch_io, other, waiting, aggregation, eval), and each role's waiting as a share
of its ranks' wall time (the target: at most 5 % when ranks outnumber cores).
"""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from benchmarks import common
from benchmarks.common import SYNTH, cores, table
from mpi_sfl.timing import CPU_KINDS

LEVELS = {
    "full": {"models": ["mlp", "lenet5", "cnn"], "train_samples": 16000, "rounds": 2},
    "quick": {"models": ["mlp", "lenet5", "cnn"], "train_samples": 1280, "rounds": 1},
    "tiny": {"models": ["mlp"], "train_samples": 256, "rounds": 1},
}
RUNS = ("sfl_file", "sfl_graph", "baseline", "baseline_1t")


def per_sample_us(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """Each role's CPU microseconds per sample trained, by kind, over every round of a run."""
    samples = sum(r["samples"] for r in metrics)
    out: dict[str, dict[str, float]] = {}
    for r in metrics:
        for role, kinds in r["cpu_seconds"].items():
            mine = out.setdefault(role, dict.fromkeys(CPU_KINDS, 0.0))
            for k, v in kinds.items():
                mine[k] += v * 1e6 / samples
    return out


def waiting_pct(metrics: list[dict], out_dir: Path) -> dict[str, float]:
    """Each role's waiting CPU as a percentage of its ranks' training time (the rounds' `seconds`
    times the role's ranks in ranks.tsv): what waiting costs one rank of that role."""
    with open(out_dir / "ranks.tsv") as f:
        ranks = Counter(row["role"] for row in csv.DictReader(f, delimiter="\t"))
    wall = sum(r["seconds"] for r in metrics)
    return {role: 100 * sum(r["cpu_seconds"][role]["waiting"] for r in metrics) / (wall * ranks[role])
            for role in metrics[0]["cpu_seconds"]}


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    rows, parts, waits, summary = [], [], [], {}
    for i, model in enumerate(s["models"]):
        cfg = {**SYNTH, "model.name": model, "data.train_samples": s["train_samples"], "train.rounds": s["rounds"],
               "train.batch_size": 32, "train.clients": 4}
        got = {}
        for name in RUNS[i % len(RUNS):] + RUNS[:i % len(RUNS)]:
            out = work / f"cpu-{model}-{name}"
            if name.startswith("sfl"):
                res = common.train(4, {**cfg, "sfl.state": name[4:]}, out)
            else:
                res = common.baseline({**cfg, "run.threads": 1} if name == "baseline_1t" else cfg, out)
            got[name] = res
        one = got["baseline_1t"]["summary"]["cpu_seconds_per_sample"]
        fast = got["baseline"]["summary"]["train_samples_per_s"]
        for name in RUNS:
            sm = got[name]["summary"]
            rows.append({"model": model, "run": name, "samples_per_s": sm["train_samples_per_s"],
                         "vs_baseline_speed": sm["train_samples_per_s"] / fast,
                         "cpu_us_per_sample": sm["cpu_seconds_per_sample"] * 1e6,
                         "cpu_vs_1_thread": sm["cpu_seconds_per_sample"] / one})
            if name.startswith("sfl"):
                for role, kinds in per_sample_us(got[name]["metrics"]).items():
                    parts.append({"model": model, "state": name[4:], "role": role, **kinds})
                shares = waiting_pct(got[name]["metrics"], work / f"cpu-{model}-{name}")
                waits += [{"model": model, "state": name[4:], "role": role, "waiting_pct": pct}
                          for role, pct in shares.items()]
                summary[f"{model}_{name}_waiting_pct_max"] = max(shares.values())
                summary[f"{model}_{name}_cpu_vs_1_thread"] = sm["cpu_seconds_per_sample"] / one
                summary[f"{model}_{name}_vs_baseline_speed"] = sm["train_samples_per_s"] / fast
    notes = [f"-n 4 (fed server, split server, 2 client ranks) with 4 logical clients of batch 32, synthetic "
             f"1x28x28 data, {s['train_samples']} samples x {s['rounds']} round(s), on {cores()} cores; the "
             "baseline trains the same samples in one process (all cores, or run.threads = 1).",
             "CPU: user + system seconds of every process over the rounds, evaluation included "
             "(cpu_seconds_per_sample); per sample trained. vs_baseline_speed divides by the all-core baseline's "
             "samples/s, cpu_vs_1_thread by the one-thread baseline's CPU per sample.",
             "By kind (µs per sample, summed over a role's ranks): compute = forward, recompute, backward, "
             "optimizer; scratch_io = the file state's reads and writes; waiting = for a peer or a collective "
             "(the polling's CPU); other = the rank's Python outside those phases (message handling, "
             "bookkeeping; on the fed server, writing the outputs).",
             "waiting_pct: a role's waiting CPU over its ranks' training time (the rounds' seconds x its ranks), "
             "in percent: what waiting for peers costs one rank of that role."]
    text = (table(rows, ["model", "run", "samples_per_s", "vs_baseline_speed", "cpu_us_per_sample", "cpu_vs_1_thread"],
                  "cpu: samples/s and CPU per sample") + "\n\n"
            + table(parts, ["model", "state", "role", *CPU_KINDS], "cpu: SFL's CPU per sample by role and kind (µs)")
            + "\n\n" + table(waits, ["model", "state", "role", "waiting_pct"],
                             "cpu: waiting, % of each rank's training time"))
    return {"settings": s, "results": {"runs": rows, "breakdown": parts, "waiting": waits}, "summary": summary,
            "notes": notes, "text": text}

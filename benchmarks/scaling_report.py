"""Scaling report from a directory of training runs (one sub-directory per point, n<N>/).

    python benchmarks/scaling_report.py strong|weak DIR

Reads each run's metrics.jsonl, drops round 1 (warm-up), and writes DIR/scaling.json, DIR/scaling.png
and a table: N client ranks, seconds per round (mean ± std), speed-up t1/tN, efficiency (strong:
t1/(N tN), weak: t1/tN) and the per-round phase breakdown (max over the role's ranks).
Used by jobs/*_scaling.sbatch, jobs/local.sh and the `scaling` benchmark suite.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

PHASES = ("client_compute", "server_compute", "p2p_wait", "aggregation", "idle")


def load_point(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] if len(rows) > 1 else rows
    secs = [r["seconds"] for r in timed]
    first, last = rows[0]["phase_seconds"], rows[-1]["phase_seconds"]
    n_rounds = max(len(rows) - 1, 1)
    phases = {}  # seconds per round after warm-up, client and server roles
    for role, key in (("client", "client"), ("split_server", "server")):
        for p in PHASES:
            a = first.get(role, {}).get(p, 0.0) if len(rows) > 1 else 0.0
            phases[f"{key}_{p}"] = round((last.get(role, {}).get(p, 0.0) - a) / n_rounds, 4)
    ranks = json.loads((run / "summary.json").read_text()).get("ranks")
    return {"seconds_per_round": statistics.mean(secs), "std": statistics.pstdev(secs),
            "rounds_timed": len(secs), "ranks": ranks, "phases": phases}


def report(kind: str, directory: Path, plot: bool = True) -> dict:
    points = {}
    for d in directory.iterdir():
        m = re.fullmatch(r"n(\d+)", d.name)
        if m and (d / "metrics.jsonl").is_file():
            points[int(m.group(1))] = load_point(d)
    if not points:
        raise SystemExit(f"no runs n<N>/metrics.jsonl under {directory}")
    ns = sorted(points)
    t1 = points[ns[0]]["seconds_per_round"] * ns[0] if kind == "strong" else points[ns[0]]["seconds_per_round"]
    cores = len(os.sched_getaffinity(0))
    rows = []
    for n in ns:
        p = points[n]
        tn = p["seconds_per_round"]
        eff = t1 / (n * tn) if kind == "strong" else t1 / tn
        rows.append({"n": n, "ranks": p["ranks"], "seconds_per_round": round(tn, 4), "std": round(p["std"], 4),
                     "speedup": round(t1 / tn, 4), "efficiency": round(eff, 4),
                     "oversubscribed": bool(p["ranks"] and p["ranks"] > cores), **p["phases"]})
    out = {"kind": kind, "cores": cores, "rows": rows,
           "summary": {f"{kind}_efficiency": rows[-1]["efficiency"], "max_ranks": max(r["ranks"] or 0 for r in rows)}}
    (directory / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    if plot:
        draw(out, directory / "scaling.png")
    return out


def table(out: dict) -> str:
    lines = [f"{out['kind']} scaling ({out['cores']} cores here)",
             f"{'N':>3} {'ranks':>5} {'s/round':>16} {'speed-up':>8} {'eff':>6}  "
             f"{'cli comp':>8} {'srv comp':>8} {'p2p wait':>8} {'agg':>6} {'note'}"]
    for r in out["rows"]:
        lines.append(f"{r['n']:>3} {r['ranks']:>5} {r['seconds_per_round']:>8.3f} ± {r['std']:<5.3f} "
                     f"{r['speedup']:>8.2f} {r['efficiency']:>6.2f}  {r['client_client_compute']:>8.3f} "
                     f"{r['server_server_compute']:>8.3f} {r['client_p2p_wait']:>8.3f} "
                     f"{r['client_aggregation']:>6.3f} {'ranks > cores' if r['oversubscribed'] else ''}")
    return "\n".join(lines)


def draw(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [r["n"] for r in out["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.errorbar(ns, [r["seconds_per_round"] for r in out["rows"]], yerr=[r["std"] for r in out["rows"]], marker="o")
    a.set(xlabel="client ranks N", ylabel="seconds per round", title=f"{out['kind']} scaling", xscale="log", xticks=ns)
    a.set_xticklabels(ns)
    b.plot(ns, [r["efficiency"] for r in out["rows"]], marker="o", label="measured")
    b.axhline(1.0, color="grey", ls="--", label="ideal")
    b.set(xlabel="client ranks N", ylabel="efficiency", ylim=(0, 1.2), xscale="log", xticks=ns)
    b.set_xticklabels(ns)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("strong", "weak"):
        raise SystemExit(__doc__)
    report(sys.argv[1], Path(sys.argv[2]))

"""scaling suite: strong and weak scaling over client ranks, with a per-phase breakdown and a plot.

scaling_result (the table, summary and plot from a set of runs) is also what
benchmarks/scaling_report.py makes of the runs of the sweep jobs (jobs/*_scaling.sbatch, jobs/local.sh).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import SYNTH, cores, mean_std, table

LEVELS = {
    "full": {"ranks": [1, 2, 4], "repeats": 2, "samples": 1024, "batch": 32, "rounds": 4},
    "quick": {"ranks": [1, 2], "repeats": 2, "samples": 512, "batch": 32, "rounds": 3},
    "tiny": {"ranks": [1, 2], "repeats": 1, "samples": 256, "batch": 32, "rounds": 2},
}
PHASE_KEYS = [("client", "client_compute"), ("client", "p2p_wait"), ("client", "aggregation"),
              ("split_server", "server_compute"), ("split_server", "p2p_wait")]


def _round_phases(metrics: list[dict]) -> dict:
    """Mean per-round phase seconds after the warm-up round (phase_seconds are cumulative, per role
    the slowest rank)."""
    first, last, n = metrics[0]["phase_seconds"], metrics[-1]["phase_seconds"], len(metrics) - 1
    return {f"{role}.{ph}": (last[role][ph] - first[role][ph]) / n for role, ph in PHASE_KEYS}


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    base = {**SYNTH, "train.rounds": s["rounds"], "train.batch_size": s["batch"], "sfl.state": "file",
            "sfl.aggregation": "centralized"}
    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(s["repeats"]):
        for n in s["ranks"]:
            for kind in ("strong", "weak"):
                if kind == "weak" and n == 1:
                    continue  # identical job to strong N=1 (per-client data = the strong total)
                total = s["samples"] if kind == "strong" else s["samples"] * n
                cfg = {**base, "data.train_samples": total, "train.clients": n}
                res = common.train(n + 2, cfg, work / f"scale-{kind}-{n}-{rep}")
                runs.setdefault((kind, n), []).append(res)
    runs[("weak", 1)] = runs[("strong", 1)]
    res = scaling_result(runs)
    res["notes"].insert(0, f"N client ranks + 1 fed server + 1 split server = N+2 ranks; one logical client per "
                        f"client rank, batch {s['batch']}, cnn, file state, centralized FedAvg, synthetic data; "
                        f"strong: {s['samples']} samples in total; weak: {s['samples']} per client (weak N=1 is "
                        f"the strong N=1 job). {s['rounds']} rounds per job, first excluded, {s['repeats']} "
                        "repeat(s); sec_per_round = mean (std) over measured rounds of all repeats.")
    res["settings"] = {**s, "model": "cnn", "state": "file", "aggregation": "centralized", "servers": 1}
    return res


def scaling_result(runs: dict[tuple[str, int], list[dict]]) -> dict:
    """Table, summary and plot from training runs keyed by (strong|weak, client ranks): also used by
    benchmarks/scaling_report.py on the runs of jobs/*_scaling.sbatch and jobs/local.sh."""
    rows = []
    kinds = [k for k in ("strong", "weak") if any(kind == k for kind, _ in runs)]
    for kind in kinds:
        for n in sorted(n for k, n in runs if k == kind):
            rs = runs[(kind, n)]
            secs = [m["seconds"] for r in rs for m in r["metrics"][1:]]  # first round = warm-up
            mean, std = mean_std(secs)
            phases = [_round_phases(r["metrics"]) for r in rs]
            ranks = rs[0]["summary"].get("ranks") or n + 2
            row = {"kind": kind, "client_ranks": n, "ranks": ranks, "oversubscribed": ranks > cores(),
                   "samples_per_round": rs[0]["metrics"][0]["samples"], "sec_per_round": mean, "std": std,
                   "rounds_measured": len(secs)}
            row.update({k: mean_std([p[k] for p in phases])[0] for k in phases[0]})
            rows.append(row)
    summary = {}
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]
        n1, t1 = rs[0]["client_ranks"], rs[0]["sec_per_round"]
        for r in rs:  # relative to the smallest N measured (N=1 in the suite)
            n, tn = r["client_ranks"] / n1, r["sec_per_round"]
            r["speedup"] = t1 / tn if kind == "strong" else n * t1 / tn
            r["efficiency"] = t1 / (n * tn) if kind == "strong" else t1 / tn
        summary[f"{kind}_efficiency"] = rs[-1]["efficiency"]
        summary[f"{kind}_speedup"] = rs[-1]["speedup"]
    nmax = max(r["client_ranks"] for r in rows)
    summary.update({"max_ranks": max(r["ranks"] for r in rows), "max_client_ranks": nmax, "cores": cores()})
    notes = ["strong: speedup t1/tN, efficiency t1/(N tN); weak: scaled speedup N t1/tN, efficiency t1/tN "
             "(t1 = the smallest N measured).",
             "Phase columns: mean seconds per round (after warm-up) of the slowest rank of each role "
             "(metrics.jsonl phase_seconds); p2p_wait includes waiting for the other side to compute."]
    over = [r["ranks"] for r in rows if r["oversubscribed"]]
    if over:
        notes.append(f"OVERSUBSCRIBED: {sorted(set(over))} ranks on {cores()} cores. The fed server mostly "
                     "sleeps (polite waits), but the split server and the client ranks share the cores, "
                     "so the speedup here is capped near the core count, not by mpi_sfl.")
    text = table(rows, ["kind", "client_ranks", "ranks", "samples_per_round", "sec_per_round", "std", "speedup",
                        "efficiency", "client.client_compute", "client.p2p_wait", "client.aggregation",
                        "split_server.server_compute"],
                 "scaling: seconds per round")
    return {"results": rows, "summary": summary, "notes": notes, "text": text,
            "plot": lambda path: plot_scaling(rows, path, cores())}


def plot_scaling(rows: list[dict], path: Path, ncores: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("strong", "weak") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(5 * (len(kinds) + 1), 4.5))
    for ax, kind in zip(axes[:-1], kinds):
        rs = [r for r in rows if r["kind"] == kind]
        ns = [r["client_ranks"] for r in rs]
        ax.errorbar(ns, [r["sec_per_round"] for r in rs], yerr=[r["std"] for r in rs], marker="o",
                    capsize=4, label="measured")
        t1 = rs[0]["sec_per_round"]
        ideal = [t1 * ns[0] / n for n in ns] if kind == "strong" else [t1 for _ in ns]
        ax.plot(ns, ideal, "--", color="grey", label="ideal")
        for r in rs:
            ax.annotate(f"eff {r['efficiency']:.2f}", (r["client_ranks"], r["sec_per_round"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        over = [r["client_ranks"] for r in rs if r["oversubscribed"]]
        title = f"{kind} scaling"
        if over:
            title += f" (ranks > {ncores} cores)"
        ax.set(xscale="log", xlabel="client ranks N", ylabel="seconds per round", title=title)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend()
    ax = axes[-1]  # per-phase: for each job a client-rank bar and a split-server bar, stacked by phase
    x = list(range(len(rows)))
    colors = {"client_compute": "tab:blue", "server_compute": "tab:red", "p2p_wait": "tab:orange",
              "aggregation": "tab:green"}
    for role, shift in (("client", -0.2), ("split_server", 0.2)):
        bottom = [0.0] * len(rows)
        for r_, ph in PHASE_KEYS:
            if r_ != role:
                continue
            vals = [r[f"{role}.{ph}"] for r in rows]
            ax.bar([i + shift for i in x], vals, width=0.38, bottom=bottom, color=colors[ph],
                   hatch="" if role == "client" else "//", edgecolor="white",
                   label=f"{'client' if role == 'client' else 'server'} {ph}")
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(x, [r["sec_per_round"] for r in rows], "k_", markersize=30, mew=2, label="round (measured)")
    ax.set_xticks(x, [f"{r['kind']}\nN={r['client_ranks']}" for r in rows])
    ax.set(ylabel="seconds per round", title="per phase: client rank (left) / split server (right)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""variants suite: the split-learning family side by side on the same data, model, seed and batch.

Centralized training (`mpi-sfl baseline`), fl, sl, v1, v2 and sync, one after another, for IID,
Dirichlet(0.5) and Dirichlet(0.1) partitions. For each: final and best test accuracy, rounds to
85 % test accuracy, training seconds, samples/s, bytes sent per logical client and in total per
round, next to the SplitFed paper's communication formulas (Thapa et al., AAAI 2022, Table 2)
evaluated for this model and data; plus accuracy against round and against training seconds (PNG).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"data": {"data.dataset": "fashion-mnist"}, "rounds": 4, "limit": 1200},
    "quick": {"data": {"data.dataset": "synthetic", "data.train_samples": 1024, "data.test_samples": 200},
              "rounds": 2, "limit": 300},
    "tiny": {"data": {"data.dataset": "synthetic", "data.train_samples": 192, "data.test_samples": 100},
             "rounds": 1, "limit": 200, "partitions": ["iid"]},
}
COMMON = {"model.name": "lenet5", "train.clients": 4, "train.batch_size": 32, "train.lr": 0.02,
          "train.momentum": 0.9, "run.seed": 0}
CLIENT_RANKS = 2  # 4 logical clients on 2 client ranks
PARTITIONS = {"iid": {"data.partition": "iid"},
              "dirichlet-0.5": {"data.partition": "dirichlet", "data.alpha": 0.5},
              "dirichlet-0.1": {"data.partition": "dirichlet", "data.alpha": 0.1}}
METHODS = ("baseline", "fl", "sl", "v1", "v2", "sync")
TARGET = 0.85


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    base = {**COMMON, **s["data"], "train.rounds": s["rounds"]}
    rows, curves = [], {}
    partitions = {p: PARTITIONS[p] for p in s.get("partitions", PARTITIONS)}
    for pname, part in partitions.items():
        for method in METHODS:
            settings = {**base, **part}
            out = work / f"{pname}-{method}"
            if method == "baseline":
                res, ranks = common.baseline(settings, out, limit=s["limit"]), 1
            elif method == "fl":
                ranks = 1 + CLIENT_RANKS
                res = common.train(ranks, {**settings, "sfl.variant": "fl", "sfl.servers": 0}, out, limit=s["limit"])
            else:
                ranks = 2 + CLIENT_RANKS
                res = common.train(ranks, {**settings, "sfl.variant": method}, out, limit=s["limit"])
            rows.append(row(pname, method, ranks, res, s["rounds"]))
            curves[(pname, method)] = res["metrics"]
    cost = paper_costs(base)
    for r in rows:
        r["paper_MB_per_round"] = cost.get(r["method"])
    iid = {r["method"]: r for r in rows if r["partition"] == "iid"}
    summary = {f"{m}_final_accuracy_iid": iid[m]["final_accuracy"] for m in METHODS}
    summary.update({
        "sl_seconds_over_sync_iid": iid["sl"]["train_seconds"] / iid["sync"]["train_seconds"],
        "sl_seconds_over_v1_iid": iid["sl"]["train_seconds"] / iid["v1"]["train_seconds"],
        "sync_vs_baseline_samples_per_s_iid": iid["sync"]["samples_per_s"] / iid["baseline"]["samples_per_s"],
    })
    cols = ["partition", "method", "ranks", "final_accuracy", "best_accuracy", "rounds_to_85",
            "train_seconds", "samples_per_s", "MB_per_client_per_round", "MB_total_per_round", "paper_MB_per_round"]
    notes = [
        f"{'Fashion-MNIST (60k/10k)' if level == 'full' else 'synthetic data'}, model lenet5 U-shaped "
        f"(client: conv block + linear head; server: the rest), 4 logical clients on {CLIENT_RANKS} client "
        f"ranks, batch 32 per client, SGD lr 0.02 momentum 0.9, seed 0, {s['rounds']} round(s), client "
        "parts (and v1's server copies) averaged once per round; split variants on "
        f"{2 + CLIENT_RANKS} ranks, fl on {1 + CLIENT_RANKS}, baseline in one process.",
        "Runs one after another on this machine; seconds are training seconds (summary.json: the "
        "training ranks' rounds, evaluation overlapped), samples/s = samples x rounds / seconds.",
        "Bytes: everything every rank sent (payloads + 96-byte headers, averaging collectives counted "
        "once per client rank and per averaging, sl's relay of weights + momentum between ranks), per "
        "round; per client = the client role's share / logical clients. Two logical clients share a "
        "rank, so averaging moves 2 vectors, not 4, and half of sl's hand-overs are local copies.",
        "paper_MB_per_round: Table 2 of the SplitFed paper for one epoch with K clients, |W| the model "
        "size, beta|W| the client-side share, p samples, q bytes crossing the cut per sample each "
        f"way (U-shape: h and z both cross): {cost['formulas']}.",
    ]
    return {"settings": {**base, "partitions": partitions, "methods": METHODS, "target": TARGET},
            "results": rows, "summary": summary, "notes": notes,
            "text": table(rows, cols), "plot": lambda png: plot(curves, list(partitions), png)}


def row(partition: str, method: str, ranks: int, res: dict, rounds: int) -> dict:
    m, summary = res["metrics"], res["summary"]
    acc = [r["test_accuracy"] for r in m]
    reached = next((r["round"] + 1 for r in m if r["test_accuracy"] >= TARGET), None)
    out = {"partition": partition, "method": method, "ranks": ranks, "final_accuracy": acc[-1],
           "best_accuracy": max(acc), "rounds_to_85": reached, "train_seconds": summary["seconds"],
           "samples_per_s": summary["train_samples_per_s"]}
    sent = m[-1].get("bytes_sent")
    if sent:  # cumulative per role over the run
        out["MB_per_client_per_round"] = sent["client"] / rounds / COMMON["train.clients"] / 1e6
        out["MB_total_per_round"] = sum(sent.values()) / rounds / 1e6
    return out


def paper_costs(settings: dict) -> dict:
    """Table 2 of the SplitFed paper (communication per epoch, all clients), in MB, for this job."""
    import torch

    from mpi_sfl import data, models

    model = models.build(settings["model.name"], 0)
    w = sum(p.numel() for p in model.parameters()) * 4
    bw = sum(p.numel() for part in (model.encoder, model.head) for p in part.parameters()) * 4
    with torch.no_grad():
        h = model.encoder(torch.zeros(1, 1, 28, 28))
        z = model.body(h)
    q = (h.numel() + z.numel()) * 4
    p = 60000 if settings["data.dataset"] == "fashion-mnist" else settings["data.train_samples"]
    k = COMMON["train.clients"]
    mb = {"fl": 2 * k * w, "sl": 2 * p * q + bw * k, "v1": 2 * p * q + 2 * bw * k, "v2": 2 * p * q + 2 * bw * k}
    mb["sync"] = mb["v1"]
    out = {name: v / 1e6 for name, v in mb.items()}
    out["formulas"] = (f"FL 2K|W|, SL 2pq + beta|W|K, SFLV1/V2 (and sync) 2pq + 2beta|W|K with K={k}, "
                       f"|W|={w} B, beta|W|={bw} B, p={p}, q={q} B")
    return out


def plot(curves: dict, partitions: list[str], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, len(partitions), figsize=(5 * len(partitions), 8), squeeze=False)
    for col, pname in enumerate(partitions):
        for method in METHODS:
            m = curves[(pname, method)]
            acc = [r["test_accuracy"] for r in m]
            seconds, t = [], 0.0
            for r in m:
                t += r["seconds"]
                seconds.append(t)
            axes[0][col].plot([r["round"] + 1 for r in m], acc, marker="o", label=method)
            axes[1][col].plot(seconds, acc, marker="o", label=method)
        axes[0][col].set_title(pname)
        axes[0][col].set_xlabel("round")
        axes[0][col].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1][col].set_xlabel("training seconds (wall clock of the training ranks)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_ylabel("test accuracy")
            ax.axhline(TARGET, color="grey", lw=0.5, ls=":")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

"""`mpi-sfl plot RUN_DIR [RUN_DIR ...]`: loss and accuracy curves from metrics.jsonl (matplotlib).

    mpi-sfl plot runs/default runs/baseline --out curves.png

One line per run, four panels: train and test loss against round, test accuracy against round
and against training seconds, and each round's training samples/s beside the megabytes it sent
(all roles: activations, gradients and averaging). Each run is labelled by its variant (from
summary.json or config.toml) and directory name.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

from .errors import UserError


def read_run(run_dir: str) -> tuple[str, list[dict]]:
    """(label, metrics rows) of one run directory; UserError naming what is missing."""
    d = Path(run_dir)
    path = d / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{d} has no metrics.jsonl: is it a run's out_dir?")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not JSON lines ({exc})") from None
    if not rows:
        raise UserError(f"{path} has no finished round yet")
    variant = None
    if (d / "summary.json").is_file():
        summary = json.loads((d / "summary.json").read_text())
        variant = "baseline" if summary.get("mode") == "baseline" else summary.get("variant")
    if variant is None and (d / "config.toml").is_file():
        variant = tomllib.loads((d / "config.toml").read_text()).get("sfl", {}).get("variant")
    return (f"{variant} ({d.name})" if variant else d.name), rows


def plot(run_dirs: list[str], out: str) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("mpi-sfl plot needs matplotlib: pip install matplotlib "
                        "(make setup installs it in .venv)") from None
    runs = [read_run(d) for d in run_dirs]
    fig, grid = plt.subplots(2, 2, figsize=(12, 8))
    axes = grid.ravel()
    speed = axes[3].twinx()
    for label, rows in runs:
        rounds = [r["round"] + 1 for r in rows]
        line, = axes[0].plot(rounds, [r["train_loss"] for r in rows], marker="o", label=f"{label} train")
        color = line.get_color()
        axes[0].plot(rounds, [r["test_loss"] for r in rows], ls="--", color=color, label=f"{label} test")
        axes[1].plot(rounds, [r["test_accuracy"] for r in rows], marker="o", color=color, label=label)
        seconds, total = [], 0.0
        for r in rows:
            total += r["seconds"]
            seconds.append(total)
        axes[2].plot(seconds, [r["test_accuracy"] for r in rows], marker="o", color=color, label=label)
        speed.plot(rounds, [r["samples"] / r["seconds"] if r.get("seconds") and "samples" in r else float("nan") for r in rows],
                   marker="o", color=color)
        sent = [sum(r["bytes_sent"].values()) if isinstance(r.get("bytes_sent"), dict) else float("nan") for r in rows]
        axes[3].bar([x - 0.2 + 0.4 * runs.index((label, rows)) / max(len(runs), 1) for x in rounds],
                    [(b - a) / 2**20 for a, b in zip([0.0] + sent[:-1], sent)], width=0.4 / max(len(runs), 1),
                    color=color, alpha=0.35)
    for ax, (xlabel, ylabel) in zip(axes, [("round", "loss (solid: train, dashed: test)"), ("round", "test accuracy"),
                                           ("training seconds", "test accuracy"), ("round", "MB sent in the round (bars)")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    speed.set_ylabel("training samples/s (lines)")
    for ax in (axes[0], axes[1], axes[3]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_partition(run_dir: str) -> Path | None:
    """RUN_DIR/partition.png from the partition.json a training run wrote (None if it has none):
    each logical client's samples, stacked by label."""
    src = Path(run_dir) / "partition.json"
    if not src.is_file():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(src.read_text())
    hist, classes = report["labels"], report["classes"]
    n = len(hist)
    # Up to 60 clients one bar each, in id order; more, and the bars are sorted by size (each
    # stacked by label, no gaps) so that the spread of sizes and of labels reads at a glance.
    order = sorted(range(n), key=lambda c: -sum(hist[c])) if n > 60 else list(range(n))
    fig, ax = plt.subplots(figsize=(min(14.0, max(8.0, 3 + 0.25 * n)), 4.5))
    bottom = [0] * n
    cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    for k in range(classes):
        counts = [hist[c][k] for c in order]
        ax.bar(range(n), counts, bottom=bottom, width=0.9 if n <= 60 else 1.0, color=cmap(k % cmap.N),
               label=str(k), linewidth=0)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("logical client" if n <= 60 else f"logical clients, largest first ({n})")
    if n <= 60:
        ax.set_xticks(range(n)) if n <= 20 else None
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylabel("samples (stacked by label)")
    mean = report["summary"]["mean_classes_present"]
    present = f"all {classes} labels on every client" if mean == classes else f"{mean:.1f} of {classes} labels per client on average"
    ax.set_title(f"partition: {n} logical clients, {present}", fontsize=11)
    if classes <= 20:  # beside the bars, never over them
        ax.legend(title="label", fontsize=7, ncol=1 if classes <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = Path(run_dir) / "partition.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""`mpi-sfl plot RUN_DIR [RUN_DIR ...]`: loss and accuracy curves from metrics.jsonl (matplotlib).

    mpi-sfl plot runs/default runs/baseline --out curves.png

One line per run: train and test loss against round, test accuracy against round and against
training seconds. Each run is labelled by its variant (from summary.json or config.toml) and
directory name.
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
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, rows in runs:
        rounds = [r["round"] + 1 for r in rows]
        line, = axes[0].plot(rounds, [r["train_loss"] for r in rows], marker="o", label=f"{label} train")
        axes[0].plot(rounds, [r["test_loss"] for r in rows], ls="--", color=line.get_color(), label=f"{label} test")
        axes[1].plot(rounds, [r["test_accuracy"] for r in rows], marker="o", color=line.get_color(), label=label)
        seconds, total = [], 0.0
        for r in rows:
            total += r["seconds"]
            seconds.append(total)
        axes[2].plot(seconds, [r["test_accuracy"] for r in rows], marker="o", color=line.get_color(), label=label)
    for ax, (xlabel, ylabel) in zip(axes, [("round", "loss (solid: train, dashed: test)"),
                                           ("round", "test accuracy"), ("training seconds", "test accuracy")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
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
    hist = report["labels"]
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.25 * len(hist)), 4))
    bottom = [0] * len(hist)
    cmap = plt.get_cmap("tab10" if report["classes"] <= 10 else "tab20")
    for k in range(report["classes"]):
        counts = [row[k] for row in hist]
        ax.bar(range(len(hist)), counts, bottom=bottom, width=0.9, color=cmap(k % cmap.N), label=str(k))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xlabel("logical client")
    ax.set_ylabel("samples (stacked by label)")
    ax.set_title(f"partition: {report['clients']} clients, {report['summary']['mean_classes_present']:.1f} of "
                 f"{report['classes']} classes present on average")
    if report["classes"] <= 20:
        ax.legend(title="label", fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    path = Path(run_dir) / "partition.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""noise suite: test accuracy against the noise a client adds at the cut, and what still leaks.

sync, lenet5 U-shaped, trained once per sfl.noise_std (clipping each sample's activation to
sfl.clip_norm first). For each level: final test accuracy, and the distance correlation (the
leakage measure NoPeek minimizes: 1 = the wire determines the input up to a similarity, 0 =
independent) between a test batch's raw inputs and what its client would send, through the trained
model's encoder with that level's clipping and noise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"data": {"data.dataset": "fashion-mnist"}, "noise": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0], "rounds": 2,
             "clip": 20.0, "batch_eval": 512, "limit": 1200},
    "quick": {"data": {"data.dataset": "synthetic", "data.train_samples": 1024, "data.test_samples": 512},
              "noise": [0.0, 1.0, 4.0], "rounds": 1, "clip": 20.0, "batch_eval": 256, "limit": 300},
    "tiny": {"data": {"data.dataset": "synthetic", "data.train_samples": 192, "data.test_samples": 128},
             "noise": [0.0, 4.0], "rounds": 1, "clip": 20.0, "batch_eval": 128, "limit": 200},
}
COMMON = {"model.name": "lenet5", "train.clients": 4, "train.batch_size": 32, "train.lr": 0.02,
          "train.momentum": 0.9, "sfl.variant": "sync", "run.seed": 0}
CLIENT_RANKS = 2


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Székely's sample distance correlation of two batches (rows = samples), in float64."""
    def centred(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z, z)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x.flatten(1).double()), centred(y.flatten(1).double())
    dcov, vx, vy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return float((dcov / (vx * vy).sqrt()).clamp(min=0).sqrt()) if vx > 0 and vy > 0 else 0.0


def leakage(run_dir: Path, settings: dict, n: int) -> tuple[float, float]:
    """dcor(raw test inputs, what the client sends) through the run's trained encoder, and the
    floor: dcor(the same inputs, pure noise of the wire's shape), which the sample statistic does
    not bring to 0 in these dimensions."""
    from mpi_sfl import config, data, models
    cfg = config.load(str(run_dir / "config.toml"))
    spec = models.for_config(cfg)[0]
    model = spec.build(cfg.run.seed)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x = data.load(cfg, "test").x[:n]
    with torch.no_grad():
        h = models.cut_noise(model.train().encoder(x), cfg.sfl.noise_std, cfg.sfl.clip_norm, cfg.run.seed, 0, 0, 0)
    floor = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    return distance_correlation(x, h), distance_correlation(x, floor)


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    base = {**COMMON, **s["data"], "train.rounds": s["rounds"]}
    rows, floor = [], 0.0
    for std in s["noise"]:
        settings = {**base, "sfl.noise_std": std, "sfl.clip_norm": s["clip"] if std else 0.0}
        out = work / f"noise-{std}"
        res = common.train(2 + CLIENT_RANKS, settings, out, limit=s["limit"])
        dcor, floor = leakage(out, settings, s["batch_eval"])
        rows.append({"noise_std": std, "clip_norm": settings["sfl.clip_norm"],
                     "final_accuracy": res["metrics"][-1]["test_accuracy"],
                     "distance_correlation": dcor,
                     "train_seconds": res["summary"]["seconds"]})
    summary = {"accuracy_no_noise": rows[0]["final_accuracy"], "dcor_no_noise": rows[0]["distance_correlation"],
               "accuracy_most_noise": rows[-1]["final_accuracy"], "dcor_most_noise": rows[-1]["distance_correlation"],
               "dcor_independent_floor": floor}
    notes = [f"sync, lenet5 U-shaped, 4 logical clients on {CLIENT_RANKS} client ranks, batch 32, SGD lr 0.02 "
             f"momentum 0.9, {s['rounds']} rounds, {s['data']['data.dataset']}; with noise, each sample's activation "
             f"(6x14x14) is clipped to L2 norm {s['clip']} first.",
             f"distance correlation on the first {s['batch_eval']} test images and their (clipped, noised) "
             "activations through the trained encoder; a noise knob, not a differential-privacy guarantee. "
             f"dcor_independent_floor ({floor:.3f}): the same images against pure N(0, 1) noise of the wire's "
             "shape; the sample statistic is biased up in these dimensions, so that is where 'no dependence' sits."]
    text = table(rows, ["noise_std", "clip_norm", "final_accuracy", "distance_correlation", "train_seconds"],
                 "noise at the cut: accuracy and leakage")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text,
            "plot": lambda png: plot(rows, png)}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    std = [r["noise_std"] for r in rows]
    ax.plot(std, [r["final_accuracy"] for r in rows], marker="o", label="test accuracy")
    ax.plot(std, [r["distance_correlation"] for r in rows], marker="s", label="distance correlation (input, wire)")
    ax.set_xlabel("sfl.noise_std")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("noise at the cut")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

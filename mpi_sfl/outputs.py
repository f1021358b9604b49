"""What a run leaves behind (config.toml, metrics.jsonl, summary.json, model.pt) and its progress."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import to_toml
from .layout import ROLE_NAMES
from .timing import PHASES


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the whole model on a held-out set."""
    model.eval()
    loss = correct = 0.0
    for s in range(0, len(y), batch):
        xb, yb = x[s:s + batch].to(device), y[s:s + batch].to(device)
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def _finite(obj):
    """Non-finite floats as null, so metrics stay strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def role_rows(stats: np.ndarray) -> dict:
    """Per-role totals from the gathered per-rank stats rows (job.STATS)."""
    out = {}
    for code, name in ROLE_NAMES.items():
        rows = stats[stats["role"] == code]
        if len(rows):
            out[name] = {"ranks": int(len(rows)), "bytes_sent": int(rows["bytes_sent"].sum()),
                         "peak_rss_mb": round(float(rows["peak_rss"].max()) / 2**20, 1),
                         "seconds": {p: round(float(rows["phases"][:, i].max()), 4) for i, p in enumerate(PHASES)}}
    return out


class RunWriter:
    """Writes the outputs of one run into run.out_dir and shows progress. Rank 0 only."""

    def __init__(self, cfg, rounds: int, label: str, resume_rows: list[dict] | None = None):
        self.dir = Path(cfg.run.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(to_toml(cfg))
        self.metrics = (self.dir / "metrics.jsonl").open("w")
        for row in resume_rows or []:
            self.metrics.write(json.dumps(row) + "\n")
        mode = cfg.run.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.label, self.rows = mode, label, []
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=rounds, desc=label, unit="round", file=sys.stderr)

    def round(self, row: dict, model: torch.nn.Module, write_model: bool = True) -> None:
        """Record a finished round: its metrics row and the model as of now, so a job killed
        later keeps every completed round (model.pt is replaced atomically)."""
        self.rows.append(row)
        self.metrics.write(json.dumps(_finite(row), allow_nan=False) + "\n")
        self.metrics.flush()
        if write_model:
            tmp = self.dir / "model.pt.tmp"
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, self.dir / "model.pt")
        brief = (f"loss {row['train_loss']:.4g} test_loss {row['test_loss']:.4g} "
                 f"acc {row['test_accuracy']:.4f} {row['seconds']:.1f}s")
        if self.bar is not None:
            self.bar.set_postfix_str(brief)
            self.bar.update(1)
        elif self.mode == "lines":
            print(f"[{self.label}] round {row['round'] + 1}/{self.bar_total()} {brief}", file=sys.stderr, flush=True)

    def bar_total(self) -> int:
        return self.rows[-1].get("rounds", len(self.rows))

    def finish(self, summary: dict) -> dict:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        last = self.rows[-1] if self.rows else {}
        summary = {"final_train_loss": last.get("train_loss"), "final_test_loss": last.get("test_loss"),
                   "final_test_accuracy": last.get("test_accuracy"), "rounds": len(self.rows), **summary}
        summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.mode != "none":
            print(f"[{self.label}] done: test accuracy {summary['final_test_accuracy']:.4f}, "
                  f"{summary['seconds']:.1f}s, {summary['train_samples_per_s']:.0f} samples/s -> {self.dir}",
                  file=sys.stderr, flush=True)
        return summary

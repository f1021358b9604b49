"""What a run leaves behind (config.toml, metrics.jsonl, summary.json, model.pt) and its progress."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .config import to_toml
from .layout import ROLE_NAMES
from .outdir import atomic_torch_save, atomic_write, strict_json
from .progress import Board, Progress
from .timing import CPU_KINDS, PHASES


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


def role_rows(stats: np.ndarray) -> dict:
    """Per-role totals from the gathered per-rank stats rows (job.STATS)."""
    out = {}
    for code, name in ROLE_NAMES.items():
        rows = stats[stats["role"] == code]
        if len(rows):
            out[name] = {"ranks": int(len(rows)), "bytes_sent": int(rows["bytes_sent"].sum()),
                         "peak_rss_mb": round(float(rows["peak_rss"].max()) / 2**20, 1),
                         "peak_device_mb": round(float(rows["peak_device"].max()) / 2**20, 1),
                         "held_mb": round(float(rows["held"].max()) / 2**20, 3),
                         "working_copies": int(rows["copies"].max()), "passes": int(rows["passes"].sum()),
                         "seconds": {p: round(float(rows["phases"][:, i].max()), 4) for i, p in enumerate(PHASES)},
                         "cpu": {k: round(float(rows["cpu"][:, i].sum()), 4) for i, k in enumerate(CPU_KINDS)}}
    return out


def cpu_per_sample(rows: list[dict]) -> float:
    """Every rank's CPU seconds (user + system) over the rounds of metrics `rows`, per sample trained."""
    samples = sum(r["samples"] for r in rows)
    return sum(v["total"] for r in rows for v in r["cpu_seconds"].values()) / samples if samples else 0.0


def partition_report(labels: np.ndarray, shards: list[np.ndarray], classes: int) -> dict:
    """How non-IID the federation is: each logical client's samples and label histogram."""
    hist = [np.bincount(labels[s], minlength=classes).tolist() for s in shards]
    samples = [len(s) for s in shards]
    present = [sum(1 for h in row if h) for row in hist]
    return {"clients": len(shards), "classes": classes, "samples": samples, "labels": hist,
            "summary": {"min_samples": min(samples), "max_samples": max(samples),
                        "mean_classes_present": sum(present) / len(present)}}


def space_needed(summary: models.Summary) -> int:
    """A rough floor on the disk space a run needs in run.out_dir (checked by outdir.prepare):
    64 MiB for the metrics, config and slack, plus 6 float32 copies of the model — model.pt, its
    temporary while it is replaced, and two checkpoints' weights and momentum buffers (the last and
    the one before it, kept to fall back to)."""
    return 64 * 2**20 + 6 * sum(summary.params.values()) * 4


class RunWriter:
    """Writes the outputs of one run into run.out_dir and shows progress. Rank 0 only.

    The directory was checked and locked by outdir.prepare. Every file is written so that a job
    killed at any moment keeps what it finished: config.toml, model.pt and summary.json are replaced
    atomically, metrics.jsonl gets one fsync'd strict-JSON line per round. `resume_rows` (a resumed
    run) rewrites metrics.jsonl with exactly those rows, then appends to it.
    """

    def __init__(self, cfg, rounds: int, label: str, resume_rows: list[dict] | None = None,
                 dtypes: dict[str, torch.dtype] | None = None):
        self.dir = Path(cfg.run.out_dir)
        self.dtypes = dtypes  # model.pt in the model's own dtypes (models.state_dict)
        self.dir.mkdir(exist_ok=True)
        atomic_write(self.dir / "config.toml", to_toml(cfg).encode())
        self.rows = list(resume_rows or [])
        if resume_rows is not None:
            atomic_write(self.dir / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in self.rows).encode())
        self.metrics = (self.dir / "metrics.jsonl").open("ab" if resume_rows is not None else "wb", buffering=0)
        self.progress = Progress(cfg, label, rounds, len(self.rows))
        self.mode, self.label = self.progress.mode, label
        self.board = Board(cfg.run.out_dir, len(self.rows)) if cfg.run.tensorboard else None

    def round(self, row: dict, model: torch.nn.Module, *, write_model: bool = True) -> None:
        """Record a finished round: its metrics row and (unless write_model=False, e.g. when the
        model is not finite) the model as of now, so a job killed later keeps every completed round."""
        if write_model:  # first: metrics.jsonl never has a row that model.pt is behind
            atomic_torch_save(models.state_dict(model, self.dtypes), self.dir / "model.pt")
        fd, line = self.metrics.fileno(), (strict_json(row) + "\n").encode()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)  # no half row: the file stays one strict-JSON row per finished round
            raise
        self.rows.append(row)
        self.progress.round_done(row)
        if self.board is not None:
            self.board.round(row)

    def finish(self, summary: dict) -> dict:
        """Write summary.json (strict JSON: non-finite figures become null) and return it as written."""
        self.progress.close()
        if self.board is not None:
            self.board.close()
        self.metrics.close()
        last = self.rows[-1] if self.rows else {}
        summary = {"final_train_loss": last.get("train_loss"), "final_test_loss": last.get("test_loss"),
                   "final_test_accuracy": last.get("test_accuracy"), "rounds": len(self.rows), **summary}
        text = strict_json(summary, indent=2)
        atomic_write(self.dir / "summary.json", (text + "\n").encode())
        if self.mode != "none":
            print(f"[{self.label}] done: test accuracy {_num(summary['final_test_accuracy'], '.4f')}, "
                  f"{_num(summary['seconds'], '.1f')}s, {_num(summary['train_samples_per_s'], '.0f')} samples/s "
                  f"-> {self.dir}", file=sys.stderr, flush=True)
        return json.loads(text)


def _num(v, spec: str) -> str:
    """A figure for the progress line; None (e.g. no finished round) prints as n/a."""
    return "n/a" if v is None else format(v, spec)

"""Watching a run: the progress bar or timed lines on rank 0, OUT/progress.json, `mpi-sfl status`.

The fed server takes part in every step's stop agreement, so it sees each step as it happens; it
reports progress from there at no cost to the training ranks. `run.progress`: "bar" (tqdm, per
step over the whole run), "lines" (one line at most every `run.progress_every_s`, and one per
round), "auto" (bar in a terminal, else lines), "none". Whatever the mode, OUT/progress.json says
where the run stands (written at most every few seconds, atomically) and how it ended, so that
`mpi-sfl status OUT` can answer from a login node on shared storage without touching the job.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError
from .outdir import LOCK, atomic_write, pid_alive, strict_json

FILE = "progress.json"
WRITE_EVERY_S = 5.0  # progress.json at most this often while running


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Rank 0's view of the run, step by step (the fed server) or round by round (the baseline)."""

    def __init__(self, cfg, label: str, rounds: int, done_rounds: int):
        mode = cfg.run.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.label, self.rounds, self.every = mode, label, rounds, cfg.run.progress_every_s
        self.path = Path(cfg.run.out_dir) / FILE
        self.where = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self.round, self.step, self.steps, self.per_step = done_rounds, 0, 0, 0.0
        self.t0, self.samples = time.monotonic(), 0.0       # this launch's samples, for the rate
        self.next_line = self.next_file = self.next_bar = 0.0
        self.last = ""                                       # the last round's figures
        self.unshown = 0                                     # steps done since the bar was last drawn
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=rounds, initial=done_rounds, desc=label, unit="round", file=sys.stderr)

    # -- fed server: each round's size, each step ---------------------------------------------------
    def start_round(self, rnd: int, first: int, steps: int, samples: int) -> None:
        self.round, self.step, self.steps, self.per_step = rnd, first, steps, samples / max(steps, 1)
        if self.bar is not None:
            self.bar.update(self.unshown)
            self.unshown = 0
            if self.bar.unit != "step":  # from here on the bar counts steps over the whole run
                self.bar.unit, self.bar.total = "step", steps * self.rounds
                self.bar.n = self.bar.last_print_n = rnd * steps + first
            self.bar.total = self.bar.n - first + steps * (self.rounds - rnd)
            self.bar.refresh()

    def step_done(self, steps_done: int) -> None:
        self.step = steps_done
        self.samples += self.per_step
        now = time.monotonic()
        if self.bar is not None:
            self.unshown += 1
            if now >= self.next_bar:  # the bar is redrawn twice a second, not per step
                self.bar.set_postfix_str(self.facts(short=True), refresh=False)
                self.bar.update(self.unshown)
                self.unshown, self.next_bar = 0, now + 0.5
        elif self.mode == "lines" and now >= self.next_line:
            if self.next_line:  # not at the first step: nothing measured yet
                print(f"[{self.label}] {self.facts()}", file=sys.stderr, flush=True)
            self.next_line = now + self.every
        if now >= self.next_file:
            self.write("running")
            self.next_file = now + WRITE_EVERY_S

    def rate(self) -> float | None:
        seconds = time.monotonic() - self.t0
        return self.samples / seconds if self.samples and seconds > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        left = (self.steps - self.step + self.steps * (self.rounds - self.round - 1)) * self.per_step
        return left / rate if rate else None

    def facts(self, short: bool = False) -> str:
        rate = self.rate()
        where = f"round {self.round + 1}/{self.rounds} step {self.step}/{self.steps}"
        speed = f"{rate:,.0f} samples/s" if rate else "? samples/s"
        text = f"{where} {speed}" if short else f"{where}, {speed}, ETA {_span(self.eta())}"
        return text + (f"; {self.last}" if self.last else "")

    # -- every role that writes metrics: each round --------------------------------------------------
    def round_done(self, row: dict) -> None:
        self.last = f"round {row['round'] + 1}: loss {row['train_loss']:.4f} acc {row['test_accuracy']:.4f}"
        if not self.steps:  # the baseline: no steps to count (start_round is the fed server's)
            self.round = row["round"] + 1
        if self.bar is not None:
            self.bar.update(1 if self.bar.unit == "round" else self.unshown)
            self.unshown = 0
            self.bar.set_postfix_str(self.facts(short=True) if self.bar.unit == "step" else self.last)
        elif self.mode == "lines":
            print(f"[{self.label}] round {row['round'] + 1}/{self.rounds} loss {row['train_loss']:.4f} test_loss "
                  f"{row['test_loss']:.4f} acc {row['test_accuracy']:.4f} {row['seconds']:.1f}s",
                  file=sys.stderr, flush=True)
        self.write("running")

    def write(self, state: str, message: str = "") -> None:
        rate, eta = self.rate(), self.eta() if state == "running" else None
        _save(self.path, {"state": state, "message": message, "round": self.round, "rounds": self.rounds,
                          "step": self.step, "steps": self.steps, "samples_per_s": rate, "eta_s": eta,
                          "last_round": self.last, "updated": time.time(), **self.where})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def ended(out_dir: str, state: str, message: str = "") -> None:
    """Rank 0, at the job's end: record how it ended ("finished", "stopped", "failed") in progress.json."""
    path = Path(out_dir) / FILE
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        facts = {}
    _save(path, {**facts, "state": state, "message": message, "updated": time.time(), "eta_s": None})


def _save(path: Path, facts: dict) -> None:
    try:
        atomic_write(path, (strict_json(facts, indent=1) + "\n").encode())
    except OSError:
        pass  # watching a run never stops it (a full disk is found by the outputs' own writes)


# -- run.tensorboard ------------------------------------------------------------------------------------
def check_tensorboard() -> None:
    """At set-up (rank 0), when run.tensorboard is on: the optional writer must be installed."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise UserError("run.tensorboard = true needs the tensorboardX package: pip install 'mpi_sfl[tensorboard]' "
                        "(or set run.tensorboard = false)") from None


class Board:
    """Every round's figures as TensorBoard scalars in OUT/tensorboard, step = the round (1-based):
    each number of the metrics row, and each number inside its per-role (and per-phase, per-kind)
    tables as `field/role[/name]`, so losses, accuracy, samples/s, bytes and seconds per role, and
    the robust aggregators' and the noise's figures where a run has them, are all there. A resumed
    run writes into the same directory from its checkpoint's round on (purge_step drops what a killed
    run had written past it), so its curves go on without a jump."""

    def __init__(self, out_dir: str, done_rounds: int):
        from tensorboardX import SummaryWriter
        # Event files are named by the second they are opened: a resume within the same second
        # would replace the first run's file, so each launch's file also names its first round.
        self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=done_rounds + 1 if done_rounds else None,
                                    filename_suffix=f".round{done_rounds + 1}.{os.getpid()}")

    def round(self, row: dict) -> None:
        step = row["round"] + 1
        if row.get("seconds"):
            self.writer.add_scalar("samples_per_s", row["samples"] / row["seconds"], step)
        for tag, value in _scalars(row):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _scalars(row: dict, prefix: str = ""):
    for key, value in row.items():
        if key in ("round", "rounds"):
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            yield f"{prefix}{key}", float(value)


# -- mpi-sfl status OUT -------------------------------------------------------------------------------
def status(out_dir: str) -> str:
    """Where the run in `out_dir` stands: running (with the lock's host, pid and Slurm job), stopped
    and resumable, finished, or failed; its round and step, last metrics, rate and ETA, and its last
    checkpoint. Reads files only and never takes the lock."""
    from . import checkpoint

    out = Path(out_dir)
    facts = _json(out / FILE)
    rows = [json.loads(line) for line in _text(out / "metrics.jsonl").splitlines() if line.strip()]
    summary = _json(out / "summary.json")
    if facts is None and not rows and summary is None:
        raise UserError(f"{out_dir} holds no mpi_sfl run (no progress.json, metrics.jsonl or summary.json)")
    facts = facts or {}
    lock = _text(out / LOCK).split()
    live = len(lock) == 3 and (lock[0] != socket.gethostname() or pid_alive(int(lock[1])))
    if live:
        state = (f"running (host {lock[0]}, pid {lock[1]}" + (f", Slurm job {lock[2]}" if lock[2] != "-" else "") + ")"
                 + ("" if lock[0] == socket.gethostname() else ": per its lock; another host's process is not checked"))
    elif summary is not None:
        state = "finished"
    elif facts.get("state") == "stopped":
        state = "stopped, resumable: continue with the same command and --resume"
    elif facts.get("state") == "failed":
        state = f"failed: {facts.get('message') or 'see the job log'}"
    else:
        state = "failed: the job ended without a word (killed, or its node lost); its lock is gone"
    lines = [f"{out_dir}: {state}"]
    if facts.get("rounds"):
        if live:
            rate = facts.get("samples_per_s")
            lines.append(f"  at round {facts['round'] + 1}/{facts['rounds']}, step {facts['step']}/{facts['steps']}"
                         f" ({rate:,.0f} samples/s, ETA {_span(facts.get('eta_s'))}); updated "
                         f"{_span(time.time() - facts['updated'])} ago" if rate else
                         f"  at round {facts['round'] + 1}/{facts['rounds']}, step {facts['step']}/{facts['steps']}")
        lines.append(f"  rounds finished: {len(rows)}/{facts['rounds']}")
    elif rows:
        lines.append(f"  rounds finished: {len(rows)}/{rows[-1].get('rounds', '?')}")
    if rows:
        r = rows[-1]
        lines.append(f"  last round ({r['round'] + 1}): train loss {r['train_loss']:.4f}, test loss {r['test_loss']:.4f}, "
                     f"test accuracy {r['test_accuracy']:.4f}, {r['seconds']:.1f} s")
    if summary is not None:
        acc, rate, secs = (summary.get(k) for k in ("final_test_accuracy", "train_samples_per_s", "seconds"))
        lines.append(f"  summary: test accuracy {acc if acc is None else format(acc, '.4f')}, "
                     f"{rate if rate is None else format(rate, ',.0f')} samples/s over "
                     f"{secs if secs is None else format(secs, '.1f')} s")
    found = checkpoint.find(out_dir)
    if found is not None and state.startswith("failed"):
        lines[0] += "; resumable from its last checkpoint: the same command with --resume"
    if found is not None:
        meta = _json(found / "meta.json") or {}
        if isinstance(meta.get("round"), int) and isinstance(meta.get("step"), int):
            lines.append(f"  last checkpoint: {found.name}/ at {checkpoint.position(meta)}, written "
                         f"{_span(time.time() - (found / 'meta.json').stat().st_mtime)} ago "
                         f"(mpi-sfl checkpoint {out_dir}: what it holds)")
    return "\n".join(lines)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

"""The fed server (rank 0): FedAvg root, evaluator and the only rank that writes outputs.

Per round it runs the same step loop as every rank (the stop agreement is once per step), taking
part in each centralized averaging (Reduce, divide, Bcast); then it collects the round's global
model — the client parts (from the averaging, or from the client rank that has them: the first
client rank when decentralized, the holder of the relayed model in sl) and the server part (from
the first split server; none in fl) — and evaluates it on the test set in a background thread while
the other ranks already train the next round. A model that is not finite is never written over
model.pt: the run stops (control.FAILED) and the last good model stays.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from mpi4py import MPI

from . import data, models, startup
from .aggregation import Aggregator, flatten_params
from .job import WEIGHTS_TAG, Job
from .layout import FED, ROLE_NAMES
from .outputs import RunWriter, cpu_per_sample, evaluate, role_rows
from .transport import describe
from .waiting import polite_wait


class FedServer:
    def __init__(self, job: Job, test: data.Split):
        cfg = self.cfg = job.cfg
        self.job, self.test = job, test
        self.model = job.spec.build(cfg.run.seed).to(job.device)
        self.dtypes = models.dtypes(self.model)  # model.pt keeps them (flattening makes buffers float32)
        self.client_flat = flatten_params(models.client_parts(self.model, cfg.u_shape, cfg.split), job.device)
        self.server_flat = flatten_params([models.server_part(self.model, cfg.u_shape)], job.device) if cfg.split else None
        self.client_buf = np.zeros(self.client_flat.numel(), np.float32)
        self.server_buf = np.zeros(self.server_flat.numel() - 1 if cfg.split else 0, np.float32)
        self.aggregator = Aggregator("centralized", job.fed_comm, job.timers, cfg.sfl.aggregator, cfg.sfl.trim,
                                     cfg.sfl.byzantine_f, cfg.sfl.krum_select)
        self.rows: list[dict] = []  # finished rounds' metrics rows
        self.model_round: int | None = None  # the round (0-based) whose model model.pt holds, if any
        self.train_seconds, self.samples, self.wall = 0.0, 0, 0.0
        self.started = MPI.Wtime()
        self.writer: RunWriter | None = None
        self.evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval")
        job.timers.clock = time.thread_time  # phases in two threads: each counts its own CPU (timing.py)
        self.pending: tuple[Future, dict] | None = None
        self.startup: dict | None = None  # this run's ranks' start-up phases (startup.py), from its first round's stats
        self.trained_at = float("nan")    # time.time() when training ended here (the benchmarks' exit phase)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        job, cfg = self.job, self.cfg
        self.writer = RunWriter(cfg, cfg.train.rounds, "sfl" if cfg.split else "fl",
                                resume_rows=self.rows if job.start != (0, 0) else None, dtypes=self.dtypes)
        progress = self.writer.progress
        for rnd, plan, first in job.rounds():
            t0 = MPI.Wtime()
            progress.start_round(rnd, first, job.steps(plan), plan.samples)
            for step in range(first, job.steps(plan)):
                if cfg.averages and cfg.centralized and job.aggregate_due(plan, step):
                    if cfg.robust:
                        self.aggregator.combine_at_root(self.client_buf)
                    else:
                        self.aggregator.average_at_root(self.client_buf)
                job.step_done(rnd, step + 1)
                progress.step_done(step + 1)
            self.end_round(rnd, plan, t0)
            if job.checkpoint_due(rnd):
                self.finish_eval()  # its row goes into the checkpoint
                job.checkpoint(self.state_dict, (rnd + 1, 0))
        self.trained_at = time.time()

    def end_round(self, rnd: int, plan: data.RoundPlan, t0: float) -> None:
        job, cfg = self.job, self.cfg
        with job.timers.phase("idle"):
            reqs = [job.comm.Irecv(self.server_buf, source=job.layout.first_server, tag=WEIGHTS_TAG)] if cfg.split else []
            source = job.client_weights_from(plan)
            if source is not None:
                reqs.append(job.comm.Irecv(self.client_buf[:-1], source=source, tag=WEIGHTS_TAG))
            polite_wait(reqs, who=lambda: " and ".join(describe(r) for r in
                                                       [job.layout.first_server] * cfg.split + [source] * (source is not None))
                        + " to send the round's weights", patience=1.5)
        stats = job.gather_stats(job.stats(FED, 0.0, 0.0, self.aggregator.bytes_sent, MPI.Wtime() - t0))
        if self.startup is None:
            self.startup = startup.summary(stats, ROLE_NAMES)
        seconds = float(stats["round_seconds"][1:].max())  # the training ranks' round; eval of the last overlaps it
        self.train_seconds += seconds
        self.samples += plan.samples
        roles = role_rows(stats)
        row = {"round": rnd, "rounds": cfg.train.rounds,
               "train_loss": float(stats["loss_sum"].sum() / max(stats["samples"].sum(), 1)),
               "seconds": round(seconds, 4), "samples": plan.samples, "clients_trained": len(plan.batches),
               "batches_skipped": int(stats["skipped"].sum()),
               "bytes_sent": {r: v["bytes_sent"] for r, v in roles.items()},
               "peak_rss_mb": {r: v["peak_rss_mb"] for r, v in roles.items()},
               **({"peak_device_mb": {r: v["peak_device_mb"] for r, v in roles.items()}}
                  if self.job.device.type == "cuda" else {}),
               "held_mb": {r: v["held_mb"] for r, v in roles.items() if r != "fed_server"},
               "working_copies": {r: v["working_copies"] for r, v in roles.items() if r != "fed_server"},
               "server_passes": roles.get("split_server", {}).get("passes", 0),
               "phase_seconds": {r: v["seconds"] for r, v in roles.items()},
               "cpu_seconds": {r: v["cpu"] for r, v in roles.items()}}
        self.finish_eval()  # the model's weights are about to change
        self.client_flat[:-1].copy_(torch.from_numpy(self.client_buf[:-1]))
        if cfg.split:
            self.server_flat[:-1].copy_(torch.from_numpy(self.server_buf))
        self.pending = (self.evaluator.submit(self.evaluate), row)

    def evaluate(self) -> tuple[float, float]:
        with self.job.timers.phase("eval"):
            return evaluate(self.model, self.test.x, self.test.y, self.job.device)

    def finish_eval(self) -> None:
        """Wait for the last round's evaluation and record its row (and model.pt, if finite)."""
        if self.pending is None:
            return
        future, row = self.pending
        self.pending = None
        row["test_loss"], row["test_accuracy"] = future.result()
        finite = all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
        if not finite:
            self.job.control.fail((row["round"], float("inf"), -1),
                                  f"the global model after round {row['round'] + 1} is not finite "
                                  "(training diverged: lower train.lr); model.pt keeps the last finite model")
        self.rows.append(row)
        try:
            self.writer.round(row, self.model, write_model=finite)
            if finite:
                self.model_round = row["round"]
        except OSError as exc:
            self.job.control.fail((row["round"], float("inf"), -1),
                                  f"cannot write the outputs in {self.writer.dir} ({exc.strerror}); free space "
                                  "there or set run.out_dir")

    # -- checkpoints and the end --------------------------------------------------------------
    def state_dict(self) -> dict:
        self.finish_eval()
        return {"rows": list(self.rows), "client_buf": torch.from_numpy(self.client_buf.copy()),
                "train_seconds": self.train_seconds, "samples": self.samples,
                "wall": self.wall + MPI.Wtime() - self.started, "aggregated_bytes": self.aggregator.bytes_sent}

    def load_state_dict(self, state: dict) -> None:
        self.rows = list(state["rows"])
        self.model_round = self.rows[-1]["round"] if self.rows else None  # a checkpoint's model is finite
        self.client_buf[:] = state["client_buf"].numpy()
        self.train_seconds, self.samples, self.wall = state["train_seconds"], state["samples"], state["wall"]
        self.aggregator.bytes_sent = state["aggregated_bytes"]

    def settle(self) -> None:
        """Before a checkpoint or the end: the evaluation in flight finishes and its row is written."""
        if self.writer is not None:
            self.finish_eval()

    def finish(self) -> None:
        """The run is complete: summary.json."""
        roles = self.rows[-1]["phase_seconds"] if self.rows else {}
        self.writer.finish({
            "mode": "sfl", "variant": self.cfg.sfl.variant, "seconds": round(self.train_seconds, 3),
            "wall_seconds": round(self.wall + MPI.Wtime() - self.started, 3), "ranks": self.job.comm.size,
            "train_samples_per_s": self.samples / self.train_seconds if self.train_seconds else 0.0,
            # every rank's CPU (user + system) over the rounds, per sample trained (timing.py)
            "cpu_seconds_per_sample": cpu_per_sample(self.rows),
            "phase_seconds": roles,
            # Each role's slowest rank to its first step, by phase; then when training ended and
            # summary.json was written here, as time.time() (startup.py; `python -m benchmarks startup`).
            "startup": {**(self.startup or {}), "trained_at": self.trained_at, "finished_at": time.time()},
        })

    def kept(self) -> str:
        """What the outputs hold after a run stopped on a problem (a sentence for its message)."""
        if not self.rows:
            return "No round had finished: there is no model.pt and metrics.jsonl has no rows"
        last = self.rows[-1]["round"] + 1
        rows = f"metrics.jsonl has the rows of rounds 1-{last}" if last > 1 else "metrics.jsonl has round 1's row"
        if self.model_round is None:
            return f"No round ended with a finite model: there is no model.pt; {rows}"
        return f"model.pt keeps round {self.model_round + 1}'s model, the last finite one; {rows}"

    def close(self) -> None:
        self.evaluator.shutdown(wait=True, cancel_futures=True)

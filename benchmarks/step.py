"""step suite: where the time of one training step goes, in microseconds per batch.

One logical client on one client rank with its split server (`-n 3`, sync, U-shaped, batch 64,
synthetic 28x28 data): every piece of a step is on the critical path, one after another, so the
pieces add up to the step. For each model (mlp, mlp with a frozen encoder, lenet5, cnn):

- measured: the real step (`seconds / steps` of a training round after the first) with the file,
  memory and graph state, and `mpi-sfl baseline`'s step on the same batches;
- components, timed in one process with one thread (as each rank runs): the client's encoder
  forward, head forward + loss + backward, encoder backward and optimizer step; the server's forward
  (no graph), recompute + backward, and optimizer step; the file state's write + read of h and the
  memory state's copy; and the four messages (h, z, dl/dz, dl/dh; three with a frozen encoder) as the
  transport's measured one-way time at their sizes (benchmarks._wire, 2 ranks);
- other: measured (file) minus the sum of the components: Python and framework overhead of the
  roles' loops, headers and waits, which no component accounts for. The sum is an upper bound on
  the critical path: the client's encoder backward and optimizer step overlap the server's optimizer
  step and its wait for the next h, so with large encoders `other` can come out negative.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"models": ["mlp", "mlp-frozen", "lenet5", "cnn"], "steps": 150, "reps": 5, "limit": 600},
    "quick": {"models": ["mlp", "lenet5"], "steps": 60, "reps": 2, "limit": 300},
    "tiny": {"models": ["mlp"], "steps": 20, "reps": 1, "limit": 200},
}
BATCH = 64


def model_settings(name: str) -> dict:
    return {"model.name": name.removesuffix("-frozen"), "model.freeze_encoder": name.endswith("-frozen")}


def timed(fn, reps: int, inner: int = 20) -> float:
    """Median seconds of one call of `fn` (after a warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return statistics.median(out)


def components(name: str, reps: int) -> tuple[dict, tuple[int, int]]:
    """Per batch seconds of each piece of a step (one thread), and the bytes of h and z."""
    from mpi_sfl import models, state
    torch.set_num_threads(1)
    m = models.build(name.removesuffix("-frozen"), 0)
    frozen = name.endswith("-frozen")
    enc, body, head = m.encoder, m.body, m.head
    enc.requires_grad_(not frozen)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    with torch.no_grad():
        h0 = enc(x)
        z0 = body(h0)
    delta, dh = torch.randn_like(z0) / BATCH, torch.randn_like(h0) / BATCH
    client_opt = torch.optim.SGD([p for p in [*enc.parameters(), *head.parameters()] if p.requires_grad],
                                 lr=0.01, momentum=0.9)
    server_opt = torch.optim.SGD(body.parameters(), lr=0.01, momentum=0.9)
    params = list(body.parameters())

    def encoder_forward():
        with torch.set_grad_enabled(not frozen):
            enc(x)

    def head_step():
        z = z0.clone().requires_grad_(True)
        F.cross_entropy(head(z), y).backward()

    def encoder_backward():
        enc(x).backward(dh)

    def server_forward():
        with torch.no_grad():
            body(h0)

    def server_backward():
        h = h0.clone().requires_grad_(not frozen)
        torch.autograd.grad(body(h), params + ([h] if not frozen else []), grad_outputs=delta)

    for p in [*enc.parameters(), *head.parameters(), *body.parameters()]:
        p.grad = torch.zeros_like(p)
    out = {"client_encoder_forward": timed(encoder_forward, reps),
           "client_head_forward_backward": timed(head_step, reps),
           # its forward is timed above: the backward is what the forward and backward take beyond it
           "client_encoder_backward": 0.0 if frozen else max(0.0, timed(encoder_backward, reps)
                                                                 - timed(encoder_forward, reps)),
           "client_optimizer": timed(client_opt.step, reps),
           "server_forward": timed(server_forward, reps),
           "server_recompute_backward": timed(server_backward, reps),
           "server_optimizer": timed(server_opt.step, reps)}
    with tempfile.TemporaryDirectory() as d:
        st = state.FileState(not frozen, Path(d), torch.device("cpu"))
        mem = state.MemoryState(not frozen)

        def file_io():
            st._put((0, 0, 0), h0, 1)
            st._take((0, 0, 0))

        def memory_copy():
            mem._put((0, 0, 0), h0, 1)
            mem._take((0, 0, 0))
        out["file_state_write_read"] = timed(file_io, reps)
        out["memory_state_copy"] = timed(memory_copy, reps)
        st.close()
    return out, (h0.numel() * 4, z0.numel() * 4)


def one_way(sizes: list[int], work: Path, reps: int) -> dict[int, float]:
    """The transport's one-way seconds per message size (half its round trip)."""
    out = work / "step-wire.json"
    common.mpi(2, ["-m", "benchmarks._wire", "--sizes", ",".join(map(str, sizes)), "--reps", str(reps),
                   "--target", "0.05", "--out", str(out)], limit=300)
    return {r["bytes"]: statistics.median(r["rtt_seconds"]["transport"]) / 2
            for r in json.loads(out.read_text())["results"]}


def measured(name: str, s: dict, work: Path) -> dict:
    """Seconds per step of real runs (-n 3, one client) per state mode, and of the baseline."""
    settings = {**model_settings(name), "data.dataset": "synthetic", "data.train_samples": s["steps"] * BATCH,
                "data.test_samples": 64, "train.clients": 1, "train.batch_size": BATCH, "train.rounds": 3,
                "train.lr": 0.01, "train.momentum": 0.9, "sfl.variant": "sync", "run.checkpoint_every": 0}
    out = {}
    for mode in ("file", "memory", "graph"):
        res = common.train(3, {**settings, "sfl.state": mode}, work / f"step-{name}-{mode}", limit=s["limit"])
        out[mode] = common.median([r["seconds"] for r in res["metrics"][1:]]) / s["steps"]
    res = common.baseline(settings, work / f"step-{name}-baseline", limit=s["limit"])
    out["baseline"] = common.median([r["seconds"] for r in res["metrics"][1:]]) / s["steps"]
    return out


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    comp, sizes = {}, {}
    for name in s["models"]:
        comp[name], sizes[name] = components(name, s["reps"])
    lat = one_way(sorted({b for pair in sizes.values() for b in pair}), work, s["reps"])
    rows, summary = [], {}
    for name in s["models"]:
        real = measured(name, s, work)
        c = comp[name]
        h, z = sizes[name]
        frozen = name.endswith("-frozen")
        messages = lat[h] + 2 * lat[z] + (0.0 if frozen else lat[h])
        parts = {k: v for k, v in c.items() if k != "memory_state_copy"}
        accounted = sum(parts.values()) + messages
        row = {"model": name, "step_file_us": real["file"] * 1e6, "step_memory_us": real["memory"] * 1e6,
               "step_graph_us": real["graph"] * 1e6, "baseline_us": real["baseline"] * 1e6,
               "batches_per_s_file": 1 / real["file"], "sfl_file_vs_baseline": real["baseline"] / real["file"],
               **{f"{k}_us": v * 1e6 for k, v in c.items()}, "messages_us": messages * 1e6,
               "other_us": (real["file"] - accounted) * 1e6, "h_bytes": h, "z_bytes": z}
        rows.append(row)
        summary[f"{name}_batches_per_s"] = row["batches_per_s_file"]
        summary[f"{name}_other_us"] = row["other_us"]
        summary[f"{name}_sfl_vs_baseline"] = row["sfl_file_vs_baseline"]
    cols = ["client_encoder_forward_us", "client_head_forward_backward_us", "client_encoder_backward_us",
            "client_optimizer_us", "server_forward_us", "server_recompute_backward_us", "server_optimizer_us",
            "file_state_write_read_us", "messages_us", "other_us"]
    breakdown = [{"model": r["model"], "measured_us": r["step_file_us"], **{c.removesuffix("_us"): r[c] for c in cols}}
                 for r in rows]
    text = "\n\n".join([
        table(rows, ["model", "step_file_us", "step_memory_us", "step_graph_us", "baseline_us", "batches_per_s_file",
                     "sfl_file_vs_baseline"], f"step: measured microseconds per batch (batch {BATCH}, -n 3, one client)"),
        table(breakdown, None, "step: the file-state step, piece by piece (us per batch)")])
    notes = [f"sync U-shaped, one logical client, batch {BATCH}, synthetic 1x28x28, SGD momentum 0.9, -n 3 on this "
             "machine; the measured step is the median round (after the first) over its steps.",
             "Components are timed in one process with one torch thread; messages are the transport's one-way "
             "time at the h and z sizes (half a ping-pong round trip); other = measured - components - messages.",
             "The client's encoder backward and optimizer step overlap the server's optimizer step: the sum of the "
             "pieces over-counts the critical path, and other is negative where that overlap exceeds the overhead."]
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

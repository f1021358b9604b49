"""Analytic cost model of one synchronous SFL round, checked against the scaling measurements.

    python -m benchmarks model [--quick] [--wire WIRE.json] [--scaling SCALING.json]

(benchmarks/model.py gathers the inputs below and calls suite() here.)

Inputs, all measured, none assumed:
- per-sample compute of the client part (encoder forward, head forward + loss + backward, encoder
  backward, optimizer step) and of the server part as the split server runs it (mpi_sfl.state:
  forward, then backward with recompute for memory/file, with the scratch file for file), timed
  in this process with one torch thread (what each rank gets when ranks >= cores);
- message sizes from the model's cut-layer shapes (h = encoder output, z = body output);
- link latency alpha and bandwidth beta from the wire suite (mpi_sfl Transport, smallest and
  largest message) — from --wire, or a tiny wire run made here.

Model of one round with N client ranks (one logical client each), S split servers (clients dealt
round-robin), per-client shard n, batch b, T = ceil(n / b) steps, K = ceil(N / S) clients per server:
    client   = n * t_client                               (client ranks work in parallel)
    server   = K * n * t_server                           (a split server serves its batches in turn)
    messages = K * (4 T (alpha + header / beta) + n (2|h| + 2|z|) / beta)   4 messages per batch
    replicas = T * 2 ceil(log2 S) (alpha + 4 P_s / beta)  split-server gradient Allreduce when S > 1
    fedavg   = 2 ceil(log2(N + 1)) (alpha + 4 (P_c + 1) / beta)             Reduce + Bcast per round
    round    = client + server + messages + replicas + fedavg   (the sync step barely overlaps them)
On a machine with fewer cores than busy ranks, the check scales client compute by max(1, N / cores)
(the N client ranks compute at once; the server computes while they wait). The projection assumes a
core per rank and the measured link everywhere (optimistic across nodes).
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import cores, table

HEADER_BYTES = 12 * 8
PROJECT_N = [2 ** i for i in range(11)]  # 1 .. 1024
PROJECT_SAMPLES = 60000                  # Fashion-MNIST's training set, split over the clients


def measure_compute(model_name: str = "cnn", batch: int = 32, reps: int = 7, states=("file", "memory", "graph")) -> dict:
    """Seconds per sample of the client part and of the server part per state mode, plus shapes."""
    import mpi4py
    mpi4py.rc.initialize = False  # mpi_sfl.state imports mpi4py.MPI; nothing here calls MPI
    import torch
    import torch.nn.functional as F

    from mpi_sfl import models
    from mpi_sfl.aggregation import attach_flat_grads, flatten_params
    from mpi_sfl.state import make_state

    torch.set_num_threads(1)
    model = models.build(model_name, 0).train()
    enc, body, head = model.encoder, model.body, model.head
    client_parts = models.client_parts(model, "u")
    flatten_params(client_parts, torch.device("cpu"))
    c_opt = torch.optim.SGD([p for m in client_parts for p in m.parameters()], lr=0.01, momentum=0.9)
    s_params = list(body.parameters())
    gflat = attach_flat_grads(s_params, torch.device("cpu"))
    s_opt = torch.optim.SGD(s_params, lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    with torch.no_grad():
        h0 = enc(x)
        z0 = body(h0)
    P_c = sum(p.numel() for m in client_parts for p in m.parameters())
    P_s = sum(p.numel() for p in s_params)

    def client_once():
        h = enc(x)
        z = z0.clone().requires_grad_(True)
        loss = F.cross_entropy(head(z), y)
        loss.backward()
        h.backward(torch.ones_like(h) * 1e-3)  # stands in for the returned dl/dh
        c_opt.step()
        c_opt.zero_grad(set_to_none=False)

    def timed(fn, n=reps):
        fn()  # warm-up
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / batch

    out = {"model": model_name, "batch": batch, "threads": 1, "P_client": P_c, "P_server": P_s,
           "h_shape": list(h0.shape[1:]), "z_shape": list(z0.shape[1:]),
           "h_bytes_per_sample": h0[0].numel() * 4, "z_bytes_per_sample": z0[0].numel() * 4,
           "t_client": timed(client_once), "t_server": {}}
    with tempfile.TemporaryDirectory(prefix="mpi_sfl-costmodel-") as scratch:
        for st in states:
            state = make_state(st, True, Path(scratch), torch.device("cpu"))
            delta = torch.randn_like(z0) * 1e-3
            counter = [0]

            def server_once():
                counter[0] += 1
                key = (0, counter[0], 0)
                state.forward(key, body, h0, 1234)
                grads, _ = state.backward(key, body, delta)
                off = 0
                for g in grads:
                    gflat[off:off + g.numel()].add_(g.reshape(-1), alpha=batch)
                    off += g.numel()
                gflat[:-1].div_(batch)
                s_opt.step()
                gflat.zero_()

            out["t_server"][st] = timed(server_once)
            state.close()
    return out


def link_from_wire(wire: dict) -> dict:
    s = wire["summary"]
    return {"alpha": s["transport_latency_us"] * 1e-6, "beta": s["transport_GBps_max"] * 1e9,
            "alpha_raw": s.get("raw_latency_us", float("nan")) * 1e-6,
            "beta_raw": s.get("raw_GBps_max", float("nan")) * 1e9}


def predict(comp: dict, link: dict, n_clients: int, servers: int, shard: int, batch: int,
            state: str = "file", cores: int | None = None) -> dict:
    """Seconds per round (and its parts) for N client ranks of one logical client each."""
    a, beta = link["alpha"], link["beta"]
    steps = math.ceil(shard / batch)
    k = math.ceil(n_clients / servers)
    contention = max(1.0, n_clients / cores) if cores else 1.0
    # per round; compute and bytes scale with the samples (the last batch may be short)
    client = shard * comp["t_client"] * contention
    server = k * shard * comp["t_server"][state]
    per_sample = 2 * (comp["h_bytes_per_sample"] + comp["z_bytes_per_sample"])
    messages = k * (steps * 4 * (a + HEADER_BYTES / beta) + shard * per_sample / beta)
    replicas = steps * 2 * math.ceil(math.log2(servers)) * (a + 4 * comp["P_server"] / beta) if servers > 1 else 0.0
    agg = 2 * math.ceil(math.log2(n_clients + 1)) * (a + 4 * (comp["P_client"] + 1) / beta)
    total = client + server + messages + replicas + agg
    return {"steps": steps, "client": client, "server": server, "messages": messages,
            "replicas": replicas, "aggregation": agg, "round": total}


def calibrate(comp: dict, scaling: dict) -> dict | None:
    """`comp` with the per-sample compute a rank really spent in the scaling job with one client
    rank (its phase_seconds per round / samples per round), instead of the in-process timing."""
    one = [r for r in scaling["results"] if r["kind"] == "strong" and r["client_ranks"] == 1]
    if not one or "client.client_compute" not in one[0]:
        return None
    r = one[0]
    state = scaling["settings"].get("state", "file")
    cal = dict(comp, t_server=dict(comp["t_server"]))
    cal["t_client"] = r["client.client_compute"] / r["samples_per_round"]
    cal["t_server"][state] = r["split_server.server_compute"] / r["samples_per_round"]
    return cal


def check(comp: dict, link: dict, scaling: dict, cores: int) -> list[dict]:
    """Predicted vs measured seconds per round for every row of a scaling suite result: with the
    in-process compute timings (independent of the job) and calibrated on the N=1 job's phases
    (tests the model's structure: how the parts add up as N grows)."""
    s = scaling["settings"]
    state = s.get("state", "file")
    cal = calibrate(comp, scaling)
    rows = []
    for r in scaling["results"]:
        n = r["client_ranks"]
        shard = r["samples_per_round"] // n
        p = predict(comp, link, n, 1, shard, s["batch"], state, cores)
        row = {"kind": r["kind"], "client_ranks": n, "servers": 1, "measured_s": r["sec_per_round"],
               "predicted_s": p["round"], "pred_over_meas": p["round"] / r["sec_per_round"],
               "pred_client_s": p["client"], "pred_server_s": p["server"], "pred_messages_s": p["messages"],
               "pred_aggregation_s": p["aggregation"],
               "meas_client_compute_s": r.get("client.client_compute", float("nan")),
               "meas_server_compute_s": r.get("split_server.server_compute", float("nan"))}
        if cal is not None:
            pc = predict(cal, link, n, 1, shard, s["batch"], state, cores)
            row["calibrated_s"] = pc["round"]
            row["cal_over_meas"] = pc["round"] / r["sec_per_round"]
        rows.append(row)
    return rows


def project(comp: dict, link: dict, batch: int = 32, state: str = "file") -> list[dict]:
    """Strong scaling of PROJECT_SAMPLES over 1..1024 clients, S = 1 and S = ceil(N / 16)."""
    rows = []
    t1 = predict(comp, link, 1, 1, PROJECT_SAMPLES, batch, state)["round"]
    for n in PROJECT_N:
        for servers in sorted({1, math.ceil(n / 16)}):
            shard = math.ceil(PROJECT_SAMPLES / n)
            p = predict(comp, link, n, servers, shard, batch, state)
            rows.append({"clients": n, "servers": servers, "steps": p["steps"], "round_s": p["round"],
                         "samples_per_s": PROJECT_SAMPLES / p["round"], "speedup": t1 / p["round"],
                         "efficiency": t1 / (n * p["round"]),
                         "server_share": p["server"] / p["round"],
                         "comm_share": (p["messages"] + p["replicas"] + p["aggregation"]) / p["round"]})
    return rows


def suite(level: str, wire: dict, scaling: dict) -> dict:
    """The `model` suite: measure, check, project."""
    s_batch = scaling["settings"]["batch"]
    comp = measure_compute(scaling["settings"].get("model", "cnn"), s_batch, reps=3 if level == "tiny" else 15)
    link = link_from_wire(wire)
    ncores = cores()
    checked = check(comp, link, scaling, ncores)
    projected = project(comp, link, s_batch)
    errors = [abs(r["pred_over_meas"] - 1) for r in checked]
    last = {r["servers"]: r for r in projected if r["clients"] == PROJECT_N[-1]}
    summary = {
        "t_client_us_per_sample": comp["t_client"] * 1e6,
        "t_server_us_per_sample_file": comp["t_server"]["file"] * 1e6,
        "t_server_us_per_sample_memory": comp["t_server"]["memory"] * 1e6,
        "t_server_us_per_sample_graph": comp["t_server"]["graph"] * 1e6,
        "link_latency_us": link["alpha"] * 1e6,
        "link_GBps": link["beta"] / 1e9,
        "check_median_abs_error": statistics.median(errors),
        "check_max_abs_error": max(errors),
        **({"check_median_abs_error_calibrated": statistics.median(abs(r["cal_over_meas"] - 1) for r in checked),
            "check_max_abs_error_calibrated": max(abs(r["cal_over_meas"] - 1) for r in checked)}
           if "cal_over_meas" in checked[0] else {}),
        "projected_speedup_1024_s1": last[1]["speedup"],
        "projected_speedup_1024_s64": last[64]["speedup"],
        "projected_efficiency_1024_s64": last[64]["efficiency"],
    }
    assumptions = [
        f"Compute: in-process, 1 torch thread, batch {s_batch}, model {comp['model']}: client "
        f"{comp['t_client'] * 1e6:.0f} us/sample, server (file) {comp['t_server']['file'] * 1e6:.0f} us/sample "
        f"(memory {comp['t_server']['memory'] * 1e6:.0f}, graph {comp['t_server']['graph'] * 1e6:.0f}).",
        f"Cut layer: h {comp['h_shape']} ({comp['h_bytes_per_sample']} B/sample), z {comp['z_shape']} "
        f"({comp['z_bytes_per_sample']} B/sample); 4 Transport messages per batch (h, z, delta, dl/dh), "
        f"each alpha + ({HEADER_BYTES}-byte header + payload) / beta. P_client = {comp['P_client']}, P_server = {comp['P_server']}.",
        f"Link: alpha = {link['alpha'] * 1e6:.1f} us (one way, Transport, smallest wire size), beta = "
        f"{link['beta'] / 1e9:.2f} GB/s (Transport, best wire size)" + (" — from a tiny wire run made here"
                                                                          if wire.get("measured_here") else ""),
        "No overlap of client compute, server compute and messages within a step (sync variant); the "
        "split server serves its K = ceil(N/S) batches one after another; FedAvg once per round as a "
        "binomial-tree Reduce + Bcast; split-server replicas Allreduce P_server floats per step.",
        f"Check: this machine's {ncores} cores — client compute x max(1, N/cores); the scaling rows ran "
        f"with {scaling['settings'].get('batch')}-sample batches, file state, S = 1" +
        (" (a scaling run made here)" if scaling.get("measured_here") else "") + ". predicted_s uses the "
        "in-process compute timings; calibrated_s the compute per sample the ranks of the N=1 job "
        "really spent (its phase_seconds), so it fits N=1 by construction and tests how the parts add "
        "up as N grows. A gap between the two is what a busy, oversubscribed job adds to pure compute.",
        f"Projection (in-process compute): strong scaling of {PROJECT_SAMPLES} samples (Fashion-MNIST) over N clients, one "
        "logical client and one core per rank, S = 1 and S = ceil(N/16) split servers, the measured "
        "intra-node link everywhere (optimistic across nodes: add the network's latency and bandwidth), "
        "batch as in the check.",
    ]
    text = (table(checked, ["kind", "client_ranks", "measured_s", "predicted_s", "pred_over_meas", "calibrated_s",
                            "cal_over_meas", "pred_client_s",
                            "pred_server_s", "pred_messages_s", "meas_client_compute_s", "meas_server_compute_s"],
                  "model check: seconds per round, predicted vs measured")
            + "\n" + table(projected, ["clients", "servers", "steps", "round_s", "samples_per_s", "speedup",
                                      "efficiency", "server_share", "comm_share"],
                           f"model projection: strong scaling, {PROJECT_SAMPLES} samples, batch {s_batch}, file state"))
    return {"settings": {"batch": s_batch, "project_samples": PROJECT_SAMPLES, "project_clients": PROJECT_N},
            "results": {"compute": comp, "link": link, "check": checked, "projection": projected},
            "summary": summary, "notes": assumptions, "text": text}


"""mpi_sfl benchmarks: every figure a ratio against a baseline measured in the same run.

    python benchmarks/run.py SUITE [--quick | --tiny] [--out FILE.json]

Suites (design.md §6):
  wire        Transport ping-pong vs raw mpi4py Send/Recv vs pickled send/recv (2 ranks)
  aggregate   flat-buffer FedAvg (Aggregator) vs per-tensor vs pickled collectives (4 ranks)
  throughput  SFL samples/s (file/memory/graph state) vs `mpi_sfl baseline` and vs torch DDP (gloo)
  memory      split-server peak RSS vs client batches in flight, per state mode
  scaling     strong and weak scaling over client ranks, with a per-phase breakdown and a plot
  model       analytic cost model (benchmarks/cost_model.py): checked against scaling, projected
  all         every suite above in order, into --out-dir (model uses that run's wire and scaling)

--quick runs each suite in well under a minute on 2 cores; --tiny is smaller still (tests only:
its numbers are too small to mean much). Without either it is the real measurement. Each suite
prints a table and writes JSON {"suite", "level", "machine", "settings", "results", "summary",
"notes"} to --out (default runs/bench/SUITE[-quick|-tiny].json). MPI jobs run one at a time, each
under MPIEXEC_TIMEOUT and `timeout -k 10`.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import HERE, REPO, cores, human_bytes, mean_std, median, slope, table  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
SYNTH = {"data.dataset": "synthetic", "data.test_samples": 100, "model.name": "cnn"}


# ------------------------------------------------------------------------------------------------
# wire
# ------------------------------------------------------------------------------------------------
WIRE = {
    "full": {"sizes": [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB],
             "reps": 7, "target": 0.05},
    "quick": {"sizes": [4 * KiB, 64 * KiB, MiB, 4 * MiB, 16 * MiB], "reps": 3, "target": 0.03},
    "tiny": {"sizes": [4 * KiB, MiB, 4 * MiB], "reps": 2, "target": 0.02},
}


def suite_wire(level: str, work: Path, args) -> dict:
    s = WIRE[level]
    out = work / "wire-raw.json"
    common.mpi(2, [str(HERE / "_wire.py"), "--sizes", ",".join(map(str, s["sizes"])), "--reps", str(s["reps"]),
                   "--target", str(s["target"]), "--out", str(out)], limit=600)
    raw = json.loads(out.read_text())["results"]
    rows = []
    for r in raw:
        med = {v: median(ts) for v, ts in r["rtt_seconds"].items()}
        b = r["bytes"]
        rows.append({
            "size": human_bytes(b), "bytes": b,
            "transport_us": med["transport"] * 1e6, "transport_poll_us": med["transport_poll"] * 1e6,
            "raw_us": med["raw"] * 1e6, "pickle_us": med["pickle"] * 1e6,
            # each round trip moves the payload twice
            "transport_GBps": 2 * b / med["transport"] / 1e9, "raw_GBps": 2 * b / med["raw"] / 1e9,
            "pickle_GBps": 2 * b / med["pickle"] / 1e9,
            "transport_vs_raw": med["raw"] / med["transport"],
            "poll_vs_raw": med["raw"] / med["transport_poll"],
            "transport_vs_pickle": med["pickle"] / med["transport"],
            "iters": r["iters"], "reps": len(r["rtt_seconds"]["raw"]),
        })
    big = [r for r in rows if r["bytes"] >= MiB]
    one = next(r for r in rows if r["bytes"] == MiB)
    summary = {
        "wire_vs_raw_min_1mib": min(r["transport_vs_raw"] for r in big),
        "wire_vs_pickle_1mib": one["transport_vs_pickle"],
        "transport_GBps_max": max(r["transport_GBps"] for r in rows),
        "raw_GBps_max": max(r["raw_GBps"] for r in rows),
        "transport_latency_us": rows[0]["transport_us"] / 2,  # one way, smallest size
        "raw_latency_us": rows[0]["raw_us"] / 2,
        "latency_size_bytes": rows[0]["bytes"],
    }
    notes = ["GB/s = 2 x payload / median round-trip time (1e9 bytes); ratios are ratios of medians.",
             "transport = mpi_sfl Transport.isend + wait_sends / recv (a 96-byte header message, then "
             "the payload) with the wait mode training picks here (run.wait = auto: blocking when each "
             "rank has a core); transport_poll = the same with run.wait = poll (test + sleeps, what "
             "training uses when ranks outnumber cores: it costs latency and large-message progress by "
             "design); raw = blocking Send/Recv of a numpy buffer; pickle = send/recv of the torch tensor."]
    text = table(rows, ["size", "transport_us", "transport_poll_us", "raw_us", "pickle_us", "transport_GBps",
                        "raw_GBps", "pickle_GBps", "transport_vs_raw", "poll_vs_raw", "transport_vs_pickle"],
                 "wire: ping-pong, 2 ranks, medians")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}


# ------------------------------------------------------------------------------------------------
# aggregate
# ------------------------------------------------------------------------------------------------
AGG = {
    "full": {"params": [100_000, 1_000_000, 10_000_000, 50_000_000], "reps": 5, "ranks": 4},
    "quick": {"params": [100_000, 1_000_000, 4_000_000], "reps": 3, "ranks": 4},
    "tiny": {"params": [100_000, 1_000_000], "reps": 2, "ranks": 4},
}
AGG_VARIANTS = ("flat", "flat_blocking", "per_tensor", "per_tensor_blocking", "pickle")


def suite_aggregate(level: str, work: Path, args) -> dict:
    s = AGG[level]
    out = work / "aggregate-raw.json"
    common.mpi(s["ranks"], [str(HERE / "_aggregate.py"), "--params", ",".join(map(str, s["params"])),
                            "--reps", str(s["reps"]), "--out", str(out)], limit=600)
    rows = []
    for r in json.loads(out.read_text())["results"]:
        med = {v: median(ts) for v, ts in r["seconds"].items()}
        row = {"mode": r["mode"], "params": r["params"], "tensors": r["tensors"], "ranks": r["ranks"],
               "MB": (r["params"] + 1) * 4 / 1e6}
        row.update({f"{v}_ms": med[v] * 1e3 for v in AGG_VARIANTS})
        # like against like: the same waiting (polite nonblocking, as training uses it) ...
        row["flat_vs_per_tensor"] = med["per_tensor"] / med["flat"]
        # ... and both blocking (spinning), for reference
        row["blocking_flat_vs_per_tensor"] = med["per_tensor_blocking"] / med["flat_blocking"]
        row["flat_vs_pickle"] = med["pickle"] / med["flat"]
        row["flat_vs_flat_blocking"] = med["flat_blocking"] / med["flat"]
        row["max_abs_error"] = max(r["max_abs_error"].values())
        rows.append(row)
    largest = [r for r in rows if r["params"] == max(x["params"] for x in rows)]
    summary = {
        "flat_vs_per_tensor": min(r["flat_vs_per_tensor"] for r in largest),
        "blocking_flat_vs_per_tensor": min(r["blocking_flat_vs_per_tensor"] for r in largest),
        "flat_vs_pickle": min(r["flat_vs_pickle"] for r in largest),
        "largest_params": largest[0]["params"],
        "flat_ms_largest_centralized": next(r["flat_ms"] for r in largest if r["mode"] == "centralized"),
        "flat_ms_largest_decentralized": next(r["flat_ms"] for r in largest if r["mode"] == "decentralized"),
        "flat_vs_one_blocking_largest": min(r["flat_vs_flat_blocking"] for r in largest),
    }
    notes = [f"{s['ranks']} ranks: centralized = rank 0 fed server + {s['ranks'] - 1} clients "
             f"(Ireduce + Ibcast); decentralized = {s['ranks']} clients (Iallreduce).",
             "flat = mpi_sfl Aggregator (one flat buffer, as 8 MiB slices posted together); per_tensor = one nonblocking collective per tensor (posted "
             "together, one polite wait); per_tensor_blocking = blocking collectives one by one; "
             "pickle = lowercase reduce+bcast / allreduce of the tensor list; flat_blocking (the whole "
             "flat buffer in one blocking collective) is for reference. "
             "Tensor lists are ResNet-like (3 tensors per conv; 62 tensors at 10M params, 161 at 50M). "
             "Time = slowest rank, median.",
             "flat_vs_per_tensor compares like with like: flat and per_tensor both nonblocking with "
             "polite waits (as training waits); blocking_flat_vs_per_tensor compares the two blocking "
             "variants. Summary figures are the lower of the two modes at the largest model.",
             "max_abs_error: every variant's result against the exact average (float32)."]
    if s["ranks"] > cores():
        notes.append(f"{s['ranks']} ranks on {cores()} cores: oversubscribed; blocking variants spin.")
    text = table(rows, ["mode", "params", "tensors", "flat_ms", "flat_blocking_ms", "per_tensor_ms",
                        "per_tensor_blocking_ms", "pickle_ms", "flat_vs_per_tensor", "blocking_flat_vs_per_tensor",
                        "flat_vs_pickle"],
                 "aggregate: client-side FedAvg, medians")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------
THROUGHPUT = {
    "full": {"client_ranks": 2, "batch": 32, "train_samples": 4096, "rounds": 3, "repeats": 2},
    "quick": {"client_ranks": 2, "batch": 32, "train_samples": 768, "rounds": 2, "repeats": 1},
    "tiny": {"client_ranks": 2, "batch": 32, "train_samples": 256, "rounds": 1, "repeats": 1},
}
STATES = ("file", "memory", "graph")


def suite_throughput(level: str, work: Path, args) -> dict:
    s = THROUGHPUT[level]
    ranks = s["client_ranks"] + 2
    cfg = {**SYNTH, "data.train_samples": s["train_samples"], "train.rounds": s["rounds"],
           "train.batch_size": s["batch"], "train.clients": s["client_ranks"]}
    variants = [*STATES, "baseline", "baseline_1t", "ddp"]
    samples: dict[str, list[float]] = {k: [] for k in variants}
    extra: dict[str, dict] = {}
    for rep in range(s["repeats"]):
        k = rep % len(variants)
        order = variants[k:] + variants[:k]  # rotate so no variant is always first
        for v in order:
            d = work / f"tp-{v}-{rep}"
            if v in STATES:
                res = common.train(ranks, {**cfg, "sfl.state": v}, d)
                samples[v].append(res["summary"]["train_samples_per_s"])
            elif v.startswith("baseline"):
                res = common.baseline({**cfg, "run.threads": 1} if v == "baseline_1t" else cfg, d)
                samples[v].append(res["summary"]["train_samples_per_s"])
            else:
                out = work / f"ddp-{rep}.json"
                # the same global batch per step as SFL and the baseline, split over the DDP ranks
                ddp_cfg = {**cfg, "train.batch_size": max(1, s["client_ranks"] * s["batch"] // ranks)}
                common.mpi(ranks, [str(HERE / "_ddp.py"), *common.sets(ddp_cfg), "--out", str(out)])
                res = json.loads(out.read_text())
                samples[v].append(res["train_samples_per_s"])
                extra["ddp"] = res
    # The reference is the faster baseline: all cores (mpi_sfl's default threads) or one thread
    # (multi-threaded torch can collapse when other processes load the cores).
    base = max(median(samples["baseline"]), median(samples["baseline_1t"]))
    rows = []
    for v, xs in samples.items():
        sps = median(xs)
        if v in STATES:
            desc, procs, glob = f"SFL sync, state={v}", ranks, s["client_ranks"] * s["batch"]
        elif v.startswith("baseline"):
            threads = 1 if v == "baseline_1t" else cores()
            desc, procs, glob = (f"mpi_sfl baseline (1 process, unsplit, {threads} thread{'s' * (threads > 1)})",
                                 1, s["client_ranks"] * s["batch"])
        else:
            desc, procs, glob = ("torch DDP over gloo (unsplit)", ranks,
                                 ranks * max(1, s["client_ranks"] * s["batch"] // ranks))
        rows.append({"variant": v, "what": desc, "processes": procs, "batch_per_step": glob,
                     "samples_per_s": sps, "vs_baseline": sps / base, "runs": len(xs)})
    by = {r["variant"]: r["samples_per_s"] for r in rows}
    summary = {f"sfl_vs_baseline_{m}": by[m] / base for m in STATES}
    summary["sfl_vs_ddp"] = by["file"] / by["ddp"]
    summary["baseline_samples_per_s"] = base
    summary["baseline_threads"] = cores() if by["baseline"] >= by["baseline_1t"] else 1
    notes = [f"SFL: 1 fed server + 1 split server + {s['client_ranks']} client ranks ({ranks} processes), "
             f"{s['client_ranks']} logical clients x batch {s['batch']}; baseline: one process, the "
             f"concatenated batch of {s['client_ranks'] * s['batch']}; DDP: {ranks} processes x batch "
             f"{max(1, s['client_ranks'] * s['batch'] // ranks)} (the same global batch per step).",
             "samples/s = training samples x rounds / training seconds (summary.json; eval excluded, "
             "first round included), median over repeats. Threads: mpi_sfl's rule (cores / ranks on "
             "the node, at least 1) for SFL and DDP; the baseline runs with all cores and with one "
             "thread, and vs_baseline divides by the faster of the two.",
             f"Synthetic 28x28 data, model cnn, {s['train_samples']} samples, {s['rounds']} round(s)."]
    if ranks > cores():
        notes.append(f"{ranks} processes on {cores()} cores: SFL and DDP are oversubscribed; the "
                     "baseline is not.")
    if by["baseline"] < 0.5 * by["baseline_1t"]:
        notes.append(f"The {cores()}-thread baseline ran {by['baseline_1t'] / by['baseline']:.0f}x slower than "
                     "the 1-thread one: multi-threaded torch collapses when other processes load the cores "
                     "(see machine.load_avg_1m).")
    text = table(rows, ["variant", "what", "processes", "batch_per_step", "samples_per_s", "vs_baseline"],
                 "throughput: training samples/s")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------
MEMORY = {
    "full": {"clients": [1, 2, 4, 8, 16, 32], "batch": 128, "grouped": False},
    "quick": {"clients": [1, 2, 4], "batch": 128, "grouped": True},
    "tiny": {"clients": [1, 8], "batch": 128, "grouped": True},
}


def suite_memory(level: str, work: Path, args) -> dict:
    s = MEMORY[level]
    kmax = max(s["clients"])
    # Fixed data set (kmax full batches) for every point: the data-loading transient at start-up is
    # the same everywhere, and only the batches in flight per step change (kmax / k steps).
    cfg = {**SYNTH, "data.train_samples": kmax * s["batch"], "train.rounds": 1, "train.batch_size": s["batch"],
           "sfl.servers": 1, "run.threads": 1}
    rows = []
    for state in STATES:
        jobs = [({**cfg, "sfl.state": state, "train.clients": k}, work / f"mem-{state}-{k}") for k in s["clients"]]
        if s["grouped"]:  # one launch per state mode, its points side by side (see _group_train.py)
            results = common.train_grouped(3, jobs)
        else:             # one plain launch per point
            results = [common.train(3, settings, d) for settings, d in jobs]
        for k, res in zip(s["clients"], results):
            m = res["metrics"][-1]
            rows.append({"state": state, "clients": k, "inflight_batches": k,
                         "split_server_peak_mb": m["peak_rss_mb"]["split_server"],
                         "client_peak_mb": m["peak_rss_mb"]["client"],
                         "fed_peak_mb": m["peak_rss_mb"]["fed_server"],
                         "seconds": res["summary"]["seconds"]})
    summary = {}
    act_mb = s["batch"] * 16 * 14 * 14 * 4 / 2**20  # the cnn cut layer: h is 16x14x14 float32 per sample
    for state in STATES:
        pts = [r for r in rows if r["state"] == state]
        p1 = next(r["split_server_peak_mb"] for r in pts if r["clients"] == min(s["clients"]))
        pk = next(r["split_server_peak_mb"] for r in pts if r["clients"] == kmax)
        for r in pts:
            r["growth"] = r["split_server_peak_mb"] / p1 - 1
        summary[f"growth_{state}"] = pk / p1 - 1
        summary[f"mb_per_inflight_batch_{state}"] = slope([r["clients"] for r in pts],
                                                          [r["split_server_peak_mb"] for r in pts])
    summary["activation_mb_per_batch"] = act_mb
    notes = ["3 ranks: fed server, split server, one client rank hosting all logical clients; a client "
             "rank sends every logical client's activation before receiving, so the batches in flight "
             "at the split server per step = logical clients.",
             f"cnn, batch {s['batch']} per client, synthetic data of {kmax * s['batch']} samples for every "
             f"point (1 round: {kmax}/k steps); peak RSS = ru_maxrss of the split server process "
             "(metrics.jsonl peak_rss_mb.split_server), which includes the interpreter and torch.",
             f"The activation h at the cut is {act_mb:.2f} MiB per batch: graph mode keeps it and the "
             "graph behind z, memory mode keeps h, file mode keeps a file name. Outgoing dl/dh buffers "
             "are released as soon as the client has taken them.",
             "growth = peak(max clients) / peak(1 client) - 1; mb_per_inflight_batch = least-squares slope."]
    if s["grouped"]:
        notes.append(f"Each state mode's {len(s['clients'])} points ran side by side as independent 3-rank "
                     f"jobs in one {3 * len(s['clients'])}-rank launch (benchmarks/_group_train.py), to save "
                     "start-up time: peak RSS is per process, but the seconds column is then meaningless, "
                     "and every process maps MPI shared memory for the whole launch (a constant offset).")
    else:
        notes.append("Every point is its own mpiexec -n 3 launch.")
    text = table(rows, ["state", "clients", "split_server_peak_mb", "growth", "client_peak_mb", "seconds"],
                 "memory: split server peak RSS vs batches in flight")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}


# ------------------------------------------------------------------------------------------------
# scaling
# ------------------------------------------------------------------------------------------------
SCALING = {
    "full": {"ranks": [1, 2, 4], "repeats": 2, "samples": 1024, "batch": 32, "rounds": 4},
    "quick": {"ranks": [1, 2], "repeats": 2, "samples": 512, "batch": 32, "rounds": 3},
    "tiny": {"ranks": [1, 2], "repeats": 1, "samples": 256, "batch": 32, "rounds": 2},
}
PHASE_KEYS = [("client", "client_compute"), ("client", "p2p_wait"), ("client", "aggregation"),
              ("split_server", "server_compute"), ("split_server", "p2p_wait")]


def _round_phases(metrics: list[dict]) -> dict:
    """Mean per-round phase seconds after the warm-up round (phase_seconds are cumulative, per role
    the slowest rank)."""
    first, last, n = metrics[0]["phase_seconds"], metrics[-1]["phase_seconds"], len(metrics) - 1
    return {f"{role}.{ph}": (last[role][ph] - first[role][ph]) / n for role, ph in PHASE_KEYS}


def suite_scaling(level: str, work: Path, args) -> dict:
    s = SCALING[level]
    base = {**SYNTH, "train.rounds": s["rounds"], "train.batch_size": s["batch"], "sfl.state": "file",
            "sfl.aggregation": "centralized"}
    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(s["repeats"]):
        for n in s["ranks"]:
            for kind in ("strong", "weak"):
                if kind == "weak" and n == 1:
                    continue  # identical job to strong N=1 (per-client data = the strong total)
                total = s["samples"] if kind == "strong" else s["samples"] * n
                cfg = {**base, "data.train_samples": total, "train.clients": n}
                res = common.train(n + 2, cfg, work / f"scale-{kind}-{n}-{rep}")
                runs.setdefault((kind, n), []).append(res)
    runs[("weak", 1)] = runs[("strong", 1)]
    res = scaling_result(runs)
    res["notes"].insert(0, f"N client ranks + 1 fed server + 1 split server = N+2 ranks; one logical client per "
                        f"client rank, batch {s['batch']}, cnn, file state, centralized FedAvg, synthetic data; "
                        f"strong: {s['samples']} samples in total; weak: {s['samples']} per client (weak N=1 is "
                        f"the strong N=1 job). {s['rounds']} rounds per job, first excluded, {s['repeats']} "
                        "repeat(s); sec_per_round = mean (std) over measured rounds of all repeats.")
    res["settings"] = {**s, "model": "cnn", "state": "file", "aggregation": "centralized", "servers": 1}
    return res


def scaling_result(runs: dict[tuple[str, int], list[dict]]) -> dict:
    """Table, summary and plot from training runs keyed by (strong|weak, client ranks): also used by
    benchmarks/scaling_report.py on the runs of jobs/*_scaling.sbatch and jobs/local.sh."""
    rows = []
    kinds = [k for k in ("strong", "weak") if any(kind == k for kind, _ in runs)]
    for kind in kinds:
        for n in sorted(n for k, n in runs if k == kind):
            rs = runs[(kind, n)]
            secs = [m["seconds"] for r in rs for m in r["metrics"][1:]]  # first round = warm-up
            mean, std = mean_std(secs)
            phases = [_round_phases(r["metrics"]) for r in rs]
            ranks = rs[0]["summary"].get("ranks") or n + 2
            row = {"kind": kind, "client_ranks": n, "ranks": ranks, "oversubscribed": ranks > cores(),
                   "samples_per_round": rs[0]["metrics"][0]["samples"], "sec_per_round": mean, "std": std,
                   "rounds_measured": len(secs)}
            row.update({k: mean_std([p[k] for p in phases])[0] for k in phases[0]})
            rows.append(row)
    summary = {}
    for kind in kinds:
        rs = [r for r in rows if r["kind"] == kind]
        n1, t1 = rs[0]["client_ranks"], rs[0]["sec_per_round"]
        for r in rs:  # relative to the smallest N measured (N=1 in the suite)
            n, tn = r["client_ranks"] / n1, r["sec_per_round"]
            r["speedup"] = t1 / tn if kind == "strong" else n * t1 / tn
            r["efficiency"] = t1 / (n * tn) if kind == "strong" else t1 / tn
        summary[f"{kind}_efficiency"] = rs[-1]["efficiency"]
        summary[f"{kind}_speedup"] = rs[-1]["speedup"]
    nmax = max(r["client_ranks"] for r in rows)
    summary.update({"max_ranks": max(r["ranks"] for r in rows), "max_client_ranks": nmax, "cores": cores()})
    notes = ["strong: speedup t1/tN, efficiency t1/(N tN); weak: scaled speedup N t1/tN, efficiency t1/tN "
             "(t1 = the smallest N measured).",
             "Phase columns: mean seconds per round (after warm-up) of the slowest rank of each role "
             "(metrics.jsonl phase_seconds); p2p_wait includes waiting for the other side to compute."]
    over = [r["ranks"] for r in rows if r["oversubscribed"]]
    if over:
        notes.append(f"OVERSUBSCRIBED: {sorted(set(over))} ranks on {cores()} cores. The fed server mostly "
                     "sleeps (polite waits), but the split server and the client ranks share the cores, "
                     "so the speedup here is capped near the core count, not by mpi_sfl.")
    text = table(rows, ["kind", "client_ranks", "ranks", "samples_per_round", "sec_per_round", "std", "speedup",
                        "efficiency", "client.client_compute", "client.p2p_wait", "client.aggregation",
                        "split_server.server_compute"],
                 "scaling: seconds per round")
    return {"results": rows, "summary": summary, "notes": notes, "text": text,
            "plot": lambda path: plot_scaling(rows, path, cores())}


def plot_scaling(rows: list[dict], path: Path, ncores: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("strong", "weak") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(5 * (len(kinds) + 1), 4.5))
    for ax, kind in zip(axes[:-1], kinds):
        rs = [r for r in rows if r["kind"] == kind]
        ns = [r["client_ranks"] for r in rs]
        ax.errorbar(ns, [r["sec_per_round"] for r in rs], yerr=[r["std"] for r in rs], marker="o",
                    capsize=4, label="measured")
        t1 = rs[0]["sec_per_round"]
        ideal = [t1 * ns[0] / n for n in ns] if kind == "strong" else [t1 for _ in ns]
        ax.plot(ns, ideal, "--", color="grey", label="ideal")
        for r in rs:
            ax.annotate(f"eff {r['efficiency']:.2f}", (r["client_ranks"], r["sec_per_round"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        over = [r["client_ranks"] for r in rs if r["oversubscribed"]]
        title = f"{kind} scaling"
        if over:
            title += f" (ranks > {ncores} cores)"
        ax.set(xscale="log", xlabel="client ranks N", ylabel="seconds per round", title=title)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.legend()
    ax = axes[-1]  # per-phase: for each job a client-rank bar and a split-server bar, stacked by phase
    x = list(range(len(rows)))
    colors = {"client_compute": "tab:blue", "server_compute": "tab:red", "p2p_wait": "tab:orange",
              "aggregation": "tab:green"}
    for role, shift in (("client", -0.2), ("split_server", 0.2)):
        bottom = [0.0] * len(rows)
        for r_, ph in PHASE_KEYS:
            if r_ != role:
                continue
            vals = [r[f"{role}.{ph}"] for r in rows]
            ax.bar([i + shift for i in x], vals, width=0.38, bottom=bottom, color=colors[ph],
                   hatch="" if role == "client" else "//", edgecolor="white",
                   label=f"{'client' if role == 'client' else 'server'} {ph}")
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(x, [r["sec_per_round"] for r in rows], "k_", markersize=30, mew=2, label="round (measured)")
    ax.set_xticks(x, [f"{r['kind']}\nN={r['client_ranks']}" for r in rows])
    ax.set(ylabel="seconds per round", title="per phase: client rank (left) / split server (right)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# model (analytic cost model)
# ------------------------------------------------------------------------------------------------
def suite_model(level: str, work: Path, args) -> dict:
    import cost_model

    wire = json.loads(Path(args.wire).read_text()) if args.wire else None
    if wire is None:
        wire = {"summary": suite_wire("tiny", work, args)["summary"], "measured_here": True}
    scaling = json.loads(Path(args.scaling).read_text()) if args.scaling else None
    if scaling is None:
        sc = suite_scaling("tiny" if level == "tiny" else "quick", work, args)
        scaling = {"settings": sc["settings"], "results": sc["results"], "measured_here": True}
    return cost_model.suite(level, wire, scaling)


SUITES = {"wire": suite_wire, "aggregate": suite_aggregate, "throughput": suite_throughput,
          "memory": suite_memory, "scaling": suite_scaling, "model": suite_model}


def run_suite(name: str, level: str, out: Path, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mpi_sfl-bench-{name}-"))
    t0 = time.time()
    machine = common.machine()
    try:
        res = SUITES[name](level, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t0
    plot = res.pop("plot", None)
    text = res.pop("text")
    notes = res.get("notes", [])
    if level != "full":
        notes.insert(0, f"{level} mode: smaller settings, for checking the machinery; not the real measurement.")
    machine["load_avg_1m_end"] = round(__import__("os").getloadavg()[0], 2)
    doc = {"suite": name, "level": level, "machine": machine, "settings": res.get("settings", {}),
           "results": res["results"], "summary": res["summary"], "notes": notes,
           "suite_seconds": round(elapsed, 1)}
    bad = [k for k, v in res["summary"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        png = out.with_suffix(".png")
        plot(png)
        doc["plot"] = str(png)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    print("summary:")
    for k, v in res["summary"].items():
        print(f"  {k:34s} {common.fmt(v)}")
    for n in notes:
        print(f"note: {n}")
    print(f"{name}: {elapsed:.1f}s on {machine['hostname']} ({machine['cores']} cores) -> {out}"
          + (f" and {doc['plot']}" if plot else ""))
    if bad:
        print(f"warning: non-finite summary fields: {bad}", file=sys.stderr)
    sys.stdout.flush()
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("suite", choices=[*SUITES, "all"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small settings, well under a minute per suite")
    g.add_argument("--tiny", action="store_true", help="smallest settings (used by the tests)")
    p.add_argument("--out", help="JSON output (default runs/bench/SUITE[-LEVEL].json)")
    p.add_argument("--out-dir", default=str(REPO / "runs" / "bench"), help="where `all` (and defaults) write")
    p.add_argument("--wire", help="model: a wire suite JSON to take bandwidth/latency from (else measured)")
    p.add_argument("--scaling", help="model: a scaling suite JSON to check against (else measured)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    args = p.parse_args(argv)
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    suffix = "" if level == "full" else f"-{level}"
    out_dir = Path(args.out_dir)
    if args.suite == "all":
        if args.out:
            p.error("all writes one file per suite into --out-dir; --out is for a single suite")
        for name in SUITES:
            out = out_dir / f"{name}{suffix}.json"
            if name == "model":
                args.wire, args.scaling = str(out_dir / f"wire{suffix}.json"), str(out_dir / f"scaling{suffix}.json")
            run_suite(name, level, out, args)
            print()
        return 0
    run_suite(args.suite, level, Path(args.out) if args.out else out_dir / f"{args.suite}{suffix}.json", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

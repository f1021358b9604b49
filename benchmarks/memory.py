"""memory suite: split-server peak RSS vs client batches in flight, per state mode.

At the quick and tiny levels a state mode's points run side by side in one launch
(benchmarks/_group_train.py, through common.train_grouped).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import STATES, SYNTH, slope, table


def client_kept_mb(model: str, batch: int, shape: tuple[int, ...]) -> dict:
    """What one logical client keeps between its encoder's forward and its backward, in MiB per
    batch, counted in-process: the tensors autograd saves for the encoder's backward (hooks on
    saved tensors; the input batch included), and h itself."""
    import torch

    from mpi_sfl import models
    parts = models.build(model, 0, input_shape=shape)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.data_ptr()] = t.untyped_storage().nbytes()  # each storage once (views share it)
        return t
    x = torch.randn(batch, *shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = parts.encoder(x.requires_grad_(False))
    return {"encoder_saved_mb": sum(saved.values()) / 2**20, "h_mb": h.nbytes / 2**20}

LEVELS = {
    "full": {"clients": [1, 2, 4, 8, 16, 32], "batch": 128, "grouped": False},
    "quick": {"clients": [1, 2, 4], "batch": 128, "grouped": True},
    "tiny": {"clients": [1, 8], "batch": 128, "grouped": True},
}


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    kmax = max(s["clients"])
    # Fixed data set (kmax full batches) for every point: the data-loading transient at start-up is
    # the same everywhere, and only the batches in flight per step change (kmax / k steps).
    cfg = {**SYNTH, **common.model_settings(args), "data.train_samples": kmax * s["batch"], "train.rounds": 1, "train.batch_size": s["batch"],
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
                         "split_server_held_mb": m["held_mb"]["split_server"],
                         "client_peak_mb": m["peak_rss_mb"]["client"],
                         "client_held_mb": m["held_mb"]["client"],
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
        summary[f"held_mb_per_inflight_batch_{state}"] = slope([r["clients"] for r in pts],
                                                               [r["split_server_held_mb"] for r in pts])
        summary[f"client_mb_per_logical_client_{state}"] = slope([r["clients"] for r in pts],
                                                                 [r["client_peak_mb"] for r in pts])
    summary["activation_mb_per_batch"] = act_mb
    kept = client_kept_mb(cfg["model.name"], s["batch"], tuple(cfg.get("data.shape", (1, 28, 28))))
    summary["client_kept_mb_per_logical_client"] = kept["encoder_saved_mb"] + kept["h_mb"]
    notes = ["3 ranks: fed server, split server, one client rank hosting all k logical clients: k batches "
             "start per step, so up to k are in flight at the split server (the x axis, 'inflight_batches'). "
             "Fewer are at once when the client takes a z or dl/dh between its forwards (it takes whatever "
             "has arrived), so a slope below the activation size means batches finished before the last began.",
             f"cnn, batch {s['batch']} per client, synthetic data of {kmax * s['batch']} samples for every "
             f"point (1 round: {kmax}/k steps); peak RSS = ru_maxrss of the split server process "
             "(metrics.jsonl peak_rss_mb.split_server), which includes the interpreter and torch.",
             f"The activation h at the cut is {act_mb:.2f} MiB per batch: graph mode keeps it and the "
             "graph behind z, memory mode keeps h, file mode keeps a file name. Outgoing z and dl/dh buffers "
             "are released once the client has taken them, at the split server's next send or step end.",
             "growth = peak(max clients) / peak(1 client) - 1; mb_per_inflight_batch = least-squares slope.",
             "held_mb (metrics.jsonl): what a rank held for batches in flight, counted by the code itself: the "
             "most its sends not yet taken by the peer held at once, plus its reused receive buffers, plus the "
             "most the split server's state kept in RAM at once (a sum of peaks: an upper bound); unlike RSS it does not depend on the allocator or the machine's noise, "
             "except for how far a slow peer lets sends pile up (at most transport.BACKLOG_BYTES on the split "
             "server).",
             f"A client rank keeps, per logical client in the step, the tensors autograd saved for its encoder's "
             f"backward and h: {kept['encoder_saved_mb']:.2f} + {kept['h_mb']:.2f} MiB per batch of {s['batch']} "
             "(counted in-process with saved-tensor hooks); client_mb_per_logical_client is the measured "
             "slope of the client rank's peak RSS."]
    if s["grouped"]:
        notes.append(f"Each state mode's {len(s['clients'])} points ran side by side as independent 3-rank "
                     f"jobs in one {3 * len(s['clients'])}-rank launch (benchmarks/_group_train.py), to save "
                     "start-up time: peak RSS is per process, but the seconds column is then meaningless, "
                     "and every process maps MPI shared memory for the whole launch (a constant offset).")
    else:
        notes.append("Every point is its own mpiexec -n 3 launch.")
    text = table(rows, ["state", "clients", "split_server_peak_mb", "split_server_held_mb", "growth", "client_peak_mb",
                        "client_held_mb", "seconds"],
                 "memory: split server peak RSS vs batches in flight")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

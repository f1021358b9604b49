"""wire suite: mpi_sfl Transport ping-pong vs raw mpi4py Send/Recv vs pickled send/recv (2 ranks).

The measurement itself runs in the MPI worker benchmarks/_wire.py; this module sets its sizes per
level, takes medians and ratios, and makes the table.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import common
from benchmarks.common import human_bytes, median, table

KiB, MiB = 1024, 1024 * 1024

LEVELS = {
    "full": {"sizes": [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB],
             "reps": 7, "target": 0.05},
    "quick": {"sizes": [4 * KiB, 64 * KiB, MiB, 4 * MiB, 16 * MiB], "reps": 3, "target": 0.03},
    "tiny": {"sizes": [4 * KiB, MiB, 4 * MiB], "reps": 2, "target": 0.02},
}


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    out = work / "wire-raw.json"
    common.mpi(2, ["-m", "benchmarks._wire", "--sizes", ",".join(map(str, s["sizes"])), "--reps", str(s["reps"]),
                   "--target", str(s["target"]), "--out", str(out)], limit=600)
    raw = json.loads(out.read_text())["results"]
    rows = []
    for r in raw:
        med = {v: median(ts) for v, ts in r["rtt_seconds"].items()}
        b = r["bytes"]
        rows.append({
            "size": human_bytes(b), "bytes": b,
            "transport_us": med["transport"] * 1e6, "transport_poll_us": med["transport_poll"] * 1e6,
            "transport_bell_us": med["transport_bell"] * 1e6,
            "raw_us": med["raw"] * 1e6, "pickle_us": med["pickle"] * 1e6,
            # each round trip moves the payload twice
            "transport_GBps": 2 * b / med["transport"] / 1e9, "raw_GBps": 2 * b / med["raw"] / 1e9,
            "pickle_GBps": 2 * b / med["pickle"] / 1e9,
            "transport_vs_raw": med["raw"] / med["transport"],
            "poll_vs_raw": med["raw"] / med["transport_poll"],
            "bell_vs_transport": med["transport"] / med["transport_bell"],
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
        "bell_latency_us": rows[0]["transport_bell_us"] / 2,
        "latency_size_bytes": rows[0]["bytes"],
    }
    notes = ["GB/s = 2 x payload / median round-trip time (1e9 bytes); ratios are ratios of medians.",
             "transport = mpi_sfl Transport.isend + wait_sends / recv (a 96-byte header message, then "
             "the payload) with the wait mode training picks here (run.wait = auto: blocking when each "
             "rank has a core); transport_poll = the same with run.wait = poll and no doorbells (test + "
             "sleeps: it costs latency and large-message progress by design); transport_bell = run.wait = poll "
             "with doorbells, what training uses when ranks outnumber cores (a wait for a message sleeps until "
             "its sender rings; bell_vs_transport = its speed against the spinning transport's); raw = blocking "
             "Send/Recv of a numpy buffer; pickle = send/recv of the torch tensor."]
    text = table(rows, ["size", "transport_us", "transport_poll_us", "transport_bell_us", "raw_us", "pickle_us",
                        "transport_GBps", "raw_GBps", "pickle_GBps", "transport_vs_raw", "poll_vs_raw",
                        "bell_vs_transport", "transport_vs_pickle"],
                 "wire: ping-pong, 2 ranks, medians")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

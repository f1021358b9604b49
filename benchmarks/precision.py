"""precision suite: what each sfl.wire_dtype costs in test accuracy and saves in bytes.

sync, lenet5 U-shaped, 4 logical clients on 2 client ranks, trained once per wire format and seed
(float32, float16, bfloat16, int8 with a per-sample scale) on the same data and schedule. For each:
final test accuracy (mean over the seeds), its difference from float32 in points (seed by seed,
then averaged: the formats of one seed start from the same weights and batches), and the bytes the
split server sent per round (z and dl/dh; the clients' bytes also hold the averaging, which is
float32 in every format).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"data": {"data.dataset": "fashion-mnist"}, "rounds": 2, "seeds": [0, 1, 2], "limit": 900},
    "quick": {"data": {"data.dataset": "synthetic", "data.train_samples": 1024, "data.test_samples": 256},
              "rounds": 1, "seeds": [0], "limit": 300},
    "tiny": {"data": {"data.dataset": "synthetic", "data.train_samples": 192, "data.test_samples": 64},
             "rounds": 1, "seeds": [0], "limit": 200},
}
FORMATS = ["float32", "float16", "bfloat16", "int8"]
COMMON = {"model.name": "lenet5", "train.clients": 4, "train.batch_size": 32, "train.lr": 0.02,
          "train.momentum": 0.9, "sfl.variant": "sync", "sfl.aggregation": "decentralized"}
RANKS = 4


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    runs: dict[tuple[str, int], dict] = {}
    for seed in s["seeds"]:
        for fmt in FORMATS:
            settings = {**COMMON, **s["data"], "train.rounds": s["rounds"], "run.seed": seed, "sfl.wire_dtype": fmt}
            runs[(fmt, seed)] = common.train(RANKS, settings, work / f"{fmt}-{seed}", limit=s["limit"])
    rows = []
    for fmt in FORMATS:
        accs = [runs[(fmt, seed)]["metrics"][-1]["test_accuracy"] for seed in s["seeds"]]
        diffs = [(runs[("float32", seed)]["metrics"][-1]["test_accuracy"] - a) * 100 for seed, a in zip(s["seeds"], accs)]
        split_bytes = [runs[(fmt, seed)]["metrics"][-1]["bytes_sent"]["split_server"] / s["rounds"] for seed in s["seeds"]]
        rows.append({"wire_dtype": fmt, "test_accuracy": common.mean_std(accs)[0],
                     "accuracy_spread": max(accs) - min(accs), "points_below_float32": common.mean_std(diffs)[0],
                     "worst_points_below_float32": max(diffs),
                     "server_MB_sent_per_round": common.median(split_bytes) / 2**20})
    wide = rows[0]["server_MB_sent_per_round"]
    for r in rows:
        r["bytes_vs_float32"] = r["server_MB_sent_per_round"] / wide
    summary = {f"{r['wire_dtype']}_points_below_float32": r["points_below_float32"] for r in rows[1:]}
    summary.update({f"{r['wire_dtype']}_bytes_vs_float32": r["bytes_vs_float32"] for r in rows[1:]})
    notes = [f"sync lenet5 U-shaped, 4 logical clients on 2 client ranks, batch 32, SGD lr 0.02 momentum 0.9, "
             f"{s['rounds']} rounds, seeds {s['seeds']}, {s['data']['data.dataset']}.",
             "points_below_float32: (float32 accuracy - this format's) x 100 for the same seed, averaged; "
             "bytes: what the split server sent per round (z and dl/dh; the clients' h and dl/dz shrink alike). "
             "Headers (96 B per message) are included, so int8 also pays its 4-byte scale per sample."]
    text = table(rows, ["wire_dtype", "test_accuracy", "accuracy_spread", "points_below_float32",
                        "worst_points_below_float32", "server_MB_sent_per_round", "bytes_vs_float32"],
                 "precision: wire format against float32")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

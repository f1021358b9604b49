"""attacks suite: robust aggregators against simulated attackers, beside the run without attackers.

The sync variant (lenet5, U-shaped) with many logical clients, a few of which send 10x sign-flipped
updates of their client parts to every averaging (train.attackers, train.attack = "sign-flip"):
final test accuracy with the mean, the coordinate-wise median, the trimmed mean (cutting as many
clients at each end as there are attackers), Krum and multi-Krum (f = the attackers), and the mean
without attackers. Also the seconds spent aggregating per round (phase_seconds) for each.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"data": {"data.dataset": "fashion-mnist"}, "clients": 20, "attackers": 4, "rounds": 2, "limit": 1200},
    "quick": {"data": {"data.dataset": "synthetic", "data.train_samples": 2000, "data.test_samples": 200},
              "clients": 10, "attackers": 2, "rounds": 2, "limit": 300},
    "tiny": {"data": {"data.dataset": "synthetic", "data.train_samples": 320, "data.test_samples": 100},
             "clients": 8, "attackers": 2, "rounds": 1, "limit": 200},
}
COMMON = {"model.name": "lenet5", "train.batch_size": 32, "train.lr": 0.02, "train.momentum": 0.9,
          "sfl.variant": "sync", "sfl.aggregation": "decentralized", "run.seed": 0, "train.attack": "sign-flip",
          "train.attack_strength": 10.0}
CLIENT_RANKS = 2


def cases(s: dict) -> dict[str, dict]:
    k, m = s["attackers"], s["clients"]
    attacked = {"train.attackers": k}
    return {
        "mean, no attackers": {},
        "mean": attacked,
        "median": {**attacked, "sfl.aggregator": "median"},
        "trimmed-mean": {**attacked, "sfl.aggregator": "trimmed-mean", "sfl.trim": k / m},
        "krum": {**attacked, "sfl.aggregator": "krum", "sfl.byzantine_f": k, "sfl.krum_select": 1},
        "multi-krum": {**attacked, "sfl.aggregator": "krum", "sfl.byzantine_f": k, "sfl.krum_select": 0},
    }


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    base = {**COMMON, **s["data"], "train.rounds": s["rounds"], "train.clients": s["clients"]}
    rows = []
    for i, (name, extra) in enumerate(cases(s).items()):
        res = common.train(2 + CLIENT_RANKS, {**base, **extra}, work / f"attack-{i}", limit=s["limit"])
        last = res["metrics"][-1]
        rows.append({"aggregator": name, "attackers": extra.get("train.attackers", 0),
                     "final_accuracy": last["test_accuracy"],
                     "best_accuracy": max(r["test_accuracy"] for r in res["metrics"]),
                     "aggregation_s_per_round": last["phase_seconds"]["client"]["aggregation"] / len(res["metrics"]),
                     "train_seconds": res["summary"]["seconds"]})
    by = {r["aggregator"]: r["final_accuracy"] for r in rows}
    summary = {f"{k.replace(', ', '_').replace(' ', '_').replace('-', '_')}_accuracy": v for k, v in by.items()}
    notes = [f"sync, lenet5 U-shaped, {s['clients']} logical clients on {CLIENT_RANKS} client ranks, "
             f"{s['attackers']} of them (a seeded choice) sending -10 x their update of the client parts to every "
             f"averaging (once per round), decentralized averaging, batch 32, SGD lr 0.02 momentum 0.9, "
             f"{s['rounds']} rounds, {s['data']['data.dataset']}.",
             "trimmed-mean cuts attackers/clients at each end; krum and multi-krum assume f = attackers; "
             "krum averages the 1 best-scored vector, multi-krum the clients - f best.",
             "Only client parts are attacked (the split server is trusted); aggregation_s_per_round is the "
             "client ranks' aggregation phase (max over ranks) per round."]
    text = table(rows, ["aggregator", "attackers", "final_accuracy", "best_accuracy", "aggregation_s_per_round",
                        "train_seconds"], "attacks: test accuracy under attack")
    return {"settings": s, "results": rows, "summary": summary, "notes": notes, "text": text}

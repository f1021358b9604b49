"""clients suite: what many logical clients cost, and whether a thousand of them learn.

Every job: sync, lenet5 U-shaped, 2 client ranks (`-n 4`), file state, SGD momentum 0.9 with
train.client_optimizer = "keep" unless said otherwise.

hosting   M logical clients (10 ... 10,000) of which a seeded 10 train each round (the same work
          every round whatever M: 10 clients x one batch of 4 synthetic 28x28 samples). Peak RSS per
          client rank, working copies built, set-up seconds (launch to the first round, interpreter and
          torch import included), seconds per round (median of the rounds after the first), and what
          each hosted client adds to a round: (round(M) - round(10)) / (M - 10).
together  all M logical clients train in the round's one step (M batches of 4), averaged with the
          mean and each robust aggregator (decentralized: every client rank gathers M vectors):
          aggregation seconds in the second round (client ranks, max over ranks), round seconds.
accuracy  Fashion-MNIST (full level, 3 seeds): 10 clients of 6,000 samples against 1,000 clients of
          60, of which 10 train each round (train.clients_per_round), in the same number of samples
          seen (one epoch: 1 round against 100), with "keep" and "reset"; and the same on synthetic
          data (64,000 samples, two epochs, one seed).
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import table

LEVELS = {
    "full": {"hosted": [10, 100, 1000, 10000], "together": [10, 100, 1000, 10000], "rounds": 8,
             "aggregators": ["mean", "median", "trimmed-mean", "krum"], "accuracy": True, "seeds": [0, 1, 2],
             "limit": 1200},
    "quick": {"hosted": [10, 100, 1000], "together": [10, 100], "rounds": 3,
              "aggregators": ["mean", "median", "krum"], "accuracy": False, "seeds": [0], "limit": 300},
    "tiny": {"hosted": [10, 60], "together": [10], "rounds": 2, "aggregators": ["mean", "median"],
             "accuracy": False, "seeds": [0], "limit": 200},
}
RANKS = 4          # fed server, split server, 2 client ranks
PER_CLIENT = 4     # samples per logical client in hosting and together (one batch)
SAMPLED = 10
COMMON = {"model.name": "lenet5", "sfl.variant": "sync", "sfl.state": "file", "train.lr": 0.02,
          "train.momentum": 0.9, "run.seed": 0, "run.checkpoint_every": 0, "data.test_samples": 200}
ROBUST = {"mean": {}, "median": {}, "trimmed-mean": {"sfl.trim": 0.1},
          "krum": {"sfl.byzantine_f": 1, "sfl.krum_select": 1}}


def timed_train(settings: dict, out: Path, limit: float) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = common.train(RANKS, settings, out, limit=limit)
    return res, time.perf_counter() - t0


def hosting(s: dict, work: Path) -> list[dict]:
    rows = []
    for m in s["hosted"]:
        settings = {**COMMON, "data.dataset": "synthetic", "data.train_samples": m * PER_CLIENT,
                    "train.clients": m, "train.clients_per_round": SAMPLED, "train.batch_size": PER_CLIENT,
                    "train.rounds": s["rounds"]}
        res, elapsed = timed_train(settings, work / f"hosting-{m}", s["limit"])
        last = res["metrics"][-1]
        rows.append({"clients": m, "client_rank_peak_mb": last["peak_rss_mb"]["client"],
                     "working_copies": last["working_copies"]["client"],
                     "setup_s": round(elapsed - res["summary"]["wall_seconds"], 2),
                     "round_s": common.median([r["seconds"] for r in res["metrics"][1:]])})
    base = rows[0]
    for r in rows:
        extra = r["clients"] - base["clients"]
        r["ms_per_hosted_client"] = (r["round_s"] - base["round_s"]) / extra * 1e3 if extra else 0.0
        r["mb_per_hosted_client"] = (r["client_rank_peak_mb"] - base["client_rank_peak_mb"]) / extra if extra else 0.0
    return rows


def together(s: dict, work: Path) -> list[dict]:
    rows = []
    for m in s["together"]:
        for kind in s["aggregators"]:
            settings = {**COMMON, "data.dataset": "synthetic", "data.train_samples": m * PER_CLIENT,
                        "train.clients": m, "train.batch_size": PER_CLIENT, "train.rounds": 2,
                        "sfl.aggregation": "decentralized", "sfl.aggregator": kind, **ROBUST[kind]}
            res, _ = timed_train(settings, work / f"together-{m}-{kind}", s["limit"])
            first, second = (r["phase_seconds"]["client"]["aggregation"] for r in res["metrics"])
            rows.append({"clients": m, "aggregator": kind, "aggregation_s": round(second - first, 4),
                         "round_s": res["metrics"][1]["seconds"],
                         "ms_per_client": res["metrics"][1]["seconds"] / m * 1e3,
                         "client_rank_peak_mb": res["metrics"][1]["peak_rss_mb"]["client"]})
    return rows


def accuracy(s: dict, work: Path) -> list[dict]:
    """The same samples seen: few large clients against many small ones, a few sampled a round;
    on Fashion-MNIST once per seed of s["seeds"] (the three runs of a seed share it)."""
    rows = []
    sets = [("fashion-mnist", {"data.dataset": "fashion-mnist", "data.test_samples": 0}, 1, s["seeds"]),
            ("synthetic", {"data.dataset": "synthetic", "data.train_samples": 64000, "data.test_samples": 2000},
             2, s["seeds"][:1])]
    for name, data, epochs, seeds in sets:
        for seed in seeds:
            base = {**COMMON, **data, "train.batch_size": 16, "sfl.aggregation": "decentralized", "run.seed": seed}
            for m, k, opt in [(10, 0, "keep"), (1000, SAMPLED, "keep"), (1000, SAMPLED, "reset")]:
                rounds = epochs * (m // k if k else 1)
                settings = {**base, "train.clients": m, "train.clients_per_round": k, "train.rounds": rounds,
                            "train.client_optimizer": opt}
                res, _ = timed_train(settings, work / f"acc-{name}-{seed}-{m}-{opt}", s["limit"])
                rows.append({"data": name, "seed": seed, "clients": m, "per_round": k or m, "client_optimizer": opt,
                             "rounds": rounds, "samples_seen": sum(r["samples"] for r in res["metrics"]),
                             "test_accuracy": res["metrics"][-1]["test_accuracy"],
                             "train_seconds": res["summary"]["seconds"],
                             "client_rank_peak_mb": res["metrics"][-1]["peak_rss_mb"]["client"]})
            ref = rows[-3]["test_accuracy"]
            for r in rows[-3:]:
                r["points_below_10_clients"] = round((ref - r["test_accuracy"]) * 100, 2)
    return rows


def run(level: str, work: Path, args) -> dict:
    s = LEVELS[level]
    host, tog = hosting(s, work), together(s, work)
    acc = accuracy(s, work) if s["accuracy"] else []
    big = host[-1]
    summary = {"hosted_clients_max": big["clients"], "ms_per_hosted_client": big["ms_per_hosted_client"],
               "mb_per_hosted_client": big["mb_per_hosted_client"],
               "client_rank_peak_mb_at_max": big["client_rank_peak_mb"], "setup_s_at_max": big["setup_s"],
               "working_copies_at_max": big["working_copies"]}
    for r in tog:
        if r["clients"] == tog[-1]["clients"]:
            summary[f"aggregation_s_{r['aggregator'].replace('-', '_')}_at_{r['clients']}"] = r["aggregation_s"]
    for data in dict.fromkeys(r["data"] for r in acc):
        for opt in ("keep", "reset"):
            below = [r["points_below_10_clients"] for r in acc if r["data"] == data and r["clients"] > 10
                     and r["client_optimizer"] == opt]
            summary[f"points_below_10_clients_{data.replace('-', '_')}_{opt}"] = common.mean_std(below)[0]
    notes = [f"sync lenet5 U-shaped, file state, SGD lr 0.02 momentum 0.9, {RANKS} ranks (2 client ranks), "
             "decentralized averaging in together and accuracy, centralized in hosting; no checkpoints.",
             f"hosting: {SAMPLED} sampled clients a round of one batch of {PER_CLIENT} synthetic samples each; "
             "ms_per_hosted_client = (round_s(M) - round_s(10)) / (M - 10); mb_per_hosted_client the same for the "
             f"client rank's peak RSS, which includes the rank's share of the data ({PER_CLIENT} x 3 KiB per client).",
             "together: every client trains once per round; aggregation_s is the client ranks' aggregation phase "
             "in round 2 (gathering and computing the statistic; Krum is O(M^2 P)).",
             "accuracy: same samples seen (one epoch of Fashion-MNIST, two of the synthetic set); "
             "points_below_10_clients = (acc(10 clients) - acc) x 100 for the same seed; the summary averages the seeds."]
    text = "\n\n".join([
        table(host, ["clients", "client_rank_peak_mb", "mb_per_hosted_client", "working_copies", "setup_s",
                     "round_s", "ms_per_hosted_client"], "clients: hosting M logical clients, 10 train a round"),
        table(tog, ["clients", "aggregator", "aggregation_s", "round_s", "ms_per_client", "client_rank_peak_mb"],
              "clients: every client trains; aggregation per round"),
        *([table(acc, ["data", "seed", "clients", "per_round", "client_optimizer", "rounds", "samples_seen", "test_accuracy",
                       "points_below_10_clients", "train_seconds", "client_rank_peak_mb"],
                 "clients: accuracy in the same samples seen")] if acc else [])])
    return {"settings": s, "results": {"hosting": host, "together": tog, "accuracy": acc}, "summary": summary,
            "notes": notes, "text": text}

"""Each variant's defining property (derivations in docs/design.md §3).

- v1 with per-step averaging is the baseline (large-batch SGD); for ANY averaging schedule, with
  momentum (kept across averagings or reset at each), v1 is fl with the model cut: each client's part plus its own server copy is a full model
  trained on that client alone, and both halves are averaged with the same weights.
- v2 with one client is sequential SGD (the baseline); with several clients and nothing to train on
  the client side, it is single-model SGD over the client batches in its seeded order.
- sl with several clients (momentum on) is single-model sequential SGD over the relay order: weights
  and optimizer state really travel between logical clients, locally and between ranks.
- fl with per-step averaging is the baseline; client sampling draws the same clients everywhere.
Each comparison is paired with a control showing the compared runs really differ from something,
so the checks can fail. The tolerance is measured per configuration (conftest.roundoff_bound: the
baseline from initial weights one ulp away), never a fixed number tuned on one CPU's kernels.
"""
from __future__ import annotations

import pytest

from conftest import TINY, baseline, close, load_model, max_diff, metrics, mpirun, ok, record, roundoff_bound, sets
COMMON = TINY + ["train.clients=3"]  # 3 logical clients on 2 client ranks (2 + 1) unless said otherwise


def train(tmp_path, name: str, ranks: int, settings: list[str]) -> dict:
    out = tmp_path / name
    ok(mpirun(ranks, "train", *sets(COMMON + settings + [f'run.out_dir="{out}"'])))
    return {"out": out, "model": load_model(out)}


def reference(tmp_path, run: dict, *settings: str) -> dict:
    """`mpi-sfl baseline` on the config that run wrote (optionally changed), i.e. its schedule."""
    out = tmp_path / f"baseline-{run['out'].name}-{len(settings)}"
    ok(baseline(str(run["out"] / "config.toml"), *sets(list(settings) + [f'run.out_dir="{out}"'])))
    return load_model(out)


def bound(tmp_path, run: dict, ref: dict, what: str, *settings: str) -> float:
    """The round-off bound of the baseline `reference(tmp_path, run, *settings)` gave `ref` for."""
    return roundoff_bound(tmp_path, ref, str(run["out"] / "config.toml"), settings, what)


def matches(tmp_path, run: dict, what: str) -> None:
    """run lands on its baseline within the measured round-off bound."""
    ref = reference(tmp_path, run)
    close(run["model"], ref, bound(tmp_path, run, ref, f"{what}: nudged baseline"), f"{what}: SFL vs baseline")


def differs(a: dict, b: dict, bound: float, what: str) -> None:
    """Control: a and b are another model, far outside the round-off bound."""
    diff = max_diff(a, b)
    record(what, diff=diff, bound=bound)
    assert diff > 10 * bound, f"{what}: only {diff} apart, bound {bound}"


def test_v1_with_per_step_averaging_is_the_baseline(tmp_path):
    """Two split servers, each with copies for its clients, averaged across servers every step."""
    run = train(tmp_path, "v1", 5, ["sfl.variant=\"v1\"", "train.aggregate_every=1", "model.name=\"cnn\"",
                                    "sfl.servers=2", "sfl.state=\"file\""])
    matches(tmp_path, run, "v1 per-step")


@pytest.mark.parametrize("case", [
    ["model.name=\"cnn\"", "sfl.state=\"memory\"", "sfl.aggregation=\"decentralized\""],
    ["model.name=\"mlp\"", "model.split=\"label-sharing\"", "sfl.state=\"graph\"", "train.aggregate_every=4",
     "train.client_optimizer=\"reset\""],
], ids=["cnn-u-memory-decentral-per-round", "mlp-label-graph-central-every4-reset"])
def test_v1_is_fl_with_the_model_cut(tmp_path, case):
    both = ["train.momentum=0.9"] + case
    v1 = train(tmp_path, "v1", 4, both + ["sfl.variant=\"v1\""])
    fl = train(tmp_path, "fl", 3, both + ["sfl.variant=\"fl\"", "sfl.servers=0"])
    # The bound: the sensitivity of the same model, data and steps to round-off, measured on the
    # baseline of v1's config (large-batch SGD: a proxy for v1's own trajectory, which no single
    # process reproduces)
    ref = reference(tmp_path, v1)
    tol = bound(tmp_path, v1, ref, "v1 is fl: nudged baseline")
    close(v1["model"], fl["model"], tol, "v1 is fl: v1 vs fl")
    # control: local steps between averagings make it FedAvg, not SGD on the joint batch
    differs(v1["model"], ref, tol, "v1 is fl: v1 vs baseline (control)")


def test_v2_with_one_client_is_the_baseline(tmp_path):
    run = train(tmp_path, "v2", 3, ["sfl.variant=\"v2\"", "train.clients=1", "model.name=\"lenet5\"",
                                    "train.momentum=0.9", "sfl.state=\"graph\""])
    matches(tmp_path, run, "v2 one client")


def test_v2_serves_clients_in_its_seeded_order(tmp_path):
    """Label-sharing with a frozen encoder: only the server trains, once per client batch, in v2's
    order; the baseline following that order matches, the one following sync's does not."""
    name = "v2 order"
    run = train(tmp_path, "v2", 4, ["sfl.variant=\"v2\"", "model.name=\"mlp\"", "model.split=\"label-sharing\"",
                                    "model.freeze_encoder=true", "sfl.aggregation=\"decentralized\""])
    ref = reference(tmp_path, run)
    tol = bound(tmp_path, run, ref, f"{name}: nudged baseline")
    close(run["model"], ref, tol, f"{name}: SFL vs baseline")
    differs(run["model"], reference(tmp_path, run, "sfl.variant=\"sync\""), tol, f"{name}: SFL vs sync's baseline (control)")


@pytest.mark.parametrize("case", [
    ["model.name=\"cnn\"", "sfl.state=\"file\""],
    ["model.name=\"mlp\"", "model.split=\"label-sharing\"", "sfl.state=\"memory\"", "sfl.aggregation=\"decentralized\""],
], ids=["cnn-u-file-dropout", "mlp-label-memory"])
def test_sl_relays_one_model_through_the_clients(tmp_path, case):
    name = f"sl {case[0]}"
    run = train(tmp_path, "sl", 4, ["sfl.variant=\"sl\"", "train.momentum=0.9", "train.rounds=3"] + case)
    ref = reference(tmp_path, run)
    tol = bound(tmp_path, run, ref, f"{name}: nudged baseline")
    close(run["model"], ref, tol, f"{name}: SFL vs baseline")
    differs(run["model"], reference(tmp_path, run, "sfl.variant=\"sync\""), tol, f"{name}: SFL vs sync's baseline (control)")
    rows = metrics(run["out"])
    assert rows[-1]["bytes_sent"]["client"] > 0 and all(r["clients_trained"] == 3 for r in rows)


@pytest.mark.parametrize("aggregation", ["centralized", "decentralized"])
def test_fl_with_per_step_averaging_is_the_baseline(tmp_path, aggregation):
    run = train(tmp_path, "fl", 3, ["sfl.variant=\"fl\"", "sfl.servers=0", "train.aggregate_every=1",
                                    "model.name=\"cnn\"", f"sfl.aggregation=\"{aggregation}\""])
    matches(tmp_path, run, f"fl {aggregation}")
    assert set(metrics(run["out"])[0]["bytes_sent"]) == {"fed_server", "client"}  # no split server


def test_client_sampling(tmp_path):
    """2 of 4 clients a round: the baseline drawing the same clients matches; others sat out."""
    run = train(tmp_path, "sampled", 4, ["train.clients=4", "train.clients_per_round=2", "train.aggregate_every=1",
                                         "train.rounds=3"])
    ref = reference(tmp_path, run)
    tol = bound(tmp_path, run, ref, "sampling: nudged baseline")
    close(run["model"], ref, tol, "sampling: SFL vs baseline")
    differs(run["model"], reference(tmp_path, run, "train.clients_per_round=0"), tol, "sampling: SFL vs all clients' baseline (control)")
    rows = metrics(run["out"])
    assert [r["clients_trained"] for r in rows] == [2, 2, 2] and all(r["samples"] < 240 for r in rows)

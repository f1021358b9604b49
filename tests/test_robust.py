"""Robust aggregators and simulated attackers (docs/design.md §2, robust aggregation).

In-process: each statistic against its definition; set-up refusals. Through mpiexec: the gather
collectives give robust_combine's bits at several -n; a robust aggregator on two equal clients is the
mean (its defining property where the statistics coincide), for the client parts and v1's server
copies; attacked clients wreck the mean but not the median or Krum.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, TINY, baseline_here, close, load_model, metrics, mpijobs, mpirun, mpiscript, ok, roundoff_bound, sets
from mpi_sfl import config
from mpi_sfl.aggregation import check_robust, krum_select, robust_combine
from mpi_sfl.errors import UserError


def test_statistics_follow_their_definitions():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 50)).astype(np.float32)
    blocks = [v[:, :20], v[:, 20:]]
    med = np.concatenate(robust_combine("median", blocks, 0, 0, 1))
    assert np.array_equal(med, np.median(v, axis=0).astype(np.float32))
    tm = np.concatenate(robust_combine("trimmed-mean", blocks, 0.3, 0, 1))  # 2 cut at each end of 7
    assert np.allclose(tm, np.sort(v, axis=0)[2:5].mean(axis=0), atol=1e-6)
    assert not np.allclose(tm, v.mean(axis=0), atol=1e-3)


def test_krum_picks_the_honest_cluster():
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 0.1, size=(5, 30))
    attack = rng.normal(50, 0.1, size=(2, 30))
    v = np.concatenate([attack, honest]).astype(np.float32)
    chosen = krum_select([v[:, :10], v[:, 10:]], f=2, select=0)  # multi-Krum: M - f = 5 vectors
    assert chosen.tolist() == [2, 3, 4, 5, 6]
    one = np.concatenate(robust_combine("krum", [v], 0, 2, 1))
    assert any(np.array_equal(one, row) for row in v[2:])  # Krum returns one honest vector


@pytest.mark.parametrize("kind, clients, trim, f, limit, words", [
    ("krum", 4, 0.1, 1, 2048, "needs more than 4 logical clients per averaging; there are 4"),
    ("median", 1000, 0.1, 1, 10, "1000 client vectors of 50,000 floats: 191 MB where they are gathered, "
                                 "over sfl.gather_limit_mb = 10"),
])
def test_aggregators_that_cannot_work_are_refused(kind, clients, trim, f, limit, words):
    with pytest.raises(UserError) as err:
        check_robust(kind, clients, trim, f, 50_000, limit)
    assert words in str(err.value)
    assert "gathers 10 client vectors of 50,000 floats, 1.9 MB" in check_robust("median", 10, 0.1, 1, 50_000, 2048)


def test_a_trim_that_cuts_everything_is_refused():
    with pytest.raises(UserError, match=r"sfl.trim = 0.5 cuts everything.*must be < 0.5"):
        config.load(overrides=["sfl.aggregator=\"trimmed-mean\"", "sfl.trim=0.5"])


@pytest.fixture(scope="module")
def gathered():
    """tests/mpi_robust.py in one launch of 5 ranks, on communicators of 3, 4 and 5 of them in turn."""
    return ok(mpiscript(5, REPO / "tests" / "mpi_robust.py", "150", "3,4,5"))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 4, 5])
def test_gather_collectives_give_the_statistics_bits(gathered, n):
    assert f"summary n={n}: {4 * (2 * n - 1)} same bits, 0 different" in gathered.stdout, gathered.stdout[-3000:]
    assert "DIFFERENT" not in gathered.stdout


def runs(tmp_path, ranks: int, jobs: dict[str, list[str]]) -> dict[str, dict]:
    """Each named job (TINY + its settings) into tmp_path/name, all in one launch of `ranks`
    (conftest.mpijobs); name -> its model and metrics rows."""
    outs = {name: tmp_path / name for name in jobs}
    for proc in mpijobs(ranks, *[["train", *sets(TINY + settings + [f'run.out_dir="{outs[name]}"'])]
                                 for name, settings in jobs.items()]):
        ok(proc)
    return {name: {"model": load_model(out), "rows": metrics(out)} for name, out in outs.items()}


def diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.mpi
def test_robust_aggregators_on_two_equal_clients_are_the_mean(tmp_path):
    """Two clients with equal shards: their median and their untrimmed mean are their
    (sample-weighted) mean, for the client parts and for v1's server copies on 2 split servers."""
    common = ["train.clients=2", "sfl.variant=\"v1\"", "sfl.servers=2", "train.aggregate_every=2",
              "sfl.aggregation=\"decentralized\"", "model.name=\"cnn\""]
    three = [s for s in common if s != "train.clients=2"] + ["train.clients=3"]
    r = runs(tmp_path, 5, {"mean": common, "median": common + ["sfl.aggregator=\"median\""],
                           "trimmed": common + ["sfl.aggregator=\"trimmed-mean\"", "sfl.trim=0.0",
                                                "sfl.aggregation=\"centralized\""],
                           "median3": three + ["sfl.aggregator=\"median\""], "mean3": three})
    # The bound: the sensitivity of the same model, data and steps to round-off, measured on the
    # single-process baseline of this config (a proxy: no single process runs v1's averaging of two)
    bound = roundoff_bound(tmp_path, baseline_here(None, TINY + common, tmp_path / "base"), None, TINY + common,
                           "robust: nudged baseline")
    for name in ("median", "trimmed"):
        close(r[name]["model"], r["mean"]["model"], bound, f"robust: {name} vs mean")
    # control: the median of three clients is not their mean
    assert diff(r["median3"]["model"], r["mean3"]["model"]) > 10 * bound


@pytest.mark.mpi
def test_attackers_wreck_the_mean_not_the_robust_aggregators(tmp_path):
    """fl on 6 logical clients, 2 of them sending 10x sign-flipped updates every round: the mean
    ends far from the honest model and loses its accuracy; median and Krum stay near it."""
    common = ["sfl.variant=\"fl\"", "sfl.servers=0", "train.clients=6", "model.name=\"mlp\"", "train.rounds=3",
              "data.train_samples=480"]
    attack = common + ["train.attackers=2", "train.attack=\"sign-flip\""]
    r = runs(tmp_path, 3, {"honest": common, "mean": attack,
                           "median": attack + ["sfl.aggregator=\"median\"", "sfl.aggregation=\"decentralized\""],
                           "krum": attack + ["sfl.aggregator=\"krum\"", "sfl.byzantine_f=2", "train.clients=7"]})
    honest, mean, median, krum = r["honest"], r["mean"], r["median"], r["krum"]
    acc = {k: r["rows"][-1]["test_accuracy"] for k, r in
           (("honest", honest), ("mean", mean), ("median", median), ("krum", krum))}
    assert acc["honest"] > 0.9 and acc["mean"] < 0.5, acc
    assert acc["median"] > 0.6 and acc["krum"] > 0.6, acc
    far = diff(mean["model"], honest["model"])
    assert diff(median["model"], honest["model"]) < far / 5, (far, acc)


@pytest.mark.mpi
def test_an_impossible_aggregator_ends_the_job_at_set_up(tmp_path):
    proc = mpirun(3, "train", *sets(TINY + ["train.clients=4", "sfl.aggregator=\"krum\"", "sfl.byzantine_f=1",
                                            f'run.out_dir="{tmp_path / "x"}"']), timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("mpi-sfl: error:") == 1, proc.stderr[-2000:]
    assert "needs more than 4 logical clients per averaging; there are 4" in proc.stderr

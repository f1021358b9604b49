"""Noise at the cut (sfl.noise_std, sfl.clip_norm): what it does to one batch, in-process; through
mpiexec, SFL with noise is still the baseline with the same seeded noise (its defining property),
and not the noiseless run."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, baseline, close, load_model, max_diff, mpirun, ok, roundoff_bound, sets
from benchmarks.noise import distance_correlation
from mpi_sfl import models



def test_clipping_bounds_each_sample_and_the_noise_is_seeded():
    h = torch.randn(64, 8, 4, 4) * 10
    clipped = models.cut_noise(h, 0.0, 3.0, 0, 0, 0, 0)
    assert float(clipped.flatten(1).norm(dim=1).max()) <= 3.0 + 1e-5
    small = torch.full((2, 3), 0.1)
    assert torch.equal(models.cut_noise(small, 0.0, 3.0, 0, 0, 0, 0), small)  # inside the ball: untouched
    a = models.cut_noise(h, 2.0, 0.0, 5, 1, 2, 3)
    assert torch.equal(a, models.cut_noise(h, 2.0, 0.0, 5, 1, 2, 3))       # same batch, same noise
    assert not torch.equal(a, models.cut_noise(h, 2.0, 0.0, 5, 1, 2, 4))   # another client, other noise
    assert abs(float((a - h).std()) - 2.0) < 0.05


def test_distance_correlation_measures_dependence():
    x = torch.randn(200, 10)
    assert distance_correlation(x, x) > 0.999
    assert distance_correlation(x, 3 * x + 1) > 0.999
    assert distance_correlation(x, torch.randn(200, 5)) < 0.45  # independent (the sample statistic is biased up)
    assert distance_correlation(x, x + 10 * torch.randn(200, 10)) < distance_correlation(x, x + torch.randn(200, 10))


@pytest.mark.mpi
def test_sfl_with_noise_at_the_cut_is_the_baseline_with_the_same_noise(tmp_path):
    common = TINY + ["train.clients=3", "train.aggregate_every=1", "model.name=\"cnn\""]
    noisy = common + ["sfl.noise_std=0.5", "sfl.clip_norm=20.0"]
    ok(mpirun(4, "train", *sets(noisy + ["sfl.state=\"file\"", f'run.out_dir="{tmp_path / "sfl"}"'])))
    ok(baseline(str(tmp_path / "sfl" / "config.toml"), *sets([f'run.out_dir="{tmp_path / "base"}"'])))
    sfl, ref = load_model(tmp_path / "sfl"), load_model(tmp_path / "base")
    bound = roundoff_bound(tmp_path, ref, str(tmp_path / "sfl" / "config.toml"), (), "noise: nudged baseline")
    close(sfl, ref, bound, "noise: SFL vs baseline")
    # control: the noise really changed the training
    ok(baseline(str(tmp_path / "sfl" / "config.toml"), *sets(["sfl.noise_std=0.0", "sfl.clip_norm=0.0",
                                                               f'run.out_dir="{tmp_path / "clean"}"'])))
    assert max_diff(sfl, load_model(tmp_path / "clean")) > 10 * bound

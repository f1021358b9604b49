"""Training on the user's own data (data.dataset = "npz") end to end, under mpiexec."""
from __future__ import annotations

import numpy as np

import pytest

from conftest import TINY, baseline, close, load_model, metrics, mpijobs, ok, roundoff_bound, sets

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)



def learnable_npz(path, n_train=240, n_test=200, dtype=np.uint8):
    """1x28x28 uint8 images, 10 classes: a random prototype per class plus noise (the built-in
    models take 1x28x28 inputs and 10 classes)."""
    rng = np.random.default_rng(11)
    protos = rng.integers(0, 256, (10, 1, 28, 28))

    def draw(n):
        y = rng.integers(0, 10, n)
        x = np.clip(protos[y] + rng.normal(0, 40, (n, 1, 28, 28)), 0, 255).astype(np.uint8)
        return x.astype(dtype), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return xtr


def test_train_on_an_npz_file_equals_the_baseline(tmp_path):
    """4 ranks, 3 logical clients on 2 client ranks (2 + 1): each client rank loads only its
    clients' rows of the memory-mapped file, and with per-step averaging the model equals the
    single-process baseline's (which loads all of it). A file with a NaN is refused at set-up."""
    path = tmp_path / "mine.npz"
    learnable_npz(path)
    common = TINY + ['data.dataset="npz"', f'data.path="{path}"', 'model.name="mlp"', "train.clients=3",
                     "train.aggregate_every=1"]
    out, base = tmp_path / "sfl", tmp_path / "base"
    bad = tmp_path / "nan.npz"
    x = learnable_npz(bad, dtype=np.float32) / 255
    x[7, 0, 3, 3] = np.nan
    with np.load(bad) as f:
        np.savez(bad, x_train=x, y_train=f["y_train"], x_test=f["x_test"], y_test=f["y_test"])
    # both jobs in one launch: the training, then the refusal
    trained, proc = mpijobs(4, ["train", *sets(common + [f'run.out_dir="{out}"'])],
                            ["train", *sets(TINY + ['data.dataset="npz"', f'data.path="{bad}"', 'model.name="mlp"',
                                                   f'run.out_dir="{tmp_path / "refused"}"'])])
    ok(trained)
    ok(baseline(*sets(common + [f'run.out_dir="{base}"'])))
    ref = load_model(base)
    close(load_model(out), ref, roundoff_bound(tmp_path, ref, None, common, "npz: nudged baseline"), "npz: SFL vs baseline")
    rows = metrics(out)
    assert len(rows) == 2 and rows[-1]["test_accuracy"] > 0.2, rows[-1]  # chance: 0.1 (30 small steps)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1
    assert f"x_train in {bad} has non-finite values (NaN or inf), first in sample 7" in proc.stderr
    assert not (tmp_path / "refused").exists()  # a set-up error leaves no output directory behind

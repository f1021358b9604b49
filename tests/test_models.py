"""Models of the user's own and BatchNorm (docs/design.md §4).

In-process: a user function is imported by name and cut; every way it can be wrong is one clear
message; the summary's counts; recompute under running buffers. Through mpiexec: a user model from a
directory outside the package trains end to end, and SFL with BatchNorm in every part lands on the
baseline for each variant whose defining property says it must.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import REPO, TINY, baseline, close, load_model, mpirun, ok, roundoff_bound, run_jobs, sets
from mpi_sfl import models
from mpi_sfl.errors import UserError
from mpi_sfl.state import make_scratch, make_state

USER = REPO / "tests" / "user_models"
USER_ENV = {"PYTHONPATH": f"{REPO}{os.pathsep}{USER}"}
BN = ['model.name="bn_models:bn_cnn"', "model.cut=[4, 11]"]


@pytest.fixture
def user_path(monkeypatch):
    monkeypatch.syspath_prepend(str(USER))


@pytest.mark.parametrize("name, cut, shape, words", [
    ("broken_module:f", (), (1, 28, 28), "cannot import broken_module (ModuleNotFoundError"),
    ("bn_models:nothing", (), (1, 28, 28), "bn_models has no function 'nothing'"),
    ("bn_models:not_a_model", (), (1, 28, 28), "returned dict; it must return (encoder, body, head)"),
    ("bn_models:wrong_width", (), (1, 28, 28), "its body cannot take a batch of shape [2, 32]"),
    ("bn_models:bn_cnn", (), (1, 28, 28), "say where to cut it with model.cut = [i, j]"),
    ("bn_models:bn_cnn", (4, 20), (1, 28, 28), "model.cut = [4, 20] is out of range for 'bn_models:bn_cnn''s 14 layers"),
    ("bn_models:bn_cnn", (0, 4), (1, 28, 28), "out of range"),
    ("bn_models:three_parts", (1, 2), (1, 28, 28), "returns its three parts already: set model.cut = []"),
    ("cnn", (), (20,), "model cnn takes images (channels, height, width)"),
    ("mlp", (3, 9), (1, 28, 28), "out of range"),
])
def test_a_model_that_cannot_work_is_one_message(user_path, name, cut, shape, words):
    with pytest.raises(UserError) as err:
        models.check(models.Spec(name, cut, shape, 10), u_shape=True, grad_input=True)
    assert words in str(err.value)


def test_a_model_with_the_wrong_number_of_classes_is_refused(user_path):
    """three_parts ignores num_classes (it always gives 10 logits); the data has 5 classes."""
    with pytest.raises(UserError, match=r"outputs shape \[10\] per sample; it must give 5 logits"):
        models.check(models.Spec("bn_models:three_parts", (), (1, 28, 28), 5), u_shape=True, grad_input=True)


def test_user_functions_build_identical_cut_models(user_path):
    spec = models.Spec("bn_models:bn_cnn", (4, 11), (3, 16, 16), 7)
    a, b = spec.build(3), spec.build(3)
    assert [len(p) for p in (a.encoder, a.body, a.head)] == [4, 7, 3]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a(torch.randn(5, 3, 16, 16)).shape == (5, 7)  # it got input_shape and num_classes
    parts = models.Spec("bn_models:three_parts").build(0)
    assert isinstance(parts.body, nn.Sequential) and isinstance(parts.head, nn.Linear)


def test_builtin_cuts_can_move():
    moved = models.Spec("mlp", (1, 5)).build(0)
    assert len(moved.encoder) == 1 and len(moved.body) == 4
    s = models.check(models.Spec("mlp", (1, 5)), u_shape=True, grad_input=True)
    assert s.cut_shape == (784,)


def test_summary_counts_parameters_and_bytes():
    u = models.check(models.Spec("mlp"), u_shape=True, grad_input=True)
    assert u.params == {"encoder": 784 * 64 + 64, "body": 64 * 64 + 64, "head": 64 * 10 + 10}
    assert (u.cut_shape, u.out_shape) == ((64,), (64,))
    assert (u.up_bytes, u.down_bytes) == (256 + 256, 256 + 256)  # h and dl/dz up; z and dl/dh down
    ls = models.check(models.Spec("mlp"), u_shape=False, grad_input=False)
    assert (ls.up_bytes, ls.down_bytes, ls.out_shape) == (256 + 8, 0, None)  # h and the label; nothing back
    r = models.check(models.Spec("resnet18", (), (3, 32, 32)), u_shape=True, grad_input=True)
    assert r.cut_shape == (64, 32, 32) and r.out_shape == (512,) and r.params["head"] == 5130
    assert "cut 64x32x32, server output 512" in r.line("resnet18", "u")


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_recompute_under_running_buffers_updates_them_once(tmp_path, user_path, mode):
    """A BatchNorm body through forward + backward: the recomputed output and gradients are graph
    mode's, and the running statistics moved once — not twice, as a plain recompute would move them."""
    spec = models.Spec("bn_models:bn_cnn", (4, 11), (1, 28, 28), 10)
    h = torch.randn(6, 8, 14, 14)
    delta = torch.randn(6, 32)
    results = {}
    for name in ("graph", mode):
        body = spec.build(0).body.train()
        st = make_state(name, True, make_scratch(str(tmp_path), name), torch.device("cpu"))
        z = st.forward((0, 0, 1), body, h, seed=5)
        st.forward((0, 0, 2), body, h * 2, seed=6)  # a second batch in flight moves the buffers again
        grads, gh = st.backward((0, 0, 1), body, delta)
        st.backward((0, 0, 2), body, delta)
        results[name] = (z, grads, gh, [b.clone() for b in body.buffers()])
    (z, grads, gh, bufs), (mz, mgrads, mgh, mbufs) = results["graph"], results[mode]
    assert torch.equal(z, mz) and torch.equal(gh, mgh) and all(torch.equal(a, b) for a, b in zip(grads, mgrads))
    assert all(torch.equal(a, b) for a, b in zip(bufs, mbufs))
    assert int(bufs[-1]) == 2  # num_batches_tracked: two forwards, counted once each
    # control: a recompute without the saved buffers would have counted four
    body = spec.build(0).body.train()
    for x in (h, h * 2, h, h * 2):
        body(x)
    assert not torch.equal(next(body.buffers()), bufs[0])


# -- through mpiexec ---------------------------------------------------------------------------
USER_RUN = BN + ["train.aggregate_every=1", "sfl.state=\"file\"", "run.progress=\"lines\""]
BN_CASES = {
    "sync-label-graph": (4, ["sfl.variant=\"sync\"", "model.split=\"label-sharing\"", "sfl.state=\"graph\"",
                             "sfl.aggregation=\"decentralized\""]),
    "v1-2servers": (5, ["sfl.variant=\"v1\"", "sfl.servers=2", "sfl.state=\"memory\""]),
    "v2-one-client": (3, ["sfl.variant=\"v2\"", "train.clients=1", "train.momentum=0.9", "sfl.state=\"file\""]),
    "sl": (4, ["sfl.variant=\"sl\"", "train.momentum=0.9", "sfl.state=\"memory\""]),
    "fl": (3, ["sfl.variant=\"fl\"", "sfl.servers=0", "sfl.aggregation=\"decentralized\""]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's SFL jobs (TINY, 3 logical clients, the user model directory on PYTHONPATH), those
    with the same -n in one launch (conftest.run_jobs): "user" (USER_RUN on 4 ranks) and each BN_CASES."""
    jobs = {"user": (4, USER_RUN)} | {name: (ranks, BN + ["train.aggregate_every=1"] + settings)
                                      for name, (ranks, settings) in BN_CASES.items()}
    return run_jobs(tmp_path_factory, {name: (ranks, TINY + ["train.clients=3"] + settings)
                                       for name, (ranks, settings) in jobs.items()}, extra_env=USER_ENV)


def sfl(tmp_path, name: str, key: str, runs) -> dict:
    """Job `key`'s outputs (copied to tmp_path/name), model and stderr."""
    out = runs.into(key, tmp_path / name)
    return {"out": out, "model": load_model(out), "stderr": runs.procs[key].stderr}


def reference(tmp_path, run: dict) -> dict:
    out = tmp_path / f"baseline-{run['out'].name}"
    ok(baseline(str(run["out"] / "config.toml"), *sets([f'run.out_dir="{out}"']), extra_env=USER_ENV))
    return load_model(out)


def matches(tmp_path, run: dict, what: str) -> dict:
    """run lands on its baseline within the round-off bound measured on that baseline
    (conftest.roundoff_bound; in this process, so the user_path fixture must be in use)."""
    ref = reference(tmp_path, run)
    bound = roundoff_bound(tmp_path, ref, str(run["out"] / "config.toml"), (), f"{what}: nudged baseline")
    close(run["model"], ref, bound, f"{what}: SFL vs baseline")
    return ref


@pytest.mark.mpi
def test_a_user_model_with_batchnorm_trains_end_to_end_and_equals_the_baseline(tmp_path, runs, user_path):
    """The user's function from a directory outside the package, BatchNorm in every part, dropout in
    the body, file state: with per-step averaging SFL is the baseline (running statistics included)."""
    run = sfl(tmp_path, "user", "user", runs)
    assert "[mpi-sfl] model bn_models:bn_cnn (u split): parameters encoder 96 |" in run["stderr"]
    ref = matches(tmp_path, run, "user bn_cnn")
    assert run["model"]["encoder.1.num_batches_tracked"].dtype == torch.int64
    assert int(run["model"]["body.5.num_batches_tracked"]) == int(ref["body.5.num_batches_tracked"]) == 10
    assert float(run["model"]["head.11.running_var"].sub(1).abs().max()) > 1e-3  # the statistics moved


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(BN_CASES))
def test_batchnorm_keeps_each_variants_defining_property(tmp_path, case, runs, user_path):
    run = sfl(tmp_path, "bn", case, runs)
    matches(tmp_path, run, f"bn {case}")


@pytest.mark.mpi
def test_a_user_model_that_does_not_chain_ends_the_job_at_set_up(tmp_path):
    proc = mpirun(3, "train", *sets(TINY + ['model.name="bn_models:wrong_width"', f'run.out_dir="{tmp_path / "x"}"']),
                  timeout=60, extra_env=USER_ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    assert "its body cannot take a batch of shape [2, 32]" in proc.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_per_batch_seeding_is_torch_manual_seed_without_the_lazy_cuda_call(monkeypatch):
    """models.seed_rng gives the CPU generator exactly torch.manual_seed's state, and, unlike it
    (the control), formats no Python stack for a lazy CUDA/MTIA/XPU seeding call on a machine whose
    CUDA is not initialized: that cost about 0.2 ms per batch on the split server."""
    import traceback

    stacks = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: stacks.append(1) or real(*a, **k))
    torch.manual_seed(1234)
    want = torch.get_rng_state()
    formatted_by_torch = len(stacks)
    torch.manual_seed(0)
    del stacks[:]
    models.seed_rng(1234)
    assert torch.equal(torch.get_rng_state(), want)
    if not torch.cuda.is_initialized():
        assert formatted_by_torch > 0 and stacks == []

"""sfl.wire_dtype: activations and gradients cross narrowed; compute stays float32.

- In-process: each format's round trip is what its definition says (float16 / bfloat16 are torch's
  rounding; int8 has one scale per sample, max|row| / 127, so no value moves by more than half a
  scale step, and a zero row stays zero) and takes the bytes it should.
- Defining property: SFL with a narrowed wire equals the single-process model whose cut rounds the
  forward value and the backward gradient the same way (baseline.WireCut): bit for bit with one
  client, to float32 round-off as measured by a control with two (conftest.roundoff_bound: the same
  baseline from initial weights one ulp away); the float32 baseline lies well outside, so the
  rounding really happened. The bytes the clients send shrink by the format's width.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, baseline, baseline_here, close, load_model, max_diff, metrics, mpirun, ok, record, roundoff_bound, sets
from mpi_sfl.wire import Wire


def test_each_wire_format_rounds_as_defined_and_takes_its_bytes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 5, generator=g) * torch.logspace(-3, 2, 6)[:, None, None]
    x[2] = 0.0
    assert torch.equal(Wire("float32").round(x), x)
    assert torch.equal(Wire("float16").round(x), x.half().float())
    assert torch.equal(Wire("bfloat16").round(x), x.bfloat16().float())
    w = Wire("int8")
    packed = w.pack(x)
    assert packed.dtype == torch.int8 and packed.numel() == x.numel() + 4 * len(x)
    assert Wire.payload_shape(torch.int8, tuple(x.shape)) == (packed.numel(),)
    back = w.round(x)
    step = x.reshape(6, -1).abs().amax(1) / 127
    assert torch.all((back - x).reshape(6, -1).abs() <= step[:, None] / 2 * (1 + 1e-5) + 1e-30)
    assert torch.equal(back[2], torch.zeros_like(back[2]))
    assert not torch.equal(back, x)  # it really quantizes
    half = Wire("bfloat16").pack(x)
    assert half.dtype == torch.bfloat16 and half.numel() == x.numel() and half.element_size() == 2
    assert Wire("int8").pack(torch.zeros(0)).numel() == 0  # a dropped batch's empty payload


CASES = {  # name: (ranks, logical clients, settings)
    "float16-cnn-u-file-one-client": (3, 1, ["sfl.wire_dtype=\"float16\"", "model.name=\"cnn\"", "sfl.state=\"file\""]),
    "int8-mlp-label-memory": (4, 2, ["sfl.wire_dtype=\"int8\"", "model.name=\"mlp\"", "model.split=\"label-sharing\"",
                                     "sfl.state=\"memory\""]),
    "bfloat16-mlp-u-graph": (4, 2, ["sfl.wire_dtype=\"bfloat16\"", "model.name=\"mlp\"", "sfl.state=\"graph\""]),
}


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(CASES))
def test_a_narrowed_wire_is_the_baseline_that_rounds_at_the_cut(tmp_path, case):
    # One round. With several clients a conv computes a client's chunk and the concatenated batch
    # with different float32 round-off, by how much depends on the kernels this CPU dispatches to; a
    # value on a float16 rounding boundary then flips, and in the cnn (ReLU, max-pool) a flip grows:
    # 2 clients gave 3e-6 on one Intel machine and 4.7e-5 on an AMD EPYC, and baselines from initial
    # weights one ulp away land up to 1.2e-3 apart, as far as the float32 baseline (1.6e-3). No bound
    # tells those apart, so the cnn runs one client: its chunk is the whole batch, the gradient's
    # scale B / b_i is 1 and averaging one client multiplies and divides by 16, so SFL computes the
    # baseline's very operations on the same shapes and must match it bit for bit, on any CPU. The
    # two-client cases (the gradient rounded at scale B / b_i = 2) are smooth enough for the bound
    # measured here (conftest.roundoff_bound) to sit far below the float32 baseline's distance.
    ranks, clients, settings = CASES[case]
    common = TINY + [f"train.clients={clients}", "train.aggregate_every=1", "train.rounds=1",
                     f'run.out_dir="{tmp_path / "sfl"}"']
    ok(mpirun(ranks, "train", *sets(common + settings)))
    config = str(tmp_path / "sfl" / "config.toml")
    ok(baseline(config, *sets([f'run.out_dir="{tmp_path / "same"}"'])))
    # the control in this process: no interpreter to start, no 120 s limit for a slow CPU's kernels
    f32 = baseline_here(config, ["sfl.wire_dtype=\"float32\""], tmp_path / "f32")
    sfl, same = (load_model(tmp_path / d) for d in ("sfl", "same"))
    wrong = max_diff(sfl, f32)  # what a wire that did not round would be off by
    if clients == 1:
        record(f"wire {case}: SFL vs the rounding baseline (exact)", diff=max_diff(sfl, same), bound=0.0)
        record(f"wire {case}: SFL vs the float32 baseline", diff=wrong, bound=0.0)
        assert all(torch.equal(sfl[k], same[k]) for k in same)
        assert wrong > 1e-4  # the rounding really happened (measured: 3.8e-3)
    else:
        bound = roundoff_bound(tmp_path, same, config, what=f"wire {case}: nudged baseline")
        close(sfl, same, bound, f"wire {case}: SFL vs the rounding baseline")
        record(f"wire {case}: SFL vs the float32 baseline", diff=wrong, bound=bound)
        assert wrong > 5 * bound
    if case.startswith("float16"):  # half the bytes of float32 in every payload
        ok(mpirun(ranks, "train", *sets(common[:-1] + settings[1:] + [f'run.out_dir="{tmp_path / "wide"}"'])))
        # the split server sends only z and dl/dh (the clients' bytes include the averaging's)
        narrow, wide = (metrics(tmp_path / d)[-1]["bytes_sent"]["split_server"] for d in ("sfl", "wide"))
        assert 0.45 < narrow / wide < 0.55

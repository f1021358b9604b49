"""The GPU path on a machine without one: a stand-in device catches a tensor made on the wrong
device, and the GPU mapping, the numerics settings, the timers, the device memory and the CUDA RNG
state are checked in-process. (benchmarks/gpu_check.py runs the real thing on a GPU; its CPU dry
run is in test_benchmarks.py.)

The stand-in: "meta" tensors (shapes and dtypes, no data) under OneDevice, a dispatch mode that
enforces CUDA's rule, which the meta device alone does not: every tensor of an op on one device,
except CPU scalars (0-dim) and the copies between devices. Forward, backward and optimizer steps
run; what needs values (.item(), a comparison in Python, MPI, a file) does not. torch's
FakeTensorMode with device="cuda" would be the closer stand-in, but on a CPU-only build of torch
it cannot run copy_, indexing with None or backward on "cuda" tensors (CUDA's device guard is not
linked in), which every path here uses.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY
from mpi_sfl import aggregation, baseline, client, config, data, layout, models, outputs, slots
from mpi_sfl.errors import UserError
from mpi_sfl.job import STATS, Job
from mpi_sfl.state import make_state
from mpi_sfl.timing import Timers
from mpi_sfl.wire import Wire

GPU = torch.device("meta")  # the stand-in: any device but the CPU takes the GPU's branches
CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
CROSSING = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize}


class OneDevice(TorchDispatchMode):
    """CUDA's device rule for every op run under it (see the module's docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in CROSSING:
            devices = {t.device for t in pytree.tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{func}: tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_the_stand_in_catches_a_tensor_made_on_the_cpu():
    """The control: a mixed-device op raises under OneDevice (and not without it), a scalar and
    a copy between devices do not."""
    a = torch.zeros(3, device=GPU)
    torch.zeros(3).add_(a)  # the meta device alone lets this through
    with OneDevice():
        with pytest.raises(RuntimeError, match=r"tensors on \['cpu', 'meta'\]"):
            torch.zeros(3).add_(a)
        a.add_(torch.tensor(2.0)).copy_(torch.ones(3))


def test_the_baselines_update_stays_on_the_device():
    """baseline._forward_part for a BatchNorm part run per client chunk (each chunk from the same
    starting buffers, then their sample-weighted average: _average_buffers) and the int8 wire's
    emulation at the cut, forward and backward."""
    cfg = config.load(None, TINY + ["model.name=\"resnet18\"", "data.shape=[3, 32, 32]", "train.clients=2",
                                    "sfl.wire_dtype=\"int8\""])
    shards = data.partition(np.arange(cfg.data.train_samples) % 10, 2, cfg)
    plan = data.RoundPlan.make(shards, 4, 0, 0, 0)
    update = [(c, 0) for c in plan.active(0)]
    spec, _ = models.for_config(cfg)
    model = spec.build(0).to(GPU)
    x = torch.randn(sum(plan.batch_len(c, t) for c, t in update), 3, 32, 32).to(GPU)
    with OneDevice():
        h = baseline._forward_part(model.encoder, models.Part.ENCODER, x, update, plan, 0)
        h = baseline.WireCut.apply(h, Wire("int8"), [plan.batch_len(c, t) for c, t in update])
        out = model.head(model.body(h))
        out.sum().backward()
        assert all(b.device == GPU for b in models.buffers(model))


@pytest.mark.parametrize("case", ["label-sharing-frozen", "u-shape"])
def test_a_client_copy_lives_on_the_device(case):
    """client_copy: weights, the optimizer (its placeholder parameter when nothing on the client
    trains: label-sharing with a frozen encoder), a training step, the state vector sl hands over
    and loads, the momentum that slots keep, the averaging's flat gradient buffer."""
    extra = {"label-sharing-frozen": ["model.split=\"label-sharing\"", "model.freeze_encoder=true"],
             "u-shape": []}[case]
    cfg = config.load(None, TINY + ["model.name=\"cnn\"", "train.momentum=0.9"] + extra)
    spec, _ = models.for_config(cfg)
    body = models.server_part(spec.build(0), cfg.u_shape).to(GPU)
    with OneDevice():
        c = client.client_copy(cfg, spec.build(0), GPU)
        out = body(c.model.encoder(torch.randn(8, 1, 28, 28).to(GPU)))
        out = c.model.head(out) if cfg.u_shape else out
        out.sum().backward()
        c.opt.step()
        vec = c.state_vector()
        assert vec.device == GPU and c.flat.device == GPU
        c.load_state_vector(vec)
        assert slots.momentum(c.opt).device == GPU
        if c.trainable:
            assert aggregation.attach_flat_grads(c.trainable, GPU).device == GPU


@pytest.mark.parametrize("mode", ["memory", "graph"])
def test_the_split_servers_state_stays_on_the_device(mode, tmp_path):
    """The server part's forward, kept input and recompute-backward (file state: its bytes need
    values, so only memory and graph run here; gpu_check runs the file state on a GPU)."""
    body = models.build("cnn", 0).body.to(GPU)
    st = make_state(mode, True, tmp_path, GPU)
    with OneDevice():
        z = st.forward((0, 0, 1), body, torch.randn(8, 16, 14, 14).to(GPU), seed=3)
        grads, gh = st.backward((0, 0, 1), body, torch.ones_like(z))
        assert gh.device == GPU and all(g.device == GPU for g in grads)


class DivisorLog(TorchDispatchMode):
    """Records the divisor of every division: CUDA divides by a CPU scalar (a Python number, a
    0-dim CPU tensor) through its reciprocal, one rounding more than the quotient; by a tensor on
    the device, it divides."""

    def __init__(self):
        super().__init__()
        self.divisors = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (aten.div, aten.div_):
            d = args[1]
            scalar = not isinstance(d, torch.Tensor) or (d.device.type == "cpu" and d.dim() == 0)
            self.divisors.append("scalar" if scalar else "tensor")
        return func(*args, **(kwargs or {}))


def test_the_wire_and_the_averages_never_divide_by_a_scalar():
    """int8 packing (both ends: SFL's ranks and the baseline's emulation) and the baseline's
    BatchNorm average divide elementwise on the device, so CPU and CUDA give the same bits
    (checked on a GPU by benchmarks/gpu_check.py: inprocess/int8_wire_bits)."""
    bn = torch.nn.BatchNorm1d(4).to(GPU)
    bufs = models.buffers(bn)
    with DivisorLog() as log:
        Wire("int8").round(torch.randn(16, 30).to(GPU))
        baseline._average_buffers(bufs, [models.snapshot(bufs)] * 2, [3, 4])
    assert len(log.divisors) == 5 and set(log.divisors) == {"tensor"}, log.divisors


def test_int8_packing_stays_on_the_device_it_is_given():
    """The narrowing happens where the tensor is (a GPU sends a quarter of the bytes over PCIe),
    and so does the widening at the other end."""
    with OneDevice():
        x = torch.randn(8, 5).to(GPU)
        packed = Wire("int8").pack(x)
        assert packed.device == GPU and packed.dtype == torch.int8
        assert Wire.unpack(packed, torch.int8, (8, 5)).device == GPU


class FakeNode:
    """comm.Split_type(COMM_TYPE_SHARED) of a node holding world ranks `members`."""

    def __init__(self, world_rank: int, members: list[int]):
        self.rank, self.size, self.members = members.index(world_rank), len(members), members

    def Split_type(self, _kind):
        return self

    def Allreduce(self, _send, recv, op=None):
        recv[0] = int(0 in self.members)

    def Free(self):
        pass


def test_gpus_are_numbered_by_training_rank():
    """Node A holds ranks 0-4 (the fed server and 4 training ranks), node B ranks 5-8: the
    training ranks take slots 0-3 on each, the fed server shares slot 0."""
    a, b = [0, 1, 2, 3, 4], [5, 6, 7, 8]
    slots_a = [layout.local_rank(SimpleNamespace(rank=r, Split_type=FakeNode(r, a).Split_type))[0] for r in a]
    slots_b = [layout.local_rank(SimpleNamespace(rank=r, Split_type=FakeNode(r, b).Split_type))[0] for r in b]
    assert slots_a == [0, 0, 1, 2, 3] and slots_b == [0, 1, 2, 3]
    assert layout.local_rank(SimpleNamespace(rank=2, Split_type=FakeNode(2, a).Split_type))[1:] == (5, 4)


def test_a_gpu_that_cannot_be_used_is_one_line(monkeypatch):
    """torch says a GPU is there, but it cannot run a kernel (busy, exclusive mode; here: a CPU
    build): set-up ends with a UserError naming the GPU, not a traceback later."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    picked = []
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    with pytest.raises(UserError, match=r"cannot use GPU 1 \(of 2 visible\)"):
        layout.pick_device("auto", 3)
    assert picked == [torch.device("cuda", 1)]
    assert layout.pick_device("cpu", 3) == torch.device("cpu")


def test_deterministic_numerics_on_a_gpu():
    """run.deterministic (default true): cuDNN deterministic, no autotuning, no TF32; off: cuDNN
    autotunes. Nothing is touched for the CPU."""
    cfg = config.load(None, [])
    assert cfg.run.deterministic is True
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        layout.set_numerics(CUDA, True)
        assert cudnn.deterministic and not cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
        layout.set_numerics(CUDA, False)
        assert not cudnn.deterministic and cudnn.benchmark and cudnn.allow_tf32
        layout.set_numerics(torch.device("cpu"), True)
        assert cudnn.benchmark  # unchanged
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_device_phases_are_timed_to_their_kernels_end():
    """On a GPU the compute phases sync before and after (kernels are queued, not run, when a
    call returns); the waits do not (a sync there would stall the overlap)."""
    calls = []
    t = Timers(sync=lambda: calls.append("sync"))
    for name in ("client_compute", "server_compute", "eval", "p2p_wait", "aggregation", "idle"):
        with t.phase(name):
            calls.append(name)
    assert calls == ["sync", "client_compute", "sync", "sync", "server_compute", "sync", "sync", "eval", "sync",
                     "p2p_wait", "aggregation", "idle"]


def test_device_memory_is_in_the_stats():
    """peak_device (bytes) per rank; per role in MB, as metrics.jsonl carries it on a GPU."""
    rows = import_rows([(0, 0.0), (1, 3 * 2**20), (2, 5 * 2**20), (2, 7 * 2**20)])
    roles = outputs.role_rows(rows)
    assert {r: v["peak_device_mb"] for r, v in roles.items()} == {"fed_server": 0.0, "split_server": 3.0, "client": 7.0}


def import_rows(spec: list[tuple[int, float]]):
    import numpy as np
    rows = np.zeros(len(spec), STATS)
    for row, (role, device) in zip(rows, spec):
        row["role"], row["peak_device"] = role, device
    return rows


def test_the_cuda_rng_state_is_checkpointed(monkeypatch):
    """Job.counters carries the GPU's generator state and load_counters restores it (torch.cuda's
    calls stubbed: there is no GPU here); a checkpoint written on the CPU has none to restore."""
    state = torch.arange(4, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    job = SimpleNamespace(device=CUDA, timers=Timers(), transport=SimpleNamespace(bytes_sent=7))
    saved = Job.counters(job)
    assert torch.equal(saved["cuda_rng"], state)
    Job.load_counters(job, saved)
    assert restored == [(state, CUDA)]
    Job.load_counters(job, {**saved, "cuda_rng": None})
    assert len(restored) == 1

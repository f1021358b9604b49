"""Split-server state modes, in-process: same z, same gradients, nothing left behind."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

from mpi_sfl import models, state
from mpi_sfl.errors import UserError
from mpi_sfl.state import GraphState, clean_stale, make_scratch, make_state, scratch_name, scratch_owner


@pytest.mark.parametrize("grad_input", [True, False])
def test_modes_agree_exactly_with_dropout(tmp_path, grad_input):
    scratch = make_scratch(str(tmp_path), "t")
    body = models.build("cnn", 0).body  # carries Dropout(0.25)
    h = torch.randn(8, 16, 14, 14)
    delta = torch.randn(8, 128)
    results = {}
    for mode in ("graph", "memory", "file"):
        st = make_state(mode, grad_input, scratch, torch.device("cpu"))
        z1 = st.forward((0, 0, 1), body, h, seed=123)
        z2 = st.forward((0, 0, 2), body, h, seed=456)   # a second batch in flight
        assert st.in_flight() == 2
        grads, gh = st.backward((0, 0, 1), body, delta)
        st.backward((0, 0, 2), body, delta)
        assert st.in_flight() == 0
        results[mode] = (z1, z2, grads, gh)
    z1, z2, grads, gh = results["graph"]
    assert not torch.equal(z1, z2)  # different seeds, different masks: the seed really matters
    for mode in ("memory", "file"):
        m1, m2, mg, mgh = results[mode]
        assert torch.equal(z1, m1) and torch.equal(z2, m2)
        assert all(torch.equal(a, b) for a, b in zip(grads, mg))
        assert (gh is None and mgh is None) if not grad_input else torch.equal(gh, mgh)
        if mode == "file":  # one file per batch that was in flight at once, removed on close
            assert len(os.listdir(scratch)) == st.files() == 2
            st.close()
    assert os.listdir(scratch) == []


def test_file_state_keeps_tensors_out_of_ram_and_reuses_its_files(tmp_path):
    scratch = make_scratch(str(tmp_path), "t")
    st = make_state("file", True, scratch, torch.device("cpu"))
    body = models.build("mlp", 0).body
    h = torch.randn(4, 64)
    st.forward((0, 3, 7), body, h, seed=1)
    files = os.listdir(scratch)
    assert len(files) == 1 and len(files[0]) == 32 and int(files[0], 16) >= 0  # a uuid4 hex name
    assert not st._kept and all(not isinstance(v, torch.Tensor) for held in st._names.values() for v in held)
    want = GraphState(True)
    want.forward((0, 3, 7), body, h, seed=1)
    grads, gh = st.backward((0, 3, 7), body, torch.ones(4, 64))
    ref, ref_h = want.backward((0, 3, 7), body, torch.ones(4, 64))
    assert all(torch.equal(a, b) for a, b in zip(grads, ref)) and torch.equal(gh, ref_h)
    for step in range(5):  # later batches, one in flight at a time: the same file, rewritten
        st.forward((0, 4 + step, 7), body, torch.randn(4, 64), seed=step)
        assert os.listdir(scratch) == files
        st.backward((0, 4 + step, 7), body, torch.ones(4, 64))
    st.forward((0, 9, 1), body, torch.randn(2, 64), seed=2)  # another shape, while another is in flight
    st.forward((0, 9, 2), body, torch.randn(4, 64), seed=3)
    assert st.in_flight() == 2 and len(os.listdir(scratch)) == 2
    st.drop((0, 9, 1))
    st.close()
    assert os.listdir(scratch) == []


def test_scratch_is_private_and_stale_dirs_are_cleaned(tmp_path):
    d = make_scratch(str(tmp_path), "job-r1")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert scratch_owner(d.name) == (socket.gethostname(), os.getpid())  # the name says who owns it
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / scratch_name("old-r1", dead.pid, host)
    stale.mkdir()
    (stale / "0123abcd").write_bytes(b"x" * 10)
    empty = tmp_path / scratch_name("local-r2", dead.pid, host)  # a set-up that failed half-way
    empty.mkdir()
    elsewhere = tmp_path / scratch_name("old-r1", dead.pid, "another-host")
    elsewhere.mkdir()
    other = tmp_path / "mpi_sfl-not-ours"
    other.mkdir()
    assert sorted(clean_stale(tmp_path)) == sorted([stale, empty])
    assert not stale.exists() and not empty.exists()
    assert d.exists() and elsewhere.exists() and other.exists()  # live owner, other host, unparseable: kept


def test_a_zombie_owns_nothing(tmp_path):
    """A rank killed with its job can stay a zombie after its launcher returns (seconds, on these
    machines): its scratch dir is stale all the same, while a live process's is kept."""
    from mpi_sfl.outdir import pid_alive
    live = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])  # not waited for: a zombie once it has exited
    try:
        for _ in range(500):
            with open(f"/proc/{gone.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        assert pid_alive(live.pid) and not pid_alive(gone.pid)
        host = socket.gethostname()
        kept, stale = (tmp_path / scratch_name("7-r1", p.pid, host) for p in (live, gone))
        kept.mkdir(), stale.mkdir()
        assert clean_stale(tmp_path) == [stale] and kept.exists()
    finally:
        live.kill()
        live.wait(), gone.wait()


def test_scratch_names_parse_back():
    assert scratch_owner(scratch_name("123-r4", 77, "node-7.cluster")) == ("node-7.cluster", 77)
    assert scratch_owner("mpi_sfl-x-12") is None and scratch_owner("mpi_sfl-x-ab@h") is None
    assert scratch_owner("other-1-2@h") is None and scratch_owner("mpi_sfl-12@h") is None


def test_failed_scratch_set_up_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the dir is made (here chmod; in life a full disk) removes it before the error."""
    def refuse(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(state.os, "chmod", refuse)
    with pytest.raises(UserError, match=r"cannot use scratch dir .*No space left on device.*set run.scratch_dir"):
        make_scratch(str(tmp_path), "job-r1")
    assert os.listdir(tmp_path) == []


def test_graph_state_retains_graph_memory_does_not():
    body = models.build("mlp", 0).body
    g, m = GraphState(True), make_state("memory", True, None, torch.device("cpu"))
    h = torch.randn(4, 64)
    g.forward((0, 0, 0), body, h, 1)
    m.forward((0, 0, 0), body, h, 1)
    kept_g, kept_m = g._kept[(0, 0, 0)], m._kept[(0, 0, 0)]
    assert kept_g[1].grad_fn is not None          # graph mode holds z with its graph
    assert isinstance(kept_m[1], int) and kept_m[0].grad_fn is None  # memory mode: input + seed only


@pytest.mark.parametrize("inflight", [1, 4, 16])
def test_what_a_state_keeps_in_ram_per_batch_in_flight(tmp_path, inflight):
    """file: one read buffer, however many batches are in flight; memory: exactly each batch's h;
    graph: h and z per batch (its graph comes on top)."""
    body = models.build("mlp", 0).body
    h = torch.randn(8, 64)
    z_bytes = body(h).nbytes
    want = {"file": h.nbytes, "memory": inflight * h.nbytes, "graph": inflight * (h.nbytes + z_bytes)}
    for mode in ("file", "memory", "graph"):
        st = make_state(mode, True, make_scratch(str(tmp_path), mode), torch.device("cpu"))
        for rnd in range(2):  # the second round in flight again: nothing left over from the first
            for c in range(inflight):
                st.forward((rnd, 0, c), body, h, seed=c)
            for c in range(inflight):
                st.backward((rnd, 0, c), body, torch.ones(8, 64))
        assert st.peak_bytes == want[mode], mode
        assert st.bytes == (h.nbytes if mode == "file" else 0), mode
        st.close()


def test_a_batched_forward_draws_each_clients_own_masks(tmp_path):
    """Cross-client batching with dropout (models.seeded with ChunkSeeds): three clients' batches
    as one through two dropout layers give each client's rows the masks of its own forward, seeded
    with its own seed — bit for bit (dropout is elementwise: nothing else to round) — with the
    generator state carried from the first dropout layer to the second; the state modes keep the
    seeds and recompute the same, also for two clients' rows of the three (one dropped). Control: one
    seed for the whole batch, a mask shared across clients, is another function."""
    body = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Dropout(0.3))
    sizes, seeds = (5, 8, 3), (11, 22, 33)
    h = torch.randn(sum(sizes), 4, 6, generator=torch.Generator().manual_seed(0)) + 3
    delta = torch.randn_like(h)
    x = h.clone().requires_grad_(True)
    own = torch.cat([body(part) for part, s in zip(x.split(sizes), seeds) if models.seed_rng(s) is None])
    own_grad = torch.autograd.grad(own, x, delta)[0]
    own = own.detach()
    chunks = models.ChunkSeeds(seeds, sizes)
    with models.seeded(chunks, body):
        batched = body(h)
    assert torch.equal(batched, own)
    assert all("forward" not in vars(m) for m in body.modules())  # the layers are themselves again
    with models.seeded(seeds[0], body):
        shared = body(h)
    assert (shared != own).float().mean() > 0.2  # the control: masks differ on a large share of values
    keep = torch.cat([torch.arange(0, 5), torch.arange(13, 16)])  # clients 0 and 2; client 1 dropped
    results = {}
    for mode in ("graph", "memory", "file"):
        st = make_state(mode, True, make_scratch(str(tmp_path), mode), torch.device("cpu"))
        z = st.forward((0, 0, -1), body, h, chunks)
        st.forward((0, 0, -2), body, h, chunks)
        results[mode] = z, st.backward((0, 0, -1), body, delta), st.backward((0, 0, -2), body, delta[keep], keep)
        st.close()
    for mode, (z, (_, gh), (_, gh_kept)) in results.items():
        assert torch.equal(z, own), mode
        assert torch.equal(gh, own_grad), mode
        assert torch.equal(gh_kept, gh[keep]), mode


FREED = """
import sys, torch
from mpi_sfl.state import release_large_buffers
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "fixed":
    assert release_large_buffers()
big = torch.ones(8 << 18); del big   # 8 MiB mapped, then unmapped: glibc's sliding threshold rises to it
a = torch.ones(4 << 18)              # a 4 MiB tensor (a few batches' worth of h) ...
b = torch.ones(1 << 10)              # ... and a small one allocated after it
before = rss_mb(); del a
print(before - rss_mb())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or os.uname().sysname != "Linux", reason="glibc and /proc only")
def test_a_freed_large_tensor_goes_back_to_the_system():
    """The split server's fixed mmap threshold: a 4 MiB tensor freed while a later, smaller one lives
    returns its 4 MiB at once. The control (glibc's default) keeps all of it: the heap cannot shrink
    below the live block, which is how a server's RSS kept its peak in batches in flight."""
    def returned(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)
    assert returned("default") < 1.0
    assert returned("fixed") >= 3.9

"""Many logical clients are cheap: a working copy only while a client trains (mpi_sfl/slots.py).

- In-process: a copy starts from the last average and is reused after the next averaging; with
  train.client_optimizer = "keep" a logical client's momentum comes back bit for bit in its next copy,
  with "reset" (or for a client that never trained) the copy's optimizer starts empty.
- Defining property of "reset" (docs/design.md §3.11): with per-step averaging, sync equals the
  single-process model whose client parts restart their momentum after every step, i.e. plain SGD
  on the client side; the control shows "keep" (one momentum buffer throughout) is another model.
- A thousand logical clients on two client ranks, a few sampled per round: each rank builds only as
  many copies as it has clients training at once, on the client and on v1's split server.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY, baseline, close, load_model, max_diff, metrics, mpijobs, ok, private_tmpdir, roundoff_bound, sets
from mpi_sfl import slots
from mpi_sfl.aggregation import flatten_params



class Copy:
    """The smallest working copy: one linear layer, its flat vector and SGD with momentum."""

    def __init__(self, momentum: float = 0.9):
        self.module = nn.Linear(3, 2)
        self.flat = flatten_params([self.module], torch.device("cpu"))
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.1, momentum=momentum)
        self.cid, self.trained = -1, 0

    def step(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in self.module.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        self.opt.step()
        self.trained += 1


def test_a_copy_starts_from_the_last_average_and_is_reused():
    pool = slots.Slots(Copy, keep=True)
    start = torch.arange(8, dtype=torch.float32)
    a = pool.get(4, start)
    assert torch.equal(a.flat[:-1], start) and a.cid == 4 and pool.get(4, start * 0) is a  # held: not reloaded
    a.step(0)
    b = pool.get(9, start)
    assert b is not a and pool.made == 2
    assert [cid for cid, _ in pool.in_order()] == [4, 9]
    pool.release()
    later = torch.full((8,), 0.5)
    c = pool.get(700, later)
    assert c in (a, b) and torch.equal(c.flat[:-1], later) and c.trained == 0 and c.cid == 700
    assert pool.made == 2 and len(pool.free) == 1 and len(pool.held) == 1


def test_keep_brings_a_clients_momentum_back_and_reset_starts_empty():
    start = torch.zeros(8)
    for keep in (True, False):
        pool = slots.Slots(Copy, keep=keep)
        a = pool.get(1, start)
        a.step(1)
        saved = slots.momentum(a.opt).clone()
        assert saved.abs().sum() > 0
        pool.release()
        other = pool.get(2, start)  # the same object, now another client's: no momentum of client 1's
        assert other is a and other.opt.state == {}
        pool.release()
        again = pool.get(1, start)
        if keep:
            assert torch.equal(slots.momentum(again.opt), saved)
        else:
            assert again.opt.state == {} and pool.kept == {}
    # without momentum there is nothing to keep
    pool = slots.Slots(lambda: Copy(momentum=0.0), keep=True)
    pool.get(3, start).step(3)
    pool.release()
    assert pool.kept == {}


def test_a_checkpoint_of_the_pool_restores_held_copies_and_kept_momentum():
    pool = slots.Slots(Copy, keep=True)
    start = torch.zeros(8)
    pool.get(5, start).step(5)
    pool.release()
    pool.get(6, start).step(6)
    state = pool.state_dict()
    back = slots.Slots(Copy, keep=True)
    back.load_state_dict(state, start)
    assert list(back.held) == [6] and torch.equal(back.held[6].flat, pool.held[6].flat)
    assert torch.equal(slots.momentum(back.held[6].opt), slots.momentum(pool.held[6].opt))
    assert back.held[6].trained == 1 and torch.equal(back.kept[5], pool.kept[5])


COMMON = TINY + ["train.clients=3", "train.momentum=0.9", "train.aggregate_every=1"]
THOUSAND = TINY + ["data.train_samples=2000", "train.clients=1000", "train.clients_per_round=6", "train.batch_size=2",
                   "sfl.variant=\"v1\"", "sfl.aggregator=\"median\"", "train.momentum=0.9", "train.rounds=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The module's two SFL jobs, one launch of 4 ranks: "reset" (COMMON, client_optimizer = reset)
    and "many" (THOUSAND); name -> out_dir."""
    with private_tmpdir(tmp_path_factory) as tmp:
        outs = {"reset": (tmp / "reset", COMMON + ["train.client_optimizer=\"reset\""]), "many": (tmp / "many", THOUSAND)}
        for proc in mpijobs(4, *[["train", *sets(settings + [f'run.out_dir="{out}"'])] for out, settings in outs.values()]):
            ok(proc)
        return {name: out for name, (out, _) in outs.items()}


@pytest.mark.mpi
def test_reset_is_plain_sgd_on_the_client_side(tmp_path, runs):
    out = runs["reset"]
    ref = tmp_path / "baseline"
    ok(baseline(str(out / "config.toml"), *sets([f'run.out_dir="{ref}"'])))
    bound = roundoff_bound(tmp_path, load_model(ref), str(out / "config.toml"), (), "reset: nudged baseline")
    close(load_model(out), load_model(ref), bound, "reset: SFL vs baseline")
    kept = tmp_path / "baseline-keep"  # control: one momentum buffer throughout is another trajectory
    ok(baseline(str(out / "config.toml"), *sets(["train.client_optimizer=\"keep\"", f'run.out_dir="{kept}"'])))
    assert max_diff(load_model(out), load_model(kept)) > 10 * bound


@pytest.mark.mpi
def test_a_thousand_clients_build_only_the_copies_that_train(runs):
    rows = metrics(runs["many"])
    assert [r["clients_trained"] for r in rows] == [6, 6, 6]
    # at most 6 train at once on a rank (the 1000 split 500/500); without the pool it is 500 per rank
    assert 1 <= rows[-1]["working_copies"]["client"] <= 6
    assert 1 <= rows[-1]["working_copies"]["split_server"] <= 6
    assert 0.0 <= rows[-1]["test_accuracy"] <= 1.0


def test_clients_are_dealt_in_contiguous_blocks_and_found_in_constant_time():
    """Layout.clients_of / rank_of by arithmetic (sl asks rank_of once per batch) agree with
    numpy's array_split of the ids over the client ranks, for every layout up to 10 ranks."""
    import numpy as np
    from mpi_sfl.layout import Layout
    checked = 0
    for world in range(3, 11):
        for servers in (1, 2, 3):
            ranks = world - 1 - servers
            for clients in range(max(ranks, 1), 41):
                if ranks < servers:
                    continue
                layout = Layout(world, servers, clients)
                blocks = np.array_split(np.arange(clients), ranks)
                for r, block in zip(layout.client_ranks, blocks):
                    assert layout.clients_of(r) == block.tolist()
                    assert all(layout.rank_of(int(c)) == r for c in block)
                checked += 1
    assert checked > 300

"""Working copies for the logical clients that train now, so that thousands of them are cheap.

Between two averagings every logical client that trains needs weights of its own; right after an
averaging all of them hold the same weights (the average), so none needs a copy. `Slots` hands a
logical client a working copy (its weights, running buffers and optimizer) the first time it trains
after an averaging, loaded from the last average, and takes every copy back at the next averaging,
to be reused. A rank therefore holds as many copies as it has logical clients training between two
averagings (train.clients_per_round samples them), not as many as it hosts.

Only the optimizer state can outlive a copy (train.client_optimizer):
  keep   each logical client's momentum buffers are stored when its copy is taken back (one float32
         vector of the copy's trainable parameters per logical client that has trained, for the
         whole run: the cost of "keep") and loaded into its next copy. This is what makes sync
         with momentum equal single-process SGD (docs/design.md §3.1).
  reset  every copy starts with an empty optimizer state: the first step after an averaging is
         plain SGD (SGD's momentum buffer starts as the gradient). Nothing is stored.
Without momentum the two are the same and nothing is stored.

Used by the client ranks (client parts; fl's whole model) and by v1's split servers (one copy of
the server part per logical client served).
"""
from __future__ import annotations

from typing import Callable, Generic, Protocol, TypeVar

import torch


class Copy(Protocol):
    cid: int                        # the logical client it serves
    flat: torch.Tensor              # weights, then running buffers, then a spare slot (aggregation.flatten_params)
    opt: torch.optim.Optimizer
    trained: int                    # samples since the last averaging


C = TypeVar("C", bound=Copy)


def momentum(opt: torch.optim.Optimizer) -> torch.Tensor | None:
    """The optimizer's momentum buffers as one vector (zeros where a parameter has none yet);
    None without momentum."""
    if not opt.defaults.get("momentum"):
        return None
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            out.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if buf is None else buf.reshape(-1))
    return torch.cat(out) if out else None


def set_momentum(opt: torch.optim.Optimizer, vec: torch.Tensor | None) -> None:
    """Load `momentum(...)`'s vector into the optimizer; None clears its state (a fresh optimizer)."""
    opt.state.clear()
    if vec is None:
        return
    n = 0
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["momentum_buffer"] = vec[n:n + p.numel()].view_as(p).clone()
            n += p.numel()


class Slots(Generic[C]):
    """The working copies of one rank, by logical client (see the module's docstring)."""

    def __init__(self, make: Callable[[], C], keep: bool):
        self.make, self.keep = make, keep
        self.held: dict[int, C] = {}
        self.free: list[C] = []
        self.kept: dict[int, torch.Tensor] = {}  # keep: each logical client's momentum since its last copy
        self.made = 0                             # copies ever built (the peak held at once)

    def get(self, cid: int, start: torch.Tensor) -> C:
        """Logical client `cid`'s working copy; a new one starts from `start` (the last average:
        weights and running buffers, without the spare slot) and, with keep, its stored momentum."""
        c = self.held.get(cid)
        if c is None:
            c = self.free.pop() if self.free else self.new()
            c.flat[:-1].copy_(start)
            set_momentum(c.opt, self.kept.get(cid) if self.keep else None)
            c.cid, c.trained = cid, 0
            self.held[cid] = c
        return c

    def new(self) -> C:
        self.made += 1
        return self.make()

    def in_order(self) -> list[tuple[int, C]]:
        """The held copies by logical client id: the fixed order of every local sum."""
        return sorted(self.held.items())

    def release(self) -> None:
        """After an averaging: every copy goes back to the pool (with keep, its momentum stored)."""
        for cid, c in self.held.items():
            if self.keep:
                m = momentum(c.opt)
                if m is not None:
                    self.kept[cid] = m
            self.free.append(c)
        self.held.clear()

    def move(self, src: int, dst: int) -> None:
        """sl: logical client `dst` takes over `src`'s copy as it is (the relayed model)."""
        c = self.held[dst] = self.held.pop(src)
        c.cid = dst

    def drop(self, cid: int) -> None:
        """sl: `cid`'s copy has been sent on; it goes back to the pool."""
        self.free.append(self.held.pop(cid))

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"held": [{"client": cid, "flat": c.flat.detach().cpu().clone(), "opt": c.opt.state_dict(),
                          "trained": c.trained} for cid, c in self.in_order()],
                "kept": {cid: m.detach().cpu().clone() for cid, m in sorted(self.kept.items())}}

    def load_state_dict(self, state: dict, start: torch.Tensor) -> None:
        self.kept = {int(cid): m.to(start.device) for cid, m in state["kept"].items()}
        for saved in state["held"]:
            c = self.get(int(saved["client"]), start)
            c.flat.copy_(saved["flat"])
            c.opt.load_state_dict(saved["opt"])
            c.trained = saved["trained"]

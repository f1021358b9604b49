"""The models, each defined once as three parts: encoder | body | head.

The cut points live here and nowhere else. U-shaped split: client = encoder + head, server = body.
Label-sharing split: client = encoder, server = body + head. The global model is always
`Parts(encoder, body, head)`, so `model.pt` has the same keys whatever the split.
"""
from __future__ import annotations

from enum import IntEnum

import torch
from torch import nn


class Parts(nn.Module):
    """The whole network as its three parts; forward runs them in order."""

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.body, self.head = encoder, body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.encoder(x)))


def cnn() -> Parts:
    """Small CNN for 28x28 images; the server part carries the dropout (its masks must survive recompute)."""
    return Parts(
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),            # 16x14x14
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Dropout(0.25)),              # 128
        nn.Linear(128, 10),
    )


def lenet5() -> Parts:
    return Parts(
        nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2)),             # 6x14x14
        nn.Sequential(nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                      nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh()),  # 84
        nn.Linear(84, 10),
    )


def mlp() -> Parts:
    return Parts(
        nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU()),
        nn.Sequential(nn.Linear(64, 64), nn.ReLU()),
        nn.Linear(64, 10),
    )


MODELS = {"cnn": cnn, "lenet5": lenet5, "mlp": mlp}


def build(name: str, seed: int) -> Parts:
    """The full model with weights drawn from `seed`: every rank builds it, so all start identical."""
    torch.manual_seed(seed)
    return MODELS[name]()


class Part(IntEnum):
    """Which part a forward runs: one of the numbers a batch's dropout seed is drawn from."""
    ENCODER = 0
    BODY = 1
    HEAD = 2


def server_part(model: Parts, u_shape: bool) -> nn.Module:
    return model.body if u_shape else nn.Sequential(model.body, model.head)


def client_parts(model: Parts, u_shape: bool, split: bool = True) -> list[nn.Module]:
    """The modules a client trains: encoder (+ head for the U-shape); all three when not split (fl)."""
    if not split:
        return [model.encoder, model.body, model.head]
    return [model.encoder, model.head] if u_shape else [model.encoder]


def uses_rng(module: nn.Module) -> bool:
    """Whether a forward of `module` draws random numbers (dropout): only those are seeded per batch."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


def batch_seed(seed: int, rnd: int, step: int, client: int, part: Part) -> int:
    """The RNG seed for one part's forward of one client's batch.

    Seeding each (round, step, client, part) forward makes dropout masks independent of arrival
    order, of which rank runs the part and of recomputation: the split server, its replicas and the
    single-process baseline all draw the same masks.
    """
    h = seed
    for v in (rnd, step, client, part):
        h = (h * 1_000_003 + v + 1) % (2**61 - 1)
    return h

"""Data as every role sees it: the samples of a train or test set from the configured source
(sources.py: Fashion-MNIST, synthetic, npz), the client partitions, and the round plan that every
rank computes alike.

`load(cfg, kind, only=ids)` gives a Split that holds only the samples with those global ids (a
client rank asks for its logical clients' shards); `describe(cfg)` gives the sample shape and the
number of classes without loading any sample; `prepare(cfg)` is set-up's one look at the source."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .errors import UserError
from .sources import (MEAN, NUM_CLASSES, STD, check_finite, check_npz, load_fashion_mnist, locate_fashion_mnist,
                      npz_arrays, synthetic, to_float32)


@dataclass
class Split:
    """Samples (N, *sample shape) float32 and labels (N,) int64 of a train or test set: all of it
    (`ids` None, row i is sample i), or only the samples whose global ids are in `ids` (sorted,
    unique), which is what a client rank holds: its logical clients' shards."""
    x: torch.Tensor | None
    y: torch.Tensor
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, ids) -> np.ndarray:
        """The rows holding the global sample ids `ids` (what `partition` and `RoundPlan.batches`
        give), int64, in the order of `ids`. IndexError for an id this split does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.ids is None:
            if ids.size and (ids.min() < 0 or ids.max() >= len(self.y)):
                raise IndexError(f"sample ids outside 0..{len(self.y) - 1}")
            return ids
        pos = np.searchsorted(self.ids, ids)
        held = pos < len(self.ids)
        held[held] = self.ids[pos[held]] == ids[held]
        if not held.all():
            raise IndexError(f"sample ids {ids[~held][:5].tolist()} are not among the {len(self.ids)} "
                             "samples this split holds")
        return pos


# -- what set-up asks ----------------------------------------------------------------------------------
def prepare(cfg) -> None:
    """What set-up does once, on rank 0, before any rank loads: find (and if need be download)
    Fashion-MNIST, so ranks never race on the cache; check an npz file through and through."""
    if cfg.data.dataset == "fashion-mnist":
        locate_fashion_mnist(cfg.data.dir)
    elif cfg.data.dataset == "npz":
        check_npz(cfg.data.path)


def describe(cfg) -> tuple[tuple[int, ...], int]:
    """(the shape of one input sample, the number of classes), without loading the samples.
    npz: from the file's headers; the classes are max(label over y_train and y_test) + 1."""
    d = cfg.data
    if d.dataset == "synthetic":
        return tuple(int(n) for n in d.shape), NUM_CLASSES
    if d.dataset == "npz":
        members, arrays = npz_arrays(d.path)
        return members["x_train"].shape[1:], int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return (1, 28, 28), NUM_CLASSES


def _count(cap: int, available: int) -> int:
    return min(cap, available) if cap else available


def load(cfg, kind: str, labels_only: bool = False, only: np.ndarray | None = None) -> Split:
    """The train or test set as the config asks (capped by data.train_samples / test_samples;
    fashion-mnist normalized, npz uint8 divided by 255).

    `only`: the global sample ids to hold (any order; kept sorted and unique), default all; the
    Split's `rows` maps global ids to its rows. Every source gives a subset the same values as
    those rows of the whole set, and pays only for the subset: fashion-mnist converts only those
    rows to float32, synthetic draws only the chunks that hold them, npz reads only those rows of
    its memory map. `labels_only` skips the samples (x is None).
    """
    if kind not in ("train", "test"):
        raise ValueError(f"kind must be 'train' or 'test', not {kind!r}")
    d = cfg.data
    ids = None if only is None else np.unique(np.asarray(only, dtype=np.int64))

    def select(n: int):
        if ids is not None and len(ids) and (ids[0] < 0 or ids[-1] >= n):
            raise ValueError(f"sample ids outside 0..{n - 1} asked of the {kind} set")
        return slice(0, n) if ids is None else ids

    if d.dataset == "synthetic":
        n = (d.train_samples or 10000) if kind == "train" else (d.test_samples or 2000)
        select(n)
        x, y = synthetic(n, d.shape, cfg.run.seed, 1 if kind == "train" else 2, ids, labels_only)
        return Split(None if x is None else torch.from_numpy(x), torch.from_numpy(y).long(), ids)
    if d.dataset == "npz":
        _, arrays = npz_arrays(d.path)
        labels = arrays[f"y_{kind}"]
        rows = select(_count(d.train_samples if kind == "train" else d.test_samples, len(labels)))
        y = torch.from_numpy(np.asarray(labels[rows]).astype(np.int64))
        if labels_only:
            return Split(None, y, ids)
        stored = arrays[f"x_{kind}"]
        x = to_float32(stored[rows])  # a memmap reads only these rows
        check_finite(x, f"x_{kind}", d.path, ids, stored.dtype)  # the rows held, in memory (set-up checked all)
        return Split(torch.from_numpy(x), y, ids)
    images, labels = load_fashion_mnist(locate_fashion_mnist(d.dir), kind, labels_only)
    rows = select(_count(d.train_samples if kind == "train" else d.test_samples, len(labels)))
    y = torch.from_numpy(labels[rows].astype(np.int64))
    if images is None:
        return Split(None, y, ids)
    # The whole file was read to verify it; only the kept rows become float32.
    x = torch.from_numpy(images[rows].astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return Split(x, y, ids)


def partition(labels: np.ndarray, clients: int, cfg) -> list[np.ndarray]:
    """Sample indices of each logical client. Seeded: every rank computes the same answer."""
    n = len(labels)
    if clients > n:
        raise UserError(f"train.clients = {clients} exceeds the {n} training samples; "
                        "lower train.clients or raise data.train_samples")
    d, seed = cfg.data, cfg.run.seed
    rng = np.random.default_rng([seed, 104729])
    if d.partition == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    if d.partition == "shards":
        k = d.shards_per_client
        if clients * k > n:
            raise UserError(f"{clients} clients x {k} shards exceed the {n} samples; lower "
                            "data.shards_per_client")
        order = np.argsort(labels, kind="stable")
        shards = np.array_split(order, clients * k)
        pick = rng.permutation(clients * k)
        return [np.sort(np.concatenate([shards[j] for j in pick[i * k:(i + 1) * k]])) for i in range(clients)]
    # Dirichlet(alpha) over labels, redrawn until every client has at least min_size samples.
    min_size = min(10, n // clients)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([d.alpha] * clients)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise UserError(f"Dirichlet(alpha={d.alpha}) could not give each of {clients} clients "
                    f"{min_size} samples; raise data.alpha or lower train.clients")


def round_batches(shards: list[np.ndarray], batch_size: int, seed: int, rnd: int,
                  ids: list[int] | None = None) -> dict[int, list[np.ndarray]]:
    """Batches of each client in `ids` (default: all) for round `rnd`: its shard in a seeded
    per-(round, client) order, chunked.

    SFL and the single-process baseline both call this, which is what makes them comparable sample
    for sample: in step t, the baseline consumes the concatenation of batches[i][t] over clients i.
    """
    out = {}
    for i in (range(len(shards)) if ids is None else ids):
        shard = shards[i]
        order = shard[np.random.default_rng([seed, rnd, i, 15485863]).permutation(len(shard))]
        out[i] = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return out


def sampled_clients(clients: int, per_round: int, seed: int, rnd: int) -> list[int]:
    """The logical clients that train in round `rnd`: all, or a seeded subset of `per_round`."""
    if not per_round or per_round >= clients:
        return list(range(clients))
    return sorted(int(c) for c in np.random.default_rng([seed, rnd, 32452843]).choice(clients, per_round, replace=False))


def client_order(ids: list[int], seed: int, rnd: int) -> list[int]:
    """The seeded order in which v2 serves a step's clients and sl relays its model, new each round."""
    return [ids[i] for i in np.random.default_rng([seed, rnd, 49979687]).permutation(len(ids))]


@dataclass(frozen=True)
class RoundPlan:
    """Who trains in a round, on which samples, in which order. Every rank computes the same plan.

    `batches[c][t]` are the sample indices logical client c trains on in step t; only the round's
    sampled clients have an entry. `order` is the round's seeded serving/relay order (v2, sl).
    """
    rnd: int
    batches: dict[int, list[np.ndarray]]
    order: list[int]

    @classmethod
    def make(cls, shards: list[np.ndarray], batch_size: int, seed: int, rnd: int, per_round: int = 0) -> "RoundPlan":
        ids = sampled_clients(len(shards), per_round, seed, rnd)
        return cls(rnd, round_batches(shards, batch_size, seed, rnd, ids), client_order(ids, seed, rnd))

    @cached_property
    def steps(self) -> int:
        """Steps in the round: until the largest sampled shard is used up (smaller ones drop out)."""
        return max(len(b) for b in self.batches.values())

    @cached_property
    def samples(self) -> int:
        return sum(len(b) for bs in self.batches.values() for b in bs)

    @cached_property
    def sequence(self) -> list[tuple[int, int]]:
        """sl: the round's batches as (logical client, its step), clients one after another in `order`."""
        return [(c, t) for c in self.order for t in range(len(self.batches[c]))]

    def averages_after(self, step: int, every: int) -> bool:
        """Whether the averaging variants average after `step`: every `every` steps
        (train.aggregate_every; 0 = once per round) and always after the round's last."""
        return step == self.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def batch_len(self, client: int, step: int) -> int:
        """Samples logical client `client` trains on in `step` (0 if it has none)."""
        bs = self.batches.get(client)
        return len(bs[step]) if bs is not None and step < len(bs) else 0

    def active(self, step: int, among=None) -> list[int]:
        """The clients (of the container `among`, default all) with a batch in `step`, in id order;
        the cost is in the round's sampled clients, not in the size of `among`."""
        return sorted(c for c in self.batches if (among is None or c in among) and self.batch_len(c, step))

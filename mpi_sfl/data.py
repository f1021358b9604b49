"""Data: Fashion-MNIST (verified IDX files), a seeded synthetic set, and the client partitions."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
DOWNLOAD_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
URL_ENV = "MPI_SFL_FASHION_MNIST_URL"  # a mirror (or a test server) instead of DOWNLOAD_URL

# name -> (sha256 of the *uncompressed* IDX bytes, uncompressed size, md5 of the upstream .gz, for
# reference). Checking the content, not the .gz, accepts any faithful re-compression (Debian's differs).
FILES = {
    "train-images-idx3-ubyte": ("c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                                47040016, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte": ("bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                                60008, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte": ("5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                               7840016, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte": ("0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                               10008, "bb300cfdad3c16e7a12a480ee83cd310"),
}
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (train set)
NUM_CLASSES = 10
HOW_TO_GET = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
              "or put the four *-ubyte.gz files from the Fashion-MNIST site in a directory and set "
              "data.dir to it")


@dataclass
class Split:
    """Images (N, 1, 28, 28) float32, normalized, and labels (N,) int64."""
    x: torch.Tensor
    y: torch.Tensor


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpi_sfl" / "fashion-mnist"


def _find_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _read_verified(path: Path, name: str) -> bytes:
    """The uncompressed bytes of an IDX file, or UserError naming the file if it is not the real one."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"data file {path} is truncated or corrupt ({exc}); delete it and {HOW_TO_GET}")
    sha, size, _ = FILES[name]
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != sha:
        raise UserError(f"data file {path} is truncated or corrupt ({len(raw)} bytes uncompressed, "
                        f"expected {size} with sha256 {sha[:12]}...); delete it and {HOW_TO_GET}")
    return raw


def _download(directory: Path) -> None:
    """Fetch the four .gz files; each must decompress to the published content before it is kept."""
    base = os.environ.get(URL_ENV, DOWNLOAD_URL)
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = directory / f"{name}.gz"
        if target.is_file():
            continue
        url = base.rstrip("/") + f"/{name}.gz"
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".gz", delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except OSError as exc:
                os.unlink(tmp.name)
                raise UserError(f"could not download Fashion-MNIST from {url} ({exc}); {HOW_TO_GET}")
        try:
            _read_verified(Path(tmp.name), name)
        except UserError:
            os.unlink(tmp.name)
            raise UserError(f"the download of {url} is not the published Fashion-MNIST file; {HOW_TO_GET}")
        os.replace(tmp.name, target)


def locate_fashion_mnist(configured: str) -> Path:
    """The directory holding Fashion-MNIST: data.dir, then the Debian package, then the user cache
    (downloading into it if needed). A configured directory that lacks the files is an error."""
    if configured:
        d = Path(configured).expanduser()
        missing = [n for n in FILES if _find_file(d, n) is None]
        if missing:
            raise UserError(f"data.dir = {configured!r} lacks {', '.join(m + '.gz' for m in missing)}; "
                            f"{HOW_TO_GET}")
        return d
    for d in (SYSTEM_DIR, cache_dir()):
        if all(_find_file(d, n) for n in FILES):
            return d
    _download(cache_dir())
    return cache_dir()


def _parse_idx(raw: bytes, path: str) -> np.ndarray:
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise UserError(f"data file {path} is not an unsigned-byte IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fmnist(directory: Path, kind: str, labels_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    prefix = "train" if kind == "train" else "t10k"
    lname = f"{prefix}-labels-idx1-ubyte"
    lpath = _find_file(directory, lname)
    labels = _parse_idx(_read_verified(lpath, lname), str(lpath))
    if labels_only:
        return None, labels
    iname = f"{prefix}-images-idx3-ubyte"
    ipath = _find_file(directory, iname)
    images = _parse_idx(_read_verified(ipath, iname), str(ipath))
    return images, labels


def _synthetic(n: int, seed: int, stream: int, labels_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Learnable, seeded 28x28 images: a fixed random prototype per class plus noise. The labels are
    drawn first, so asking for labels only gives the same labels without making the images."""
    rng = np.random.default_rng([seed, stream])
    y = rng.integers(0, NUM_CLASSES, n)
    if labels_only:
        return None, y
    protos = np.random.default_rng([seed, 7919]).normal(0.0, 1.0, (NUM_CLASSES, 28, 28)).astype(np.float32)
    x = protos[y] + rng.normal(0.0, 1.5, (n, 28, 28)).astype(np.float32)
    return x, y


def describe(cfg) -> tuple[tuple[int, ...], int]:
    """(sample shape, number of classes) of the configured data set, without loading it."""
    return (1, 28, 28), NUM_CLASSES


def load(cfg, kind: str, labels_only: bool = False) -> Split:
    """The train or test split as the config asks (capped, normalized). `labels_only` skips the images."""
    d = cfg.data
    seed = cfg.run.seed
    if d.dataset == "synthetic":
        n = (d.train_samples or 10000) if kind == "train" else (d.test_samples or 2000)
        x, y = _synthetic(n, seed, 1 if kind == "train" else 2, labels_only)
        xt = None if x is None else torch.from_numpy(x).unsqueeze(1)
        return Split(xt, torch.from_numpy(y).long())
    images, labels = _load_fmnist(locate_fashion_mnist(d.dir), kind, labels_only)
    cap = d.train_samples if kind == "train" else d.test_samples
    n = min(cap, len(labels)) if cap else len(labels)
    y = torch.from_numpy(labels[:n].astype(np.int64))
    if images is None:
        return Split(None, y)
    x = torch.from_numpy(images[:n].astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return Split(x, y)


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
    raise UserError(f"Dirichlet(alpha={d['alpha']}) could not give each of {clients} clients "
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

    def batch_len(self, client: int, step: int) -> int:
        """Samples logical client `client` trains on in `step` (0 if it has none)."""
        bs = self.batches.get(client)
        return len(bs[step]) if bs is not None and step < len(bs) else 0

    def active(self, step: int, among: list[int] | None = None) -> list[int]:
        """The clients (of `among`, default all) with a batch in `step`, in id order."""
        ids = self.batches if among is None else among
        return sorted(c for c in ids if self.batch_len(c, step))

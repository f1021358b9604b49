"""Data loading, verification and partitioning, in-process."""
from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest

from mpi_sfl import config, data
from mpi_sfl.errors import UserError


@pytest.fixture(scope="module")
def fmnist_dir():
    return data.locate_fashion_mnist("")


def test_fashion_mnist_loads_verified(fmnist_dir):
    cfg = config.load()
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert sorted(np.bincount(train.y.numpy()).tolist()) == [6000] * 10
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def test_configured_dir_without_files_is_an_error(tmp_path):
    with pytest.raises(UserError, match="lacks train-images-idx3-ubyte.gz"):
        data.locate_fashion_mnist(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_named(fmnist_dir, tmp_path, damage):
    for name in data.FILES:
        shutil.copy(data._find_file(fmnist_dir, name), tmp_path)
    victim = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    else:  # a valid gzip of different content
        content = bytearray(gzip.decompress(bytes(raw)))
        content[100] ^= 0xFF
        victim.write_bytes(gzip.compress(bytes(content)))
    cfg = config.load(overrides=[f'data.dir="{tmp_path}"'])
    with pytest.raises(UserError, match=f"{victim}.*truncated or corrupt"):
        data.load(cfg, "train", labels_only=True)


def test_download_verifies_and_caches(fmnist_dir, tmp_path, monkeypatch):
    """The download path against a loopback HTTP server: good files land in the cache, bad ones not."""
    served = tmp_path / "served"
    served.mkdir()
    for name in data.FILES:
        shutil.copy(data._find_file(fmnist_dir, name), served)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(data.URL_ENV, f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "nowhere")
        (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the data"))
        with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is not the published"):
            data.locate_fashion_mnist("")
        assert not (data.cache_dir() / "t10k-labels-idx1-ubyte.gz").exists()
        shutil.copy(data._find_file(fmnist_dir, "t10k-labels-idx1-ubyte"), served)
        assert data.locate_fashion_mnist("") == data.cache_dir()
        assert sorted(p.name for p in data.cache_dir().iterdir()) == sorted(f"{n}.gz" for n in data.FILES)
    finally:
        server.shutdown()


@pytest.mark.parametrize("how", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_complete_and_seeded(how):
    cfg = config.load(overrides=[f"data.partition={how}", "data.alpha=0.3"])
    labels = np.random.default_rng(1).integers(0, 10, 5000)
    parts = data.partition(labels, 7, cfg)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 5000
    assert min(len(p) for p in parts) >= 10
    again = data.partition(labels, 7, cfg)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if how != "iid":  # non-IID: label mixes differ a lot between clients
        hist = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
        assert hist.max(axis=1).mean() > 0.3


def test_too_many_clients():
    with pytest.raises(UserError, match="train.clients = 11 exceeds the 10 training samples"):
        data.partition(np.zeros(10, int), 11, config.load())


def test_round_batches_cover_each_shard_once_in_a_new_order():
    shards = [np.arange(0, 50), np.arange(50, 73)]
    r0 = data.round_batches(shards, 8, seed=3, rnd=0)
    r1 = data.round_batches(shards, 8, seed=3, rnd=1)
    for i, shard in enumerate(shards):
        assert sorted(np.concatenate(r0[i]).tolist()) == shard.tolist()
        assert [len(b) for b in r0[i]][-1] == len(shard) - 8 * (len(r0[i]) - 1)
    assert not np.array_equal(np.concatenate(r0[0]), np.concatenate(r1[0]))
    assert all(np.array_equal(a, b) for a, b in zip(r0[1], data.round_batches(shards, 8, 3, 0, ids=[1])[1]))


def test_synthetic_is_seeded_and_sized():
    cfg = config.load(overrides=["data.dataset=synthetic", "data.train_samples=123", "data.test_samples=45"])
    a, b = data.load(cfg, "train"), data.load(cfg, "train")
    assert a.x.shape == (123, 1, 28, 28) and data.load(cfg, "test").y.shape == (45,)
    assert (a.x == b.x).all() and (a.y == b.y).all()

"""Data loading, verification and partitioning, in-process."""
from __future__ import annotations

import gzip
import http.server
import shutil
import threading
from functools import partial

import numpy as np
import pytest
import torch

from mpi_sfl import config, data, sources
from mpi_sfl.errors import UserError


@pytest.fixture(scope="module")
def fmnist_dir():
    return sources.locate_fashion_mnist("")


def test_fashion_mnist_loads_verified(fmnist_dir):
    cfg = config.load()
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert sorted(np.bincount(train.y.numpy()).tolist()) == [6000] * 10
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def test_configured_dir_without_files_is_an_error(tmp_path):
    with pytest.raises(UserError, match="lacks train-images-idx3-ubyte.gz"):
        sources.locate_fashion_mnist(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_named(fmnist_dir, tmp_path, damage):
    for name in sources.FILES:
        shutil.copy(sources._find_file(fmnist_dir, name), tmp_path)
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
    for name in sources.FILES:
        shutil.copy(sources._find_file(fmnist_dir, name), served)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(sources.URL_ENV, f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        monkeypatch.setattr(sources, "SYSTEM_DIR", tmp_path / "nowhere")
        (served / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the data"))
        with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.gz is not the published"):
            sources.locate_fashion_mnist("")
        assert not (sources.cache_dir() / "t10k-labels-idx1-ubyte.gz").exists()
        shutil.copy(sources._find_file(fmnist_dir, "t10k-labels-idx1-ubyte"), served)
        assert sources.locate_fashion_mnist("") == sources.cache_dir()
        assert sorted(p.name for p in sources.cache_dir().iterdir()) == sorted(f"{n}.gz" for n in sources.FILES)
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


# -- describe, subsets, synthetic of any shape ---------------------------------------------------------
def synthetic_cfg(*extra: str):
    return config.load(overrides=["data.dataset=synthetic", *extra])


def test_describe_without_loading(fmnist_dir, tmp_path):
    assert data.describe(config.load()) == ((1, 28, 28), 10)
    assert data.describe(synthetic_cfg("data.shape=[3, 32, 32]")) == ((3, 32, 32), 10)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 2, 5), np.float32), y_train=np.array([0, 2, 1, 2]),
             x_test=np.zeros((3, 2, 5), np.float32), y_test=np.array([0, 6, 1]))  # class 6 only in the test set
    assert data.describe(npz_cfg(path)) == ((2, 5), 7)


@pytest.mark.parametrize("shape, n", [([1, 28, 28], 6000), ([3, 64, 64], 1500), ([20], 1500)])
def test_synthetic_subset_equals_those_rows_of_the_whole_set(shape, n):
    cfg = synthetic_cfg(f"data.shape={shape}", f"data.train_samples={n}", "data.test_samples=300")
    assert (sources.synthetic_chunk(shape) < n / 2) is (shape != [20])  # several chunks, cut mid-chunk (not [20])
    full = data.load(cfg, "train")
    assert full.x.shape == (n, *shape) and full.x.dtype == torch.float32 and full.ids is None
    ids = np.random.default_rng(5).choice(n, 400, replace=False)  # unsorted: kept sorted by load
    sub = data.load(cfg, "train", only=ids)
    assert np.array_equal(sub.ids, np.sort(ids)) and len(sub) == 400
    assert torch.equal(sub.x, full.x[np.sort(ids)]) and torch.equal(sub.y, full.y[np.sort(ids)])
    assert torch.equal(sub.x[sub.rows(ids)], full.x[ids])  # global ids -> rows, in the order asked
    labels = data.load(cfg, "train", labels_only=True)
    assert labels.x is None and torch.equal(labels.y, full.y)
    assert torch.equal(data.load(cfg, "train", labels_only=True, only=ids).y, full.y[np.sort(ids)])
    assert not torch.equal(data.load(cfg, "test").x[:300], full.x[:300])  # test and train are other draws
    other = data.load(config.load(overrides=["data.dataset=synthetic", f"data.shape={shape}",
                                             f"data.train_samples={n}", "run.seed=1"]), "train", only=ids)
    assert not torch.equal(other.x, sub.x)


def test_a_synthetic_subset_costs_one_chunk_plus_its_rows():
    """64000 samples of 1x28x28 are 200 MB; 100 of them, spread over every chunk, must not be."""
    import tracemalloc
    cfg = synthetic_cfg("data.train_samples=64000")
    ids = np.linspace(0, 63999, 100).astype(np.int64)
    tracemalloc.start()
    try:
        sub = data.load(cfg, "train", only=ids)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    chunk_bytes = sources.synthetic_chunk([1, 28, 28]) * 28 * 28 * 4
    assert peak < 2 * chunk_bytes + 4 * 64000 * 8 + 100 * 28 * 28 * 4, peak / 2**20
    assert torch.equal(sub.x[-1], data.load(cfg, "train", only=[63999]).x[0])


@pytest.mark.parametrize("shape", [[3, 8, 8], [20]])
def test_synthetic_is_learnable_for_any_shape(shape):
    """Nearest class mean from the training set classifies the test set far above chance."""
    cfg = synthetic_cfg(f"data.shape={shape}", "data.train_samples=3000", "data.test_samples=1000")
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    means = torch.stack([train.x[train.y == c].mean(0).flatten() for c in range(10)])
    pred = torch.cdist(test.x.flatten(1), means).argmin(1)
    assert float((pred == test.y).float().mean()) > 0.6


def test_fashion_mnist_subset_equals_those_rows(fmnist_dir):
    cfg = config.load(overrides=["data.train_samples=20000"])
    full = data.load(cfg, "train")
    ids = np.random.default_rng(2).choice(20000, 3000, replace=False)
    sub = data.load(cfg, "train", only=ids)
    assert sub.x.shape == (3000, 1, 28, 28) and torch.equal(sub.x[sub.rows(ids)], full.x[ids])
    assert torch.equal(sub.y[sub.rows(ids)], full.y[ids])
    with pytest.raises(ValueError, match="outside 0..19999"):
        data.load(cfg, "train", only=[20000])


def test_rows_refuses_samples_it_does_not_hold():
    split = data.Split(None, torch.zeros(3, dtype=torch.long), np.array([2, 5, 9]))
    assert split.rows([9, 2, 5]).tolist() == [2, 0, 1]
    for missing in ([3], [10], [-1], [5, 0]):
        with pytest.raises(IndexError, match="not among the 3 samples"):
            split.rows(missing)
    whole = data.Split(None, torch.zeros(4, dtype=torch.long))
    assert whole.rows([3, 0]).tolist() == [3, 0]
    with pytest.raises(IndexError):
        whole.rows([4])


# -- npz -----------------------------------------------------------------------------------------------
def npz_cfg(path, *extra: str):
    return config.load(overrides=["data.dataset=npz", f'data.path="{path}"', *extra])


def write_npz(path, compressed=False, **arrays):
    base = {"x_train": np.zeros((6, 2, 3), np.float32), "y_train": np.arange(6) % 3,
            "x_test": np.zeros((4, 2, 3), np.float32), "y_test": np.arange(4) % 3}
    base.update(arrays)
    (np.savez_compressed if compressed else np.savez)(path, **{k: v for k, v in base.items() if v is not None})
    return path


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (None: anonymous memory)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32", "float64"])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(tmp_path, dtype, compressed):
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        xtr, xte = rng.integers(0, 256, (30, 3, 5, 4), dtype=np.uint8), rng.integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
        want_tr, want_te = xtr.astype(np.float32) / np.float32(255), xte.astype(np.float32) / np.float32(255)
    else:
        xtr, xte = rng.normal(size=(30, 3, 5, 4)).astype(dtype), rng.normal(size=(7, 3, 5, 4)).astype(dtype)
        want_tr, want_te = xtr.astype(np.float32), xte.astype(np.float32)
    ytr, yte = rng.integers(0, 4, 30).astype(np.uint16), rng.integers(0, 4, 7).astype(np.int8)
    path = write_npz(tmp_path / "mine.npz", compressed, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                     classes=np.array(["a", "b", "c", "d"]))  # an extra key is ignored
    cfg = npz_cfg(path)
    data.prepare(cfg)
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert np.array_equal(train.x.numpy(), want_tr) and np.array_equal(test.x.numpy(), want_te)
    assert train.y.tolist() == ytr.tolist() and test.y.tolist() == yte.tolist()
    members, arrays = sources.npz_arrays(str(path))
    assert isinstance(arrays["x_train"], np.memmap) is (not compressed)
    assert (members["x_train"].offset is None) is compressed
    if not compressed:
        assert np.array_equal(np.asarray(arrays["x_train"]), xtr)
    # whole float32 set: the tensor is the file's mapping, not a copy (compressed: a copy)
    assert (mapped_file(train.x.data_ptr()) == str(path)) is (dtype == "float32" and not compressed)
    capped = data.load(npz_cfg(path, "data.train_samples=10", "data.test_samples=3"), "train")
    assert np.array_equal(capped.x.numpy(), want_tr[:10])
    ids = np.array([29, 3, 17, 4])
    sub = data.load(cfg, "train", only=ids)
    assert np.array_equal(sub.x[sub.rows(ids)].numpy(), want_tr[ids]) and sub.y[sub.rows(ids)].tolist() == ytr[ids].tolist()


def test_npz_fortran_order_and_big_endian(tmp_path):
    x = np.asfortranarray(np.arange(6 * 2 * 3, dtype=">f4").reshape(6, 2, 3))
    path = write_npz(tmp_path / "f.npz", x_train=x)
    assert sources.npz_arrays(str(path))[0]["x_train"].fortran
    train = data.load(npz_cfg(path), "train")
    assert np.array_equal(train.x.numpy(), x.astype(np.float32))
    assert np.array_equal(data.load(npz_cfg(path), "train", only=[5, 1]).x.numpy(), x[[1, 5]].astype(np.float32))


def test_an_npz_subset_reads_only_its_rows(tmp_path):
    """A 48 MB uncompressed file: 20 rows cost kilobytes (the memmap); compressed, the whole array."""
    import tracemalloc
    x = np.random.default_rng(0).integers(0, 256, (6000, 8, 32, 32), dtype=np.uint8)
    y = np.arange(6000) % 5
    ids = np.arange(0, 6000, 300)
    for compressed in (False, True):
        path = write_npz(tmp_path / f"big{compressed}.npz", compressed, x_train=x, y_train=y, x_test=x[:4])
        tracemalloc.start()
        try:
            sub = data.load(npz_cfg(path), "train", only=ids)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.array_equal(sub.x.numpy(), x[ids].astype(np.float32) / np.float32(255))
        if compressed:
            assert peak > x.nbytes
        else:
            assert peak < 2 * 2**20, peak  # the labels (48 KB), 20 rows as uint8 and float32


def _bad(tmp_path, **arrays):
    return write_npz(tmp_path / "bad.npz", **arrays)


NAN_TEST = np.zeros((4, 2, 3), np.float32)
NAN_TEST[2, 1, 0] = np.nan


@pytest.mark.parametrize("make, words", [
    (lambda t: t / "missing.npz", r"data.path = '.*missing.npz': no such file; it must be an .npz made with np.savez"),
    (lambda t: (t / "text.npz").write_text("x_train = 1") and t / "text.npz", r"is not an .npz \(zip\) archive"),
    (lambda t: _bad(t, x_test=None, y_test=None), r"lacks x_test, y_test \(it has x_train, y_train\)"),
    (lambda t: _bad(t, y_train=np.arange(5)), "x_train and y_train in .* differ in length: 6 samples, 5 labels"),
    (lambda t: _bad(t, y_test=np.zeros((4, 1), int)), r"y_test in .* must be a 1-D array of integer class labels; it has shape \(4, 1\)"),
    (lambda t: _bad(t, y_train=np.zeros(6, np.float32)), "y_train .* must be a 1-D array of integer class labels; .* dtype float32"),
    (lambda t: _bad(t, y_train=np.zeros(6, bool)), "y_train .* must be a 1-D array of integer class labels"),
    (lambda t: _bad(t, y_test=np.array([0, 1, -3, 2])), r"y_test in .* has negative labels \(sample 2: -3\)"),
    (lambda t: _bad(t, y_test=np.array([0, 1, 2**40, 2])), "y_test in .* has label 1099511627776"),
    (lambda t: _bad(t, x_test=np.zeros((4, 3, 2), np.float32)), r"different sample shapes: \(2, 3\) and \(3, 2\)"),
    (lambda t: _bad(t, x_train=np.zeros((0, 2, 3), np.float32), y_train=np.zeros(0, int)), r"x_train in .* is empty \(shape \(0, 2, 3\)\)"),
    (lambda t: _bad(t, x_test=np.zeros((4, 0), np.float32)), "x_test in .* is empty"),
    (lambda t: _bad(t, x_train=np.zeros(6, np.float32)), r"x_train in .* has shape \(6,\); it must be N x sample shape"),
    (lambda t: _bad(t, x_train=np.zeros((6, 2, 3), np.int32)), "x_train in .* has dtype int32; it must be one of uint8, float16, float32, float64"),
    (lambda t: _bad(t, x_test=np.zeros((4, 2, 3), np.complex64)), "x_test .* has dtype complex64"),
    (lambda t: _bad(t, x_train=np.empty((6, 2, 3), object)), "x_train .* has dtype object"),
    (lambda t: _bad(t, x_test=NAN_TEST), r"x_test in .* has non-finite values \(NaN or inf\), first in sample 2"),
    (lambda t: _bad(t, x_train=np.full((6, 2, 3), 1e300)), r"x_train .* non-finite values \(NaN or inf as float32\), first in sample 0"),
    (lambda t: _bad(t, x_train=np.array([[0.0], [1.0], [np.inf], [0.0], [0.0], [0.0]], np.float16),
                    x_test=np.zeros((4, 1), np.float16)), "x_train .* non-finite values .* first in sample 2"),
])
def test_npz_problems_each_have_one_message(tmp_path, make, words):
    path = make(tmp_path)
    cfg = npz_cfg(path)
    with pytest.raises(UserError, match=words):
        data.prepare(cfg)  # set-up, on rank 0: the whole file
    with pytest.raises(UserError, match=words):  # and any load of the rows with the problem
        data.load(cfg, "test" if "test" in words else "train")


def test_a_truncated_npz_is_named(tmp_path):
    path = write_npz(tmp_path / "t.npz", x_train=np.ones((6, 200, 3), np.float32))
    raw = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(raw[: len(raw) // 2])  # the central directory is gone
    with pytest.raises(UserError, match="is not an .npz"):
        data.prepare(npz_cfg(cut))
    for compressed in (False, True):  # a damaged member: header or data
        p = write_npz(tmp_path / f"d{compressed}.npz", compressed, x_train=np.ones((6, 200, 3), np.float32))
        raw = bytearray(p.read_bytes())
        name = raw.find(b"x_train.npy")
        raw[name + 11: name + 300] = b"\0" * 289
        p.write_bytes(bytes(raw))
        with pytest.raises(UserError, match="x_train in .* is truncated"):
            data.load(npz_cfg(p), "train")


@pytest.mark.parametrize("how", ["iid", "dirichlet", "shards"])
def test_partitions_on_npz_data_with_three_classes(tmp_path, how):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(900, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 900)
    path = write_npz(tmp_path / "three.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    cfg = npz_cfg(path, f"data.partition={how}", "data.alpha=0.2")
    assert data.describe(cfg) == ((5, 5), 3)
    labels = data.load(cfg, "train", labels_only=True).y.numpy()
    parts = data.partition(labels, 4, cfg)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == 900 and min(len(p) for p in parts) >= 10
    hist = np.array([np.bincount(labels[p], minlength=3) / len(p) for p in parts])
    assert bool(hist.max(axis=1).mean() > 0.45) is (how != "iid")  # IID: each class about 1/3 everywhere
    for p in parts:  # each client's rows, loaded alone, are its rows of the whole file
        sub = data.load(cfg, "train", only=p)
        assert np.array_equal(sub.x.numpy(), x[p]) and np.array_equal(sub.y.numpy(), y[p])


def test_dirichlet_that_cannot_fill_every_client_says_so():
    cfg = config.load(overrides=["data.partition=dirichlet", "data.alpha=0.001"])
    with pytest.raises(UserError, match=r"Dirichlet\(alpha=0.001\) could not give each of 5 clients 10 samples"):
        data.partition(np.zeros(100, int), 5, cfg)


# -- examples/images_to_npz.py ------------------------------------------------------------------------
def test_images_to_npz_example(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(4)
    want: dict[str, list] = {"train": [], "test": []}
    for kind, per in (("train", 3), ("test", 2)):
        for label, name in enumerate(["cat", "dog", "emu"]):  # sorted names: cat 0, dog 1, emu 2
            if kind == "test" and name == "dog":
                continue  # a class the test set lacks keeps its train number
            (root / kind / name).mkdir(parents=True)
            for i in range(per):
                pixels = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)  # H 5, W 4, RGB
                suffix = "jpg" if i == 2 else "png"
                Image.fromarray(pixels).save(root / kind / name / f"{i}.{suffix}")
                if suffix == "png":  # JPEG is lossy: compare what Pillow reads back
                    want[kind].append((pixels.transpose(2, 0, 1), label))
                else:
                    want[kind].append((np.asarray(Image.open(root / kind / name / f"{i}.{suffix}")).transpose(2, 0, 1), label))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "mine.npz"
    script = Path(__file__).resolve().parents[1] / "examples" / "images_to_npz.py"
    proc = subprocess.run([sys.executable, str(script), str(root), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "9 train and 4 test images of 3x5x4, 3 classes (cat, dog, emu)" in proc.stdout
    cfg = npz_cfg(out)
    data.prepare(cfg)
    assert data.describe(cfg) == ((3, 5, 4), 3)
    assert isinstance(sources.npz_arrays(str(out))[1]["x_train"], np.memmap)  # written uncompressed
    for kind in ("train", "test"):
        split = data.load(cfg, kind)
        x = np.stack([a for a, _ in want[kind]]).astype(np.float32) / np.float32(255)
        assert np.array_equal(split.x.numpy(), x) and split.y.tolist() == [label for _, label in want[kind]]
    # grayscale by default when every image is; different sizes need --size
    Image.fromarray(rng.integers(0, 256, (7, 7), dtype=np.uint8)).save(root / "train" / "emu" / "big.png")
    proc = subprocess.run([sys.executable, str(script), str(root), str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "pass --size H W" in proc.stderr
    gray = tmp_path / "gray"
    for kind in ("train", "test"):
        (gray / kind / "a").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(gray / kind / "a" / "0.png")
        Image.fromarray(rng.integers(0, 256, (9, 3), dtype=np.uint8)).save(gray / kind / "a" / "1.png")
    proc = subprocess.run([sys.executable, str(script), str(gray), str(out), "--size", "4", "4"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert data.describe(npz_cfg(out)) == ((1, 4, 4), 1)

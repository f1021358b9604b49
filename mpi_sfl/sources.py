"""Where the samples come from: Fashion-MNIST (found, or downloaded, and verified against its
published content), the seeded synthetic set of any sample shape, and the user's own .npz file
(its headers and labels checked, its arrays memory-mapped, its values scanned for NaN and inf).

data.py asks these for the samples of a train or test set (data.load, data.describe, data.prepare);
nothing here knows about clients, partitions or rounds."""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import struct
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def load_fashion_mnist(directory: Path, kind: str, labels_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
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


SYNTHETIC_CHUNK_BYTES = 8 << 20  # float32 noise per generator; part of the synthetic set's definition


def synthetic_chunk(shape) -> int:
    """Samples per chunk of the synthetic set (each chunk is drawn from its own generator)."""
    return max(1, SYNTHETIC_CHUNK_BYTES // (4 * int(np.prod(shape))))


def synthetic(n: int, shape, seed: int, stream: int, ids: np.ndarray | None,
              labels_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Learnable, seeded samples of `shape`: a fixed random prototype per class plus N(0, 1.5^2)
    noise. Rows `ids` (sorted; None = all n).

    The labels come from their own generator, so labels-only is cheap and gives the same labels.
    The noise is drawn in fixed chunks of `synthetic_chunk(shape)` samples, chunk c from
    default_rng([seed, stream, c]), and only the chunks that hold a wanted row are drawn: any subset
    equals those rows of the whole set, and the peak memory is one chunk plus the kept rows."""
    labels = np.random.default_rng([seed, stream]).integers(0, NUM_CLASSES, n)
    keep = np.arange(n) if ids is None else ids
    y = labels[keep]
    if labels_only:
        return None, y
    protos = np.random.default_rng([seed, 7919]).normal(0.0, 1.0, (NUM_CLASSES, *shape)).astype(np.float32)
    per = synthetic_chunk(shape)
    x = np.empty((len(keep), *shape), np.float32)
    chunk = keep // per
    bounds = np.flatnonzero(np.diff(chunk)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(keep)]):
        if a == b:
            continue
        c = int(chunk[a])
        lo, m = c * per, min(per, n - c * per)
        noise = np.random.default_rng([seed, stream, c]).standard_normal((m, *shape), dtype=np.float32)
        np.multiply(noise if b - a == m else noise[keep[a:b] - lo], np.float32(1.5), out=x[a:b])
        x[a:b] += protos[y[a:b]]
    return x, y


# -- npz: the user's own data ------------------------------------------------------------------------
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
X_DTYPES = ("uint8", "float16", "float32", "float64")
SCAN_BYTES = 64 << 20  # the non-finite scan reads the memmap in pieces of about this size
NPZ_FORM = ("np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) with x N x sample shape "
            f"({', '.join(X_DTYPES)}; uint8 is divided by 255) and y N integer class labels 0, 1, ...")


@dataclass(frozen=True)
class NpzMember:
    """One array of an .npz, from its .npy header. `offset`: where its data starts in the file when
    the archive stores it uncompressed (np.savez), so it can be memory-mapped; None if compressed."""
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None


def _npz_members(path: str) -> dict[str, NpzMember]:
    """The headers of the four arrays (nothing else is read). UserError for a missing file, a file
    that is not an npz, a missing key, an unreadable header."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data.path = {path!r}: no such file; it must be an .npz made with {NPZ_FORM}")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"data.path = {path!r} is not an .npz (zip) archive ({exc}); make it with {NPZ_FORM}")
    with zf, open(p, "rb") as raw:
        infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
        missing = [k for k in NPZ_KEYS if k not in infos]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)} (it has {', '.join(sorted(infos)) or 'nothing'}); "
                            f"make it with {NPZ_FORM}")
        out = {}
        for key in NPZ_KEYS:
            info = infos[key]
            try:
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    # The member's data follows its local file header: 30 bytes, then the name and
                    # the extra field (their lengths at bytes 26..29), then the .npy header.
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    if len(local) != 30 or local[:4] != b"PK\x03\x04":
                        raise ValueError("bad local file header")
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    raw.seek(info.header_offset + 30 + name_len + extra_len)
                    shape, fortran, dtype = _read_npy_header(raw)
                    offset = raw.tell()
                    if offset + int(np.prod(shape)) * dtype.itemsize > p.stat().st_size:
                        raise ValueError("the file ends before the array does")
                else:
                    with zf.open(info) as f:
                        shape, fortran, dtype = _read_npy_header(f)
                    offset = None
            except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error) as exc:
                raise UserError(f"{key} in {path} is truncated or not an .npy array ({exc}); make the file "
                                f"with {NPZ_FORM}")
            out[key] = NpzMember(key, tuple(shape), dtype, fortran, offset)
    return out


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} (np.savez writes 1.0 or 2.0)")
    return shape, fortran, dtype


def _check_members(m: dict[str, NpzMember], path: str) -> None:
    """Everything the headers can tell: dtypes, dimensions, lengths, sample shapes, empty sets."""
    for kind in ("train", "test"):
        x, y = m[f"x_{kind}"], m[f"y_{kind}"]
        if x.dtype.hasobject or x.dtype.fields or x.dtype.name not in X_DTYPES:
            raise UserError(f"x_{kind} in {path} has dtype {x.dtype}; it must be one of {', '.join(X_DTYPES)} "
                            "(uint8 is divided by 255)")
        if y.dtype.hasobject or y.dtype.fields or y.dtype.kind not in "iu" or len(y.shape) != 1:
            raise UserError(f"y_{kind} in {path} must be a 1-D array of integer class labels; it has shape "
                            f"{y.shape} and dtype {y.dtype}")
        if len(x.shape) < 2:
            raise UserError(f"x_{kind} in {path} has shape {x.shape}; it must be N x sample shape "
                            "(reshape scalar features to N x 1)")
        if x.shape[0] != y.shape[0]:
            raise UserError(f"x_{kind} and y_{kind} in {path} differ in length: {x.shape[0]} samples, "
                            f"{y.shape[0]} labels")
        if x.shape[0] == 0 or 0 in x.shape[1:]:
            raise UserError(f"x_{kind} in {path} is empty (shape {x.shape}); both sets need samples")
    if m["x_train"].shape[1:] != m["x_test"].shape[1:]:
        raise UserError(f"x_train and x_test in {path} have different sample shapes: "
                        f"{m['x_train'].shape[1:]} and {m['x_test'].shape[1:]}")


def _npz_array(path: str, m: NpzMember) -> np.ndarray:
    """One array: memory-mapped (copy-on-write: nothing is read until used, and writes stay private)
    when stored uncompressed, else read whole (a compressed archive is decompressed by every caller)."""
    p = Path(path).expanduser()
    if m.offset is not None:
        return np.memmap(p, dtype=m.dtype, mode="c", offset=m.offset, shape=m.shape,
                         order="F" if m.fortran else "C")
    try:
        with zipfile.ZipFile(p) as zf, zf.open(m.key + ".npy" if m.key + ".npy" in zf.namelist() else m.key) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise UserError(f"{m.key} in {path} is truncated or corrupt ({exc}); make the file with {NPZ_FORM}")


def _check_labels(y: np.ndarray, key: str, path: str) -> None:
    if not len(y):
        return
    low, high = int(y.min()), int(y.max())
    if low < 0:
        first = int(np.flatnonzero(y < 0)[0])
        raise UserError(f"{key} in {path} has negative labels (sample {first}: {int(y[first])}); labels are "
                        "class numbers 0, 1, ...")
    if high >= 2**31:
        raise UserError(f"{key} in {path} has label {high}; labels are class numbers 0, 1, ... (at most 2^31 - 1)")


def check_finite(x: np.ndarray, key: str, path: str, ids: np.ndarray | None = None,
                 stored: np.dtype | None = None) -> None:
    """No NaN or inf, as float32 (a float64 beyond float32's range is inf there): a scan in pieces,
    so a memory-mapped array is read a piece at a time. `ids`: the global sample ids of x's rows;
    `stored`: the file's dtype when x is already converted."""
    stored = x.dtype if stored is None else stored
    if stored.kind != "f" or not len(x):
        return
    step = max(1, SCAN_BYTES // max(1, x[0].nbytes))
    for a in range(0, len(x), step):
        part = x[a:a + step]
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(part.astype(np.float32, copy=False)).reshape(len(part), -1).all(axis=1)
        if bad.any():
            row = a + int(np.flatnonzero(bad)[0])
            how = " as float32" if stored == np.float64 else ""
            raise UserError(f"{key} in {path} has non-finite values (NaN or inf{how}), first in sample "
                            f"{row if ids is None else int(ids[row])}; fix or drop those samples")


def npz_arrays(path: str) -> tuple[dict[str, NpzMember], dict[str, np.ndarray]]:
    """The headers, checked, and the four arrays (memory-mapped where possible), labels checked."""
    members = _npz_members(path)
    _check_members(members, path)
    arrays = {}
    for key in ("y_train", "y_test", "x_train", "x_test"):  # labels first: they are small, checked at once
        arrays[key] = _npz_array(path, members[key])
        if key.startswith("y"):
            _check_labels(arrays[key], key, path)
    return members, arrays


def check_npz(path: str) -> None:
    """Everything about an npz file, the whole content included (every value finite). Set-up runs
    this once, on rank 0, before any rank loads; a uint8 file has nothing to scan."""
    _, arrays = npz_arrays(path)
    for key in ("x_train", "x_test"):
        check_finite(arrays[key], key, path)


def to_float32(a: np.ndarray) -> np.ndarray:
    """float32 samples: uint8 / 255, floats converted. A native float32 C-ordered array (a memmap
    of the whole set) is returned as is, without a copy."""
    if a.dtype == np.uint8:
        out = a.astype(np.float32)
        out /= np.float32(255.0)
        return out
    if a.dtype == np.float32 and a.dtype.isnative and a.flags.c_contiguous:
        return a
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused by check_finite
        return np.ascontiguousarray(a, dtype=np.float32)

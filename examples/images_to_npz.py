"""Turn a folder of images into the .npz that `data.dataset = "npz"` reads.

    python examples/images_to_npz.py ROOT OUT.npz [--size H W] [--mode L|RGB]

ROOT/train/<class>/*.png|jpg|jpeg and ROOT/test/<class>/*.png|jpg|jpeg; the classes are the train
folders' names, sorted (class 0 is the first name). Writes x_train, y_train, x_test, y_test
(x: uint8, N x C x H x W; y: int64) and `classes` (the names, ignored by mpi_sfl), uncompressed
(np.savez) so that every rank memory-maps it. All images must share one size unless --size
resizes them; --mode is L (1 channel) or RGB (3); by default L when every image is grayscale.
Needs Pillow (matplotlib installs it). Holds all images in memory while it writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SUFFIXES = {".png", ".jpg", ".jpeg"}
GRAY = {"1", "L", "LA", "I", "I;16", "F"}


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def read_set(root: Path, kind: str, classes: list[str]) -> list[tuple[Path, int]]:
    base = root / kind
    if not base.is_dir():
        sys.exit(f"images_to_npz: {base} is not a folder (expected {root}/{kind}/<class>/*.png)")
    found = sorted(d.name for d in base.iterdir() if d.is_dir())
    unknown = [c for c in found if c not in classes]
    if unknown:
        sys.exit(f"images_to_npz: {base} has classes that {root}/train lacks: {', '.join(unknown)}")
    files = [(p, classes.index(c)) for c in found for p in images(base / c)]
    if not files:
        sys.exit(f"images_to_npz: no .png/.jpg images under {base}/<class>/")
    return files


def to_array(files: list[tuple[Path, int]], mode: str, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    xs, shape = [], None
    for path, _ in files:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size:
                img = img.resize((size[1], size[0]))  # PIL takes (width, height)
            a = np.asarray(img, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # C x H x W
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            sys.exit(f"images_to_npz: {path} is {a.shape[2]}x{a.shape[1]}, the first image {shape[2]}x{shape[1]}; "
                     "pass --size H W to resize them all")
        xs.append(a)
    return np.stack(xs), np.array([label for _, label in files], dtype=np.int64)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--mode", choices=("L", "RGB"))
    args = ap.parse_args(argv)
    if not (args.root / "train").is_dir():
        sys.exit(f"images_to_npz: {args.root / 'train'} is not a folder")
    classes = sorted(d.name for d in (args.root / "train").iterdir() if d.is_dir())
    train, test = read_set(args.root, "train", classes), read_set(args.root, "test", classes)
    mode = args.mode
    if mode is None:  # Image.open reads only the header
        modes = set()
        for p, _ in train + test:
            with Image.open(p) as img:
                modes.add(img.mode)
        mode = "L" if modes <= GRAY else "RGB"
    x_train, y_train = to_array(train, mode, args.size)
    x_test, y_test = to_array(test, mode, args.size)
    if x_train.shape[1:] != x_test.shape[1:]:
        sys.exit(f"images_to_npz: train images are {x_train.shape[1:]}, test images {x_test.shape[1:]}; pass --size H W")
    np.savez(args.out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=np.array(classes))
    print(f"{args.out}: {len(x_train)} train and {len(x_test)} test images of {'x'.join(map(str, x_train.shape[1:]))}, "
          f"{len(classes)} classes ({', '.join(classes)})")


if __name__ == "__main__":
    main()

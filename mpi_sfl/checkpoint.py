"""Checkpoints: everything a run needs to continue bit for bit, written so a kill cannot corrupt it.

    OUT/checkpoint/meta.json     round and step it continues from, world size, the config, a digest
                                 of the data partition (JSON, readable)
    OUT/checkpoint/rank-R.pt     rank R's state: its weights and optimizer states (logical clients',
                                 the split server's, v1's per-client copies), round accumulators,
                                 byte counters, timers, torch RNG state (plain tensors and numbers:
                                 loaded with torch.load(weights_only=True), nothing in it can run code)

Writing is collective at a step boundary: every rank writes its file into OUT/checkpoint.tmp and
fsyncs it; only when all succeeded does rank 0 write meta.json and swap the directories
(checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint, remove checkpoint.old). A kill at
any moment leaves a complete checkpoint or checkpoint.old, which `find` takes.
Sampling and partition are functions of (seed, round) and the data; the digest catches a resume
whose data would give other shards.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .outdir import atomic_write, fsync_dir

CURRENT, OLD, TMP = "checkpoint", "checkpoint.old", "checkpoint.tmp"
FORMAT = 1
# Keys a resume may change: they do not change what the checkpoint means (train.rounds only upwards).
HARMLESS = {"run.out_dir", "run.progress", "run.threads", "run.wait", "run.timeout_s", "run.checkpoint_every",
            "run.scratch_dir", "run.device", "sfl.state", "train.rounds"}


def partition_digest(shards: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(np.asarray(s, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def save(comm, out_dir: str, state: dict, meta: dict, agree) -> str | None:
    """Collective: every rank's `state`, and `meta` from rank 0. Returns None, or this rank's error
    (or that another rank failed), after removing the incomplete checkpoint; the previous one is
    untouched. `agree(flag)` is the max of an int over the ranks, bounded by run.timeout_s."""
    out = Path(out_dir)
    tmp = out / TMP
    err = None
    if comm.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            err = f"cannot write a checkpoint in {out} ({exc.strerror}); free space there or set run.out_dir"
    if not agree(err is not None):
        path = tmp / f"rank-{comm.rank}.pt"
        try:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write(path, buf.getvalue())
        except OSError as exc:
            err = f"cannot write {path} ({exc.strerror}); free space there or set run.out_dir"
        if not agree(err is not None) and comm.rank == 0:
            try:
                atomic_write(tmp / "meta.json", (json.dumps({**meta, "format": FORMAT, "world": comm.size,
                                                              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                                             indent=1) + "\n").encode())
                if (out / CURRENT).exists():
                    shutil.rmtree(out / OLD, ignore_errors=True)
                    os.replace(out / CURRENT, out / OLD)
                os.replace(tmp, out / CURRENT)
                fsync_dir(out)
                shutil.rmtree(out / OLD, ignore_errors=True)
            except OSError as exc:
                err = f"cannot complete the checkpoint in {out} ({exc.strerror}); free space there or set run.out_dir"
    failed = agree(err is not None)
    if failed and comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return err or ("another rank could not write its part of the checkpoint" if failed else None)


def find(out_dir: str) -> Path | None:
    """The latest complete checkpoint (checkpoint/, or checkpoint.old/ if killed mid-swap)."""
    for name in (CURRENT, OLD):
        d = Path(out_dir) / name
        if (d / "meta.json").is_file():
            return d
    return None


def read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"checkpoint {d} is unreadable ({exc}); start a new run with --overwrite") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"checkpoint {d} has format {meta.get('format')}, this mpi_sfl reads {FORMAT}")
    return meta


def load_state(d: Path, rank: int) -> dict:
    path = d / f"rank-{rank}.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"checkpoint file {path} is unreadable ({type(exc).__name__}); "
                        "start a new run with --overwrite") from None


def check_resume(meta: dict, cfg, world: int, digest: str, where: Path) -> None:
    """Refuse a resume whose config, layout or data changes what the checkpoint means."""
    if meta["world"] != world:
        raise UserError(f"the checkpoint in {where} was written by {meta['world']} ranks; resume with "
                        f"mpiexec -n {meta['world']}")
    old, new = _flat(meta["config"]), _flat(cfg.as_dict())
    for key in sorted(old.keys() | new.keys()):
        if key not in HARMLESS and old.get(key) != new.get(key):
            raise UserError(f"cannot resume: {key} = {new.get(key)!r} here but {old.get(key)!r} in the "
                            f"checkpoint ({where}); resume with the same value, or start a new run with --overwrite")
    rnd, step = meta["round"], meta["step"]
    if cfg.train.rounds < rnd + (1 if step else 0):
        raise UserError(f"train.rounds = {cfg.train.rounds} is below the checkpoint's round {rnd + 1}; "
                        "raise it to continue")
    if meta["partition"] != digest:
        raise UserError(f"the data partition differs from the checkpoint's ({where}): the data changed; "
                        "start a new run with --overwrite")


def _flat(cfg: dict) -> dict:
    return {f"{s}.{k}": v for s, table in cfg.items() for k, v in table.items()}

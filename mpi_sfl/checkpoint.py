"""Checkpoints: everything a run needs to continue bit for bit, written so a kill cannot corrupt it.

    OUT/checkpoint/meta.json     round and step it continues from, world size, the config, a digest
                                 of the data partition, the run's id, and the SHA-256 of every rank
                                 file (JSON, readable)
    OUT/checkpoint/rank-R.pt     rank R's state: its weights and optimizer states (logical clients',
                                 the split server's, v1's per-client copies), round accumulators,
                                 byte counters, timers, torch RNG state, and who wrote it (run id,
                                 rank, world size, round, step) (plain tensors and numbers: loaded with
                                 torch.load(weights_only=True), nothing in it can run code)
    OUT/checkpoint.old/          the checkpoint before it, kept to fall back to

Writing is collective at a step boundary: every rank writes its file into OUT/checkpoint.tmp and
fsyncs it; only when all succeeded does rank 0 write meta.json and swap the directories
(checkpoint -> checkpoint.old, checkpoint.tmp -> checkpoint). A kill at any moment leaves a
complete checkpoint or checkpoint.old. Nothing is trusted blindly on resume (`verified`): meta.json
must have every field with its type, each rank file its digest, and each file must name the run,
rank and position that meta.json does; a checkpoint that fails is named with the file and the
resume falls back to checkpoint.old when that one is intact.
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
FORMAT = 2
META_FIELDS = {"format": int, "round": int, "step": int, "world": int, "config": dict, "partition": str,
               "run": str, "files": dict}
# Keys a resume may change: they do not change what the checkpoint means (train.rounds only upwards).
HARMLESS = {"run.out_dir", "run.progress", "run.progress_every_s", "run.tensorboard", "run.threads", "run.wait", "run.timeout_s", "run.checkpoint_every",
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
    from .waiting import polite_wait

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
        path = tmp / rank_file(comm.rank)
        digest = np.zeros(32, np.uint8)
        try:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            digest[:] = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
            atomic_write(path, data)
        except OSError as exc:
            err = f"cannot write {path} ({exc.strerror}); free space there or set run.out_dir"
        digests = np.zeros((comm.size, 32), np.uint8) if comm.rank == 0 else None
        polite_wait(comm.Igather(digest, digests, root=0), who="every rank's checkpoint digest", collective=True)
        if not agree(err is not None) and comm.rank == 0:
            try:
                files = {rank_file(r): bytes(d).hex() for r, d in enumerate(digests)}
                atomic_write(tmp / "meta.json", (json.dumps({**meta, "format": FORMAT, "world": comm.size, "files": files,
                                                              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                                             indent=1) + "\n").encode())
                if (out / CURRENT).exists():
                    shutil.rmtree(out / OLD, ignore_errors=True)
                    os.replace(out / CURRENT, out / OLD)
                os.replace(tmp, out / CURRENT)
                fsync_dir(out)
            except OSError as exc:
                err = f"cannot complete the checkpoint in {out} ({exc.strerror}); free space there or set run.out_dir"
    failed = agree(err is not None)
    if failed and comm.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return err or ("another rank could not write its part of the checkpoint" if failed else None)


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def candidates(out_dir: str) -> list[Path]:
    """The checkpoints to resume from, newest first: checkpoint/, then checkpoint.old/ (the one
    before it, or the only one when a kill came mid-swap)."""
    return [Path(out_dir) / name for name in (CURRENT, OLD) if (Path(out_dir) / name / "meta.json").is_file()]


def find(out_dir: str) -> Path | None:
    """The newest checkpoint directory there is (not verified: see `verified`)."""
    found = candidates(out_dir)
    return found[0] if found else None


class Damaged(Exception):
    """A checkpoint file that is not what meta.json says it is (or meta.json itself unusable)."""


def read_meta(d: Path) -> dict:
    """meta.json with every field present and of its type, or Damaged naming the problem."""
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise Damaged(f"{d / 'meta.json'} is unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise Damaged(f"{d / 'meta.json'} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise Damaged(f"{d / 'meta.json'} has format {meta.get('format')!r}; this mpi_sfl reads format {FORMAT}")
    for key, kind in META_FIELDS.items():
        if key not in meta:
            raise Damaged(f"{d / 'meta.json'} has no {key!r}")
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise Damaged(f"{d / 'meta.json'}: {key!r} is {type(meta[key]).__name__}, not {kind.__name__}")
    if sorted(meta["files"]) != sorted(rank_file(r) for r in range(meta["world"])):
        raise Damaged(f"{d / 'meta.json'} lists {len(meta['files'])} rank files for {meta['world']} ranks")
    return meta


def load_state(d: Path, meta: dict, rank: int) -> dict:
    """Rank `rank`'s file, checked against meta.json: its SHA-256, then the run, rank and position
    it names. Raises Damaged naming the file."""
    path = d / rank_file(rank)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Damaged(f"{path} is unreadable ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != meta["files"][path.name]:
        raise Damaged(f"{path} is not the file this checkpoint wrote (its SHA-256 differs from meta.json's: "
                      "damaged, or copied from elsewhere)")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise Damaged(f"{path} is unreadable ({type(exc).__name__})") from None
    who = state.get("identity") if isinstance(state, dict) else None
    want = {"run": meta["run"], "rank": rank, "world": meta["world"], "round": meta["round"], "step": meta["step"]}
    if who != want:
        raise Damaged(f"{path} was written by {_identity(who)}, but meta.json describes {_identity(want)}")
    return state


def _identity(who) -> str:
    if not isinstance(who, dict):
        return "an unknown writer"
    return (f"run {str(who.get('run'))[:8]} rank {who.get('rank')} of {who.get('world')} at round "
            f"{who.get('round')}, step {who.get('step')}")


def check_resume(meta: dict, cfg, digest: str, where: Path, new_layout: bool = False) -> None:
    """Refuse a resume whose config or data changes what the checkpoint means. `new_layout`: the
    job resumes on another number of ranks or split servers (elastic.py), so sfl.servers may differ."""
    old, new = _flat(meta["config"]), _flat(cfg.as_dict())
    for key in sorted(old.keys() | new.keys()):
        if key not in HARMLESS and not (new_layout and key == "sfl.servers") and old.get(key) != new.get(key):
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


def describe(out_dir: str) -> str:
    """`mpi-sfl checkpoint OUT`: what each checkpoint in OUT holds and whether it is intact (every
    rank file's digest and identity checked), so a user sees what --resume would do before launching.
    Reads only files; raises UserError when OUT has none."""
    from .layout import Layout

    found = candidates(out_dir)
    if not found:
        raise UserError(f"{out_dir} has no checkpoint (checkpoint/meta.json or checkpoint.old/meta.json)")
    lines, usable = [], None
    for d in found:
        try:
            meta = read_meta(d)
            for r in range(meta["world"]):
                load_state(d, meta, r)
            verdict = "intact (every rank file's SHA-256 and identity checked)"
            usable = usable or (d, meta)
        except Damaged as exc:
            lines += [f"{d}: DAMAGED: {exc}"]
            continue
        cfg = meta["config"]
        sfl, train = cfg.get("sfl", {}), cfg.get("train", {})
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        lines += [f"{d}: {verdict}",
                  f"  position: {position(meta, train.get('rounds'))}; written {meta.get('written', '?')} "
                  f"({_age(d / 'meta.json')} ago); run {meta['run'][:8]}",
                  f"  written by: mpiexec -n {meta['world']}, variant {sfl.get('variant')}, state {sfl.get('state')}, "
                  f"{sfl.get('servers')} split server(s), model {cfg.get('model', {}).get('name')}",
                  f"  size: {size / 2**20:.1f} MiB in {len(meta['files'])} rank files"]
        try:
            layout = Layout(meta["world"], int(sfl.get("servers", 1)), int(train.get("clients") or 0))
            lines += [f"  {layout.describe(r)}" for r in layout.client_ranks]
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    if usable is None:
        lines.append("--resume would be refused: no intact checkpoint")
    else:
        d, m = usable
        rounds = m["config"].get("train", {}).get("rounds")
        done = (m["round"], m["step"]) == (rounds, 0)
        lines.append(f"--resume continues from {d.name}/ with mpiexec -n {m['world']} and the same config "
                     "(run.* settings, sfl.state and a higher train.rounds may change)"
                     + (f"; the run has finished its {rounds} rounds: raise train.rounds to train further" if done else ""))
    return "\n".join(lines)


def position(meta: dict, rounds=None) -> str:
    """Where a checkpoint continues from, in words: 'the end of round 2 (of 6)' or 'round 3, after step 40'."""
    of = f" of {rounds}" if rounds else ""
    if meta["step"] or not meta["round"]:
        return f"round {meta['round'] + 1}{of}, after step {meta['step']}"
    return f"the end of round {meta['round']}{of}"


def _age(path: Path) -> str:
    s = max(0, time.time() - path.stat().st_mtime)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"

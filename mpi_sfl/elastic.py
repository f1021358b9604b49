"""Resume on another layout: a rank's state rebuilt from the files of the ranks that held its part.

A checkpoint is written per rank, but what a client rank saves is keyed by logical client (its
working copies and, with train.client_optimizer = "keep", their momentum: slots.py), and what a
split server saves is the server part (equal on every replica at a round's end) and v1's per-client
copies, again by logical client. So at a round boundary the job can continue on any number of
client ranks and split servers the variant allows: each new rank takes

- the fed server (rank 0): rank 0's file as it is;
- a split server: the first old split server's part and optimizer, and the per-client entries of
  every old split server for the logical clients it now serves;
- a client rank: the entries of every old client rank for the logical clients it now hosts, and
  the global client part (`last_average`, the same on every client rank) from the first;

and the per-rank counters: the RNG state of the old rank with its number and role (every batch
reseeds what it draws, so no result depends on it), and byte counters summed into the first rank of
each role (metrics.jsonl reports them summed per role). Mid-round a resume needs the layout that
wrote the checkpoint: the round's working copies are bound to the ranks' steps in flight.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .errors import UserError
from .layout import FED, SERVER, Layout


def old_layout(meta: dict) -> Layout:
    cfg = meta["config"]
    return Layout(meta["world"], int(cfg["sfl"]["servers"]), int(cfg["train"]["clients"]))


def state_for(d: Path, meta: dict, rank: int, new: Layout) -> dict:
    """Rank `rank`'s state on layout `new`, from the checkpoint in `d` written on another layout
    (each file read is verified: checkpoint.load_state). Raises UserError mid-round."""
    old = old_layout(meta)
    if meta["step"]:
        raise UserError(f"the checkpoint in {d} is mid-round (round {meta['round'] + 1}, after step {meta['step']}) "
                        f"and was written by {old.world} ranks with {old.servers} split server(s): mid-round it "
                        f"resumes only on that layout (mpiexec -n {old.world}, sfl.servers = {old.servers})")
    role = new.role(rank)
    if role == FED:
        return checkpoint.load_state(d, meta, 0)
    sources = old.server_ranks if role == SERVER else old.client_ranks
    states = [checkpoint.load_state(d, meta, r) for r in sources]
    first = new.server_ranks[0] if role == SERVER else new.client_ranks[0]
    same = rank in sources and old.role(rank) == new.role(rank)
    base = states[sources.index(rank)] if same else states[0]
    counters = {**base["counters"], "bytes_sent": sum(s["counters"]["bytes_sent"] for s in states) if rank == first else 0,
                "timers": base["counters"]["timers"] if same else {}}
    if role == SERVER:
        served = {c for r in new.client_ranks_of(rank) for c in new.clients_of(r)}
        return {**states[0], "counters": counters, "copies": _slots([s["copies"] for s in states], served)}
    mine = set(new.clients_of(rank))
    bytes_ = {k: sum(s["bytes"][k] for s in states) if rank == first else 0 for k in states[0]["bytes"]}
    return {**states[0], "counters": counters, "bytes": bytes_, "slots": _slots([s["slots"] for s in states], mine)}


def _slots(saved: list[dict], mine: set[int]) -> dict:
    """The slots.Slots state of the logical clients in `mine`, from the old ranks' states."""
    held = sorted((e for s in saved for e in s["held"] if int(e["client"]) in mine), key=lambda e: int(e["client"]))
    kept: dict[int, torch.Tensor] = {}
    for s in saved:
        kept.update({int(c): m for c, m in s["kept"].items() if int(c) in mine})
    return {"held": held, "kept": dict(sorted(kept.items()))}


def check_layout(meta: dict, new: Layout, where: Path) -> None:
    """What a new layout must keep: the logical clients (they are what the state is keyed by)."""
    old = old_layout(meta)
    if new.clients != old.clients:
        raise UserError(f"cannot resume: the checkpoint in {where} has {old.clients} logical clients, this launch "
                        f"{new.clients}; set train.clients = {old.clients}")
    if new.servers and not old.servers or old.servers and not new.servers:
        raise UserError(f"cannot resume: sfl.servers = {new.servers} here but {old.servers} in the checkpoint ({where})")


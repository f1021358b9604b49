"""`mpi-sfl baseline`: the same model, data, seed and sample order, unsplit, in one process.

    mpi-sfl baseline [CONFIG.toml] [--set section.key=value ...]

Each step consumes the concatenation of what the logical clients draw in that step of the SFL run
(data.round_batches) with the mean loss over all its samples. Parts that draw random numbers
(dropout) run per client chunk under the same per-(round, step, client, part) seeds the SFL ranks
use; the others run on the whole concatenated batch. With aggregate_every = 1 and plain SGD, SFL
must land on this model to float32 round-off (the exactness property, design §1).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data, models
from .errors import UserError
from .layout import pick_device, set_threads
from .outputs import RunWriter, evaluate


def run(cfg) -> dict:
    if cfg.train.clients == 0:
        raise UserError("train.clients = 0 means one per client rank, which a single process "
                        "cannot know: set train.clients, or pass the config.toml an SFL run wrote")
    out = Path(cfg.run.out_dir)
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text()).get("mode") == "sfl":
        raise UserError(f"{out} holds an SFL run's results, which the baseline would overwrite; "
                        f"pass --set run.out_dir=... (for example {out.parent / 'baseline'})")
    device = pick_device(cfg.run.device, 0)
    set_threads(cfg.run.threads, 1)
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    shards = data.partition(train.y.numpy(), cfg.train.clients, cfg)
    seed, split = cfg.run.seed, cfg.model.split
    model = models.build(cfg.model.name, seed).to(device).train()
    if cfg.model.freeze_encoder:
        model.encoder.requires_grad_(False)
    server = models.server_part(model, split)
    later = [(model.body if split == "u" else server, 1)] + ([(model.head, 2)] if split == "u" else [])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=cfg.train.lr, momentum=cfg.train.momentum)
    writer = RunWriter(cfg, cfg.train.rounds, "baseline")
    total = sum(len(s) for s in shards)
    train_seconds = 0.0
    for rnd in range(cfg.train.rounds):
        t0 = time.perf_counter()
        plan = data.round_batches(shards, cfg.train.batch_size, seed, rnd)
        steps = max(len(b) for b in plan.values())
        loss_sum = 0.0
        for step in range(steps):
            active = [i for i in range(len(shards)) if step < len(plan[i])]
            idx = torch.cat([torch.from_numpy(plan[i][step]) for i in active])
            x, y = train.x[idx].to(device), train.y[idx].to(device)
            sizes = [len(plan[i][step]) for i in active]
            out = _forward_part(model.encoder, x, sizes, active, seed, rnd, step, 0)
            for part, tag in later:
                out = _forward_part(part, out, sizes, active, seed, rnd, step, tag)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        test_loss, test_acc = evaluate(model, test.x, test.y, device)
        writer.round({"round": rnd, "rounds": cfg.train.rounds, "train_loss": loss_sum / total,
                      "test_loss": test_loss, "test_accuracy": test_acc, "seconds": round(seconds, 4),
                      "samples": total}, model)
    return writer.finish({"mode": "baseline", "seconds": round(train_seconds, 3), "ranks": 1,
                                 "train_samples_per_s": total * cfg.train.rounds / train_seconds})


def _forward_part(part: nn.Module, x: torch.Tensor, sizes: list[int], clients: list[int],
                  seed: int, rnd: int, step: int, tag: int) -> torch.Tensor:
    """`part` on the concatenated batch, or per client chunk under the SFL seeds if it draws randoms."""
    if not models.uses_rng(part):
        return part(x)
    outs = []
    for chunk, cid in zip(torch.split(x, sizes), clients):
        torch.manual_seed(models.batch_seed(seed, rnd, step, cid, tag))
        outs.append(part(chunk))
    return torch.cat(outs)

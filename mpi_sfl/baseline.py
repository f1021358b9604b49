"""`mpi-sfl baseline`: the same model, data, seed and sample order, unsplit, in one process.

    mpi-sfl baseline [CONFIG.toml] [--set section.key=value ...] [--overwrite]

It follows the configured variant's schedule of updates (`schedule`): each update consumes the
concatenation of some logical clients' batches with the mean loss over all its samples —
sync, v1, fl: one update per step over every client that has a batch in it; v2: one update per
client batch, a step's clients in the round's seeded order; sl: clients in the round's order, each
over its whole shard, one update per batch. Parts that draw random numbers (dropout) run per client
chunk under the same per-(round, step, client, part) seeds the SFL ranks use; the others run on the
whole concatenated batch. Parts with running buffers (BatchNorm) also run per client chunk, each
chunk from the update's starting buffers, which then become the chunks' sample-weighted average:
what FedAvg does with them in SFL (docs/design.md §4). Where a variant is single-model SGD (docs/design.md §3 lists when), its run
must land on this model to float32 round-off (the exactness property).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import data, models, outdir
from .errors import UserError
from .layout import pick_device, set_numerics, set_threads
from .models import Part
from .eager import SGD
from .outputs import RunWriter, cpu_per_sample, evaluate, space_needed
from .progress import check_tensorboard
from .wire import Wire


def run(cfg, start: str = "new") -> dict:
    """Train and write run.out_dir; `start` is "new" (refuse an earlier run's results, an SFL run's
    included) or "overwrite" (replace them), as outdir.prepare checks them."""
    if cfg.train.clients == 0:
        raise UserError("train.clients = 0 means one per client rank, which a single process "
                        "cannot know: set train.clients, or pass the config.toml an SFL run wrote")
    if cfg.robust or cfg.train.attackers:
        raise UserError("mpi-sfl baseline trains one model on the clients' concatenated batches: it has no "
                        "averaging for sfl.aggregator or train.attackers to act on; set sfl.aggregator = 'mean' "
                        "and train.attackers = 0")
    if cfg.run.tensorboard:
        check_tensorboard()
    spec, summary = models.for_config(cfg)
    outdir.prepare(cfg.run.out_dir, start, space_needed(summary), can_resume=False)
    try:
        return _train(cfg, spec)
    finally:
        outdir.release(cfg.run.out_dir)


def _train(cfg, spec: models.Spec) -> dict:
    device = pick_device(cfg.run.device, 0)
    set_numerics(device, cfg.run.deterministic)
    set_threads(cfg.run.threads, 1)
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    shards = data.partition(train.y.numpy(), cfg.train.clients, cfg)
    seed = cfg.run.seed
    model = spec.build(seed).to(device).train()
    if cfg.model.freeze_encoder:
        model.encoder.requires_grad_(False)
    # The parts as the variant runs them, each seeded as its rank seeds it (label-sharing: the server
    # runs body and head as one part).
    parts = [(model.encoder, Part.ENCODER), (model.body, Part.BODY), (model.head, Part.HEAD)]
    if cfg.split and not cfg.u_shape:
        parts = [(model.encoder, Part.ENCODER), (models.server_part(model, False), Part.BODY)]
    opt = SGD([p for p in model.parameters() if p.requires_grad],
                          lr=cfg.train.lr, momentum=cfg.train.momentum)
    # train.client_optimizer = "reset": the per-client working copies' momentum (the client parts;
    # v1's server copies too) starts afresh after every averaging; here, the same parameters' buffers.
    fresh = []
    if cfg.train.client_optimizer == "reset":
        halves = models.client_parts(model, cfg.u_shape, cfg.split)
        if cfg.sfl.variant == "v1":
            halves.append(models.server_part(model, cfg.u_shape))
        fresh = [p for part in halves for p in part.parameters()]
    wire = Wire(cfg.sfl.wire_dtype)
    writer = RunWriter(cfg, cfg.train.rounds, "baseline")
    train_seconds, samples = 0.0, 0
    rows = []
    for rnd in range(cfg.train.rounds):
        t0, cpu0 = time.perf_counter(), time.process_time()
        plan = data.RoundPlan.make(shards, cfg.train.batch_size, seed, rnd, cfg.train.clients_per_round)
        loss_sum = 0.0
        updates = schedule(cfg, plan)
        for k, update in enumerate(updates):
            idx = torch.cat([torch.from_numpy(plan.batches[c][step]) for c, step in update])
            out, y = train.x[idx].to(device), train.y[idx].to(device)
            sizes = [plan.batch_len(c, t) for c, t in update]
            for part, tag in parts:
                out = _forward_part(part, tag, out, update, plan, seed)
                if tag == Part.ENCODER and cfg.split and (cfg.sfl.noise_std or cfg.sfl.clip_norm):
                    out = torch.cat([models.cut_noise(chunk, cfg.sfl.noise_std, cfg.sfl.clip_norm, seed, plan.rnd, t, c)
                                     for chunk, (c, t) in zip(torch.split(out, sizes), update)])
                if wire.fmt != "float32" and cfg.split and (tag == Part.ENCODER or (tag == Part.BODY and cfg.u_shape)):
                    out = WireCut.apply(out, wire, sizes)  # h (and z) cross the wire, their gradients back
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            step = update[-1][1]
            if fresh and (k + 1 == len(updates) or updates[k + 1][-1][1] != step) \
                    and plan.averages_after(step, cfg.train.aggregate_every):
                for p in fresh:
                    opt.state.pop(p, None)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        train_seconds += seconds
        samples += plan.samples
        test_loss, test_acc = evaluate(model, test.x, test.y, device)
        cpu_eval = time.process_time() - cpu0 - cpu
        rows.append({"round": rnd, "rounds": cfg.train.rounds, "train_loss": loss_sum / plan.samples,
                     "test_loss": test_loss, "test_accuracy": test_acc, "seconds": round(seconds, 4),
                     "samples": plan.samples, "clients_trained": len(plan.batches),
                     # the same accounting as an SFL run's (timing.CPU_KINDS), for the one process
                     "cpu_seconds": {"baseline": {"compute": round(cpu, 4), "eval": round(cpu_eval, 4),
                                                  "total": round(cpu + cpu_eval, 4)}}})
        writer.round(rows[-1], model)
    return writer.finish({"mode": "baseline", "variant": cfg.sfl.variant, "seconds": round(train_seconds, 3),
                          "ranks": 1, "train_samples_per_s": samples / train_seconds,
                          "cpu_seconds_per_sample": cpu_per_sample(rows),
                          **({"peak_device_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
                             if device.type == "cuda" else {})})


def schedule(cfg, plan: data.RoundPlan) -> list[list[tuple[int, int]]]:
    """One round's updates, each a list of (logical client, step) batches trained together."""
    if cfg.sfl.variant == "sl":
        return [[unit] for unit in plan.sequence]
    if cfg.sfl.variant == "v2":
        return [[(c, t)] for t in range(plan.steps) for c in plan.order if plan.batch_len(c, t)]
    return [[(c, t) for c in plan.active(t)] for t in range(plan.steps)]


class WireCut(torch.autograd.Function):
    """sfl.wire_dtype at a cut: the forward value and the backward gradient each rounded as the
    wire rounds them (wire.Wire). A client sends the gradient of its own batch's mean loss,
    which is the baseline's gradient of the chunk times (all samples / the chunk's): it is rounded
    at that scale and scaled back (exact when the ratio is a power of two)."""

    @staticmethod
    def forward(ctx, x, wire, sizes):
        ctx.wire, ctx.sizes = wire, sizes
        return wire.round(x)  # per value, or per sample (int8): chunking changes nothing

    @staticmethod
    def backward(ctx, grad):
        total = float(sum(ctx.sizes))
        chunks = [ctx.wire.round(g * (total / n)) * (n / total) for g, n in zip(torch.split(grad, ctx.sizes), ctx.sizes)]
        return torch.cat(chunks), None, None


def _forward_part(part: nn.Module, tag: Part, x: torch.Tensor, update: list[tuple[int, int]],
                  plan: data.RoundPlan, seed: int) -> torch.Tensor:
    """`part` on the concatenated batch, or per client chunk: under the SFL seeds if it draws
    randoms; from the same starting buffers, then averaged, if it has running buffers."""
    if not models.per_batch(part):
        return part(x)
    rng, bufs = models.uses_rng(part), models.buffers(part)
    start = models.snapshot(bufs) if bufs and len(update) > 1 else None
    outs, after, weights = [], [], []
    for chunk, (cid, step) in zip(torch.split(x, [plan.batch_len(c, t) for c, t in update]), update):
        if start is not None:
            models.restore(bufs, start)
        if rng:
            models.seed_rng(models.batch_seed(seed, plan.rnd, step, cid, tag))
        outs.append(part(chunk))
        if start is not None:
            after.append(models.snapshot(bufs))
            weights.append(len(chunk))
    if start is not None:
        _average_buffers(bufs, after, weights)
    return torch.cat(outs)


def _average_buffers(bufs: list[torch.Tensor], after: list[list[torch.Tensor]], weights: list[int]) -> None:
    """The chunks' sample-weighted average, in float32 and chunk order as SFL sums it; integer
    counters rounded; other integer buffers (index tables) are not averaged."""
    total = float(sum(weights))
    with torch.no_grad():
        for k, b in enumerate(bufs):
            if not (b.is_floating_point() or b.dim() == 0):
                continue
            acc = torch.zeros(b.shape, dtype=torch.float32, device=b.device)
            for values, w in zip(after, weights):
                acc.add_(values[k].float(), alpha=float(w))
            acc.div_(torch.full_like(acc, total))  # not by a scalar: CUDA would use its reciprocal (wire.Wire.pack)
            b.data.copy_(acc if b.is_floating_point() else acc.round())  # .data: see models.restore

"""How a split server serves a step's client batches, as functions of the SplitServer:
- together (sync, v1): forward each activation as it arrives, apply backwards in client order;
- batched (sync, sfl.batch_clients): groups of a step's batches forwarded and backpropagated as one
  batch (batches_clients says when that is exact; batch_groups makes the groups);
- in order (v2, sl): one client after another, in the round's seeded order.
One client's backward (or a group's), the seeds of its forward and what a non-finite batch does are
here too; what a gradient does to the server part is the SplitServer's `learn` (server_part.py holds
the parts)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data, models
from .control import nonfinite_message
from .models import Part
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox


DROPPED = object()  # a batch its client dropped (train.on_nonfinite = "skip")


def finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element is finite (one max-abs per tensor: cheap on the per-batch path)."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


GROUP_ROWS = 256  # the most samples one batched pass runs (batch_groups); a larger client batch runs alone


def batches_clients(cfg, body: nn.Module) -> bool:
    """sfl.batch_clients: sync runs groups of a step's client batches as one batch, where that is the
    same function as one batch at a time: f_s keeps no running buffers (BatchNorm normalizes each
    client's batch by its own statistics). Dropout is exact too (each client's rows draw the masks
    of that client's seed: models.seeded with ChunkSeeds), but "auto" leaves it unbatched: the
    default job (cnn, 2 logical clients per client rank) ran 0.90x batched on 2 cores."""
    mode = cfg.sfl.batch_clients
    if mode == "off" or cfg.sfl.variant != "sync" or models.buffers(body):
        return False
    return mode != "auto" or not models.uses_rng(body)


def seed(server, plan: data.RoundPlan, step: int, client: int) -> int:
    return models.batch_seed(server.cfg.run.seed, plan.rnd, step, client, Part.BODY)


def group_seeds(server, plan: data.RoundPlan, step: int, members: list[int], sizes: list[int]) -> models.ChunkSeeds:
    """A batched group's seeds: each member's rows draw what its own forward would."""
    return models.ChunkSeeds(tuple(seed(server, plan, step, c) for c in members), tuple(sizes))


def forward_from_step_buffers(server, client: int, forward):
    """sync: `forward()` of one client's batch from the step's running buffers, keeping the
    buffers it leaves for the step's average (learn). Other variants: just `forward()`."""
    server.passes += 1
    if server.parts.step_buffers is None:
        return forward()
    server.parts.main.set_buffers(server.parts.step_buffers)
    out = forward()
    server.parts.client_buffers[client] = server.parts.main.buffers.clone()
    return out


def serve_together(server, plan: data.RoundPlan, step: int, active: list[int]) -> None:
    """sync, v1: forward each activation as it arrives; apply backwards in client order."""
    t, u_shape = server.job.transport, server.cfg.u_shape
    counts = messages_due(server, active)
    kinds = (ACT, DELTA) if u_shape else (ACT,)
    inbox = Inbox(t, {(src, kind): n for src, n in counts.items() for kind in kinds})
    order, waiting = list(active), {}
    while inbox:
        src, header = inbox.next()
        c, key = header.client, (plan.rnd, step, header.client)
        if header.kind == ACT and u_shape:
            h = t.recv_payload(header, src)
            with server.job.timers.phase("server_compute"):
                z = forward_from_step_buffers(server, c, lambda: server.state.forward(
                    key, server.parts.part_of(c).module, h, seed(server, plan, step, c)))
            t.isend(z, src, OUT, plan.rnd, step, c)
            continue
        waiting[c] = receive_rest(server, header, src)
        while order and order[0] in waiting:
            c = order.pop(0)
            backward(server, plan, step, c, waiting.pop(c))
    t.reap()  # the step's last replies complete while the next step starts (SplitServer.settle waits for them)


def serve_batched(server, plan: data.RoundPlan, step: int, groups: list[list[int]]) -> None:
    """sync, sfl.batch_clients: the step's batches in groups, each forwarded (and backpropagated)
    as one batch; the groups are fixed by the layout, not by arrival (batch_groups), and each
    group is concatenated in client order, so runs are bit-reproducible. U-shape: a group is
    forwarded once all its activations are in, and backpropagated once all its deltas are in and
    the groups before it are done (the gradient sums in group order)."""
    t, u_shape = server.job.transport, server.cfg.u_shape
    kinds = (ACT, DELTA) if u_shape else (ACT,)
    active = [c for members in groups for c in members]
    inbox = Inbox(t, {(src, kind): n for src, n in messages_due(server, active).items() for kind in kinds})
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    h: dict[int, torch.Tensor] = {}
    back: dict[int, object] = {}   # what the backward takes: delta, or (h, labels)
    sizes: dict[int, list[int]] = {}
    missing_h = [len(m) for m in groups]     # per group: activations still to come
    missing_back = [len(m) for m in groups]  # and deltas (label-sharing: h with labels)
    done = 0                                 # groups backpropagated so far
    while inbox:
        src, header = inbox.next()
        c, g = header.client, group_of[header.client]
        if header.kind == ACT and u_shape:
            h[c] = server.job.transport.recv_payload(header, src).clone()
            missing_h[g] -= 1
            if not missing_h[g]:
                sizes[g] = forward_group(server, plan, step, g, groups[g], [h.pop(m) for m in groups[g]])
            continue
        back[c] = receive_rest(server, header, src)
        missing_back[g] -= 1
        while done < len(groups) and not missing_back[done]:
            members = groups[done]
            backward_group(server, plan, step, done, members, [back.pop(m) for m in members], sizes.pop(done, None))
            done += 1
    t.reap()  # as serve_together


def batch_groups(server, plan: data.RoundPlan, step: int, active: list[int]) -> list[list[int]]:
    """sfl.batch_clients: "step": all of the step's clients on this server as one group;
    "rank" (and "auto"): one group per client rank (its logical clients), so the server forwards one rank's
    batches while the next rank is still computing its own. Either way a group is cut after
    GROUP_ROWS samples: a batched pass's activations, held all at once, stay bounded however
    many logical clients a rank hosts (the split server's memory stays flat in them)."""
    by_rank: dict[int, list[int]] = {}
    for c in active:
        by_rank.setdefault(0 if server.cfg.sfl.batch_clients == "step" else server.rank_of[c], []).append(c)
    return [g for members in by_rank.values() for g in cut_groups(plan, step, members)]


def cut_groups(plan: data.RoundPlan, step: int, members: list[int]) -> list[list[int]]:
    """`members` in order, cut into groups of at most GROUP_ROWS samples (a larger batch alone)."""
    groups: list[list[int]] = []
    rows = GROUP_ROWS  # start a new group at the first member
    for c in members:
        n = plan.batch_len(c, step)
        if rows + n > GROUP_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(c)
        rows += n
    return groups


def forward_group(server, plan: data.RoundPlan, step: int, g: int, members: list[int],
                  h: list[torch.Tensor]) -> list[int]:
    """U-shape: one forward of the group's activations; each client gets its rows of z."""
    sizes = [len(x) for x in h]
    with server.job.timers.phase("server_compute"):
        z = server.state.forward((plan.rnd, step, -1 - g), server.parts.main.module, torch.cat(h),
                                 group_seeds(server, plan, step, members, sizes))
    server.passes += 1
    for c, rows in zip(members, z.split(sizes)):  # one doorbell per client rank for the lot
        server.job.transport.isend(rows, server.rank_of[c], OUT, plan.rnd, step, c, ring=False)
    server.job.transport.ring_owed()
    return sizes


def backward_group(server, plan: data.RoundPlan, step: int, g: int, members: list[int], received: list,
                   sizes: list[int] | None) -> None:
    """One backward for a group. The sum of its clients' sample-weighted gradients is the
    gradient for the deltas each scaled by its client's sample count, and a client's dl/dh is its
    rows divided by that count back (design §3.12). Label-sharing: the gradient of the sum of
    every sample's loss. A non-finite parameter gradient cannot be told apart by client: it
    stops the run, or (on_nonfinite = "skip") drops the group's batches."""
    t, key, loss_sum = server.job.transport, (plan.rnd, step, -1 - g), 0.0
    with server.job.timers.phase("server_compute"):
        if server.cfg.u_shape:
            kept = [i for i, d in enumerate(received) if d is not DROPPED]
            if kept:
                rows = None if len(kept) == len(members) else rows_of(sizes, kept)
                delta = torch.cat([received[i] * sizes[i] for i in kept])
                grads, grad_h = server.state.backward(key, server.parts.main.module, delta, rows)
            else:
                server.state.drop(key)
        else:
            sizes = [len(hy[0]) for hy in received]
            grads, grad_h, kept, loss_sum = shared_labels_backward(server, plan, step, members, sizes, received)
        if kept and not finite(grads) and nonfinite(server, plan, step, members[kept[0]], "gradient",
                                                    tuple(members[i] for i in kept[1:])):
            kept = []
        if kept:
            server.parts.main.add_grads(grads, 1, samples=sum(sizes[i] for i in kept))
            server.samples += sum(sizes[i] for i in kept)
            server.loss_sum += loss_sum
    if server.cfg.grad_input:  # dl/dh back, or the drop (the client counts it)
        dl_dh = dict(zip(kept, grad_h.split([sizes[i] for i in kept]))) if kept else {}
        for i, c in enumerate(members):
            t.isend(dl_dh[i] / sizes[i] if i in dl_dh else torch.zeros(0), server.rank_of[c], GRAD_IN,
                    plan.rnd, step, c, dropped=i not in dl_dh, ring=False)
        t.ring_owed()
        t.limit_backlog()  # see backward()
    else:
        server.skipped += len(members) - len(kept)


def rows_of(sizes: list[int], kept: list[int]) -> torch.Tensor:
    """The sample indices of the batches `kept` in a concatenation of batches of `sizes`."""
    starts = np.cumsum([0] + sizes)
    return torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in kept]))


def shared_labels_backward(server, plan: data.RoundPlan, step: int, active: list[int], sizes: list[int],
                           received: list) -> tuple[list[torch.Tensor], torch.Tensor | None, list[int], float]:
    """Label-sharing, batched: the gradients of every kept sample's loss, summed. A client whose
    loss is not finite stops the run, or is dropped and the rest run again without its rows (a
    NaN row would make every weight's gradient NaN). Returns grads, dl/dh (kept rows), kept and
    the kept samples' loss sum."""
    h_all, y_all = torch.cat([hy[0] for hy in received]), torch.cat([hy[1] for hy in received])
    h, y = h_all, y_all  # without a dropped client's rows after a rerun
    params = list(server.parts.main.module.parameters())
    kept = list(range(len(active)))
    while True:
        h.requires_grad_(server.cfg.grad_input)
        with models.seeded(group_seeds(server, plan, step, [active[i] for i in kept], [sizes[i] for i in kept]),
                           server.parts.main.module):
            losses = F.cross_entropy(server.parts.main.module(h), y, reduction="none")
        server.passes += 1
        sums = torch.stack([s.sum() for s in losses.split([sizes[i] for i in kept])])
        bad = [i for i, ok in zip(kept, torch.isfinite(sums).tolist()) if not ok]
        if not bad or not all([nonfinite(server, plan, step, active[i], "loss") for i in bad]):
            break
        kept = [i for i in kept if i not in bad]
        if not kept:
            return [], None, [], 0.0
        rows = rows_of(sizes, kept)
        h, y = h_all.detach()[rows], y_all[rows]
    total = sums.sum()
    out = torch.autograd.grad(total, params + ([h] if server.cfg.grad_input else []))
    return list(out[:len(params)]), (out[-1] if server.cfg.grad_input else None), kept, float(total)


def serve_in_order(server, plan: data.RoundPlan, step: int, clients: list[int]) -> None:
    """v2, sl: one client after another in the given order; each forward sees the update of
    the one before. Activations that arrive before their turn wait in memory."""
    t = server.job.transport
    counts = messages_due(server, clients)
    kinds = (ACT, DELTA) if server.cfg.u_shape else (ACT,)
    inbox = Inbox(t, {(src, kind): n for src, n in counts.items() for kind in kinds})
    arrived: dict[tuple[int, int], object] = {}

    def take(kind: int, client: int):
        while (kind, client) not in arrived:
            src, header = inbox.next()
            arrived[(header.kind, header.client)] = receive_rest(server, header, src)
        return arrived.pop((kind, client))

    for c in clients:
        key = (plan.rnd, step, c)
        if server.cfg.u_shape:
            h = take(ACT, c)
            with server.job.timers.phase("server_compute"):
                z = server.state.forward(key, server.parts.main.module, h, seed(server, plan, step, c))
            server.passes += 1
            t.isend(z, server.rank_of[c], OUT, plan.rnd, step, c)
            backward(server, plan, step, c, take(DELTA, c))
        else:
            backward(server, plan, step, c, take(ACT, c))
    t.wait_sends()


def messages_due(server, clients: list[int]) -> dict[int, int]:
    """Messages of each kind due from each client rank."""
    out: dict[int, int] = {}
    for c in clients:
        out[server.rank_of[c]] = out.get(server.rank_of[c], 0) + 1
    return out


def receive_rest(server, header, src: int):
    """A message's payload, kept: U-shape the delta (or h), label-sharing h with its labels;
    DROPPED for a delta the client dropped (train.on_nonfinite = "skip")."""
    payload = server.job.transport.recv_payload(header, src).clone()
    if header.dropped:
        return DROPPED
    if server.cfg.u_shape:
        return payload
    _, y = server.job.transport.recv(src, LABELS)
    return payload, y.clone()


def backward(server, plan: data.RoundPlan, step: int, client: int, received) -> None:
    """Finish one client's batch: its gradient to `learn`, dl/dh back to the client.

    U-shape: `received` is delta = dl/dz; the state recomputes the forward (or keeps its graph).
    Label-sharing: `received` is (h, labels); forward, loss and backward happen here.
    """
    key, part = (plan.rnd, step, client), server.parts.part_of(client)
    dropped = received is DROPPED
    with server.job.timers.phase("server_compute"):
        if dropped:
            server.state.drop(key)
        elif server.cfg.u_shape:
            grads, grad_h = server.state.backward(key, part.module, received)
            samples = received.shape[0]
            dropped = not finite(grads) and nonfinite(server, plan, step, client, "gradient")
        else:
            h, y = received
            h.requires_grad_(server.cfg.grad_input)
            params = [p for p in part.module.parameters()]
            models.seed_rng(seed(server, plan, step, client))
            loss = F.cross_entropy(forward_from_step_buffers(server, client, lambda: part.module(h)), y)
            out = torch.autograd.grad(loss, params + ([h] if server.cfg.grad_input else []))
            grads, grad_h = list(out[:len(params)]), (out[-1] if server.cfg.grad_input else None)
            samples = h.shape[0]
            dropped = not finite([loss, *grads]) and nonfinite(server, plan, step, client, "loss or gradient")
            if not dropped:
                server.loss_sum += loss.item() * samples
        if not dropped:
            server.learn(client, grads, samples)
        elif not server.cfg.grad_input:
            server.skipped += 1  # the client cannot know; with dl/dh going back, it counts the drop
    if server.cfg.grad_input:
        server.job.transport.isend(torch.zeros(0) if dropped else grad_h, server.rank_of[client], GRAD_IN,
                                   plan.rnd, step, client, dropped=dropped)
        # The server's RAM stays flat in the batches in flight: a client that is slower to take
        # its dl/dh than the server to make them holds the server back (transport.BACKLOG_BYTES),
        # and it is in its receive loop, taking them without waiting for anything more from here.
        server.job.transport.limit_backlog()


def nonfinite(server, plan: data.RoundPlan, step: int, client: int, what: str, among: tuple[int, ...] = ()) -> bool:
    """True if the batch is to be dropped (train.on_nonfinite = "skip"); else the run stops."""
    if server.cfg.train.on_nonfinite == "skip":
        return True
    server.job.control.fail((plan.rnd, step, client), nonfinite_message(what, plan.rnd, step, client, among))
    return False

"""The split server: runs f_s for its clients, one averaged update per step (the sync variant).

Per step it expects, from each of its client ranks, one activation per active logical client and
(U-shape) one delta per activation. It posts a receive per client rank and kind and serves whichever
message is ready. It keeps no autograd graph between a forward and its backward unless
sfl.state = "graph" (see state.py). Gradients are accumulated sample-weighted into one flat buffer,
Allreduced across split-server replicas with the step's sample count, and applied once.
"""
from __future__ import annotations

import shutil

import torch
import torch.nn.functional as F
from mpi4py import MPI

from . import models
from .aggregation import attach_flat_grads, host
from .job import WEIGHTS_TAG, Job
from .layout import SERVER
from .state import make_state
from .transport import ACT, DELTA, GRAD_IN, LABELS, OUT, Inbox, polite_wait


def run(job: Job) -> None:
    cfg = job.cfg
    u_shape = cfg.model.split == "u"
    grad_input = not cfg.model.freeze_encoder
    seed = cfg.run.seed
    model = models.build(cfg.model.name, seed)
    body = models.server_part(model, cfg.model.split).to(job.device).train()
    params = list(body.parameters())
    gflat = attach_flat_grads(params, job.device)
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum)
    state = make_state(cfg.sfl.state, body, grad_input, job.scratch, job.device)
    mine = {r: job.layout.clients_of(r) for r in job.layout.client_ranks_of(job.rank)}  # fixed for the run
    loss_sum = samples = 0.0
    try:
        for rnd in range(cfg.train.rounds):
            t0 = MPI.Wtime()
            for step in range(job.steps):
                expected = {r: [c for c in cs if job.batch_len(c, step)] for r, cs in mine.items()}
                gflat.zero_()
                if u_shape:
                    serve_u_step(job, state, expected, rnd, step, gflat, grad_input)
                else:
                    ls = serve_label_step(job, body, params, expected, rnd, step, gflat, grad_input)
                    loss_sum += ls
                apply_update(job, gflat, params, opt)
                samples += sum(job.batch_len(c, step) for cs in expected.values() for c in cs)
            if job.rank == 1:  # the server part of the global model, for the fed server's evaluation
                weights = host(torch.nn.utils.parameters_to_vector(params))
                polite_wait(job.comm.Isend(weights, dest=0, tag=WEIGHTS_TAG))
            job.gather_stats(job.stats(SERVER, loss_sum, samples if not u_shape else 0.0,
                                       job.transport.bytes_sent, MPI.Wtime() - t0))
            loss_sum = samples = 0.0
    finally:
        state.close()
        if job.scratch is not None:
            shutil.rmtree(job.scratch, ignore_errors=True)


def serve_u_step(job: Job, state, expected, rnd: int, step: int, gflat: torch.Tensor, grad_input: bool) -> None:
    """U-shape: forward each activation as it arrives; backward the deltas in client order.

    Forwards go as soon as an activation is ready. Backwards are applied in logical-client order
    (an early delta waits for its turn) so the gradient sum has the same rounding in every run:
    same seed, same config, bit-identical results, whatever the arrival order.
    """
    seed = job.cfg.run.seed
    inbox = Inbox(job.transport, {(src, kind): len(cs) for src, cs in expected.items() for kind in (ACT, DELTA)})
    order = sorted(c for cs in expected.values() for c in cs)
    waiting: dict[int, tuple[int, torch.Tensor]] = {}
    count = 0.0
    while inbox:
        src, kind, header = inbox.next()
        payload = job.transport.recv_payload(header, src)
        client = int(header[3])
        if kind == ACT:
            with job.timers.phase("server_compute"):
                z = state.forward((rnd, step, client), payload, models.batch_seed(seed, rnd, step, client, 1))
            job.transport.isend(z, src, OUT, rnd, step, client)
            continue
        waiting[client] = (src, payload.clone())
        while order and order[0] in waiting:
            client = order.pop(0)
            src, delta = waiting.pop(client)
            with job.timers.phase("server_compute"):
                grads, grad_h = state.backward((rnd, step, client), delta)
                _accumulate(gflat, grads, delta.shape[0])
                count += delta.shape[0]
            if grad_input:
                job.transport.isend(grad_h, src, GRAD_IN, rnd, step, client)
    gflat[-1] = count
    job.transport.wait_sends()


def serve_label_step(job: Job, body, params, expected, rnd: int, step: int, gflat: torch.Tensor,
                     grad_input: bool) -> float:
    """Label-sharing: activation and labels arrive together; forward, loss and backward, in client
    order (see serve_u_step) so that runs are bit-reproducible."""
    seed = job.cfg.run.seed
    inbox = Inbox(job.transport, {(src, ACT): len(cs) for src, cs in expected.items()})
    order = sorted(c for cs in expected.values() for c in cs)
    waiting: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
    count = loss_sum = 0.0
    while inbox:
        src, _, header = inbox.next()
        h = job.transport.recv_payload(header, src).clone()
        _, y = job.transport.recv(src, LABELS)
        waiting[int(header[3])] = (src, h, y.clone())
        while order and order[0] in waiting:
            client = order.pop(0)
            src, h, y = waiting.pop(client)
            with job.timers.phase("server_compute"):
                h.requires_grad_(grad_input)
                torch.manual_seed(models.batch_seed(seed, rnd, step, client, 1))
                loss = F.cross_entropy(body(h), y)
                grads = torch.autograd.grad(loss, params + ([h] if grad_input else []))
                _accumulate(gflat, grads[:len(params)], h.shape[0])
                count += h.shape[0]
                loss_sum += loss.item() * h.shape[0]
            if grad_input:
                job.transport.isend(grads[-1], src, GRAD_IN, rnd, step, client)
    gflat[-1] = count
    job.transport.wait_sends()
    return loss_sum


def _accumulate(gflat: torch.Tensor, grads, weight: int) -> None:
    offset = 0
    for g in grads:
        n = g.numel()
        gflat[offset:offset + n].add_(g.reshape(-1), alpha=weight)
        offset += n


def apply_update(job: Job, gflat: torch.Tensor, params, opt: torch.optim.Optimizer) -> None:
    """Sum the replicas' sample-weighted gradients and counts, divide, step: replicas stay identical."""
    if job.layout.servers > 1:
        with job.timers.phase("aggregation"):
            data = host(gflat)
            polite_wait(job.servers_comm.Iallreduce(MPI.IN_PLACE, data, op=MPI.SUM))
            if gflat.device.type != "cpu":
                gflat.copy_(torch.from_numpy(data))
    with job.timers.phase("server_compute"):
        if gflat[-1] > 0:
            gflat[:-1].div_(gflat[-1])
            opt.step()

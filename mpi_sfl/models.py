"""The models, each cut into three parts: encoder | body | head.

U-shaped split: client = encoder + head, server = body. Label-sharing split: client = encoder,
server = body + head. The global model is always `Parts(encoder, body, head)`, so `model.pt` has the
same keys whatever the split.

A model is a built-in name (zoo.py's `MODELS`: an `nn.Sequential` and its default cut) or a user
function `"package.module:function"`, importable on every rank, that returns three modules
(encoder, body, head) or an `nn.Sequential` cut at `model.cut = [i, j]`: encoder = seq[:i],
body = seq[i:j], head = seq[j:]. A function that names `input_shape` or `num_classes` among its
parameters gets them.
Every rank builds the model under the same seed, so all start from identical weights; `check` runs
a dummy batch through it once at set-up, so a model that cannot work ends the job with one message.
"""
from __future__ import annotations

import importlib
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from .errors import UserError
from .zoo import MODELS


class Parts(nn.Module):
    """The whole network as its three parts; forward runs them in order."""

    def __init__(self, encoder: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.body, self.head = encoder, body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.encoder(x)))


def resolve(name: str) -> Callable[..., object]:
    """The function that builds model `name`: a built-in, or `package.module:function`."""
    if name in MODELS:
        return MODELS[name][0]
    if ":" not in name:
        raise UserError(f"model.name = {name!r} is neither a built-in model ({', '.join(MODELS)}) nor "
                        "a function of yours as \"package.module:function\"")
    module_name, fn_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises is the same user problem
        raise UserError(f"model.name = {name!r}: cannot import {module_name} ({type(exc).__name__}: {exc}); "
                        "it must be importable on every rank (put its directory on PYTHONPATH)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"model.name = {name!r}: {module_name} has no function {fn_name!r}")
    return fn


@dataclass(frozen=True)
class Spec:
    """What builds the model: its name, cut and the data's sample shape and classes. Resolved once
    at set-up (every role shares it), then `build(seed)` anywhere gives identical weights."""
    name: str
    cut: tuple[int, ...] = ()
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10

    @classmethod
    def from_config(cls, cfg, input_shape: tuple[int, ...], num_classes: int) -> "Spec":
        return cls(cfg.model.name, tuple(cfg.model.cut), tuple(input_shape), num_classes)

    def build(self, seed: int) -> Parts:
        """The full model with weights drawn from `seed`."""
        fn = resolve(self.name)
        kwargs = {}
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "input_shape" in params:
            kwargs["input_shape"] = self.input_shape
        if "num_classes" in params:
            kwargs["num_classes"] = self.num_classes
        torch.manual_seed(seed)
        try:
            made = fn(**kwargs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"model.name = {self.name!r}: building it raised {type(exc).__name__}: {exc}") from None
        return self._cut(made)

    def _cut(self, made: object) -> Parts:
        if isinstance(made, Parts):
            parts = made
        elif isinstance(made, nn.Sequential):
            parts = self._cut_sequential(made)
        elif isinstance(made, (tuple, list)) and len(made) == 3 and all(isinstance(m, nn.Module) for m in made):
            parts = Parts(*made)
        else:
            raise UserError(f"model.name = {self.name!r} returned {type(made).__name__}; it must return "
                            "(encoder, body, head) as three nn.Modules, or an nn.Sequential with model.cut = [i, j]")
        if self.cut and not isinstance(made, nn.Sequential):
            raise UserError(f"model.cut = {list(self.cut)} cuts an nn.Sequential, but {self.name!r} returns its "
                            "three parts already: set model.cut = []")
        return parts

    def _cut_sequential(self, seq: nn.Sequential) -> Parts:
        cut = self.cut or (MODELS[self.name][1] if self.name in MODELS else ())
        n = len(seq)
        if not cut:
            raise UserError(f"model.name = {self.name!r} returns an nn.Sequential of {n} layers: say where to "
                            f"cut it with model.cut = [i, j] (encoder = layers [0, i), body = [i, j), head = [j, {n}))")
        i, j = (cut[0], n) if len(cut) == 1 else cut[:2]
        if len(cut) > 2 or not 1 <= i < j <= n:
            raise UserError(f"model.cut = {list(cut)} is out of range for {self.name!r}'s {n} layers: it needs "
                            f"1 <= i < j <= {n} (encoder = layers [0, i), body = [i, j), head = [j, {n}))")
        return Parts(seq[:i], seq[i:j], seq[j:])


def build(name: str, seed: int, **spec) -> Parts:
    """`Spec(name, **spec).build(seed)`: a model on the default 1x28x28, 10-class data unless told."""
    return Spec(name, **spec).build(seed)


def for_config(cfg) -> tuple["Spec", "Summary"]:
    """The run's model spec (from the config and the data's shape and classes), checked on a dummy
    batch: set-up calls this once, on every rank."""
    from . import data
    spec = Spec.from_config(cfg, *data.describe(cfg))
    return spec, check(spec, cfg.u_shape, cfg.grad_input, cfg.sfl.wire_dtype)


@dataclass(frozen=True)
class Summary:
    """What `check` found: parameters per part and the shapes that cross the cut."""
    params: dict[str, int]
    cut_shape: tuple[int, ...]           # h, per sample (client -> server)
    out_shape: tuple[int, ...] | None    # z, per sample (server -> client, U-shaped); None for label-sharing
    up_bytes: int                        # per sample, client -> server
    down_bytes: int                      # per sample, server -> client
    floats: dict[str, int] | None = None  # per part: what its flat vector averages (weights + buffers)

    def client_floats(self, u_shape: bool, split: bool) -> int:
        """The length of a logical client's vector in the averaging, without the weight slot."""
        parts = ("encoder", "body", "head") if not split else ("encoder", "head") if u_shape else ("encoder",)
        return sum(self.floats[p] for p in parts)

    def line(self, name: str, split: str) -> str:
        def size(b: int) -> str:
            return f"{b / 1024:.1f} KiB" if b >= 1024 else f"{b} B"
        parts = " | ".join(f"{k} {v:,}" for k, v in self.params.items())
        z = f", server output {'x'.join(map(str, self.out_shape))}" if self.out_shape else ""
        return (f"model {name} ({split} split): parameters {parts}; cut {'x'.join(map(str, self.cut_shape))}{z}; "
                f"per sample {size(self.up_bytes)} to the server, {size(self.down_bytes)} back")


WIRE_BYTES = {"float32": (4, 0), "float16": (2, 0), "bfloat16": (2, 0), "int8": (1, 4)}  # per value, per sample


def check(spec: Spec, u_shape: bool, grad_input: bool, wire: str = "float32") -> Summary:
    """Build the model and run a dummy batch of 2 through its parts (eval mode, no gradients, on a
    throwaway copy: the caller's RNG is left as it was). A model whose parts do not chain or whose
    output is not (batch, classes) logits is a UserError naming the part and the shapes."""
    with torch.random.fork_rng(devices=[]):
        model = spec.build(0).eval()
    x = torch.zeros(2, *spec.input_shape)
    shapes = {}
    with torch.no_grad():
        for part, what in ((model.encoder, "encoder"), (model.body, "body"), (model.head, "head")):
            try:
                out = part(x)
            except Exception as exc:  # noqa: BLE001 - a user model fails in any way; name where
                raise UserError(f"model {spec.name!r}: its {what} cannot take a batch of shape "
                                f"{list(x.shape)} ({type(exc).__name__}: {exc})") from None
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 1 or len(out) != 2:
                got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"model {spec.name!r}: its {what} must return one floating-point tensor with the "
                                f"batch first; for a batch of 2 it returned {got}")
            shapes[what] = tuple(out.shape[1:])
            x = out
    if shapes["head"] != (spec.num_classes,):
        raise UserError(f"model {spec.name!r} outputs shape {list(shapes['head'])} per sample; it must give "
                        f"{spec.num_classes} logits (one per class of the data)")
    per_value, per_sample = WIRE_BYTES[wire]  # sfl.wire_dtype (transport.Wire)
    h_bytes = per_value * math.prod(shapes["encoder"]) + per_sample
    z_bytes = per_value * math.prod(shapes["body"]) + per_sample if u_shape else 0
    up = h_bytes + (z_bytes if u_shape else 8)              # h, then dl/dz (U) or the label
    down = z_bytes + (h_bytes if grad_input else 0)          # z (U), then dl/dh
    named = (("encoder", model.encoder), ("body", model.body), ("head", model.head))
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in named}
    floats = {k: params[k] + sum(b.numel() for b in m.buffers() if averaged(b)) for k, m in named}
    return Summary(params, shapes["encoder"], shapes["body"] if u_shape else None, up, down, floats)


class Part(IntEnum):
    """Which part a forward runs: one of the numbers a batch's dropout seed is drawn from."""
    ENCODER = 0
    BODY = 1
    HEAD = 2


def server_part(model: Parts, u_shape: bool) -> nn.Module:
    return model.body if u_shape else nn.Sequential(model.body, model.head)


def client_parts(model: Parts, u_shape: bool, split: bool = True) -> list[nn.Module]:
    """The modules a client trains: encoder (+ head for the U-shape); all three when not split (fl)."""
    if not split:
        return [model.encoder, model.body, model.head]
    return [model.encoder, model.head] if u_shape else [model.encoder]


def uses_rng(module: nn.Module) -> bool:
    """Whether a forward of `module` draws random numbers (dropout): only those are seeded per batch."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


def averaged(buffer: torch.Tensor) -> bool:
    """Whether FedAvg averages a buffer with the weights: floating-point ones (BatchNorm's running
    statistics) and integer scalars (its num_batches_tracked counter); other integer buffers are
    index tables that training does not change (docs/design.md §4.1)."""
    return buffer.is_floating_point() or buffer.dim() == 0


def buffers(module: nn.Module) -> list[torch.Tensor]:
    """The running state a forward may change (BatchNorm's statistics and counter)."""
    return list(module.buffers())


def per_batch(module: nn.Module) -> bool:
    """Whether `module` must run one client batch at a time to match SFL: it draws random numbers
    (seeded per batch) or updates running buffers from its batch (BatchNorm normalizes each client's
    batch by that batch's statistics)."""
    return uses_rng(module) or bool(buffers(module))


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Each state_dict entry's dtype, taken before flattening turns counters into float32."""
    return {k: v.dtype for k, v in model.state_dict().items()}


def state_dict(model: nn.Module, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights and buffers on the CPU, in their original dtypes (counters rounded back)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtypes and v.dtype != dtypes[k]:
            v = (v if dtypes[k].is_floating_point else v.round()).to(dtypes[k])
        out[k] = v
    return out


def snapshot(bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.detach().clone() for b in bufs]


def restore(bufs: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    """Put saved buffer values back. Through `.data`, so that autograd's version check of a graph
    that saved them (BatchNorm's backward takes them as arguments; in training mode it does not use
    their values) is not tripped: a kept graph stays valid while other batches run."""
    for b, s in zip(bufs, saved, strict=True):
        b.data.copy_(s)


NOISE = 8  # the seed part of a batch's noise at the cut (parts are 0-2, an attacker's noise 7)


def cut_noise(h: torch.Tensor, std: float, clip: float, seed: int, rnd: int, step: int, client: int) -> torch.Tensor:
    """What a client sends for its activation h (sfl.clip_norm, sfl.noise_std): each sample clipped
    to L2 norm `clip` (0: not clipped), plus N(0, std^2) noise drawn from the batch's own seed, so the
    baseline adds the very same noise. A noise knob, not a differential-privacy guarantee."""
    if clip > 0:
        norms = h.flatten(1).norm(dim=1).clamp_min(1e-12)
        h = h * (clip / norms).clamp(max=1.0).view(-1, *[1] * (h.dim() - 1))
    if std > 0:
        g = torch.Generator(device="cpu").manual_seed(batch_seed(seed, rnd, step, client, NOISE))
        h = h + std * torch.randn(h.shape, generator=g).to(h.device)
    return h


def seed_rng(seed: int) -> None:
    """torch.manual_seed for the per-batch path: the CPU generator, and CUDA's only once CUDA is
    initialized. torch.manual_seed on a machine whose CUDA is never initialized queues a lazy CUDA
    (and MTIA, XPU) seeding call with a formatted Python stack each time: about 0.2 ms per call and
    a queue that grows with every batch for the whole run. Same CPU generator state, same bits."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class ChunkSeeds(NamedTuple):
    """The seeds of a batch made of several clients' batches (cross-client batching): rows
    [sum(sizes[:i]), sum(sizes[:i+1])) are client i's batch, which draws its random numbers from
    seeds[i] as its own forward would."""
    seeds: tuple[int, ...]
    sizes: tuple[int, ...]

    def rows(self, rows: torch.Tensor) -> "ChunkSeeds":
        """The chunks whose rows are in `rows` (a batch without some clients' whole batches)."""
        present, start, kept = set(rows.tolist()), 0, []
        for i, n in enumerate(self.sizes):
            if start in present:
                kept.append(i)
            start += n
        return ChunkSeeds(tuple(self.seeds[i] for i in kept), tuple(self.sizes[i] for i in kept))


def _rng_state() -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


@contextmanager
def seeded(seed: "int | ChunkSeeds", module: nn.Module) -> Iterator[None]:
    """Run a forward of `module` (inside the block) under `seed`: seed_rng(seed); or, for
    ChunkSeeds, each dropout layer runs chunk by chunk, chunk i from a generator state of its own
    that starts at seeds[i] and carries from one dropout layer to the next, so each client's rows
    get the masks its unbatched forward draws (docs/design.md §3.12). Layers other than dropout run
    on the whole batch."""
    if not isinstance(seed, ChunkSeeds):
        seed_rng(seed)
        yield
        return
    drops = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    states = []
    for s in seed.seeds if drops else ():
        seed_rng(s)
        states.append(_rng_state())

    def chunked(forward):
        def each_chunk(x: torch.Tensor) -> torch.Tensor:
            out = []
            for i, rows in enumerate(x.split(seed.sizes)):
                _set_rng_state(states[i])
                out.append(forward(rows))
                states[i] = _rng_state()
            return torch.cat(out)
        return each_chunk

    for m in drops:
        m.forward = chunked(m.forward)  # an instance attribute over the class's method, until the end
    try:
        yield
    finally:
        for m in drops:
            del m.forward


def batch_seed(seed: int, rnd: int, step: int, client: int, part: Part) -> int:
    """The RNG seed for one part's forward of one client's batch.

    Seeding each (round, step, client, part) forward makes dropout masks independent of arrival
    order, of which rank runs the part and of recomputation: the split server, its replicas and the
    single-process baseline all draw the same masks.
    """
    h = seed
    for v in (rnd, step, client, part):
        h = (h * 1_000_003 + v + 1) % (2**61 - 1)
    return h

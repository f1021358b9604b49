"""torch's eager paths without the lazy imports of its compiler stack: the same kernels, the same
bits, a job's start seconds shorter. mpi_sfl never runs torch.compile, so nothing here changes what
it computes; it only keeps each rank from importing what torch.compile needs.

`SGD`: torch.optim.SGD without the torch.compile hooks.

In torch 2.x, `Optimizer.add_param_group`, `zero_grad`, `state_dict` and `load_state_dict` are
wrapped by `torch._disable_dynamo` (torch/_compile.py), which imports `torch._dynamo` on its first
call, and `SGD.step` by `_use_grad_for_differentiable` (torch/optim/optimizer.py), which imports it
and calls `torch._dynamo.graph_break()` around every step. Importing torch._dynamo (with sympy,
torch.fx, torch.distributed...) costs about 1.2 s of CPU per process; a job's every training rank
paid it when it built its first optimizer, four processes on two cores. The wrappers only matter
when torch.compile traces the optimizer, which mpi_sfl never does.

`SGD` here is `torch.optim.SGD` with those five methods calling the eager functions the wrappers
wrap (each wrapper keeps it as `__wrapped__`, functools.wraps), and `step` run under
`torch.set_grad_enabled(defaults["differentiable"])` as `_use_grad` does, minus its graph breaks:
the same kernels in the same order, so the same bits, and the same `state_dict`. It is still a
`torch.optim.SGD` (isinstance, step hooks, the profiler's record_function). Where a torch version
has no `__wrapped__` on a method, that method is torch's own (correct, only slower to start).
Nothing in torch is patched.

`backward(out, grad)` and `grad(out, inputs, grad_out)`: `out.backward(grad)` and
`torch.autograd.grad(out, inputs, grad_outputs=grad_out)` for one plain tensor `out` (what a
client does with dl/dh and the split server with dl/dz). torch.autograd's Python front
(`_make_grads`) imports torch.fx.experimental.symbolic_shapes, and with it sympy (about 0.45 s of
CPU per process), to compare the gradient's shape with the output's, which may be symbolic under
torch.compile. Here the shapes are compared as plain tuples, and the same C++ engine call follows
(torch.autograd.graph._engine_run_backward, with the arguments torch.autograd passes). Without that
function (another torch version) they are torch.autograd's own calls.
"""
from __future__ import annotations

import inspect

import torch


def _eager(fn):
    """The function under torch's wrappers (functools.wraps' __wrapped__ chain); `fn` if none."""
    return inspect.unwrap(fn)


_Opt = torch.optim.Optimizer
_ADD_PARAM_GROUP = _eager(_Opt.add_param_group)
_ZERO_GRAD = _eager(_Opt.zero_grad)
_STATE_DICT = _eager(_Opt.state_dict)
_LOAD_STATE_DICT = _eager(_Opt.load_state_dict)
# torch.optim.SGD.step may carry the profiler's hook too (once an SGD was built): unwrapped through
# both. Nothing to unwrap: the method runs as torch's own (its own grad mode, if any).
_STEP = _eager(torch.optim.SGD.step)
_STEP_UNWRAPPED = _STEP is not torch.optim.SGD.step


class SGD(torch.optim.SGD):
    __doc__ = __doc__

    def add_param_group(self, param_group: dict) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def step(self, closure=None):
        if not _STEP_UNWRAPPED:
            return _STEP(self, closure)
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return _STEP(self, closure)
        finally:
            torch.set_grad_enabled(prev)


_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def _check(out: torch.Tensor, grad_out: torch.Tensor) -> None:
    if out.shape != grad_out.shape:  # what torch.autograd checks, with plain sizes
        raise RuntimeError(f"Mismatch in shape: grad_output has a shape of {tuple(grad_out.shape)} "
                           f"and output has a shape of {tuple(out.shape)}")
    if out.dtype.is_complex != grad_out.dtype.is_complex:
        raise RuntimeError("For complex Tensors, both grad_output and output are required to have the same dtype")


def backward(out: torch.Tensor, grad_out: torch.Tensor) -> None:
    """`out.backward(grad_out)`: accumulate into the leaves' .grad."""
    if _ENGINE is None:
        out.backward(grad_out)
        return
    _check(out, grad_out)
    _ENGINE((out,), (grad_out,), False, False, (), allow_unreachable=True, accumulate_grad=True)


def grad(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`torch.autograd.grad(out, inputs, grad_outputs=grad_out)`."""
    if _ENGINE is None:
        return torch.autograd.grad(out, inputs, grad_outputs=grad_out)
    if not inputs:
        raise RuntimeError("`inputs` argument to `grad()` cannot be empty.")
    _check(out, grad_out)
    return _ENGINE((out,), (grad_out,), False, False, tuple(inputs), False, accumulate_grad=False)

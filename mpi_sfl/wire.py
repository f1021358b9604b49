"""sfl.wire_dtype: the form activations and gradients take on the wire (float32, float16,
bfloat16, or int8 with a float32 scale per row); the transport packs and unpacks with it, and the
baseline rounds with it to emulate the trip."""
from __future__ import annotations

import numpy as np
import torch


class Wire:
    """sfl.wire_dtype: how activations and gradients travel; compute stays float32.

    float32 as is; float16 / bfloat16 rounded to nearest; int8 per row (sample): a float32 scale
    s = max|row| / 127 and round(x / s) in [-127, 127], packed as [scales (rows x float32), values
    (int8)] and announced with dtype int8 and the tensor's own shape. `round(x)` is what arrives.
    """

    def __init__(self, fmt: str = "float32"):
        self.fmt = fmt
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                      "int8": torch.int8}[fmt]

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """The wire form of a float32 tensor (contiguous), on its own device: a GPU narrows before the
        copy to the host. Every division is by a tensor of the same shape: CUDA divides by a scalar
        through its reciprocal, which can differ from the CPU's quotient by an ulp; elementwise float32
        division is correctly rounded on both, so a scale has the same bits wherever it is packed."""
        if self.fmt == "float32" or t.dtype != torch.float32 or not t.numel():
            return t
        if self.fmt != "int8":
            return t.to(self.dtype)
        rows = t.reshape(len(t), -1) if t.dim() else t.reshape(1, 1)
        top = rows.abs().amax(dim=1)
        scale = top / torch.full_like(top, 127.0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([scale.view(torch.uint8), q.reshape(-1).view(torch.uint8)]).view(torch.int8)

    @staticmethod
    def payload_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The buffer a payload of `dtype` and tensor `shape` arrives in."""
        if dtype != torch.int8:
            return shape
        rows = shape[0] if shape else 1
        return (rows * 4 + int(np.prod(shape)),)

    @staticmethod
    def unpack(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A received payload back in float32 (a new tensor); other dtypes pass through."""
        if dtype in (torch.float16, torch.bfloat16):
            return buf.float()
        if dtype != torch.int8:
            return buf
        rows = shape[0] if shape else 1
        raw = buf.view(torch.uint8)
        scale = raw[:rows * 4].view(torch.float32)
        q = raw[rows * 4:].view(torch.int8).reshape(rows, -1)
        return (q.float() * scale[:, None]).reshape(shape)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """What a float32 tensor becomes after the trip (the baseline's emulation of the wire)."""
        if self.fmt == "float32":
            return x
        return self.unpack(self.pack(x.detach().contiguous()), self.dtype, tuple(x.shape))

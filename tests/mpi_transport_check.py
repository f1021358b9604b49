"""Run under mpiexec -n 2: round-trips tensors of several dtypes and shapes through Transport, with
payloads inside the header's message (up to INLINE_BYTES) and after it."""
import sys

import torch
from mpi4py import MPI

from mpi_sfl.transport import ACT, INLINE_BYTES, OUT, Transport

comm = MPI.COMM_WORLD
t = Transport(comm, torch.device("cpu"))
cases = [torch.randn(3, 5), torch.arange(12).reshape(3, 4), torch.randn(2, 3, 4, 5).to(torch.bfloat16),
         torch.randn(6, 4).t(), torch.randn(1000, 1000), torch.randn(7).half(),
         torch.randn(INLINE_BYTES // 4), torch.randn(INLINE_BYTES // 4 + 1), torch.zeros(0, 3),
         torch.randint(-9, 9, (INLINE_BYTES // 8,), dtype=torch.int64)]
if comm.rank == 0:
    for i, x in enumerate(cases):
        t.isend(x, 1, ACT, 0, i, 42)
        t.wait_sends()
        header, back = t.recv(1, OUT)
        if (header.inline is not None) != (x.numel() * x.element_size() <= INLINE_BYTES):
            print(f"case {i}: inline is {header.inline is not None}", flush=True)
            sys.exit(1)
        if not (back.dtype == x.dtype and torch.equal(back, x.contiguous())) or header.step != i:
            print(f"MISMATCH case {i}", flush=True)
            sys.exit(1)
    print(f"OK {len(cases)} bytes_sent={t.bytes_sent}", flush=True)
else:
    for i in range(len(cases)):
        header, x = t.recv(0, ACT)
        assert header.client == 42
        t.isend(x.clone(), 0, OUT, 0, i, 42)
        t.wait_sends()

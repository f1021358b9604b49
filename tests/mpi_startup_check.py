"""Run under mpiexec -n 4 python -m mpi4py: which of torch's compiler modules a run imports.

Usage: mpi_startup_check.py OUT_DIR

A tiny training job (with momentum, a final checkpoint); then rank 0, which builds no optimizer in
training, runs the baseline on the same data, and last round-trips an optimizer's state_dict and
compares eager.SGD's bits with torch.optim.SGD's (which imports torch._dynamo: checked before it).
Rank 0 prints one line, LOADED <json>: per rank, per stage, the compiler modules it had imported.
"""
import json
import sys

import torch
from mpi4py import MPI

from mpi_sfl import baseline, config, eager, train

HEAVY = ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes", "sympy")
SETTINGS = ['data.dataset="synthetic"', "data.train_samples=240", "data.test_samples=100", "train.rounds=1",
            "train.batch_size=16", "train.momentum=0.9", "train.clients=4", 'run.progress="none"', "run.threads=1"]


def loaded() -> list[str]:
    return [m for m in HEAVY if m in sys.modules]


def steps(opt_class) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = opt_class(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        h = m[0](torch.randn(4, 6))
        eager.backward(h, torch.randn(4, 5))  # a gradient from elsewhere, as a client's encoder gets
        opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.step()
    return opt.state_dict(), m


out = sys.argv[1]
comm = MPI.COMM_WORLD
train.main(None, SETTINGS + [f'run.out_dir="{out}/sfl"'])
stages = {"train": loaded()}
if comm.rank == 0:
    baseline.run(config.load(None, SETTINGS + [f'run.out_dir="{out}/baseline"']))
    stages["baseline"] = loaded()
    mine, m1 = steps(eager.SGD)
    stages["state_dict"] = loaded()
    theirs, m2 = steps(torch.optim.SGD)
    stages["same_bits"] = (all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
                           and mine["param_groups"] == theirs["param_groups"]
                           and all(torch.equal(mine["state"][k]["momentum_buffer"], theirs["state"][k]["momentum_buffer"])
                                   for k in theirs["state"]))
rows = comm.gather(stages, root=0)
if comm.rank == 0:
    print("LOADED " + json.dumps(rows), flush=True)

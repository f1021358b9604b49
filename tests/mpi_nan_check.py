"""A prelude for a warm launch (benchmarks/_warm.py; test_resilience.py's `nonfinite` jobs): from
here on, logical client 0's batch in round 2, step 3 is NaN, in every job the launch runs after it."""
import torch

from mpi_sfl import client

real_batch = client.ClientRank.batch


def poisoned_batch(self, plan, cid, step):
    x, y = real_batch(self, plan, cid, step)
    if plan.rnd == 1 and step == 2 and cid == 0:
        x = torch.full_like(x, float("nan"))
    return x, y


client.ClientRank.batch = poisoned_batch

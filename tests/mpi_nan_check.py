"""Run under mpiexec -n 4 python -m mpi4py: logical client 0's batch in round 2, step 3 is NaN.

Usage: mpi_nan_check.py OUT_DIR stop|skip [SETTING ...]   (train.on_nonfinite, then more config settings)
"""
import sys

import torch

from mpi_sfl import client, train

real_batch = client.ClientRank.batch


def poisoned_batch(self, plan, cid, step):
    x, y = real_batch(self, plan, cid, step)
    if plan.rnd == 1 and step == 2 and cid == 0:
        x = torch.full_like(x, float("nan"))
    return x, y


client.ClientRank.batch = poisoned_batch
out, mode = sys.argv[1], sys.argv[2]
train.main(None, ['data.dataset="synthetic"', "data.train_samples=960", "data.test_samples=100",
                  "train.rounds=3", "train.batch_size=16", "train.clients=3", 'run.progress="none"',
                  "run.threads=1", f'train.on_nonfinite="{mode}"', f'run.out_dir="{out}"'] + sys.argv[3:])

"""Run under mpiexec -n 4 python -m mpi4py: the first client rank raises in round 3, step 3.

The job must end (not hang), and the round already finished must be on disk.
Usage: mpi_crash_check.py OUT_DIR SCRATCH_DIR
"""
import sys

from mpi4py import MPI

from mpi_sfl import client, train

real_step = client.ClientRank.split_step


def failing_step(self, active, plan, step):
    if plan.rnd == 2 and step == 2 and self.job.rank == self.job.layout.client_ranks[0]:
        raise RuntimeError("injected failure on a client rank")
    return real_step(self, active, plan, step)


client.ClientRank.split_step = failing_step
out, scratch = sys.argv[1], sys.argv[2]
train.main(None, ['data.dataset="synthetic"', "data.train_samples=480", "data.test_samples=100",
                  "train.rounds=3", "train.batch_size=16", "train.clients=3", 'run.progress="none"',
                  f'run.out_dir="{out}"', f'run.scratch_dir="{scratch}"'])
print("NOT REACHED", MPI.COMM_WORLD.rank)

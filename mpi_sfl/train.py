"""`mpi-sfl train`: set up on every rank, then hand each rank to its role.

    mpiexec -n 4 python -m mpi4py -m mpi_sfl train [CONFIG.toml] [--set section.key=value ...]

Set-up (config, layout, data, scratch) is collective and fails together: one clear message from
rank 0, exit code 2 on every rank, no hang.
"""
from __future__ import annotations

import os

from mpi4py import MPI

from . import client, config, data, fed_server, outdir, split_server
from .errors import fail_together
from .job import Job
from .layout import CLIENT, FED, SERVER, Layout, check_launch, local_rank, pick_device, set_threads
from .outputs import space_needed
from .state import make_scratch
from .transport import polite_wait, set_wait_mode


def main(cfg_path: str | None, overrides: list[str], comm: MPI.Comm | None = None, start: str = "new") -> None:
    """Train on `comm` (default COMM_WORLD; a sub-communicator runs several jobs in one launch).

    `start` says what to do with run.out_dir (outdir.prepare): "new" refuses an earlier run's
    results, "resume" continues from its checkpoint, "overwrite" replaces them. Rank 0 holds the
    directory's lock from set-up until every rank is done, and gives it back on every way out
    (a set-up error's exit included).
    """
    held: list[str] = []  # the out_dir rank 0 locked, once it has
    try:
        _run(cfg_path, overrides, comm or MPI.COMM_WORLD, start, held)
    finally:
        for out in held:
            outdir.release(out)


def _run(cfg_path: str | None, overrides: list[str], comm: MPI.Comm, start: str, held: list[str]) -> None:
    local, local_size = local_rank(comm)

    def setup():
        check_launch(comm.size)
        cfg = config.load(cfg_path, overrides)
        layout = Layout.from_config(cfg, comm.size)
        cfg = cfg.replace("train", clients=layout.clients)  # resolved: the written config.toml reruns as is
        if comm.rank == 0:  # checked, created and locked before any work; nothing is written on failure
            outdir.prepare(cfg.run.out_dir, start, space_needed(cfg))
            held.append(cfg.run.out_dir)
        return cfg, layout

    cfg, layout = fail_together(comm, setup)
    set_wait_mode(cfg.run.wait, local_size > len(os.sched_getaffinity(0)))
    role = layout.role(comm.rank)
    # Rank 0 finds (and if need be downloads) the data first, so ranks never race on the cache.
    fail_together(comm, lambda: data.locate_fashion_mnist(cfg.data.dir)
                  if comm.rank == 0 and cfg.data.dataset == "fashion-mnist" else None)

    def load():
        device = pick_device(cfg.run.device, local)
        set_threads(cfg.run.threads, local_size)
        labels = data.load(cfg, "train", labels_only=True).y.numpy()
        shards = data.partition(labels, layout.clients, cfg)
        if role == CLIENT:
            resource = data.load(cfg, "train")
        elif role == FED:
            resource = data.load(cfg, "test")
        elif cfg.sfl.state == "file":
            resource = make_scratch(cfg.run.scratch_dir, f"{os.environ.get('SLURM_JOB_ID', 'local')}-r{comm.rank}")
        else:
            resource = None
        return device, shards, resource

    device, shards, resource = fail_together(comm, load)
    job = Job(cfg, layout, comm, device, shards)
    # Each role gets what only it uses: clients the training set, the fed server the test set, a
    # split server its scratch dir (file state).
    {FED: fed_server.run, SERVER: split_server.run, CLIENT: client.run}[role](job, resource)
    polite_wait(comm.Ibarrier())  # nobody exits before rank 0 has written the results

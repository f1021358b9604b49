"""jobs/train.sbatch under a stand-in Slurm: the time-limit signal ends in a checkpoint and a
requeue, and the requeued run continues with --resume by itself; a lost node ends in a relaunch
on the nodes left, which resumes on fewer ranks.

`srun` is replaced by a script that runs mpiexec with its --ntasks, `sinfo` by one that lists the
allocation's nodes (one marked down once the test says so) and `scontrol` by one that records its
arguments; the batch script itself runs unchanged except for its settings line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MPIEXEC, REPO, env, metrics, mpirun, ok, sets
from test_resilience import distance, has_rows, pids, wait_for

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

SETTINGS = ('--set train.rounds=8 --set data.dataset=\\"synthetic\\" --set data.train_samples=960 '
            '--set train.clients=3 --set run.progress=\\"none\\"')


def stand_in_slurm(tmp_path: Path, settings: str, nodes: int, per_node: int) -> tuple[Path, dict]:
    """The batch script with `settings`, and the environment of a stand-in Slurm allocation of
    `nodes` nodes with `per_node` tasks each (node 2 reports down once tmp_path/down exists)."""
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    bin_dir.mkdir()
    submit.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#--ntasks=};; esac; '
                                  f'shift; done\necho "$n" >> {tmp_path}/srun.log\nexec {MPIEXEC} -n "$n" "$@"\n')
    (bin_dir / "sinfo").write_text('#!/bin/bash\n' + "".join(
        f'if [ {i} -gt 1 ] && [ -f {tmp_path}/down ]; then echo "n{i} down*"; else echo "n{i} alloc"; fi\n'
        for i in range(1, nodes + 1)))
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    script = (REPO / "jobs" / "train.sbatch").read_text().replace('SETTINGS="--set train.rounds=6"',
                                                                  f'SETTINGS="{settings}"')
    assert settings in script
    (tmp_path / "job.sh").write_text(script)
    return submit, env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_ID="77",
                       SLURM_CPUS_PER_TASK="1", SLURM_JOB_NODELIST=f"n[1-{nodes}]", SLURM_NTASKS_PER_NODE=str(per_node))


def test_train_sbatch_checkpoints_requeues_and_resumes(tmp_path):
    submit, job_env = stand_in_slurm(tmp_path, SETTINGS, 1, 3)
    out = submit / "runs" / "train-77"
    first = subprocess.Popen(["bash", str(tmp_path / "job.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=job_env, cwd=submit)
    try:
        wait_for(has_rows(out), 90, first)
        first.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
        log, _ = first.communicate(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 3, log[-3000:]
    assert "stopped by SIGUSR1" in log and (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) < 8
    again = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=job_env,
                           cwd=submit, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8 and (out / "summary.json").is_file()


LOST_SETTINGS = ["train.rounds=4", 'data.dataset="synthetic"', "data.train_samples=960", "train.clients=4",
                 "train.momentum=0.9", 'run.progress="none"']
LOST = " ".join("--set " + item.replace('"', '\\"') for item in LOST_SETTINGS)  # as the script's SETTINGS line


def test_train_sbatch_relaunches_on_the_nodes_left_after_a_lost_rank(tmp_path):
    """2 nodes x 3 ranks; after the first round's checkpoint node 2 goes down and a client rank is
    SIGKILLed: the script logs the failed step and relaunches on 1 node (3 ranks) with --resume,
    which continues from the round boundary on the smaller layout and finishes all 4 rounds. Its
    model is within the bound of the uninterrupted runs: twice what the uninterrupted 6-rank and
    3-rank runs differ by (float32 sums grouped by rank; test_resilience derives it)."""
    submit, job_env = stand_in_slurm(tmp_path, LOST, 2, 3)
    out = submit / "runs" / "train-77"
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=job_env, cwd=submit)
    try:
        wait_for(lambda: (out / "checkpoint" / "meta.json").is_file(), 120, job)
        (tmp_path / "down").touch()
        os.kill(pids(out)[3][1], signal.SIGKILL)  # a client rank on the lost node
        log, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, log[-4000:]
    assert (tmp_path / "srun.log").read_text().split() == ["6", "3"]
    assert "relaunch 1 of 3 from the last checkpoint" in log and "launching 3 ranks on 1 node(s): n1 (--resume)" in log
    assert [r["round"] for r in metrics(out)] == [0, 1, 2, 3]
    straight = {}
    for n in (6, 3):
        straight[n] = tmp_path / f"straight{n}"
        ok(mpirun(n, "train", *sets(LOST_SETTINGS + [f'run.out_dir="{straight[n]}"'])))
    bound = 2 * distance(straight[6], straight[3])
    assert distance(out, straight[6]) <= bound, (distance(out, straight[6]), bound)

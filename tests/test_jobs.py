"""jobs/train.sbatch under a stand-in Slurm: the time-limit signal ends in a checkpoint and a
requeue, and the requeued run continues with --resume by itself.

`srun` is replaced by a script that runs mpiexec -n 3 and `scontrol` by one that records its
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

from conftest import MPIEXEC, REPO, env
from test_resilience import has_rows, wait_for

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

SETTINGS = ('--set train.rounds=8 --set data.dataset=\\"synthetic\\" --set data.train_samples=960 '
            '--set train.clients=3 --set run.progress=\\"none\\"')


def test_train_sbatch_checkpoints_requeues_and_resumes(tmp_path):
    bin_dir, submit = tmp_path / "bin", tmp_path / "submit"
    bin_dir.mkdir()
    submit.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nshift\nexec {MPIEXEC} -n 3 "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {tmp_path}/scontrol.log\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    script = (REPO / "jobs" / "train.sbatch").read_text().replace('SETTINGS="--set train.rounds=6"',
                                                                  f'SETTINGS="{SETTINGS}"')
    assert SETTINGS in script
    (tmp_path / "job.sh").write_text(script)
    job_env = env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(submit), SLURM_JOB_ID="77",
                  SLURM_CPUS_PER_TASK="1")
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

"""Mistakes end the job at once: exit 2, one clear message, no traceback, no hang."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from conftest import TINY, mpirun, sets
from mpi_sfl import data


def run_fails(where: Path, ranks: int, *args: str, words: str, extra_env: dict | None = None):
    """The job in `where` (a test's tmp_path): out_dir there, not ./runs/default (which a `make run`
    fills), and so is the split server's scratch; a job refused at set-up leaves neither behind."""
    t0 = time.monotonic()
    scratch = where / "scratch"
    scratch.mkdir(exist_ok=True)
    args = (*args, "--set", f'run.out_dir="{where}/out"', "--set", f'run.scratch_dir="{scratch}"')
    proc = mpirun(ranks, "train", *args, timeout=60, extra_env=extra_env)
    assert not (where / "out").exists() and os.listdir(scratch) == [], (os.listdir(where), os.listdir(scratch))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert words in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 40
    return proc


def test_a_bad_command_line_is_said_once_per_job(tmp_path):
    """argparse's refusal, said by rank 0 alone in one line (not a usage block from every rank)."""
    proc = run_fails(tmp_path, 2, "--resume", "--overwrite", words="argument --overwrite: not allowed with argument --resume")
    assert "usage:" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_unknown_key(tmp_path):
    run_fails(tmp_path, 4, "--set", "train.lerning_rate=0.1", words="unknown config key 'train.lerning_rate'")


def test_wrong_world_size(tmp_path):
    run_fails(tmp_path, 2, *sets(TINY), words="run with mpiexec -n 3 or more")
    run_fails(tmp_path, 5, *sets(TINY + ["train.clients=2"]), words="run with mpiexec -n 4 or raise train.clients")


def test_missing_dataset(tmp_path):
    run_fails(tmp_path, 4, "--set", f'data.dir="{tmp_path}"', "--set", "train.rounds=1",
              words=f"data.dir = '{tmp_path}' lacks")


def test_corrupt_data_file(tmp_path):
    src = data.locate_fashion_mnist("")
    for name in data.FILES:
        shutil.copy(data._find_file(src, name), tmp_path)
    victim = tmp_path / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:100000])
    run_fails(tmp_path, 4, "--set", f'data.dir="{tmp_path}"', "--set", "train.rounds=1",
              words=f"data file {victim} is truncated or corrupt")


def test_too_many_clients_for_the_data(tmp_path):
    run_fails(tmp_path, 4, *sets(TINY + ["train.clients=500"]), words="train.clients = 500 exceeds the 240")


def test_bad_config_file(tmp_path):
    """Not TOML at all (a binary file): one line naming it from rank 0, exit 2 on every rank. (A
    wrong value in a valid file, invalid TOML, other encodings: tests/test_config.py, in-process.)"""
    bad = tmp_path / "bad.toml"
    bad.write_bytes(bytes(range(256)))
    run_fails(tmp_path, 2, str(bad), words=f"config file '{bad}' is not a TOML file")


def test_srun_singletons_are_refused(tmp_path):
    """What srun without PMI looks like from inside: Slurm says 3 tasks, MPI sees another size."""
    run_fails(tmp_path, 4, *sets(TINY), words="MPI sees 4 rank(s) but Slurm started 3 tasks",
              extra_env={"SLURM_NTASKS": "3", "SLURM_PROCID": "0"})


def test_variant_combinations_that_make_no_sense(tmp_path):
    run_fails(tmp_path, 4, *sets(TINY + ["sfl.variant=\"fl\""]), words="set sfl.servers = 0")
    run_fails(tmp_path, 3, *sets(TINY + ["sfl.servers=0"]), words="sfl.servers = 0 is only for sfl.variant = 'fl'")
    run_fails(tmp_path, 5, *sets(TINY + ["sfl.variant=\"v2\"", "sfl.servers=2"]), words="set sfl.servers = 1")
    run_fails(tmp_path, 4, *sets(TINY + ["sfl.variant=\"sl\"", "train.clients_per_round=1"]),
              words="sfl.variant = 'sl' relays one model")
    run_fails(tmp_path, 4, *sets(TINY + ["train.clients=3", "train.clients_per_round=5"]),
              words="train.clients_per_round = 5 exceeds")
    run_fails(tmp_path, 5, *sets(TINY + ["sfl.servers=3"]), words="would leave servers idle")

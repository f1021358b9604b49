"""Mistakes end the job at once: exit 2, one clear message, no traceback, no hang.

Every refused job is a real mpiexec job. They are all made in the module's `refused` fixture and
run there, those with the same -n (and environment) one after another in one launch
(conftest.mpijobs: each job's exit code, stdout and stderr are its own); each test checks its own.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import TINY, mpijobs, private_tmpdir, sets
from mpi_sfl import sources

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

SRUN = {"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}  # what srun without PMI looks like from inside


def jobs(tmp: Path) -> dict[str, tuple[int, dict, list[str]]]:
    """name -> (ranks, extra environment, the job's arguments), each job with its own directory
    tmp/name (made here) for the files it reads."""
    for name in ("missing", "corrupt", "bad_config"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    src = sources.locate_fashion_mnist("")
    for name in sources.FILES:
        shutil.copy(sources._find_file(src, name), tmp / "corrupt")
    victim = tmp / "corrupt" / "train-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:100000])
    (tmp / "bad_config" / "bad.toml").write_bytes(bytes(range(256)))
    return {
        "command_line": (2, {}, ["--resume", "--overwrite"]),
        "unknown_key": (4, {}, ["--set", "train.lerning_rate=0.1"]),
        "world_too_small": (2, {}, sets(TINY)),
        "world_too_large": (5, {}, sets(TINY + ["train.clients=2"])),
        "missing": (4, {}, ["--set", f'data.dir="{tmp / "missing"}"', "--set", "train.rounds=1"]),
        "corrupt": (4, {}, ["--set", f'data.dir="{tmp / "corrupt"}"', "--set", "train.rounds=1"]),
        "too_many_clients": (4, {}, sets(TINY + ["train.clients=500"])),
        "bad_config": (2, {}, [str(tmp / "bad_config" / "bad.toml")]),
        "srun": (4, SRUN, sets(TINY)),
        "fl_with_servers": (4, {}, sets(TINY + ["sfl.variant=\"fl\""])),
        "servers_0_not_fl": (3, {}, sets(TINY + ["sfl.servers=0"])),
        "v2_two_servers": (5, {}, sets(TINY + ["sfl.variant=\"v2\"", "sfl.servers=2"])),
        "sl_sampling": (4, {}, sets(TINY + ["sfl.variant=\"sl\"", "train.clients_per_round=1"])),
        "sampling_too_many": (4, {}, sets(TINY + ["train.clients=3", "train.clients_per_round=5"])),
        "idle_servers": (5, {}, sets(TINY + ["sfl.servers=3"])),
    }


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every job of `jobs`, run; name -> (its directory, CompletedProcess). out_dir and the split
    server's scratch are in its directory, not ./runs/default (which a `make run` fills); a job
    refused at set-up leaves neither behind."""
    with private_tmpdir(tmp_path_factory) as tmp:
        table = jobs(tmp)
        groups: dict[tuple, list[str]] = {}
        for name, (ranks, env, _) in table.items():
            groups.setdefault((ranks, tuple(env.items())), []).append(name)
        done = {}
        for (ranks, env), names in groups.items():
            argvs = []
            for name in names:
                where = tmp / name
                (where / "scratch").mkdir(parents=True, exist_ok=True)
                argvs.append(["train", *table[name][2], "--set", f'run.out_dir="{where}/out"',
                              "--set", f'run.scratch_dir="{where / "scratch"}"'])
            for name, proc in zip(names, mpijobs(ranks, *argvs, extra_env=dict(env))):
                done[name] = (tmp / name, proc)
        return done


def run_fails(refused: dict, name: str, words: str):
    where, proc = refused[name]
    scratch = where / "scratch"
    assert not (where / "out").exists() and os.listdir(scratch) == [], (os.listdir(where), os.listdir(scratch))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert words in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    assert proc.seconds < 40
    return proc


def test_a_bad_command_line_is_said_once_per_job(refused):
    """argparse's refusal, said by rank 0 alone in one line (not a usage block from every rank)."""
    proc = run_fails(refused, "command_line", words="argument --overwrite: not allowed with argument --resume")
    assert "usage:" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_unknown_key(refused):
    run_fails(refused, "unknown_key", words="unknown config key 'train.lerning_rate'")


def test_wrong_world_size(refused):
    run_fails(refused, "world_too_small", words="run with mpiexec -n 3 or more")
    run_fails(refused, "world_too_large", words="run with mpiexec -n 4 or raise train.clients")


def test_missing_dataset(refused):
    run_fails(refused, "missing", words=f"data.dir = '{refused['missing'][0]}' lacks")


def test_corrupt_data_file(refused):
    victim = refused["corrupt"][0] / "train-images-idx3-ubyte.gz"
    run_fails(refused, "corrupt", words=f"data file {victim} is truncated or corrupt")


def test_too_many_clients_for_the_data(refused):
    run_fails(refused, "too_many_clients", words="train.clients = 500 exceeds the 240")


def test_bad_config_file(refused):
    """Not TOML at all (a binary file): one line naming it from rank 0, exit 2 on every rank. (A
    wrong value in a valid file, invalid TOML, other encodings: tests/test_config.py, in-process.)"""
    bad = refused["bad_config"][0] / "bad.toml"
    run_fails(refused, "bad_config", words=f"config file '{bad}' is not a TOML file")


def test_srun_singletons_are_refused(refused):
    """What srun without PMI looks like from inside: Slurm says 3 tasks, MPI sees another size."""
    run_fails(refused, "srun", words="MPI sees 4 rank(s) but Slurm started 3 tasks")


def test_variant_combinations_that_make_no_sense(refused):
    run_fails(refused, "fl_with_servers", words="set sfl.servers = 0")
    run_fails(refused, "servers_0_not_fl", words="sfl.servers = 0 is only for sfl.variant = 'fl'")
    run_fails(refused, "v2_two_servers", words="set sfl.servers = 1")
    run_fails(refused, "sl_sampling", words="sfl.variant = 'sl' relays one model")
    run_fails(refused, "sampling_too_many", words="train.clients_per_round = 5 exceeds")
    run_fails(refused, "idle_servers", words="would leave servers idle")


def test_help_is_printed_once_per_job():
    """--help under mpiexec: the usage once (rank 0's), not once per rank; exit 0."""
    for proc in mpijobs(3, ["--help"], ["train", "--help"]):
        assert proc.returncode == 0 and proc.stdout.count("usage: mpi-sfl") == 1, proc.stdout
        assert "--set SECTION.KEY=VALUE" in proc.stdout or "{train,baseline,plot,checkpoint,status}" in proc.stdout

"""Output directories that cannot lose results (mpi_sfl/outdir.py): refusals, the lock, overwrite
that removes only our files, atomic writes, strict JSON; then a few real jobs through mpiexec."""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import TINY, mpijobs, mpirun, ok, sets
from mpi_sfl import config, outdir
from mpi_sfl.errors import UserError
from mpi_sfl.outdir import atomic_torch_save, atomic_write, prepare, release, strict_json
from mpi_sfl.outputs import RunWriter

HOST = socket.gethostname()


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m", read_only: bool = False):
    """A tiny tmpfs mounted at `where` (the tests run as root), unmounted afterwards whatever happens."""
    where.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def lock_of(out: Path) -> list[str]:
    return (out / ".lock").read_text().split()


# -- refusals -------------------------------------------------------------------------------------
def test_a_regular_file_is_refused(tmp_path):
    f = tmp_path / "results"
    f.write_text("not a directory")
    with pytest.raises(UserError, match=rf"output directory {f} is a regular file; set run.out_dir"):
        prepare(str(f), "new")
    with pytest.raises(UserError, match=rf"{f / 'a' / 'b'} lies under {f}, which is a regular file"):
        prepare(str(f / "a" / "b"), "overwrite")
    assert f.read_text() == "not a directory" and os.listdir(tmp_path) == ["results"]


@pytest.mark.parametrize("path, words", [
    ("/proc/mpi_sfl_out", "cannot create output directory /proc/mpi_sfl_out (No such file or directory)"),
    ("/proc", "cannot write in output directory /proc ("),
    ("/sys/mpi_sfl_out", "cannot create output directory /sys/mpi_sfl_out (Operation not permitted)"),
    ("/sys/kernel", "cannot write in output directory /sys/kernel (Permission denied)"),
])
def test_places_even_root_cannot_write_are_refused(path, words):
    with pytest.raises(UserError) as exc:
        prepare(path, "new")
    assert words in str(exc.value) and "set run.out_dir" in str(exc.value)
    assert not Path("/proc/mpi_sfl_out").exists() and not Path("/sys/mpi_sfl_out").exists()


def test_a_read_only_file_system_is_refused(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(UserError, match=r"cannot create output directory .*/ro/out \(Read-only file system\)"):
            prepare(str(ro / "out"), "new")
        with pytest.raises(UserError, match=r"cannot write in output directory .*/ro \(Read-only file system\)"):
            prepare(str(ro), "overwrite")


def test_too_little_space_is_refused_and_nothing_is_left(tmp_path):
    with tmpfs(tmp_path / "small") as small:
        with pytest.raises(UserError, match=r"has 1\.0 MiB free, the run needs about 1024\.0 MiB"):
            prepare(str(small / "a" / "out"), "new", need_bytes=2**30)
        assert os.listdir(small) == []  # the dirs it made are gone again
        assert prepare(str(small / "out"), "new", need_bytes=2**19) == small / "out"
        release(small / "out")


def test_nothing_is_left_when_prepare_fails_on_a_dir_it_created(tmp_path):
    with pytest.raises(UserError, match=rf"nothing to resume in {tmp_path / 'a' / 'b'} \(no checkpoint\)"):
        prepare(str(tmp_path / "a" / "b"), "resume")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()  # a directory the user made is never removed
    with pytest.raises(UserError, match="nothing to resume"):
        prepare(str(tmp_path / "mine"), "resume")
    assert os.listdir(tmp_path) == ["mine"] and os.listdir(tmp_path / "mine") == []


def test_release_removes_an_unused_dir_prepare_created(tmp_path):
    """A set-up step after prepare failed (data missing): the job leaves no empty out_dir behind."""
    out = tmp_path / "new" / "out"
    prepare(str(out), "new")
    assert lock_of(out)[:2] == [HOST, str(os.getpid())]
    release(out)
    assert os.listdir(tmp_path) == []
    release(out)  # twice is harmless


# -- earlier results: new, overwrite, resume ----------------------------------------------------------
OURS = ["config.toml", "metrics.jsonl", "summary.json", "model.pt", "model.pt.tmp", "curves.png", "ranks.tsv",
        "partition.json", "partition.png", "model.pt.tmp-123", "metrics.jsonl.tmp-9", "checkpoint/meta.json", "checkpoint.old/meta.json",
        "checkpoint.tmp-4/part"]
THEIRS = ["notes.txt", "metrics.jsonl.bak", "data/model.pt", "checkpoints/meta.json", "old/summary.json"]


def populate(out: Path, names: list[str]) -> None:
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)


@pytest.mark.parametrize("marker", ["metrics.jsonl", "summary.json", "model.pt", "checkpoint/x"])
def test_earlier_results_are_refused_in_a_new_run(tmp_path, marker):
    populate(tmp_path, [marker, "config.toml"])
    with pytest.raises(UserError) as exc:
        prepare(str(tmp_path), "new")
    assert str(exc.value).startswith(f"{tmp_path} holds the results of an earlier run")
    assert "pass --resume to continue it or --overwrite to replace them (or set run.out_dir)" in str(exc.value)
    assert (tmp_path / marker).read_text() == marker and not (tmp_path / ".lock").exists()


SFL_RUN = {"config.toml": "", "partition.json": "{}", "ranks.tsv": "", "metrics.jsonl": "", "model.pt": "",
           "checkpoint/meta.json": "{}", "summary.json": '{"mode": "sfl"}'}
BASELINE_RUN = {"config.toml": "", "metrics.jsonl": "", "model.pt": "", "summary.json": '{"mode": "baseline"}'}


@pytest.mark.parametrize("files, sfl", [
    (BASELINE_RUN, False),
    ({"metrics.jsonl": "", "model.pt": ""}, False),  # a baseline killed mid-run: no summary yet
    (SFL_RUN, True),
    ({"partition.json": "{}", "ranks.tsv": "", "metrics.jsonl": ""}, True),  # an SFL run stopped in round 1
    ({"metrics.jsonl": "", "model.pt": "", "summary.json": '{"mode": "sfl"}'}, True),  # its other files removed
    ({"metrics.jsonl": "", "summary.json": "not json"}, True),  # cannot tell: keep it
])
def test_the_baseline_never_advises_replacing_an_sfl_run(tmp_path, files, sfl):
    """`mpi-sfl baseline` refused by a used out_dir: an earlier baseline's results may be replaced
    (--overwrite); an SFL run's, the run the baseline is the reference for, never: a directory
    beside it is suggested instead, one that holds no results."""
    out = tmp_path / "default"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline" / "metrics.jsonl").write_text("")  # taken: the advice must look further
    with pytest.raises(UserError) as exc:
        prepare(str(out), "new", can_resume=False)
    message = str(exc.value)
    if sfl:
        assert message.startswith(f"{out} holds the results of an SFL run (")
        assert message.endswith(f"write the baseline beside it, not over it: --set run.out_dir={tmp_path}/default-baseline")
        assert "--overwrite" not in message
    else:
        assert message.endswith("; pass --overwrite to replace them (or set run.out_dir)"), message
    assert {name: (out / name).read_text() for name in files} == files and not (out / ".lock").exists()
    with pytest.raises(UserError) as exc:  # train's advice is unchanged
        prepare(str(out), "new")
    assert "pass --resume to continue it or --overwrite to replace them" in str(exc.value)


def test_the_suggested_out_dir_can_be_pasted_into_a_shell(tmp_path):
    out = tmp_path / "my run"
    out.mkdir()
    (out / "ranks.tsv").write_text("")
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(UserError) as exc:
        prepare(str(out), "new", can_resume=False)
    assert str(exc.value).endswith(f"--set run.out_dir={tmp_path}/baseline")
    assert outdir._set_out_dir(out) == f"""--set 'run.out_dir="{out}"'"""
    assert config.parse_value(f'"{out}"') == str(out)


def test_a_config_alone_or_a_users_files_are_not_results(tmp_path):
    populate(tmp_path, ["config.toml"] + THEIRS)
    prepare(str(tmp_path), "new")
    release(tmp_path)
    assert all((tmp_path / name).read_text() == name for name in ["config.toml"] + THEIRS)


def test_overwrite_removes_only_our_files(tmp_path):
    populate(tmp_path, OURS + THEIRS)
    prepare(str(tmp_path), "overwrite")
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted(THEIRS + [".lock"])
    assert all((tmp_path / name).read_text() == name for name in THEIRS)
    release(tmp_path)
    assert not (tmp_path / ".lock").exists()


def test_resume_needs_a_checkpoint_and_removes_nothing(tmp_path):
    populate(tmp_path, ["metrics.jsonl", "checkpoint/weights.pt"])  # a checkpoint without meta.json
    with pytest.raises(UserError, match=rf"nothing to resume in {tmp_path} \(no checkpoint\)"):
        prepare(str(tmp_path), "resume")
    for where in ("checkpoint.old", "checkpoint"):
        populate(tmp_path, [f"{where}/meta.json"])
        prepare(str(tmp_path), "resume")
        release(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "metrics.jsonl"


# -- the lock ---------------------------------------------------------------------------------------
def test_a_live_holder_is_refused_by_name(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".lock").write_text(f"{HOST} {holder.pid} 77\n")
        with pytest.raises(UserError) as exc:
            prepare(str(tmp_path), "overwrite")
        assert str(exc.value) == (f"{tmp_path} is in use by another job (host {HOST}, pid {holder.pid}, "
                                  f"Slurm job 77); if that job is gone, delete {tmp_path / '.lock'}")
        release(tmp_path)  # not ours: kept
        assert lock_of(tmp_path) == [HOST, str(holder.pid), "77"]
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_on_this_host_is_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / ".lock").write_text(f"{HOST} {dead_pid()} -\n")
    prepare(str(tmp_path), "new")
    assert lock_of(tmp_path) == [HOST, str(os.getpid()), "-"]
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # the stale lock was not left aside
    release(tmp_path)


def test_a_holder_on_another_host_is_stale_only_for_our_own_slurm_job(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text("node-17 4321 4242\n")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(UserError, match=r"in use by another job \(host node-17, pid 4321, Slurm job 4242\)"):
        prepare(str(tmp_path), "new")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued: its own old lock
    prepare(str(tmp_path), "new")
    assert lock_of(tmp_path) == [HOST, str(os.getpid()), "4242"]
    release(tmp_path)
    assert not (tmp_path / ".lock").exists()


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / ".lock").write_text("")
    with pytest.raises(UserError, match=r"in use by another job \(unreadable .*\.lock\); if no job is using"):
        prepare(str(tmp_path), "new")
    assert (tmp_path / ".lock").exists()


# -- writing ----------------------------------------------------------------------------------------
def test_strict_json_nulls_every_non_finite_float():
    row = {"loss": math.nan, "acc": 0.5, "n": 3, "seconds": {"client": math.inf, "server": [1.0, -math.inf]},
           "rows": [{"x": math.nan}], "pair": (math.nan, "a")}
    text = strict_json(row)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON")) == {
        "loss": None, "acc": 0.5, "n": 3, "seconds": {"client": None, "server": [1.0, None]},
        "rows": [{"x": None}], "pair": [None, "a"]}
    assert "\n  " in strict_json({"a": math.nan}, indent=2) and row["loss"] != row["loss"]  # input untouched


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_a_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, fails):
    target = tmp_path / "summary.json"
    atomic_write(target, b"old")

    def broken(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(outdir.os, fails, broken)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new and longer")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["summary.json"]
    monkeypatch.undo()
    synced = []  # the file's data and then the directory holding the rename are both fsync'd
    real = os.fsync
    monkeypatch.setattr(outdir.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd)))
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["summary.json"]
    assert [stat.S_ISREG(m) for m in synced] == [True, False] and stat.S_ISDIR(synced[1])


def test_a_failed_torch_save_keeps_the_old_model(tmp_path):
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    with pytest.raises(Exception):
        atomic_torch_save({"w": torch.zeros(3), "bad": lambda: 0}, target)  # lambdas do not pickle
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["model.pt"]


def test_run_writer_strict_rows_resume_and_keeping_the_model(tmp_path):
    cfg = config.load(None, [f'run.out_dir="{tmp_path}"', 'run.progress="none"'])
    model = torch.nn.Linear(2, 1)
    row = {"round": 0, "rounds": 3, "train_loss": math.nan, "test_loss": 1.0, "test_accuracy": 0.5, "seconds": 1.0}
    w = RunWriter(cfg, 3, "t")
    w.round(row, model)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        model.weight.fill_(math.nan)
    w.round({**row, "round": 1}, model, write_model=False)  # a non-finite model does not replace the last good one
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], saved["weight"])
    summary = w.finish({"seconds": 2.0, "train_samples_per_s": math.inf})
    assert summary["final_train_loss"] is None and summary["train_samples_per_s"] is None
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["train_loss"] for line in lines] == [None, None] and "NaN" not in "".join(lines)
    # resumed: exactly the rows given (a later, lost round dropped), then appended to
    kept = [json.loads(lines[0])]
    w = RunWriter(cfg, 3, "t", resume_rows=kept)
    w.round({**row, "round": 1, "train_loss": 0.25}, model, write_model=False)
    w.finish({"seconds": 2.0, "train_samples_per_s": 10.0})
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2
    assert sorted(os.listdir(tmp_path)) == ["config.toml", "metrics.jsonl", "model.pt", "progress.json", "summary.json"]


def test_the_command_line_says_how_to_start(monkeypatch):
    from mpi_sfl import baseline, cli
    assert cli.parser().parse_args(["train", "--resume"]).resume
    for argv in (["train", "--resume", "--overwrite"], ["baseline", "--resume"]):
        with pytest.raises(cli.CommandLineError):
            cli.parser().parse_args(argv)
    seen = []
    monkeypatch.setattr(baseline, "run", lambda cfg, start: seen.append(start))
    cli.main(["baseline"])
    cli.main(["baseline", "--overwrite"])
    assert seen == ["new", "overwrite"]


@pytest.mark.parametrize("argv, words", [
    (["train", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["baseline", "--resume"], "unrecognized arguments: --resume"),
    (["baseline", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["trian"], "invalid choice: 'trian'")])
def test_a_bad_command_line_is_one_line_and_exit_2(capsys, argv, words):
    """No usage block, no traceback: the one-line form of every other user error (the same under
    mpiexec, once per job: test_errors.py::test_a_bad_command_line_is_said_once_per_job)."""
    from mpi_sfl import cli
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("mpi-sfl: error: ") and words in err, err
    assert "usage:" not in err


# -- real jobs ----------------------------------------------------------------------------------------
JOB = TINY + ["train.clients=2"]


def train(out: Path, *extra: str, settings: list[str] = (), own_launch: bool = False) -> subprocess.CompletedProcess:
    return mpirun(3, "train", *sets(JOB + list(settings) + [f'run.out_dir="{out}"']), *extra, timeout=90,
                  own_launch=own_launch)


def refused(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in proc.stderr, proc.stderr[-3000:]


def job(out: Path, *extra: str, settings: list[str] = ()) -> list[str]:
    """The argv of `train` into `out`, for conftest.mpijobs (several jobs in one launch of 3 ranks)."""
    return ["train", *sets(JOB + list(settings) + [f'run.out_dir="{out}"']), *extra]


@pytest.mark.mpi
def test_a_second_run_is_refused_until_overwrite(tmp_path, tiny_run):
    """Into a finished run's dir (two copies of the session's tiny_run, which is this JOB, so both
    jobs run in one launch): refused without --overwrite, its files untouched; replaced with it."""
    assert tiny_run.settings == JOB
    out, other = tiny_run.copy(tmp_path / "run"), tiny_run.copy(tmp_path / "other")
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "model.pt", "config.toml")}
    again, overwritten = mpijobs(3, job(out, settings=["run.seed=1"]), job(other, "--overwrite", settings=["run.seed=1"]))
    refused(again, f"{out} holds the results of an earlier run")
    assert "pass --resume to continue it or --overwrite to replace them (or set run.out_dir)" in again.stderr
    assert {name: (out / name).read_bytes() for name in before} == before  # untouched, byte for byte
    ok(overwritten)
    assert (other / "model.pt").read_bytes() != before["model.pt"]
    assert config.load(str(other / "config.toml")).run.seed == 1
    assert sorted(os.listdir(other)) == ["checkpoint", "checkpoint.old", "config.toml", "metrics.jsonl", "model.pt", "partition.json", "progress.json",
                                       "ranks.tsv", "summary.json"]  # lock released


@pytest.mark.mpi
def test_a_file_as_out_dir_or_a_later_set_up_error_leaves_nothing(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    # and: prepare succeeds, then the data set is missing: the job ends without an empty out_dir or a lock
    out, empty = tmp_path / "out", tmp_path / "no-data"
    empty.mkdir()
    as_file, no_data = mpijobs(3, job(f), job(out, settings=['data.dataset="fashion-mnist"', f'data.dir="{empty}"']))
    refused(as_file, f"output directory {f} is a regular file; set run.out_dir")
    assert f.read_text() == "keep me"
    refused(no_data, "lacks")
    assert not out.exists()


@pytest.mark.mpi
def test_two_jobs_into_one_out_dir(tmp_path):
    """Started at once: one gets the lock and finishes; the other is refused naming the holder, and
    leaves the winner's files alone (rounds differ, so metrics.jsonl tells whose run it is)."""
    out = tmp_path / "shared"
    longer = ["data.train_samples=960"]  # a run much longer than the gap between the two starts
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(train, out, settings=longer + [f"train.rounds={r}", f"run.seed={r}"], own_launch=True)
                for r in (3, 4)]
        procs = [j.result() for j in jobs]
    assert sorted(p.returncode for p in procs) == [0, 2], [p.stderr[-2000:] for p in procs]
    winner = 3 if procs[0].returncode == 0 else 4
    loser = procs[1] if winner == 3 else procs[0]
    refused(loser, f"{out} is in use by another job (host {HOST}, pid ")
    assert f"if that job is gone, delete {out / '.lock'}" in loser.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(winner)) and all(r["rounds"] == winner for r in rows)
    assert config.load(str(out / "config.toml")).run.seed == winner
    assert json.loads((out / "summary.json").read_text())["rounds"] == winner
    assert not (out / ".lock").exists()


def test_each_test_gets_a_private_temporary_directory(tmp_path_factory):
    """conftest's autouse fixture: what a test or its jobs put in the temporary directory (a killed
    split server's scratch, a benchmark's work dir) lands under pytest's base temp, never in /tmp."""
    import tempfile
    base = tmp_path_factory.getbasetemp()
    for where in (os.environ.get("TMPDIR", "/tmp"), tempfile.gettempdir()):
        assert Path(where).is_relative_to(base) and Path(where) != base, where
    from conftest import env
    assert env()["TMPDIR"] == os.environ["TMPDIR"]  # the jobs' environment: mpi_sfl.state.scratch_base reads it

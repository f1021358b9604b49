"""Long jobs: stop signals, checkpoint and resume bit for bit, stuck and dead ranks, NaN, full disks.

Every job here is a real mpiexec launch with a time limit; the signals are sent as Slurm and a
user would send them (to mpiexec, or to one rank's pid from out_dir/ranks.tsv). Jobs that need no
signal share a launch where they can (conftest.mpijobs: one after another in the same ranks).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mpi_sfl import checkpoint, progress

from conftest import TINY, TinyRun, load_model, metrics, mpijobs, mpirun, ok, private_tmpdir, sets, start

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

# Timing and memory fields differ between any two runs; everything else in a row must not.
MEASURED = {"seconds", "phase_seconds", "cpu_seconds", "peak_rss_mb", "peak_device_mb", "held_mb"}  # peak_device_mb: on a GPU
RESUMABLE = TINY + ["data.train_samples=960", "train.rounds=4", "train.clients=3"]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in rows]


def wait_for(predicate, limit: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() - t0 < limit, "timed out waiting"
        time.sleep(0.02)


def has_rows(out: Path, n: int = 1):
    return lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= n


def finish(proc: subprocess.Popen, limit: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=limit)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def pids(out: Path) -> dict[int, tuple[str, int]]:
    """rank -> (role, pid) from the run's ranks.tsv."""
    rows = [line.split("\t") for line in (out / "ranks.tsv").read_text().splitlines()[1:]]
    return {int(r[0]): (r[1], int(r[3])) for r in rows}


def strict_rows(out: Path) -> list[dict]:
    """metrics.jsonl parsed by a strict JSON parser (NaN/Infinity tokens are refused)."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- checkpoint and resume, bit for bit, for every variant ----------------------------------------
VARIANTS = {  # variant: (ranks, settings); between them both splits, the three states, both aggregations
    "sync": (4, ["train.momentum=0.9"]),
    "v1": (5, ["sfl.variant=\"v1\"", "sfl.servers=2", "train.momentum=0.9", "sfl.state=\"memory\"",
               "sfl.aggregation=\"decentralized\""]),
    "v2": (4, ["sfl.variant=\"v2\"", "model.split=\"label-sharing\"", "train.momentum=0.9", "sfl.state=\"graph\""]),
    "sl": (4, ["sfl.variant=\"sl\"", "train.momentum=0.9"]),
    "fl": (3, ["sfl.variant=\"fl\"", "sfl.servers=0", "sfl.aggregation=\"decentralized\"", "train.momentum=0.9"]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path, variant):
    """4 rounds straight vs the same run stopped by SIGTERM to mpiexec after its first round,
    then `--resume`: the same model.pt and the same metrics rows, bit for bit (momentum on, so
    the optimizer state must travel through the checkpoint too)."""
    ranks, settings = VARIANTS[variant]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["train", *sets(RESUMABLE + settings)]
    proc = start(ranks, *args, "--set", f'run.out_dir="{stopped}"')
    wait_for(has_rows(stopped), 60, proc)
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 3, err[-3000:]
    assert re.search(r"stopped by SIGTERM on rank \d at round \d, after step \d+ of 4 rounds", err), err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    meta = json.loads((stopped / "checkpoint" / "meta.json").read_text())
    assert (meta["round"], meta["step"]) < (4, 0)  # it really stopped before the end
    assert len(metrics(stopped)) < 4
    # the resumed run, then the uninterrupted one, in one launch
    for job in mpijobs(ranks, [*args, "--set", f'run.out_dir="{stopped}"', "--resume"],
                       [*args, "--set", f'run.out_dir="{straight}"']):
        ok(job)
    a, b = load_model(straight), load_model(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert deterministic(metrics(straight)) == deterministic(metrics(stopped))
    assert len(metrics(stopped)) == 4


def test_resume_refuses_a_changed_run_and_extends_a_finished_one(tmp_path, tiny_run):
    """A finished 2-round run (the session's tiny_run, copied): --resume with another config or
    another -n is refused (exit 2, one message), and so is resuming the finished run as is; with
    train.rounds raised it trains the third round."""
    out = tiny_run.copy(tmp_path / "run")
    base = tiny_run.settings + [f'run.out_dir="{out}"']
    refusals = ((["train.lr=0.1"], "cannot resume: train.lr = 0.1 here but 0.05"),
                (["model.split=\"label-sharing\""], "cannot resume: model.split"),
                (["run.deterministic=false"], "cannot resume: run.deterministic"),
                ([], "has finished its 2 rounds; raise train.rounds"))
    (other_n,) = mpijobs(4, ["train", *sets(base), "--resume"], timeout=60)
    *refused, extended = mpijobs(3, *[["train", *sets(base + extra), "--resume"] for extra, _ in refusals],
                                 ["train", *sets(base + ["train.rounds=3", 'run.progress="lines"']), "--resume"])
    for proc, words in zip([other_n, *refused], ["has finished its 2 rounds"] + [w for _, w in refusals]):
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    ok(extended)
    assert [r["round"] for r in metrics(out)] == [0, 1, 2]


def test_a_signal_to_one_rank_stops_every_rank(tmp_path):
    """SIGUSR1 to a single client rank (not the launcher): the ranks agree and stop together."""
    out = tmp_path / "run"
    proc = start(4, "train", *sets(RESUMABLE + ["train.rounds=20", f'run.out_dir="{out}"']))
    wait_for(has_rows(out), 60, proc)
    role, pid = pids(out)[3]
    assert role == "client"
    os.kill(pid, signal.SIGUSR1)
    code, _, err = finish(proc)
    assert code == 3 and "stopped by SIGUSR1 on rank 3" in err, err[-3000:]
    assert (out / "checkpoint" / "meta.json").is_file() and not (out / "summary.json").exists()


# -- stuck and dead ranks ------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [3, 0])
def test_a_stopped_rank_times_out_with_its_name(tmp_path, rank):
    """SIGSTOP (what a hung process looks like) on a client rank, and on the fed server: past
    run.timeout_s the job ends naming the stopped rank and its role, instead of stalling silently.
    A stopped fed server holds the clients in the step's stop agreement, so the split server's wait
    on a client times out first: the message must still name rank 0 (it named the client before)."""
    out = tmp_path / "run"
    proc = start(4, "train", *sets(RESUMABLE + ["train.rounds=50", "run.timeout_s=4", "run.checkpoint_every=0", f'run.out_dir="{out}"']))
    wait_for(has_rows(out), 60, proc)
    role, pid = pids(out)[rank]
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        code, _, err = finish(proc, limit=60)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert time.monotonic() - t0 < 30
    assert code == 5, err[-3000:]
    who = {3: "rank 3 (client: logical client 2", 0: "rank 0 (fed server"}[rank]
    if rank == 3:
        assert f"waited 4 s for {who}, pid {pid} on " in err, err[-3000:]
    assert re.search(rf"{re.escape(who)}, pid {pid} on [^)]+\) is stopped: that is the rank that stopped answering", err), err[-3000:]
    assert "Traceback" not in err and strict_rows(out)


def test_a_killed_rank_ends_the_job_at_once(tmp_path):
    """SIGKILL (the OOM killer's signal) cannot be caught: MPICH's mpiexec ends the whole job at
    once and reports a pid (in our runs not always the killed one); ranks.tsv maps every pid it
    can report to a rank and role. When a rank sees its transfer with the killed one fail before
    the clean-up, it names the killed rank itself."""
    out = tmp_path / "run"
    proc = start(4, "train", *sets(RESUMABLE + ["train.rounds=50", f'run.out_dir="{out}"']))
    wait_for(has_rows(out), 60, proc)
    role, pid = pids(out)[1]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    code, out_text, err = finish(proc)
    assert code != 0 and time.monotonic() - t0 < 20
    named = {int(p) for p in re.findall(r"PID (\d+)", out_text + err)}
    # Either a rank saw its transfer with the killed one fail first and named it (one line), or
    # mpiexec's clean-up came first and named some pid of the job, which ranks.tsv maps.
    gone = f"saw an MPI transfer with rank 1 (split server, pid {pid} on " in err
    assert role == "split_server" and (gone or named and named <= {p for _, p in pids(out).values()}), err[-2000:]


def test_a_peer_whose_transfers_fail_is_named_as_gone(tmp_path):
    """An MPI error on a transfer with a peer (what MPICH raises when that peer was killed) ends the
    job with one line naming the lost rank by role, pid and host (as ranks.tsv lists it) and how to
    continue, exit 5 and no traceback (before: "rank 2 crashed" and a traceback)."""
    out = tmp_path / "run"
    (proc,) = mpijobs(4, ["train", *sets(RESUMABLE + [f'run.out_dir="{out}"'])],
                      prelude=Path(__file__).with_name("mpi_gone_check.py"))
    assert proc.returncode == 5, proc.stderr[-3000:]
    pid = pids(out)[1][1]
    assert f"saw an MPI transfer with rank 1 (split server, pid {pid} on " in proc.stderr, proc.stderr[-3000:]
    assert "that process is gone" in proc.stderr and "--resume" in proc.stderr
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr


# -- non-finite training ----------------------------------------------------------------------------
NAN_MODELS = {"cnn": [],  # the default: one batch at a time on the split server (dropout)
              # batched on the split server (sfl.batch_clients): the NaN batch's rows are left out
              "mlp-u-batched": ['model.name="mlp"'],
              "mlp-label-sharing-batched": ['model.name="mlp"', 'model.split="label-sharing"']}
NAN_JOB = TINY + ["data.train_samples=960", "data.test_samples=100", "train.rounds=3", "train.clients=3",
                  "train.momentum=0.9", "train.lr=0.02"]


@pytest.fixture(scope="module")
def nonfinite(tmp_path_factory):
    """The non-finite jobs, one launch of 4 ranks: train.lr = 1e6 (diverges in round 1), then each
    NaN_MODELS model with train.on_nonfinite = stop and skip, under tests/mpi_nan_check.py's patch
    that makes logical client 0's batch in round 2, step 3 NaN (round 1, where the diverging job
    ends, is untouched by it). {name: (out_dir, CompletedProcess)}."""
    with private_tmpdir(tmp_path_factory) as tmp:
        jobs = {"diverge": RESUMABLE + ["train.lr=1e6"]}
        jobs |= {f"{mode}-{model}": NAN_JOB + [f'train.on_nonfinite="{mode}"'] + extra
                 for model, extra in NAN_MODELS.items() for mode in ("stop", "skip")}
        outs = {name: tmp / name for name in jobs}
        procs = mpijobs(4, *[["train", *sets(settings + [f'run.out_dir="{outs[name]}"'])]
                             for name, settings in jobs.items()],
                        prelude=Path(__file__).with_name("mpi_nan_check.py"))
        return {name: (outs[name], proc) for name, proc in zip(jobs, procs)}


def test_divergence_stops_with_a_message_and_keeps_strict_json(nonfinite):
    """train.lr = 1e6: the run ends (exit 4) naming the round, step and logical client; no NaN
    reaches model.pt or metrics.jsonl. It diverges in round 1, so no round is good: the message
    says there is no model.pt (not that the last good round was kept)."""
    out, proc = nonfinite["diverge"]
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert re.search(r"mpi-sfl: error: non-finite (loss|gradient)\S* in round 1, step \d+, logical client \d",
                     proc.stderr), proc.stderr[-2000:]
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    assert "the run stopped. No round had finished: there is no model.pt and metrics.jsonl has no rows" in proc.stderr
    assert "last good" not in proc.stderr and "--resume" not in proc.stderr, proc.stderr[-2000:]
    assert strict_rows(out) == [] and not (out / "model.pt").exists() and not (out / "checkpoint").exists()


@pytest.mark.parametrize("model", list(NAN_MODELS))
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_batch_mid_run(nonfinite, mode, model):
    """A NaN injected into one logical client's batch in round 2: `stop` ends the run naming that
    batch and keeps round 1's model; `skip` drops exactly that batch, counts it, and finishes."""
    out, proc = nonfinite[f"{mode}-{model}"]
    rows = strict_rows(out)
    if mode == "stop":
        assert proc.returncode == 4, proc.stderr[-3000:]
        assert re.search(r"non-finite (loss|gradient) in round 2, step 3, logical client 0", proc.stderr), proc.stderr[-2000:]
        assert [r["round"] for r in rows] == [0]
        assert ("the run stopped. model.pt keeps round 1's model, the last finite one; metrics.jsonl has round 1's "
                "row. The last checkpoint is kept; continue with the same command and --resume") in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert [r["batches_skipped"] for r in rows] == [0, 1, 0]
        assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in load_model(out).values())


# -- mpi-sfl status: the four states ----------------------------------------------------------------
def test_status_tells_running_stopped_finished_and_failed(tmp_path, tiny_run):
    """`mpi-sfl status OUT` (files only) on a running job, the same job stopped by SIGTERM, the
    session's finished tiny run, and a killed job whose lock is gone. (A job that stopped on a
    problem: test_a_failed_model_write_stops_with_one_line_and_consistent_outputs.)"""
    out = tmp_path / "run"
    proc = start(4, "train", *sets(RESUMABLE + ["train.rounds=50", 'run.progress="lines"', "run.progress_every_s=0.5",
                                                f'run.out_dir="{out}"']))
    wait_for(has_rows(out, 3), 60, proc)  # a round is about 0.3 s: the timed lines have begun
    wait_for(lambda: "running" in progress.status(str(out)), 10, proc)
    running = progress.status(str(out))
    assert re.match(rf"{re.escape(str(out))}: running \(host \S+, pid \d+\)", running), running
    assert re.search(r"at round \d+/50, step \d+/\d+ \([\d,]+ samples/s, ETA", running), running
    assert re.search(r"last round \(\d+\): train loss", running) and "last checkpoint: checkpoint/ at the end of round" in running
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 3, err[-2000:]
    assert re.search(r"\[sfl\] round \d+/50 step \d+/\d+, [\d,]+ samples/s, ETA", err)  # the timed lines
    assert progress.status(str(out)).startswith(f"{out}: stopped, resumable: continue with the same command and --resume")
    assert progress.status(str(tiny_run.out)).startswith(f"{tiny_run.out}: finished\n")
    killed = tiny_run.copy(tmp_path / "killed")
    (killed / "summary.json").unlink()  # as if killed in its last round: no summary, progress says running
    progress.ended(str(killed), "running")
    assert progress.status(str(killed)).startswith(f"{killed}: failed: the job ended without a word")
    assert "resumable from its last checkpoint" in progress.status(str(killed))


# -- elastic: resume on another layout ---------------------------------------------------------------
def distance(a: Path, b: Path) -> float:
    """The largest elementwise difference between two runs' model.pt."""
    x, y = load_model(a), load_model(b)
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


def test_a_round_boundary_checkpoint_resumes_on_more_or_fewer_ranks_and_servers(tmp_path):
    """4 logical clients, momentum on. A 2-round run at -n 4 (1 split server) resumed for a third
    round at -n 5 and at -n 3, and with 2 split servers at -n 5; a 2-round run with 2 split servers
    resumed with 1 at -n 4: each ends where the uninterrupted 3-round run of its first layout ends.
    Where every sum runs in logical-client order whatever the layout (a gathering aggregator, one
    split server, no batching across clients), -n 4 -> 5 ends on the same bits.
    The bound: the same 3 rounds run uninterrupted on 4 ranks / 1 server and on 5 ranks / 2 servers
    differ only by float32 round-off of sums grouped by rank (FedAvg's partial sums, the servers'
    Allreduce); a resumed run does one round's sums each way, so it may differ by as much, and
    we allow twice that (zero when the two layouts agree bit for bit). Control: another seed ends
    farther away than 100 bounds. Mid-round, another layout is refused with one line."""
    base = RESUMABLE + ["train.clients=4", "train.momentum=0.9"]

    def job(out, *extra, rounds=3, resume=False):
        return ["train", *sets(base + [f"train.rounds={rounds}", f'run.out_dir="{out}"', *extra])] + (["--resume"] if resume else [])

    two = ['sfl.servers=2']
    # Every sum in logical-client order whatever the layout: the fed server combines each logical
    # client's vector (a robust aggregator gathers them), one split server sums its clients' gradients
    # one batch at a time in client order. Then another layout must give the same bits.
    exact = ['sfl.aggregator="median"', 'sfl.batch_clients="off"']
    d = {name: tmp_path / name for name in ("straight4", "first4", "seed4", "straight5s2", "first5s2", "to5", "to3",
                                            "to5s2", "to4", "midround", "exact4", "exact_first4", "exact_to5")}
    for proc in mpijobs(4, job(d["straight4"]), job(d["first4"], rounds=2), job(d["seed4"], "run.seed=1"),
                        job(d["exact4"], *exact), job(d["exact_first4"], *exact, rounds=2)):
        ok(proc)
    for name in ("to5", "to3", "to5s2", "midround"):
        shutil.copytree(d["first4"], d[name])
    shutil.copytree(d["exact_first4"], d["exact_to5"])
    ckpt = d["midround"] / "checkpoint"  # as if it had stopped after step 1 of round 3
    for r in range(4):
        rewrite_identity(ckpt, r, round=2, step=1)
    edit_meta(ckpt, round=2, step=1)
    s5 = mpijobs(5, job(d["straight5s2"], *two), job(d["first5s2"], *two, rounds=2),
                 job(d["to5"], resume=True), job(d["to5s2"], *two, resume=True), job(d["midround"], resume=True),
                 job(d["exact_to5"], *exact, resume=True))
    for proc in s5[:4] + s5[5:]:
        ok(proc)
    assert s5[4].returncode == 2 and "is mid-round (round 3, after step 1)" in s5[4].stderr, s5[4].stderr[-2000:]
    assert "resumes only on that layout (mpiexec -n 4, sfl.servers = 1)" in s5[4].stderr
    assert s5[4].stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in s5[4].stderr
    shutil.copytree(d["first5s2"], d["to4"])
    ok(mpijobs(3, job(d["to3"], resume=True))[0])
    ok(mpijobs(4, job(d["to4"], resume=True))[0])

    bound = 2 * distance(d["straight4"], d["straight5s2"])
    for resumed, straight in (("to5", "straight4"), ("to3", "straight4"), ("to5s2", "straight4"), ("to4", "straight5s2")):
        assert distance(d[resumed], d[straight]) <= bound, (resumed, distance(d[resumed], d[straight]), bound)
        assert [r["round"] for r in metrics(d[resumed])] == [0, 1, 2]
    assert distance(d["seed4"], d["straight4"]) > 100 * max(bound, 1e-7)
    a, b = load_model(d["exact4"]), load_model(d["exact_to5"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # -n 4 -> 5 with client-order sums: the same bits


# -- damaged, foreign and edited checkpoints --------------------------------------------------------
def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_identity(ckpt: Path, rank: int, **changes) -> None:
    """What another run's file of the same shape looks like: its identity differs, and meta.json
    lists its digest (so only the identity check can catch it)."""
    path = ckpt / f"rank-{rank}.pt"
    state = torch.load(path, weights_only=True)
    state["identity"].update(changes)
    torch.save(state, path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def edit_meta(ckpt: Path, **changes) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(tmp_path, tiny_run):
    """Each kind of damage to the last checkpoint of the session's finished 2-round run is found
    and named in one line; the resume falls back to checkpoint.old (the end of round 1) and ends
    where the run ended, bit for bit. With both checkpoints damaged, or meta.json missing a field
    or with a wrong type, the resume is refused: exit 2, one line naming the file and the field."""
    def swap(ckpt):
        a, b = ckpt / "rank-1.pt", ckpt / "rank-2.pt"
        a.rename(ckpt / "x"), b.rename(a), (ckpt / "x").rename(b)

    damages = {  # name: (what to do to OUT, the words the line must have)
        "bit flip": (lambda out: flip_a_byte(out / "checkpoint" / "rank-1.pt"), "checkpoint/rank-1.pt is not the file"),
        "swapped": (lambda out: swap(out / "checkpoint"), "checkpoint/rank-1.pt is not the file"),
        "older file": (lambda out: shutil.copy(out / "checkpoint.old" / "rank-2.pt", out / "checkpoint" / "rank-2.pt"),
                       "checkpoint/rank-2.pt is not the file"),
        "another run": (lambda out: rewrite_identity(out / "checkpoint", 2, run="0" * 32),
                        "checkpoint/rank-2.pt was written by run 00000000 rank 2"),
        "edited round": (lambda out: edit_meta(out / "checkpoint", round=1),
                         "but meta.json describes run"),
        "wrong type": (lambda out: edit_meta(out / "checkpoint", step="0"), "'step' is str, not int"),
    }
    refused = {
        "both damaged": (lambda out: (flip_a_byte(out / "checkpoint" / "rank-0.pt"),
                                      flip_a_byte(out / "checkpoint.old" / "rank-0.pt")),
                         "and the one before it: "),
        "no world": (lambda out: (edit_meta(out / "checkpoint", world=None), edit_meta(out / "checkpoint.old", world=None)),
                     "has no 'world'"),
    }
    outs = {}
    for name, (damage, _) in {**damages, **refused}.items():
        out = outs[name] = tiny_run.copy(tmp_path / name.replace(" ", "-"))
        damage(out)
    shown = checkpoint.describe(str(outs["bit flip"]))  # mpi-sfl checkpoint OUT: what --resume will do
    assert "checkpoint: DAMAGED" in shown and "rank-1.pt" in shown and "checkpoint.old: intact" in shown
    assert "position: the end of round 1 of 2" in shown and "--resume continues from checkpoint.old/ with mpiexec -n 3" in shown
    procs = mpijobs(3, *[["train", *sets(tiny_run.settings + [f'run.out_dir="{out}"']), "--resume"] for out in outs.values()])
    for (name, out), proc in zip(outs.items(), procs):
        words = {**damages, **refused}[name][1]
        assert words in proc.stderr, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        if name in damages:
            ok(proc)
            assert "resuming from the checkpoint before it" in proc.stderr and proc.stderr.count("mpi-sfl: warning:") == 1
            a, b = load_model(tiny_run.out), load_model(out)
            assert all(torch.equal(a[k], b[k]) for k in a), name
            assert deterministic(metrics(out)) == deterministic(metrics(tiny_run.out)), name
        else:
            assert proc.returncode == 2 and proc.stderr.count("mpi-sfl: error:") == 1, (name, proc.stderr[-2000:])


# -- full disks --------------------------------------------------------------------------------------
def test_a_failed_model_write_stops_with_one_line_and_consistent_outputs(tmp_path):
    """The disk fills while rank 0 writes model.pt (here: a 64 KiB file-size limit on rank 0, the
    same OSError from write): one line naming the directory, exit 4, no traceback, and
    metrics.jsonl holds no row that model.pt is behind (the old code let torch.save write the file:
    its zip writer raised a RuntimeError past the handler, a traceback and exit 1)."""
    out = tmp_path / "run"
    (proc,) = mpijobs(3, ["train", *sets(TinyRun.settings + [f'run.out_dir="{out}"'])],
                      prelude=Path(__file__).with_name("mpi_fsize_check.py"))
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert f"cannot write the outputs in {out}" in proc.stderr and "File too large" in proc.stderr
    assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
    assert not (out / "model.pt").exists() and metrics(out) == []
    assert progress.status(str(out)).startswith(f"{out}: failed: cannot write the outputs in {out}")


def test_scratch_full_mid_run_stops_cleanly(tmp_path):
    """The split server's scratch file system fills up: one message naming the path and the
    setting, exit 4, no traceback, and no activation files left behind."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(scratch)], check=True)
    try:
        out = tmp_path / "run"
        proc = mpirun(4, "train", *sets(RESUMABLE + [f'run.scratch_dir="{scratch}"', f'run.out_dir="{out}"']),
                      timeout=60)
        assert proc.returncode == 4, proc.stderr[-3000:]
        assert f"cannot write to scratch {scratch}" in proc.stderr and "run.scratch_dir" in proc.stderr
        assert proc.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in proc.stderr
        assert os.listdir(scratch) == []
    finally:
        subprocess.run(["umount", str(scratch)], check=True)

"""A real training job end to end: outputs, reproducibility, scratch hygiene."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import torch

import pytest

from conftest import TINY, baseline, baseline_process, load_model, metrics, mpijobs, mpirun, mpiscript, ok, sets
from mpi_sfl import config
from mpi_sfl.outdir import pid_alive
from mpi_sfl.outputs import cpu_per_sample
from mpi_sfl.state import scratch_owner
from mpi_sfl.timing import CPU_KINDS

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)


def test_outputs_reproducibility_and_scratch(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = scratch / f"mpi_sfl-killed-r1-{dead.pid}@{socket.gethostname()}"
    stale.mkdir()
    (stale / "5f0c6f2d1c8b4bb1a8d8d7f2a2d3e4f5").write_bytes(b"\0" * 100)
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        ok(mpirun(4, "train", *sets(TINY + ["train.clients=3", f'run.out_dir="{out}"',
                                           f'run.scratch_dir="{scratch}"'])))
        runs.append(out)
        assert os.listdir(scratch) == []  # the run's own dir is gone, and so is the stale one
    a, b = metrics(runs[0]), metrics(runs[1])
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]
    assert len(a) == 2 and {"round", "train_loss", "test_loss", "test_accuracy", "seconds",
                            "bytes_sent", "peak_rss_mb", "phase_seconds"} <= a[0].keys()
    assert set(a[0]["bytes_sent"]) == {"fed_server", "split_server", "client"}
    assert a[0]["bytes_sent"]["client"] > 240 * 16 * 14 * 14 * 4  # every activation went over the wire
    assert all(v > 0 for v in a[0]["peak_rss_mb"].values())
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["final_test_accuracy"] == a[-1]["test_accuracy"] and summary["train_samples_per_s"] > 0
    for row in a:  # every rank's CPU by kind, summed per role (timing.py); the kinds add up to the total
        assert set(row["cpu_seconds"]) == {"fed_server", "split_server", "client"}
        for role, cpu in row["cpu_seconds"].items():
            assert list(cpu) == list(CPU_KINDS) and all(v >= 0 for v in cpu.values()), (role, cpu)
            assert abs(sum(v for k, v in cpu.items() if k != "total") - cpu["total"]) < 1e-3, (role, cpu)
        assert row["cpu_seconds"]["split_server"]["compute"] > 0 and row["cpu_seconds"]["split_server"]["scratch_io"] > 0
        assert row["cpu_seconds"]["client"]["compute"] > 0 and row["cpu_seconds"]["fed_server"]["aggregation"] > 0
    assert a[-1]["cpu_seconds"]["fed_server"]["eval"] > 0  # round 1's evaluation, counted in round 2
    assert summary["cpu_seconds_per_sample"] == pytest.approx(cpu_per_sample(a)) and summary["cpu_seconds_per_sample"] > 0
    resolved = config.load(str(runs[0] / "config.toml"))
    assert resolved.train.clients == 3 and resolved.run.out_dir == str(runs[0])
    assert torch.equal(torch.cat([v.flatten() for v in load_model(runs[0]).values()]),
                       torch.cat([v.flatten() for v in load_model(runs[1]).values()]))


def test_baseline_writes_the_same_outputs(tmp_path, tmp_path_factory, tiny_run):
    """`mpi-sfl baseline` on a finished SFL run's config.toml (a copy of the session's tiny_run):
    refused into the SFL run's own dir (the command itself, its own process: exit 2, the SFL files
    untouched); into another dir it writes the same kind of outputs, and --overwrite replaces them."""
    sfl_out = tiny_run.copy(tmp_path_factory.mktemp("sfl") / "run")
    before = {p.name: p.read_bytes() for p in sfl_out.iterdir() if p.is_file()}
    refused = baseline_process(str(sfl_out / "config.toml"))  # its out_dir is the SFL run's: refuse, keep it
    assert refused.returncode == 2 and f"{sfl_out} holds the results of an SFL run" in refused.stderr
    assert f"--set run.out_dir={sfl_out.parent / 'baseline'}" in refused.stderr  # never --overwrite the SFL run
    assert "--overwrite" not in refused.stderr and "--resume" not in refused.stderr
    assert {p.name: p.read_bytes() for p in sfl_out.iterdir() if p.is_file()} == before
    ok(baseline(str(sfl_out / "config.toml"), "--set", f'run.out_dir="{tmp_path}"'))
    assert sorted(os.listdir(tmp_path)) == ["config.toml", "metrics.jsonl", "model.pt", "progress.json", "summary.json"]
    assert sorted(os.listdir(sfl_out)) == ["checkpoint", "checkpoint.old", "config.toml", "metrics.jsonl", "model.pt", "partition.json",
                                           "progress.json", "ranks.tsv", "summary.json"]  # SFL also: its checkpoints, partition, ranks
    assert load_model(tmp_path).keys() == load_model(sfl_out).keys()
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(r["cpu_seconds"]["baseline"]["total"] > 0 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())  # the same figure as an SFL run's
    assert summary["cpu_seconds_per_sample"] == pytest.approx(cpu_per_sample(rows)) and cpu_per_sample(rows) > 0
    ok(baseline(str(sfl_out / "config.toml"), "--set", f'run.out_dir="{tmp_path}"', "--overwrite"))
    assert len(metrics(tmp_path)) == 2 and not (tmp_path / ".lock").exists()


def test_a_crash_ends_the_job_and_keeps_finished_rounds(tmp_path):
    """An exception on one rank (in round 3) aborts every rank (no hang); the finished rounds'
    metrics and model survive (round 1 certainly: round 2 takes longer than its evaluation);
    the killed split server's scratch dir is cleaned by the next run."""
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    t0 = time.monotonic()
    proc = mpiscript(4, Path(__file__).with_name("mpi_crash_check.py"), str(out), str(scratch), timeout=90)
    assert proc.returncode != 0 and "injected failure on a client rank" in proc.stderr
    assert "NOT REACHED" not in proc.stdout and time.monotonic() - t0 < 60
    rounds = [r["round"] for r in metrics(out)]
    assert rounds in ([0], [0, 1]) and (out / "model.pt").is_file()
    assert not (out / "summary.json").exists()
    (left,) = os.listdir(scratch)  # the aborted server's dir is left behind...
    _, pid = scratch_owner(left)
    t1 = time.monotonic()  # its process may still be going away (a killed rank unmaps its memory)
    while pid_alive(pid) and time.monotonic() - t1 < 30:
        time.sleep(0.05)
    ok(mpirun(4, "train", *sets(TINY + ["train.clients=3", f'run.out_dir="{tmp_path / "again"}"',
                                       f'run.scratch_dir="{scratch}"'])))
    assert os.listdir(scratch) == []  # ...and the next run on this host removes it


# -- the quick tier: one real job per variant -------------------------------------------------------
VARIANT_SETTINGS = {"sync": [], "v1": ['sfl.variant="v1"'], "v2": ['sfl.variant="v2"'], "sl": ['sfl.variant="sl"'],
                    "fl": ['sfl.variant="fl"', "sfl.servers=0"]}


@pytest.mark.quick
def test_every_variant_trains_end_to_end(tmp_path):
    """One job per variant (sync, v1, v2, sl, fl), TINY with 2 logical clients and 1 round, one after
    another in one launch of 3 ranks: each ends with exit 0 and writes its outputs: one metrics row
    with a finite training loss and every client trained, bytes sent by exactly the roles the
    variant has (fl: no split server), and a model.pt with the baseline's parameters (names, shapes)."""
    outs = {v: tmp_path / v for v in VARIANT_SETTINGS}
    procs = mpijobs(3, *[["train", *sets(TINY + ["train.clients=2", "train.rounds=1"] + settings
                                         + [f'run.out_dir="{outs[v]}"'])] for v, settings in VARIANT_SETTINGS.items()])
    ok(baseline(str(outs["sync"] / "config.toml"), "--set", f'run.out_dir="{tmp_path / "baseline"}"'))
    ref = load_model(tmp_path / "baseline")
    for (variant, out), proc in zip(outs.items(), procs):
        ok(proc)
        (row,) = metrics(out)
        assert row["train_loss"] == row["train_loss"] and 0 < row["train_loss"] < 10, (variant, row)
        assert row["clients_trained"] == 2, (variant, row)
        roles = {"fed_server", "client"} | ({"split_server"} if variant != "fl" else set())
        assert set(row["bytes_sent"]) == roles and row["bytes_sent"]["client"] > 0, (variant, row)
        model = load_model(out)
        assert {k: v.shape for k, v in model.items()} == {k: v.shape for k, v in ref.items()}, variant
        assert json.loads((out / "summary.json").read_text())["variant"] == variant


def tensorboard_scalars(out: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file in OUT/tensorboard, read with tensorboardX's own
    Event message (a TFRecord: 8-byte length, 4-byte CRC, the record, 4-byte CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    found: dict[str, dict[int, float]] = {}
    for f in sorted((out / "tensorboard").iterdir()):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                found.setdefault(v.tag, {})[event.step] = v.simple_value
    return found


def test_tensorboard_holds_every_round_and_a_resume_goes_on(tmp_path):
    """run.tensorboard: rank 0's event files hold each round's figures (losses, accuracy,
    samples/s, bytes and per-phase seconds per role); a resumed run continues the same curves at
    the next round. Without the optional package: one line at set-up, exit 2."""
    out = tmp_path / "run"
    base = TINY + ["train.clients=3", "run.tensorboard=true", f'run.out_dir="{out}"']
    first, resumed = mpijobs(3, ["train", *sets(base)], ["train", *sets(base + ["train.rounds=3"]), "--resume"])
    ok(first), ok(resumed)
    scalars, rows = tensorboard_scalars(out), metrics(out)
    for tag in ("train_loss", "test_loss", "test_accuracy"):
        assert scalars[tag] == {r["round"] + 1: float(torch.tensor(r[tag], dtype=torch.float32)) for r in rows}, tag
    assert sorted(scalars["samples_per_s"]) == [1, 2, 3] and min(scalars["samples_per_s"].values()) > 0
    for tag in ("bytes_sent/client", "bytes_sent/split_server", "phase_seconds/split_server/server_compute",
                "cpu_seconds/client/compute"):
        assert sorted(scalars[tag]) == [1, 2, 3], tag
    fake = tmp_path / "no_tensorboardx" / "tensorboardX"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorboardX')\n")
    (refused,) = mpijobs(3, ["train", *sets(TINY + ["run.tensorboard=true", f'run.out_dir="{tmp_path / "other"}"'])],
                         extra_env={"PYTHONPATH": str(fake.parent)})
    assert refused.returncode == 2 and "needs the tensorboardX package: pip install 'mpi_sfl[tensorboard]'" in refused.stderr
    assert refused.stderr.count("mpi-sfl: error:") == 1 and "Traceback" not in refused.stderr


def test_a_resume_in_the_same_second_keeps_the_first_event_file(tmp_path, monkeypatch):
    """Event files are named by the second they are opened: a resumed run's writer opened within
    the same second (the clock held still here) must not replace the first run's file."""
    from mpi_sfl.progress import Board
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)
    first = Board(str(tmp_path), 0)
    for rnd in (0, 1):
        first.round({"round": rnd, "train_loss": 1.0 / (rnd + 1), "samples": 10, "seconds": 1.0})
    first.close()
    again = Board(str(tmp_path), 2)
    again.round({"round": 2, "train_loss": 0.25, "samples": 10, "seconds": 1.0})
    again.close()
    assert tensorboard_scalars(tmp_path)["train_loss"] == {1: 1.0, 2: 0.5, 3: 0.25}

"""`mpi-sfl plot`: curves from the metrics.jsonl of finished runs, clear errors otherwise."""
from __future__ import annotations

import json

import pytest

from mpi_sfl import cli, plot
from mpi_sfl.errors import EXIT_USER_ERROR, UserError


def fake_run(d, variant: str, accs: list[float]) -> None:
    d.mkdir()
    rows = [{"round": i, "train_loss": 2.0 - a, "test_loss": 2.1 - a, "test_accuracy": a, "seconds": 1.5}
            for i, a in enumerate(accs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({"mode": "sfl", "variant": variant}))


def test_plot_writes_a_png_labelled_by_variant(tmp_path):
    fake_run(tmp_path / "a", "sl", [0.5, 0.7])
    fake_run(tmp_path / "b", "v1", [0.6, 0.8, 0.85])
    assert plot.read_run(str(tmp_path / "a"))[0] == "sl (a)"
    cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b")])
    png = tmp_path / "a" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plot", str(tmp_path / "missing")])
    assert exc.value.code == EXIT_USER_ERROR
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no finished round"):
        plot.read_run(str(tmp_path / "empty"))


@pytest.mark.mpi
def test_a_run_reports_its_partition_and_plot_draws_it(tmp_path):
    """partition.json: each logical client's samples and label histogram, the partition the ranks
    trained on (recomputed here); `mpi-sfl plot` draws it as partition.png."""
    import numpy as np
    from conftest import TINY, mpirun, ok, sets
    from mpi_sfl import config, data

    settings = TINY + ["train.clients=5", "data.partition=\"dirichlet\"", "data.alpha=0.3", "sfl.variant=\"fl\"",
                       "sfl.servers=0", "train.rounds=1", f'run.out_dir="{tmp_path}"']
    ok(mpirun(3, "train", *sets(settings)))
    report = json.loads((tmp_path / "partition.json").read_text())
    cfg = config.load(overrides=settings)
    labels = data.load(cfg, "train", labels_only=True).y.numpy()
    shards = data.partition(labels, 5, cfg)
    assert report["samples"] == [len(s) for s in shards] and sum(report["samples"]) == 240
    assert report["labels"] == [np.bincount(labels[s], minlength=10).tolist() for s in shards]
    assert report["summary"]["mean_classes_present"] < 10  # Dirichlet(0.3) is not IID
    cli.main(["plot", str(tmp_path)])
    assert (tmp_path / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

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

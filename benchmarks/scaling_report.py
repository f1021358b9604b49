"""Scaling report from a directory of training runs, one sub-directory per point: DIR/n<N>/.

    python -m benchmarks.scaling_report strong|weak DIR      (from the repository root)

What jobs/strong_scaling.sbatch, jobs/weak_scaling.sbatch and jobs/local.sh run at the end. Reads each
run's metrics.jsonl and summary.json, and prints and writes (DIR/scaling.json, DIR/scaling.png) the
same table, summary and plot as the `scaling` suite (benchmarks/scaling.py): seconds per round (warm-up
round excluded), speed-up and efficiency against the smallest N, per-phase breakdown.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.scaling import scaling_result


def report(kind: str, directory: Path) -> dict:
    runs = {}
    for d in sorted(directory.iterdir()):
        m = re.fullmatch(r"n(\d+)", d.name)
        if m and (d / "summary.json").is_file():
            runs[(kind, int(m.group(1)))] = [common.read_run(d)]
    if not runs:
        raise SystemExit(f"no finished runs n<N>/ (with summary.json) under {directory}")
    res = scaling_result(runs)
    plot = res.pop("plot")
    doc = {"suite": "scaling", "level": "sweep", "machine": common.machine(), **res}
    (directory / "scaling.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(directory / "scaling.png")
    print(res["text"])
    for name, value in res["summary"].items():
        print(f"  {name:<24} {value:.4g}")
    for note in res["notes"]:
        print(f"note: {note}")
    print(f"-> {directory / 'scaling.json'}, {directory / 'scaling.png'}")
    return doc


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("strong", "weak"):
        raise SystemExit(__doc__)
    report(sys.argv[1], Path(sys.argv[2]))

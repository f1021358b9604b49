"""model suite: the analytic cost model (benchmarks/cost_model.py), checked against a scaling run
and projected to 1024 clients.

Its inputs: the wire suite's link figures (--wire WIRE.json, else a tiny wire run made here) and a
scaling run to check against (--scaling SCALING.json, else a tiny/quick scaling run made here).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import cost_model, scaling as scaling_suite, wire as wire_suite


def run(level: str, work: Path, args) -> dict:
    wire = json.loads(Path(args.wire).read_text()) if args.wire else None
    if wire is None:
        wire = {"summary": wire_suite.run("tiny", work, args)["summary"], "measured_here": True}
    scaling = json.loads(Path(args.scaling).read_text()) if args.scaling else None
    if scaling is None:
        sc = scaling_suite.run("tiny" if level == "tiny" else "quick", work, args)
        scaling = {"settings": sc["settings"], "results": sc["results"], "measured_here": True}
    return cost_model.suite(level, wire, scaling)

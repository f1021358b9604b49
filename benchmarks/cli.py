"""mpi_sfl benchmarks: every figure a ratio against a baseline measured in the same run.

    python -m benchmarks SUITE [--quick | --tiny] [--out FILE.json]      (from the repository root)

Suites (benchmarks/README.md):
  wire        Transport ping-pong vs raw mpi4py Send/Recv vs pickled send/recv (2 ranks)
  aggregate   flat-buffer FedAvg (Aggregator) vs per-tensor vs pickled collectives (4 ranks)
  throughput  SFL samples/s (file/memory/graph state) vs `mpi_sfl baseline` and vs torch DDP (gloo)
              (--model resnet18: on synthetic 3x32x32 images)
  memory      split-server peak RSS vs client batches in flight, per state mode (--model too)
  scaling     strong and weak scaling over client ranks, with a per-phase breakdown and a plot
  variants    baseline, fl, sl, v1, v2 and sync on the same job, three partitions: accuracy, time, bytes
  attacks     mean, median, trimmed mean, Krum, multi-Krum against attacked clients: accuracy, aggregation time
  noise       test accuracy and input/wire distance correlation against the noise added at the cut
  clients     10 to 10,000 logical clients: memory, set-up, per-client round cost, aggregation, accuracy
  precision   test accuracy and bytes of each sfl.wire_dtype (float32, float16, bfloat16, int8)
  step        one step's microseconds per batch, piece by piece (compute, scratch, messages, other)
  batching    sync with the split server batching a step's clients (sfl.batch_clients) or not, vs baseline
  cpu         each rank's CPU by role and kind (compute, scratch I/O, waiting, ...) for mlp, lenet5, cnn,
              against the single-process baseline's CPU per sample (one thread) and samples/s (all cores)
  startup     a tiny 4-rank job's wall time vs `mpiexec -n 4 python -c "import torch"`, and each role's
              time to its first step by phase (--against CHECKOUT: the same job from another checkout too)
  model       analytic cost model (benchmarks/cost_model.py): checked against scaling, projected
  all         every suite above in order, into --out-dir (model uses that run's wire and scaling)

--quick runs each suite in well under a minute on 2 cores; --tiny is smaller still (tests only:
its numbers are too small to mean much). Without either it is the real measurement. Each suite
prints a table and writes JSON {"suite", "level", "machine", "settings", "results", "summary",
"notes"} to --out (default runs/bench/SUITE[-quick|-tiny].json). MPI jobs run one at a time, each
under MPIEXEC_TIMEOUT and `timeout -k 10`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import (aggregate, attacks, batching, clients, common, cpu, memory, model, noise, precision,
                        scaling, startup, step, throughput, variants, wire)
from benchmarks.common import REPO

# The driver only: this registry, argument parsing, and writing and printing a suite's result.
# A suite is a module of this package with run(level, work, args) -> {"settings", "results",
# "summary", "notes", "text"[, "plot"]} (`work` is a scratch directory, `args` the parsed command
# line) and, as a rule, LEVELS = {"full": ..., "quick": ..., "tiny": ...}, its settings per level
# (benchmarks/README.md, "Adding a suite"). To add a suite,
# write its module, import it above and give it a line here (and in the docstring's list).
# The order is the order of `all`; model last: it reads that run's wire and scaling.
SUITES = {
    "wire": wire.run,
    "aggregate": aggregate.run,
    "throughput": throughput.run,
    "memory": memory.run,
    "scaling": scaling.run,
    "variants": variants.run,
    "attacks": attacks.run,
    "noise": noise.run,
    "clients": clients.run,
    "precision": precision.run,
    "step": step.run,
    "batching": batching.run,
    "cpu": cpu.run,
    "startup": startup.run,
    "model": model.run,
}


def run_suite(name: str, level: str, out: Path, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mpi_sfl-bench-{name}-"))
    t0 = time.time()
    machine = common.machine()
    try:
        res = SUITES[name](level, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - t0
    plot = res.pop("plot", None)
    text = res.pop("text")
    notes = res.get("notes", [])
    if level != "full":
        notes.insert(0, f"{level} mode: smaller settings, for checking the machinery; not the real measurement.")
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    doc = {"suite": name, "level": level, "machine": machine, "settings": res.get("settings", {}),
           "results": res["results"], "summary": res["summary"], "notes": notes,
           "suite_seconds": round(elapsed, 1)}
    bad = [k for k, v in res["summary"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    out.parent.mkdir(parents=True, exist_ok=True)
    if plot is not None:
        png = out.with_suffix(".png")
        plot(png)
        doc["plot"] = str(png)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    print("summary:")
    for k, v in res["summary"].items():
        print(f"  {k:34s} {common.fmt(v)}")
    for n in notes:
        print(f"note: {n}")
    print(f"{name}: {elapsed:.1f}s on {machine['hostname']} ({machine['cores']} cores) -> {out}"
          + (f" and {doc['plot']}" if plot else ""))
    if bad:
        print(f"warning: non-finite summary fields: {bad}", file=sys.stderr)
    sys.stdout.flush()
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("suite", choices=[*SUITES, "all"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small settings, well under a minute per suite")
    g.add_argument("--tiny", action="store_true", help="smallest settings (used by the tests)")
    p.add_argument("--out", help="JSON output (default runs/bench/SUITE[-LEVEL].json)")
    p.add_argument("--out-dir", default=str(REPO / "runs" / "bench"), help="where `all` (and defaults) write")
    p.add_argument("--wire", help="model: a wire suite JSON to take bandwidth/latency from (else measured)")
    p.add_argument("--scaling", help="model: a scaling suite JSON to check against (else measured)")
    p.add_argument("--against", metavar="CHECKOUT",
                   help="startup: also time the tiny job from this checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    p.add_argument("--model", choices=["cnn", "lenet5", "mlp", "resnet18"], default=None,
                   help="throughput, memory: the model (default cnn; resnet18 on synthetic 3x32x32 images)")
    args = p.parse_args(argv)
    level = "tiny" if args.tiny else "quick" if args.quick else "full"
    suffix = "" if level == "full" else f"-{level}"
    out_dir = Path(args.out_dir)
    if args.suite == "all" and args.out:
        p.error("all writes one file per suite into --out-dir; --out is for a single suite")
    common.warm_launches(level == "tiny")  # tiny jobs: start-up would be most of their cost
    try:
        if args.suite != "all":
            run_suite(args.suite, level, Path(args.out) if args.out else out_dir / f"{args.suite}{suffix}.json", args)
            return 0
        failed = []
        for name in SUITES:  # a suite that fails is reported; the ones after it still run
            out = out_dir / f"{name}{suffix}.json"
            if name == "model":
                args.wire, args.scaling = str(out_dir / f"wire{suffix}.json"), str(out_dir / f"scaling{suffix}.json")
            try:
                run_suite(name, level, out, args)
            except common.BenchError as exc:
                failed.append(name)
                print(f"{name}: FAILED\n{exc}", file=sys.stderr, flush=True)
            print()
        if failed:
            print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
            return 1
        return 0
    finally:
        common.warm_launches(False)


if __name__ == "__main__":
    sys.exit(main())

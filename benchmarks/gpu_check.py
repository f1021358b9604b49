"""One call on a GPU machine: does the CUDA path work, is it exact, how fast is it.

    python -m benchmarks.gpu_check [--device cuda|cpu] [--out gpu_check.json] [--quick]

Four ranks share the machine's GPU (each rank takes GPU slot % GPUs). The JSON is rewritten after
every result, so a run cut short still says what finished. Sections:
- inprocess: in this process, on the device: BatchNorm buffers averaged as the baseline averages
  them, a client copy with nothing to train (its optimizer's placeholder), the int8 wire packed on
  the device equal bit for bit to the CPU's packing, the determinism flags, the device mapping;
- exact: SFL (mpiexec -n 4) against the single-process baseline on the device, for mlp with the
  int8 wire, lenet5, cnn (dropout) and resnet18 (BatchNorm), within a round-off bound measured
  here: ROUNDOFF_K times how far the baseline moves when its initial weights move one ulp;
- repro: the cnn job rerun lands on the same bits; one round then `--resume` to two lands on the
  two-round run's bits;
- speed: training samples/s of SFL (memory and file state) against the single-process baseline
  on the same device, and against SFL on the CPU; peak device memory per role.

--device cpu runs every section on the CPU (the suite's dry run of the machinery: tiny settings
with --quick). Exit 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from mpi_sfl import baseline, client, config, models
from mpi_sfl.layout import pick_device, set_numerics
from mpi_sfl.wire import Wire

ROUNDOFF_K, FLOOR_ULPS = 10, 64  # as the exactness tests bound a run (tests/conftest.py)
TINY = {"data.dataset": "synthetic", "data.train_samples": 240, "data.test_samples": 200, "train.rounds": 2,
        "train.batch_size": 16, "train.lr": 0.05, "train.momentum": 0.0, "train.clients": 3,
        "train.aggregate_every": 1, "run.threads": 1}
EXACT = {"mlp-int8": {"model.name": "mlp", "sfl.wire_dtype": "int8"},
         "lenet5": {"model.name": "lenet5"},
         "cnn": {"model.name": "cnn", "sfl.state": "file"},
         "resnet18": {"model.name": "resnet18", "data.shape": [3, 32, 32], "train.rounds": 1,
                      "data.train_samples": 96}}


class Report:
    """The JSON, rewritten whole after each result."""

    def __init__(self, path: Path, device: str):
        self.path, self.failed = path, []
        self.data = {"device": device, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                     "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
        self.write()

    def add(self, section: str, name: str, result: dict) -> None:
        self.data.setdefault(section, {})[name] = result
        if result.get("ok") is False:
            self.failed.append(f"{section}/{name}")
        self.data["failed"] = self.failed
        self.write()
        print(f"{section}/{name}: {json.dumps(result)}", flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def attempt(report: Report, section: str, name: str, check) -> None:
    """Run one check; an exception is its failure, recorded, and the next check runs."""
    t0 = time.perf_counter()
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - any failure is this check's result
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    report.add(section, name, result)


# -- in this process --------------------------------------------------------------------------------
def inprocess(report: Report, device: torch.device) -> None:
    def batchnorm_average():
        bn = torch.nn.BatchNorm1d(8).to(device)
        bufs = models.buffers(bn)
        after = []
        for k in range(3):
            bn(torch.randn(5 + k, 8, device=device))
            after.append(models.snapshot(bufs))
        baseline._average_buffers(bufs, after, [5, 6, 7])
        want = sum(a[0].double() * w for a, w in zip(after, [5, 6, 7])) / 18
        return {"ok": bufs[0].device == device and float((bufs[0].double() - want).abs().max()) < 1e-6}

    def placeholder():
        cfg = config.load(None, [f"{k}={json.dumps(v)}" for k, v in
                                 {"model.name": "mlp", "model.freeze_encoder": True, "model.split": "label-sharing",
                                  "train.momentum": 0.9, "data.dataset": "synthetic"}.items()])
        spec, _ = models.for_config(cfg)
        c = client.client_copy(cfg, spec.build(0), device)
        vec = c.state_vector()
        return {"ok": vec.device == device, "floats": vec.numel()}

    def wire_bits():
        x = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3
        wire = Wire("int8")
        here, there = wire.pack(x), wire.pack(x.to(device)).cpu()
        return {"ok": torch.equal(here, there), "differing_bytes": int((here != there).sum())}

    def numerics():
        set_numerics(device, True)
        det = device.type != "cuda" or (torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
                                        and not torch.backends.cudnn.allow_tf32)
        return {"ok": bool(det), "mapping": [str(pick_device(device.type, s)) for s in range(4)]}

    for name, check in (("batchnorm_average", batchnorm_average), ("placeholder_optimizer", placeholder),
                        ("int8_wire_bits", wire_bits), ("numerics", numerics)):
        attempt(report, "inprocess", name, check)


# -- SFL against the baseline -----------------------------------------------------------------------
def load(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point() and a[k].numel())


def nudged_baseline(settings: dict, out: Path, nudge: int) -> dict[str, torch.Tensor]:
    """The baseline in this process with every initial weight moved one ulp (common.nudged_weights)."""
    with common.nudged_weights(nudge):
        baseline.run(config.load(None, common.overrides({**settings, "run.out_dir": str(out), "run.progress": "none"})),
                     start="overwrite")
    return load(out)


def exact(report: Report, tmp: Path, settings: dict, name: str) -> None:
    def check():
        common.train(4, settings, tmp / f"{name}-sfl")
        common.baseline(settings, tmp / f"{name}-base")
        sfl, ref = load(tmp / f"{name}-sfl"), load(tmp / f"{name}-base")
        spread = max(max_diff(nudged_baseline(settings, tmp / f"{name}-nudge{n}", n), ref) for n in (1, 2))
        top = max(float(v.abs().max()) for v in ref.values() if v.is_floating_point() and v.numel())
        floor = FLOOR_ULPS * float(torch.nextafter(torch.tensor(top), torch.tensor(math.inf)) - top)
        bound = max(ROUNDOFF_K * spread, floor)
        diff = max_diff(sfl, ref)
        return {"ok": diff < bound, "diff": diff, "bound": bound, "control_spread": spread}
    attempt(report, "exact", name, check)


def repro(report: Report, tmp: Path, settings: dict) -> None:
    def rerun():
        a, b = tmp / "repro-a", tmp / "repro-b"
        common.train(4, settings, a)
        common.train(4, settings, b)
        return {"ok": max_diff(load(a), load(b)) == 0.0, "diff": max_diff(load(a), load(b))}

    def resume():
        whole, part = tmp / "repro-a", tmp / "repro-resumed"
        common.train(4, {**settings, "train.rounds": 1}, part)
        common.mpi(4, ["-m", "mpi_sfl", "train", *common.sets({**settings, "run.out_dir": str(part),
                                                                "run.progress": "none"}), "--resume"])
        return {"ok": max_diff(load(whole), load(part)) == 0.0, "diff": max_diff(load(whole), load(part))}
    attempt(report, "repro", "rerun", rerun)
    attempt(report, "repro", "resume", resume)


# -- speed --------------------------------------------------------------------------------------------
def speed(report: Report, tmp: Path, device: str, quick: bool) -> None:
    work = {"model.name": "cnn", "data.dataset": "synthetic", "data.train_samples": 2000 if quick else 16000,
            "data.test_samples": 1000, "train.rounds": 2, "train.batch_size": 64, "train.clients": 4,
            "run.threads": 0}
    runs = [("baseline", None, "baseline"), ("sfl_memory", "memory", device), ("sfl_file", "file", device),
            ("sfl_memory_cpu", "memory", "cpu")]
    got = {}
    for name, state, dev in runs:
        if name == "sfl_memory_cpu" and device == "cpu":
            continue  # the CPU dry run: that line is sfl_memory itself

        def check(name=name, state=state, dev=dev):
            out = tmp / f"speed-{name}"
            if state is None:
                run = common.baseline({**work, "run.device": device}, out)
            else:
                run = common.train(4, {**work, "run.device": dev, "sfl.state": state}, out)
            s, last = run["summary"], run["metrics"][-1]
            got[name] = s["train_samples_per_s"]
            return {"ok": True, "samples_per_s": round(s["train_samples_per_s"], 1),
                    "peak_device_mb": s.get("peak_device_mb") or last.get("peak_device_mb"),
                    "peak_rss_mb": last.get("peak_rss_mb")}
        attempt(report, "speed", name, check)
    if "baseline" in got:
        report.add("speed", "ratios", {f"{k}_vs_baseline": round(v / got["baseline"], 3)
                                       for k, v in got.items() if k != "baseline"}
                   | ({"gpu_vs_cpu_sfl_memory": round(got["sfl_memory"] / got["sfl_memory_cpu"], 3)}
                      if "sfl_memory" in got and "sfl_memory_cpu" in got else {}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/gpu_check.json"))
    ap.add_argument("--quick", action="store_true", help="tiny settings: the machinery, not the figures")
    ap.add_argument("--sections", default="inprocess,exact,repro,speed")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; use --device cpu for the dry run", file=sys.stderr)
        return 2
    report = Report(args.out, args.device)
    device = pick_device(args.device, 0)
    set_numerics(device, True)
    sections = args.sections.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        if "inprocess" in sections:
            inprocess(report, device)
        common.warm_launches(True)  # tiny jobs: start-up would be most of their cost
        try:
            for name, extra in EXACT.items():
                if "exact" in sections and (not args.quick or name == "mlp-int8"):
                    exact(report, tmp, {**TINY, "run.device": args.device, **extra}, name)
            if "repro" in sections:
                repro(report, tmp, {**TINY, "run.device": args.device, **EXACT["mlp-int8" if args.quick else "cnn"]})
            if not args.quick:  # a measurement launches each job on its own
                common.warm_launches(False)
            if "speed" in sections:
                speed(report, tmp, args.device, args.quick)
        finally:
            common.warm_launches(False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report.write()
    print(f"gpu_check: {'failed: ' + ', '.join(report.failed) if report.failed else 'all checks passed'} "
          f"({args.out})", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

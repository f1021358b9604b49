"""Command line: `mpi-sfl train|baseline [CONFIG.toml] [--set section.key=value ...]`.

    mpiexec -n 4 python -m mpi4py -m mpi_sfl train            # the default job
    mpi-sfl baseline runs/default/config.toml                 # its single-process reference
"""
from __future__ import annotations

import argparse
import sys
import traceback

from .errors import EXIT_USER_ERROR, UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpi-sfl", description="Split Federated Learning over MPI.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("train", "SFL training; launch with mpiexec -n N python -m mpi4py -m mpi_sfl train"),
                       ("baseline", "single-process, unsplit training of the same model on the same data")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("config", nargs="?", help="TOML config (default: the packaged default.toml)")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value; repeatable")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "baseline":
        from . import baseline, config
        try:
            baseline.run(config.load(args.config, args.overrides))
        except UserError as exc:
            print(f"mpi-sfl: error: {exc}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        return
    from . import train
    try:
        train.main(args.config, args.overrides)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        # Also when not started under `python -m mpi4py`: one rank's crash must end the job, not hang it.
        from mpi4py import MPI
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)

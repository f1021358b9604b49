"""`mpi-sfl train`: set up on every rank, hand each rank to its role, end the run together.

    mpiexec -n 4 python -m mpi4py -m mpi_sfl train [CONFIG.toml] [--set section.key=value ...] [--resume]

Set-up (config, layout, data, scratch, the checkpoint to resume from) is collective and fails
together: one clear message from rank 0, exit code 2 on every rank, no hang. Then every role runs
the same rounds and steps; at every step boundary the ranks agree whether to stop (control.py):
- the run completes: a final checkpoint, summary.json, exit 0;
- a stop signal (SIGTERM, SIGINT, SIGUSR1): a checkpoint where they stopped, exit 3 (resumable);
- a problem (non-finite training, a disk full): the last good outputs stay, exit 4;
- a peer that stops answering for run.timeout_s: the rank that waited names it, exit 5.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import uuid
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import checkpoint, client, config, control, data, elastic, fed_server, models, outdir, progress, split_server, startup
from .control import EXIT_FAILED, EXIT_STOPPED, EXIT_TIMEOUT, FAILED, Stop
from .errors import UserError, fail_together
from .job import Job
from .layout import CLIENT, FED, ROLE_NAMES, SERVER, Layout, check_launch, local_rank, pick_device, set_numerics, set_threads
from .aggregation import check_robust
from .outdir import atomic_write, strict_json
from .outputs import partition_report, space_needed
from .state import make_scratch
from .transport import describe, set_describer
from .waiting import PeerGone, PeerTimeout, polite_wait, set_wait_mode

ROLES = {FED: fed_server.FedServer, SERVER: split_server.SplitServer, CLIENT: client.ClientRank}


def main(cfg_path: str | None, overrides: list[str], comm: MPI.Comm | None = None, start: str = "new") -> None:
    """Train on `comm` (default COMM_WORLD; a sub-communicator runs several jobs in one launch).

    `start` says what to do with run.out_dir (outdir.prepare): "new" refuses an earlier run's
    results, "resume" continues from its checkpoint, "overwrite" replaces them. Rank 0 holds the
    directory's lock from set-up until every rank is done, and gives it back on every way out
    (a set-up error's exit and a stop's included).
    """
    control.install_handlers()
    held: list[str] = []  # the out_dir rank 0 locked, once it has
    try:
        _run(cfg_path, overrides, comm or MPI.COMM_WORLD, start, held)
    finally:
        for out in held:
            outdir.release(out)


def _run(cfg_path: str | None, overrides: list[str], comm: MPI.Comm, start: str, held: list[str]) -> None:
    slot, local_size, _ = local_rank(comm)
    startup.mark("node")

    def setup():
        check_launch(comm.size)
        cfg = config.load(cfg_path, overrides)
        layout = Layout.from_config(cfg, comm.size)
        cfg = cfg.replace("train", clients=layout.clients)  # resolved: the written config.toml reruns as is
        spec, summary = models.for_config(cfg)  # imports a user model on every rank; a dummy batch through it
        if cfg.train.attackers > layout.clients:
            raise UserError(f"train.attackers = {cfg.train.attackers} exceeds the {layout.clients} logical clients")
        gathering = check_robust(cfg.sfl.aggregator, cfg.train.clients_per_round or layout.clients, cfg.sfl.trim,
                                 cfg.sfl.byzantine_f, summary.client_floats(cfg.u_shape, cfg.split) + 1,
                                 cfg.sfl.gather_limit_mb)
        if comm.rank == 0 and cfg.run.tensorboard:
            progress.check_tensorboard()
        if comm.rank == 0:  # checked, created and locked before any work; nothing is written on failure
            outdir.prepare(cfg.run.out_dir, start, space_needed(summary))
            held.append(cfg.run.out_dir)
        wire = f" ({cfg.sfl.wire_dtype} on the wire)" if cfg.split and cfg.sfl.wire_dtype != "float32" else ""
        return cfg, layout, spec, [summary.line(cfg.model.name, cfg.model.split) + wire] + [gathering] * bool(gathering)

    cfg, layout, spec, summary = fail_together(comm, startup.timed(setup, "setup"))
    startup.mark("setup_wait")
    set_wait_mode(cfg.run.wait, local_size, len(os.sched_getaffinity(0)), cfg.run.timeout_s, idle=comm.rank == 0)
    set_describer(layout.describe)
    role = layout.role(comm.rank)
    # Rank 0 finds (and if need be downloads) the data first, so ranks never race on the cache, and
    # checks an npz file through once (headers, labels, every value finite) before any rank loads it.
    fail_together(comm, startup.timed(lambda: data.prepare(cfg) if comm.rank == 0 else None, "prepare"))
    startup.mark("prepare_wait")

    made: list[Path] = []  # this rank's scratch dir, once made

    def load():
        device = pick_device(cfg.run.device, slot)
        set_numerics(device, cfg.run.deterministic)
        set_threads(cfg.run.threads, local_size)
        labels = data.load(cfg, "train", labels_only=True).y.numpy()
        shards = data.partition(labels, layout.clients, cfg)
        saved = resume_state(cfg, comm, shards, layout) if start == "resume" else None
        if role == CLIENT:  # only its logical clients' samples
            mine = np.concatenate([shards[c] for c in layout.clients_of(comm.rank)])
            resource = data.load(cfg, "train", only=mine)
        elif role == FED:
            resource = data.load(cfg, "test")
        elif cfg.sfl.state == "file":
            resource = make_scratch(cfg.run.scratch_dir, f"{os.environ.get('SLURM_JOB_ID', 'local')}-r{comm.rank}")
            made.append(resource)
        else:
            resource = None
        return device, shards, saved, resource, labels

    try:
        device, shards, saved, resource, labels = fail_together(comm, startup.timed(load, "data"))
    except SystemExit:  # another rank's data failed: a refused job leaves no scratch dir behind
        for d in made:
            shutil.rmtree(d, ignore_errors=True)
        raise
    if comm.rank == 0:  # how non-IID the federation is, beside the results (mpi-sfl plot draws it); written
        # only once every rank has its data, so a job refused at set-up leaves no out_dir behind
        report = partition_report(labels, shards, spec.num_classes)
        atomic_write(Path(cfg.run.out_dir) / "partition.json", (strict_json(report) + "\n").encode())
    del labels
    startup.mark("data_wait")
    run_id = saved["run"] if saved else comm.bcast(uuid.uuid4().hex if comm.rank == 0 else None, root=0)
    job = Job(cfg, spec, layout, comm, device, shards, start=(saved["round"], saved["step"]) if saved else (0, 0),
              run_id=run_id)
    startup.mark("communicators")
    # Each role gets what only it uses: a client rank its logical clients' training samples, the fed
    # server the test set, a split server its scratch dir (file state).
    worker = ROLES[role](job, resource)
    if saved:
        worker.load_state_dict(saved["state"])
        job.load_counters(saved["state"]["counters"])
    startup.mark("build")
    announce(job, summary)
    startup.mark("announce")
    code = run(job, worker)
    polite_wait(comm.Ibarrier(), who="every rank to finish", collective=True)  # nobody exits before rank 0 has written the results
    job.transport.bells.close()
    if code:
        MPI.Finalize()
        sys.exit(code)


def resume_state(cfg, comm: MPI.Comm, shards, layout: Layout) -> dict:
    """This rank's part of the latest intact checkpoint in run.out_dir, after checking it still
    means the same run (config, data); on another layout (ranks, split servers) at a round
    boundary, rebuilt from the files that held its logical clients (elastic.py). Collective: every rank checks its own file of each
    candidate (checkpoint/, then checkpoint.old/) and all take the first that every rank found
    intact; a damaged one is named, and the fall-back said, by rank 0."""
    found = checkpoint.candidates(cfg.run.out_dir)
    if not found:
        raise UserError(f"nothing to resume in {cfg.run.out_dir}: it has no checkpoint")
    damage = []
    for where in found:
        try:
            meta = checkpoint.read_meta(where)
            moved = (meta["world"], meta["config"].get("sfl", {}).get("servers")) != (comm.size, layout.servers)
            if moved:
                elastic.check_layout(meta, layout, where)
            checkpoint.check_resume(meta, cfg, checkpoint.partition_digest(shards), where, new_layout=moved)
            state = (elastic.state_for(where, meta, comm.rank, layout) if moved
                     else checkpoint.load_state(where, meta, comm.rank))
            problem = None
        except checkpoint.Damaged as exc:
            state, problem = None, str(exc)
        problems = [p for p in comm.allgather(problem) if p]
        if not problems:
            break
        damage.append(problems[0])
    else:
        raise UserError(f"cannot resume: {damage[0]}" + (f"; and the one before it: {damage[1]}" if len(damage) > 1
                                                         else "; there is no earlier checkpoint to fall back to")
                        + ". Restore the files, or start a new run with --overwrite")
    if damage and comm.rank == 0:
        print(f"mpi-sfl: warning: {damage[0]}; resuming from the checkpoint before it ({where}: round "
              f"{meta['round'] + 1}, step {meta['step']})", file=sys.stderr, flush=True)
    if (meta["round"], meta["step"]) == (cfg.train.rounds, 0):
        raise UserError(f"the run in {cfg.run.out_dir} has finished its {cfg.train.rounds} rounds; "
                        "raise train.rounds to train further")
    return {"round": meta["round"], "step": meta["step"], "run": meta["run"], "state": state}


def run(job: Job, worker) -> int:
    """Train to the end or to the agreed stop; the exit code (0, EXIT_STOPPED or EXIT_FAILED).
    A peer timeout ends the job here with EXIT_TIMEOUT."""
    ctl, rounds = job.control, job.cfg.train.rounds
    job.timers.cpu_window()  # the CPU accounting's window opens with the first step
    try:
        try:
            worker.train()
            reason, position = ctl.drain(), (rounds, 0)
            reason = FAILED if reason == FAILED else 0  # a signal during the last step: the run is done anyway
        except Stop as stop:
            reason, position = stop.reason, ctl.position
        worker.settle()
        written = reason != FAILED and job.checkpoint(worker.state_dict, position)  # same on every rank
        if written and not reason:
            worker.finish()
            if job.rank == 0:
                progress.ended(job.cfg.run.out_dir, "finished")
            return 0
        if not written:
            problem = ctl.first_problem()  # collective
            kept = worker.kept() if job.rank == 0 else ""  # the fed server writes (and knows) the outputs
            return report(job, f"{problem}; the run stopped. {kept}"
                               f"{resume_hint(job, '. The last checkpoint is kept')}", EXIT_FAILED, state="failed")
        rnd, step = position
        return report(job, f"stopped by {ctl.who_signalled()} at round {rnd + 1}, after step {step} of {rounds} rounds; "
                           f"checkpoint in {Path(job.cfg.run.out_dir) / checkpoint.CURRENT}"
                           f"{resume_hint(job, '')}", EXIT_STOPPED, prefix="mpi-sfl: ", state="stopped")
    except PeerGone as exc:
        return abort(job, worker, f"{exc}. Finished rounds, model.pt and the last checkpoint in {job.cfg.run.out_dir} "
                                  "are kept; continue with the same command and --resume (also on fewer ranks, from a "
                                  "round's checkpoint). Ending the job.")
    except PeerTimeout as exc:
        silent = stopped_here()  # the rank actually silent may be another: the one the waited-for rank waits on
        blame = (f"; {' and '.join(f'{describe(r)} is {what}' for r, what in silent)}: "
                 f"{'that is the rank' if len(silent) == 1 else 'those are the ranks'} that stopped answering"
                 if silent else f"; {'a rank' if exc.collective else 'it'} is stuck or dead")
        return abort(job, worker, f"{exc}{blame} (run.timeout_s = {job.cfg.run.timeout_s:g}). Finished rounds, model.pt "
                                  f"and the last checkpoint in {job.cfg.run.out_dir} are kept; ending the job.")
    finally:
        worker.close()


def abort(job: Job, worker, message: str) -> int:
    """A peer is stuck or gone: this rank says so in one line and ends every rank (MPI_Abort)."""
    print(f"mpi-sfl: error: {describe(job.rank)} {message}", file=sys.stderr, flush=True)
    worker.close()  # MPI_Abort ends this process before the finally clause could
    job.comm.Abort(EXIT_TIMEOUT)
    return EXIT_TIMEOUT


_peers: list[tuple] = []  # announce: (rank, role, host, pid, logical clients) of every rank


def stopped_here() -> list[tuple[int, str]]:
    """Ranks on this node whose process is stopped (SIGSTOP, a debugger), a zombie or gone, read
    from /proc: a rank that times out waiting for one peer can name the one that is really silent."""
    found = []
    for rank, _, host, pid, _ in _peers:
        if host != socket.gethostname() or pid == os.getpid():
            continue
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "X"
        if state in "TtZX":
            found.append((rank, {"T": "stopped", "t": "stopped", "Z": "dead"}.get(state, "gone")))
    return found


def resume_hint(job: Job, what: str) -> str:
    if checkpoint.find(job.cfg.run.out_dir) is None:
        return ""
    return f"{what}; continue with the same command and --resume"


def report(job: Job, message: str, code: int, prefix: str = "mpi-sfl: error: ", state: str = "") -> int:
    """Rank 0 prints how the run ended, and records it for mpi-sfl status (progress.json)."""
    if job.rank == 0:
        print(prefix + message, file=sys.stderr, flush=True)
        if state:
            progress.ended(job.cfg.run.out_dir, state, message)
    return code


def announce(job: Job, about: list[str]) -> None:
    """Rank 0 writes out_dir/ranks.tsv (rank, role, host, pid, logical clients): when a rank dies,
    mpiexec names only a pid; this file says which rank and role that was. Every rank names its
    peers with their pid and host from here on (a timeout's or a lost peer's message). It prints `about` (the
    model summary: parameters per part, the cut, bytes per sample each way; what gathering costs)
    with the start line."""
    rows = job.comm.allgather((job.rank, ROLE_NAMES[job.layout.role(job.rank)], socket.gethostname(), os.getpid(),
                               job.layout.clients_of(job.rank) if job.layout.role(job.rank) == CLIENT else []))
    set_describer(lambda r: f"{job.layout.describe(r)[:-1]}, pid {rows[r][3]} on {rows[r][2]})")  # which process
    _peers[:] = rows
    if job.rank != 0:
        return
    out = Path(job.cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["rank\trole\thost\tpid\tlogical_clients"] + [
        f"{r}\t{role}\t{host}\t{pid}\t{','.join(map(str, ids))}" for r, role, host, pid, ids in rows]
    (out / "ranks.tsv").write_text("\n".join(lines) + "\n")
    if job.cfg.run.progress != "none":
        r0, s0 = job.start
        where = f"resuming at round {r0 + 1}, step {s0}" if job.start != (0, 0) else "starting"
        print(f"[mpi-sfl] {where}: {job.comm.size} ranks (which pid is which rank: {out / 'ranks.tsv'})"
              + "".join(f"\n[mpi-sfl] {line}" for line in about), file=sys.stderr, flush=True)

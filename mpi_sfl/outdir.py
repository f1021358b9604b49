"""The output directory: checked and locked before a run starts, written so results cannot be lost.

Rank 0 (or the baseline's one process) calls `prepare` during set-up, before any training:

- refuse a path that is (or lies under) a regular file, that cannot be created or written (a
  read-only file system, /proc, /sys, no permission), or whose file system has too little room;
- take `OUT/.lock` (one line: `host pid slurm_job_id`) so two jobs never write into one directory;
  a lock whose process is gone on this host, or that names our own Slurm job (a requeued job keeps
  its id), is stale and taken over;
- refuse a directory holding an earlier run's results unless asked to resume or overwrite it;
  overwriting removes only the files this program writes, never anything else there.

When prepare fails it removes what it created (the directory, the lock): nothing is left behind.
Files are replaced atomically (write a temporary, fsync, rename, fsync the directory), so a job
killed mid-write leaves the previous version intact, and JSON is written strictly (no NaN/Infinity,
which most JSON readers reject). Pure Python: no MPI here.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, IO

from .errors import UserError

# Directories prepare created in this process, per out_dir: release removes them again while they
# are empty (a set-up step after prepare failed), so a refused job leaves nothing behind.
_created: dict[Path, list[Path]] = {}

MODES = ("new", "resume", "overwrite")
LOCK = ".lock"
# What marks a directory as holding an earlier run's results.
RESULTS = ("metrics.jsonl", "summary.json", "model.pt", "checkpoint")
# What only an SFL training run writes (the baseline writes none of these).
SFL_ONLY = ("partition.json", "ranks.tsv", "checkpoint", "checkpoint.old")
# Everything this program writes into OUT (globs); --overwrite removes these and nothing else. The
# `.tmp-*` temporaries are those of atomic_write / atomic_torch_save left by a killed job.
OURS = ("config.toml", "metrics.jsonl", "summary.json", "model.pt", "model.pt.tmp", "curves.png", "ranks.tsv",
        "partition.json", "partition.json.tmp-*", "partition.png",
        "checkpoint", "checkpoint.old", "checkpoint.tmp*",
        "config.toml.tmp-*", "metrics.jsonl.tmp-*", "summary.json.tmp-*", "model.pt.tmp-*",
        "progress.json", "progress.json.tmp-*", "tensorboard")


def prepare(out_dir: str, mode: str, need_bytes: int = 0, *, can_resume: bool = True) -> Path:
    """Check, create and lock `out_dir` for a run started as `mode` (new, resume, overwrite).

    Raises UserError (one line naming the path and what to change) on any refusal, after removing
    whatever it created. `can_resume=False` (the baseline) leaves --resume out of the advice.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    out = Path(out_dir)
    created = _make_dir(out)
    locked = False
    try:
        _probe_write(out)
        _check_space(out, need_bytes, _our_bytes(out) if mode == "overwrite" else 0)
        _lock(out)
        locked = True
        earlier = [name for name in RESULTS if (out / name).exists()]
        if mode == "new" and earlier and not can_resume and holds_sfl_run(out):
            # The baseline is the SFL run's reference: never advise deleting the run it is compared to.
            raise UserError(f"{out} holds the results of an SFL run ({', '.join(earlier)}); write the baseline "
                            f"beside it, not over it: {_set_out_dir(_free_sibling(out))}")
        if mode == "new" and earlier:
            how = "pass --resume to continue it or --overwrite to replace them" if can_resume \
                else "pass --overwrite to replace them"
            raise UserError(f"{out} holds the results of an earlier run ({', '.join(earlier)}); "
                            f"{how} (or set run.out_dir)")
        if mode == "resume" and not any((out / d / "meta.json").is_file() for d in ("checkpoint", "checkpoint.old")):
            raise UserError(f"nothing to resume in {out} (no checkpoint); drop --resume to start a new run "
                            f"(or set run.out_dir)")
        if mode == "overwrite":
            _remove_ours(out)
    except BaseException:
        if locked:
            release(out)
        _remove_dirs(created)
        raise
    _created[out.absolute()] = created
    return out


def holds_sfl_run(out: Path) -> bool:
    """Whether `out` holds (part of) an SFL training run rather than a baseline's: only `train`
    writes partition.json, ranks.tsv and checkpoints (before its first round ends), and its
    summary.json says mode "sfl"."""
    if any((out / name).exists() for name in SFL_ONLY):
        return True
    try:
        return json.loads((out / "summary.json").read_text()).get("mode") != "baseline"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: it may be an SFL run's; do not advise replacing it


def _free_sibling(out: Path) -> Path:
    """A directory beside `out` for a baseline run: `baseline`, else `<out>-baseline[-k]`, the
    first that holds no results."""
    candidates = [out.parent / "baseline", out.with_name(f"{out.name}-baseline")]
    candidates += [out.with_name(f"{out.name}-baseline-{k}") for k in range(2, 100)]
    for c in candidates:
        if c != out and not any((c / name).exists() for name in RESULTS):
            return c
    return candidates[-1]


def _set_out_dir(path: Path) -> str:
    """`--set run.out_dir=PATH` as one can paste it into a shell (quoted where it must be)."""
    import shlex

    from .config import parse_value

    text = str(path)
    if parse_value(text) == text and shlex.quote(text) == text:
        return f"--set run.out_dir={text}"
    toml = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"--set {shlex.quote('run.out_dir=' + toml)}"


def release(out_dir: str | Path) -> None:
    """Remove OUT/.lock if this process holds it, and the directories prepare created if they are
    still empty (the job ended before writing anything). Safe to call twice, or after a failed prepare."""
    lock = Path(out_dir) / LOCK
    try:
        if _read_lock(lock)[:2] == (socket.gethostname(), str(os.getpid())):
            lock.unlink()
    except (OSError, ValueError):
        pass
    _remove_dirs(_created.pop(Path(out_dir).absolute(), []))


def atomic_write(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a job killed mid-write) sees the old file or
    the new one, never a part of either."""
    _atomic(Path(path), lambda f: f.write(data))


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save(obj, path), replacing `path` atomically (see atomic_write). Serialized in memory
    first: torch.save writing to a full disk raises a RuntimeError from its zip writer, where
    writing the bytes raises the OSError (ENOSPC) that callers handle."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def strict_json(obj, indent: int | None = None) -> str:
    """json.dumps that never writes NaN or Infinity (not JSON; many readers refuse the whole file):
    non-finite floats, also inside nested dicts and lists, become null."""
    return json.dumps(_finite(obj), allow_nan=False, indent=indent)


# -- helpers --------------------------------------------------------------------------------------
def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash only once the directory is synced
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot sync a directory
            raise
    finally:
        os.close(fd)


def _make_dir(out: Path) -> list[Path]:
    """Create `out` and its missing parents; returns those it created, deepest first."""
    missing = []
    p = out
    while not p.exists() and not p.is_symlink() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():  # the deepest existing path is a regular file (or a broken link, a device...)
        what = "is" if p == out else f"lies under {p}, which is"
        kind = "a regular file" if p.is_file() else "not a directory"
        raise UserError(f"output directory {out} {what} {kind}; set run.out_dir to a directory")
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.insert(0, d)
    except OSError as exc:
        _remove_dirs(created)
        raise UserError(f"cannot create output directory {out} ({exc.strerror}); "
                        f"set run.out_dir to a writable directory") from None
    return created


def _remove_dirs(dirs: list[Path]) -> None:
    """Remove directories prepare created, deepest first; rmdir removes one only while it is empty
    (another job may have started writing into it meanwhile)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _probe_write(out: Path) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise UserError(f"cannot write in output directory {out} ({exc.strerror}); "
                        f"set run.out_dir to a writable directory") from None


def _check_space(out: Path, need: int, reclaimable: int) -> None:
    st = os.statvfs(out)
    free = st.f_bavail * st.f_frsize
    if free + reclaimable < need:
        raise UserError(f"output directory {out} has {_mib(free)} free, the run needs about {_mib(need)}; "
                        f"free some space or set run.out_dir")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _lock(out: Path) -> None:
    """Take OUT/.lock, taking over a stale one; UserError naming the holder if it is live."""
    lock = out / LOCK
    me = f"{socket.gethostname()} {os.getpid()} {os.environ.get('SLURM_JOB_ID') or '-'}\n"
    for _ in range(5):  # another job may take or drop the lock between our steps: look again
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        try:
            holder = _read_lock(lock)
        except FileNotFoundError:
            continue  # released just now
        except (OSError, ValueError):
            raise UserError(f"{out} is in use by another job (unreadable {lock}); "
                            f"if no job is using {out}, delete {lock}") from None
        if not _stale(holder):
            host, pid, job = holder
            raise UserError(f"{out} is in use by another job (host {host}, pid {pid}, Slurm job {job}); "
                            f"if that job is gone, delete {lock}")
        _take_over(lock, holder)
    raise UserError(f"{out} is in use by other jobs that keep taking {lock}; set run.out_dir")


def _read_lock(lock: Path) -> tuple[str, str, str]:
    host, pid, job = lock.read_text().split()
    int(pid)
    return host, pid, job


def _stale(holder: tuple[str, str, str]) -> bool:
    """A lock is stale when it names this host and a dead (or our own) process, or names our own
    Slurm job id — a requeued job keeps its id — unless it is a live process on this host (another
    step of the same allocation)."""
    host, pid, job = holder
    here = host == socket.gethostname()
    if here and (int(pid) == os.getpid() or not pid_alive(int(pid))):
        return True
    return job != "-" and job == os.environ.get("SLURM_JOB_ID") and not here


def _take_over(lock: Path, holder: tuple[str, str, str]) -> None:
    """Remove a stale lock, without ever removing a fresh one another job took meanwhile: move it
    aside atomically, and put it back if it is not the stale lock we judged."""
    aside = lock.with_name(f"{LOCK}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    try:
        if _read_lock(aside) != holder:
            os.link(aside, lock)  # a live job's lock: restore it (fails only if yet another took it)
    except (OSError, ValueError):
        pass
    aside.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs. A zombie does not: a rank SIGKILLed with its
    job stays one for a while (seconds, here) after its launcher has returned, and it holds nothing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # field 3, after the command in parentheses
    except (OSError, IndexError):
        return True  # no /proc (not Linux): a live pid is all we can know
    return state not in ("Z", "X")


def _our_files(out: Path) -> list[Path]:
    return sorted({p for pattern in OURS for p in out.glob(pattern)})


def _our_bytes(out: Path) -> int:
    total = 0
    for p in _our_files(out):
        for f in ([p] if not p.is_dir() else [q for q in p.rglob("*") if q.is_file()]):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    return total


def _remove_ours(out: Path) -> None:
    try:
        for p in _our_files(out):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    except OSError as exc:
        raise UserError(f"cannot remove the earlier run's {exc.filename} ({exc.strerror}); "
                        f"remove it yourself or set run.out_dir") from None

"""One fit per run at a time: ``<root>/<run_name>/run.lock``.

Two fits of one run (a SLURM array that reuses a name, a rerun while the first job still runs)
would mix their checkpoints in one folder. The fit that starts first holds an OS lock on
``run.lock`` for as long as its process lives, and writes who it is into the file (pid, host,
process start time, SLURM job); a second fit is refused with that record in the error.

* The lock is ``fcntl.lockf`` (a POSIX record lock), not ``flock``: the kernel drops it when the
  holder exits in any way, SIGKILL included, and, unlike ``flock``, forked children (DataLoader
  workers) do not inherit it, so orphaned workers of a killed fit cannot keep its run locked.
* The record outlives a crash, so it is read even when the lock is free. A record without a
  running holder is stale and broken with a warning: its pid is gone on this host, or now belongs
  to a process started at another time, or a requeued SLURM job (same ``SLURM_JOB_ID``, higher
  ``SLURM_RESTART_COUNT``) is the holder's next incarnation. A holder on another host cannot be
  checked from here (file locks on shared filesystems may be host-local): the error says how to
  break the lock.
* Under torchrun, srun or Lightning's ``ddp`` launcher every process runs the CLI; only global
  rank 0 of a launch takes the lock (:func:`is_launch_rank_zero`), so a launch's other ranks are
  never refused.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

LOCK_FILE = "run.lock"
#: the rank variables of torchrun (RANK, GROUP_RANK, LOCAL_RANK), srun (SLURM_PROCID) and Lightning's
#: ddp launcher (NODE_RANK, LOCAL_RANK); a launch's rank 0 has each that is set equal to 0
RANK_VARIABLES = ("RANK", "GROUP_RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")
#: a filesystem without POSIX locks answers lockf with one of these; the record then guards alone
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

# The lock lives as long as its open descriptor: held here until release_run_locks(), keyed by
# the lock file's resolved path. POSIX locks belong to the process, so a second lockf from this
# process would succeed, and closing any descriptor of the file would drop the lock: this table
# also refuses a second hold from the same process.
_HELD: dict[Path, int] = {}


class RunInUseError(RuntimeError):
    """Another fit holds the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run: written into the lock file as JSON."""

    pid: int
    host: str
    pid_start: int | None  # /proc/<pid>/stat start time, in clock ticks after boot: tells a reused pid
    since: str
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            pid=os.getpid(), host=socket.gethostname(), pid_start=_process_start(os.getpid()),
            since=datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host} (since {self.since}{job})"


def is_launch_rank_zero(environ=os.environ) -> bool:
    """Whether this process is global rank 0 of its launch, from the variables launchers set
    (none set: a single process, or the main process of ``ddp_spawn``)."""
    return all(int(environ[name]) == 0 for name in RANK_VARIABLES if environ.get(name))


def lock_run(run: str | Path) -> None:
    """Holds ``<run>/run.lock`` until :func:`release_run_locks` (``ssl_lightning.cli.main()`` calls it
    when the subcommand ends) or the end of the process.

    Raises :class:`RunInUseError` naming the run directory and its holder when another fit may
    hold it; breaks a stale lock with a warning.
    """
    path = Path(run) / LOCK_FILE
    key = path.resolve()
    if key in _HELD:
        raise RunInUseError(
            f"Run directory {run} is already held by this process (pid {os.getpid()}). If its fit has "
            "ended (a fit run through SSLCLI rather than ssl_lightning.cli.main()), call "
            "ssl_lightning.run_lock.release_run_locks() first."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _claim(fd, Path(run))
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd


def release_run_locks() -> None:
    """Empties the record of every run lock this process holds, then drops the locks."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.ftruncate(fd, 0)
        os.close(fd)


def _claim(fd: int, run: Path) -> None:
    me = Holder.this_process()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in NO_LOCKS:  # EAGAIN or EACCES: a live process holds it
            holder = _read_holder(fd)
            who = holder.describe() if holder else "another process (that has not written its record yet)"
            raise RunInUseError(_in_use_message(run, who)) from None
        rank_zero_warn(
            f"{run / LOCK_FILE}: this filesystem has no file locks ({error.strerror}); only the holder "
            "record in it keeps a second fit of the run out."
        )
    holder = _read_holder(fd)
    if holder is not None:
        reason = why_stale(holder, me)
        if reason is None and holder.host == me.host:
            raise RunInUseError(_in_use_message(run, holder.describe()))
        if reason is None:
            raise RunInUseError(
                f"Run directory {run} is held by {holder.describe()}, and whether that fit still runs "
                f"cannot be checked from host {me.host}. If it does not (its node was lost, or it was "
                f"killed), delete {run / LOCK_FILE} and rerun; otherwise wait for it, or choose another --run_name."
            )
        rank_zero_warn(f"Breaking the stale lock {run / LOCK_FILE} of {holder.describe()}: {reason}.")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
    os.fsync(fd)


def why_stale(holder: Holder, me: Holder) -> str | None:
    """Why ``holder`` cannot be running any more, or None when it may be."""
    if (holder.slurm_job_id is not None and holder.slurm_job_id == me.slurm_job_id
            and me.slurm_restart_count > holder.slurm_restart_count):
        # SLURM ends every process of a job before it requeues it
        return f"SLURM job {holder.slurm_job_id} was requeued (restart {me.slurm_restart_count})"
    if holder.host != me.host:
        return None
    if not _is_running(holder.pid):
        return f"pid {holder.pid} is gone"
    start = _process_start(holder.pid)
    if holder.pid_start is not None and start is not None and start != holder.pid_start:
        return f"pid {holder.pid} now belongs to another process"
    return None


def _in_use_message(run: Path, who: str) -> str:
    return (
        f"Run directory {run} is in use by {who}: a second fit of the same run would mix its checkpoints "
        "with the first's. Wait for that fit to end or stop it, or choose another --run_name."
    )


def _read_holder(fd: int) -> Holder | None:
    text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):  # cut short by a crash mid-write: nobody to name or wait for
        return None


def _is_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return _process_state(pid) != "Z"  # a zombie has exited; only its parent has not reaped it


def _process_start(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of proc(5)'s stat


def _process_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None  # field 3


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (the command name before it may hold spaces), or None
    without procfs (macOS)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()

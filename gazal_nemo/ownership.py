"""Who owns a folder, and whether that owner is gone.

Two kinds of folder belong to one process while it works: a converter's staging folder
(convert/dist_ckpt.py) and a training run's checkpoint folder (training/run_folder.py). Each
holds a small JSON marker naming its owner: host, pid, the process's start time (which tells a
reused pid apart), the Slurm job and restart count, and when it started. The next process that
wants the folder asks `owner_gone(marker)`:

  * same host: gone when the pid is dead or now belongs to another process (start time differs);
  * same Slurm job id, another restart count: gone (Slurm requeued the job: the earlier run of it
    has ended, wherever it ran);
  * another host: its liveness cannot be checked from here; gone only when the caller keeps a
    heartbeat (the marker's mtime, refreshed by the owner) and it is older than `stale_after_s`.

Anything else counts as alive: a folder is never taken from a process that may still write it.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path


def this_process() -> dict:
    """The marker of the calling process."""
    pid = os.getpid()
    owner = {"host": socket.gethostname(), "pid": pid, "start": process_start(pid),
             "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if os.environ.get("SLURM_JOB_ID"):
        owner["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        owner["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    return owner


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux /proc), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "(comm)"


def process_alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    current = process_start(pid)
    return start is None or current is None or current == start


def owner_gone(owner: dict, *, heartbeat_mtime: float | None = None, stale_after_s: float | None = None) -> str | None:
    """Why `owner` (a `this_process()` marker) is known to have ended, as a phrase for the log;
    None while it may still be running."""
    if not isinstance(owner, dict):
        return None
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    me = this_process()
    if owner.get("host") == me["host"]:
        if pid == me["pid"] and owner.get("start") == me["start"]:
            return None  # ourselves
        if not process_alive(pid, owner.get("start")):
            return f"pid {pid} on {me['host']} is no longer running"
        return None
    job = owner.get("slurm_job_id")
    if job and job == me.get("slurm_job_id") and owner.get("slurm_restart_count") != me.get("slurm_restart_count"):
        return (f"it was run {int(owner.get('slurm_restart_count') or 0) + 1} of Slurm job {job}, which has been "
                "requeued")
    if heartbeat_mtime is not None and stale_after_s is not None:
        age = time.time() - heartbeat_mtime
        if age > stale_after_s:
            return f"its heartbeat is {age:.0f} s old (more than {stale_after_s:.0f} s: host {owner.get('host')} stopped it)"
    return None


def describe_owner(owner: dict, *, heartbeat_mtime: float | None = None) -> str:
    """`pid 123 on host gpu7 (Slurm job 4567, started 2026-12-06T21:57:38+00:00, heartbeat 12 s ago)`."""
    if not isinstance(owner, dict):
        return "an unreadable owner marker"
    details = []
    if owner.get("slurm_job_id"):
        details.append(f"Slurm job {owner['slurm_job_id']}")
    if owner.get("started_at"):
        details.append(f"started {owner['started_at']}")
    if heartbeat_mtime is not None:
        details.append(f"heartbeat {max(time.time() - heartbeat_mtime, 0):.0f} s ago")
    return f"pid {owner.get('pid')} on host {owner.get('host')}" + (f" ({', '.join(details)})" if details else "")

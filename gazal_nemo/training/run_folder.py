"""Run folders belong to one run: checked and claimed before any data is read or model built.

`checkpoint.dir` is where a run lives. While a job of it runs, the folder holds
`gazal_run.lock` (host, pid, process start, Slurm job id and restart count, start time), whose
mtime rank 0 refreshes every HEARTBEAT_S seconds. A second job for the same folder is refused,
naming the owner, unless the owner is gone (gazal_nemo/ownership.py, the rule the converters'
staging folders use): its pid is dead on this host, it was an earlier run of this same Slurm
job (a requeue takes over its own lock), or, on another host, its heartbeat is older than
STALE_AFTER_S. A taken-over lock is reported in one line.

The folder also keeps `gazal_run.json`: the run's id, made when the run first starts there.
Checkpoints carry the id (training/run_identity.py) and so does the logging folder
(`logging.dir/gazal_run.json`): a job of another run may not log there
(training/metrics.py), and `checkpoint.resume=false` in a folder that holds step checkpoints
is refused, naming them (a new run would prune them, and its requeue would resume them).

`claim_run` also does, before any work, what a resume would refuse later: the recipe
comparison and the input fingerprints against the checkpoint it would resume
(training/resume_check.py), a train.stop_at_step the run has already passed, and export
folders that are not ours or overlap the inputs (stages/export.py). `--dry-run` runs the same
checks without taking anything (`check_run_folders(..., take=False)`).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch.distributed as dist

from gazal_nemo.ownership import describe_owner, owner_gone, this_process

LOCK_FILE = "gazal_run.lock"
RUN_FILE = "gazal_run.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
"""A lock of another host whose heartbeat is older than this belongs to a dead job (clocks of the
hosts sharing the file system are assumed to agree within a few minutes)."""


# ---- the lock ---------------------------------------------------------------------------------


def read_lock(folder: str | Path) -> tuple[dict, float] | None:
    """(owner marker, heartbeat mtime) of the folder's lock; None when there is none. An
    unreadable lock (cut by a crash mid-write) reads as an owner that is gone."""
    path = Path(folder) / LOCK_FILE
    try:
        mtime = path.stat().st_mtime
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": "?", "unreadable": True}, 0.0
    return (owner if isinstance(owner, dict) else {"pid": -1, "host": "?", "unreadable": True}), mtime


def _gone(owner: dict, mtime: float) -> str | None:
    if owner.get("unreadable"):
        return "the lock file is unreadable (cut by a crash)"
    return owner_gone(owner, heartbeat_mtime=mtime, stale_after_s=STALE_AFTER_S)


def _in_use_message(folder: Path, owner: dict, mtime: float) -> str:
    return (f"checkpoint.dir={folder}: in use by another run, {describe_owner(owner, heartbeat_mtime=mtime)} "
            f"(see {folder / LOCK_FILE}); wait for it to end or use another checkpoint.dir (its lock is taken "
            f"over once that process is gone on this host, its Slurm job is requeued, or it has not refreshed the "
            f"lock for {STALE_AFTER_S:.0f} s)")


def lock_problem(folder: str | Path) -> tuple[str | None, str | None]:
    """(refusal, takeover note) as a job for `folder` would see its lock now (reads only)."""
    folder = Path(folder)
    found = read_lock(folder)
    if found is None:
        return None, None
    owner, mtime = found
    gone = _gone(owner, mtime)
    if gone is None:
        return _in_use_message(folder, owner, mtime), None
    return None, f"taking over {folder / LOCK_FILE} of {describe_owner(owner)}: {gone}"


class RunLock:
    """The lock of one checkpoint folder, held by this process (rank 0 of the job)."""

    def __init__(self, folder: str | Path, run_id: str | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.owner = dict(this_process(), run_id=run_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock (a takeover note when it was a dead owner's); ValueError naming a live one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):  # another job may take or free it between our steps
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = read_lock(self.folder)
                if found is None:
                    continue
                owner, mtime = found
                gone = _gone(owner, mtime)
                if gone is None:
                    raise ValueError(_in_use_message(self.folder, owner, mtime)) from None
                aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # atomic: of two takers, one wins
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                note = f"taking over {self.path} of {describe_owner(owner)}: {gone}"
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.owner, indent=2) + "\n")
            return note
        raise ValueError(f"checkpoint.dir={self.folder}: could not take {self.path} (other jobs keep taking it)")

    def held(self) -> bool:
        found = read_lock(self.folder)
        return found is not None and all(found[0].get(k) == self.owner[k] for k in ("host", "pid", "start"))

    def set_run_id(self, run_id: str) -> None:
        self.owner["run_id"] = run_id
        if self.held():
            tmp = self.path.with_name(LOCK_FILE + ".part")
            tmp.write_text(json.dumps(self.owner, indent=2) + "\n")
            os.replace(tmp, self.path)

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        def beat():
            while not self._stop.wait(every_s):
                try:
                    if not self.held():
                        print(f"gazal: warning: {self.path} no longer names this job; another job took the "
                              "folder over", flush=True)
                        return
                    os.utime(self.path)
                except OSError:
                    pass  # a file system hiccup: the next beat tries again

        self._thread = threading.Thread(target=beat, name="gazal-run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)


# ---- the run's id -------------------------------------------------------------------------------


def read_run_file(folder: str | Path) -> dict | None:
    try:
        record = json.loads((Path(folder) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("run_id") else None


def _new_run_record(folder: Path, name: str) -> dict:
    now = datetime.now(UTC)
    return {"run_id": f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}", "checkpoint_dir": str(folder.resolve()),
            "name": name, "created_at": now.isoformat(timespec="seconds")}


def _write_run_file(folder: Path, record: dict) -> None:
    if read_run_file(folder) != record:
        tmp = folder / (RUN_FILE + ".part")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / RUN_FILE)


# ---- the checks -----------------------------------------------------------------------------------


@dataclass
class RunClaim:
    """What rank 0 found and holds for this job."""

    run: dict
    """The run's record (run_id, checkpoint_dir, name, created_at)."""
    inputs: dict
    """Fingerprints of the inputs as they are now (training/run_identity.py)."""
    resume_from: str | None = None
    resume_step: int = 0
    notes: list[str] = field(default_factory=list)
    lock: RunLock | None = None
    created: list[Path] = field(default_factory=list)
    """Files and folders this claim made (deepest first): removed again when the job ends without
    having written anything of the run (a refusal or an error before its first step)."""


def _missing_folders(path: Path) -> list[Path]:
    """The folders mkdir(parents=True) would make for `path`, deepest first."""
    missing, probe = [], Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    return missing


def check_run_folders(recipe, *, take: bool) -> RunClaim:
    """Every refusal about the run's folders, before any work (rank 0). take=True claims them:
    the lock, the run file, the logging folder's marker; take=False (the dry run) writes nothing."""
    from gazal_nemo.config_io import to_dict
    from gazal_nemo.training import checkpoint as ckpt
    from gazal_nemo.training.metrics import RUN_OWNER_FILE, claim_logging_dir, logging_dir_problem
    from gazal_nemo.training.resume_check import check_resume_inputs, check_resume_recipe
    from gazal_nemo.training.run_identity import fingerprint_inputs

    recipe_dict = to_dict(recipe)
    folder = Path(recipe.checkpoint.dir)
    notes, lock, created = [], None, _missing_folders(folder)
    if take:
        lock = RunLock(folder)
        note = lock.acquire()
        notes += [note] if note else []
    else:
        refusal, note = lock_problem(folder)
        if refusal:
            raise ValueError(refusal)
        notes += [note] if note else []
    try:
        if take:  # the folder is ours now: a step_N.tmp is a dead job's unfinished write
            notes += [f"removed {stale}: an unfinished checkpoint write" for stale in ckpt.remove_stale_tmp(folder)]
        steps = ckpt.step_dirs(folder)
        if steps and not recipe.checkpoint.resume:
            names = ", ".join(p.name for p in steps[-6:]) + (f" and {len(steps) - 6} older" if len(steps) > 6 else "")
            raise ValueError(f"checkpoint.resume=false but checkpoint.dir={folder} holds step checkpoints of an "
                             f"earlier run: {names}; a new run there would prune them and a requeue of it would "
                             "resume them; use another checkpoint.dir, delete them, or set checkpoint.resume=true "
                             "to continue that run")
        latest, identity, state = None, None, {}
        if steps:
            latest, _, error = ckpt.resume_candidate(folder)
            if error is not None:
                raise ValueError(error)
            check_resume_recipe(ckpt.read_saved_recipe(latest), recipe_dict, where=latest)
            identity = ckpt.read_identity(latest)
            state = ckpt.read_trainer_state(latest)
        inputs = fingerprint_inputs(recipe_dict)
        if latest is not None:
            allowed = tuple(recipe.checkpoint.allow_changes)
            base = Path(recipe.model.hf_path)
            if not take and base.is_dir() and not any(base.glob("*.safetensors")):
                # a dry run fetches a hub model's config only: its weights cannot be compared here
                notes.append(f"not comparing model.hf_path={base}: no weights here (a dry run fetches the config only)")
                allowed += ("model.hf_path",)
            check_resume_inputs(identity, inputs, allowed=allowed, where=latest)
            _check_stop_at_step(recipe, folder, latest, state)
        run = _run_record(folder, recipe, identity)
        problem = logging_dir_problem(recipe.logging.dir, run["run_id"], adopt_unmarked=latest is not None and identity is None)
        if problem:
            raise ValueError(problem)
        check_outputs_apart(recipe_dict)
        if take:
            created = [p for p in (folder / RUN_FILE, Path(recipe.logging.dir) / RUN_OWNER_FILE) if not p.exists()] \
                + _missing_folders(Path(recipe.logging.dir)) + created
            _write_run_file(folder, run)
            lock.set_run_id(run["run_id"])
            claim_logging_dir(recipe.logging.dir, run)
    except BaseException:
        if lock is not None:
            for note in notes:  # what was done before the refusal (a takeover, a removed write)
                print(note, flush=True)
            lock.release()
            _remove_created(created)  # only folders this attempt made, and only when empty
        raise
    return RunClaim(run=run, inputs=inputs, resume_from=str(latest) if latest else None,
                    resume_step=int(state.get("step", 0)), notes=notes, lock=lock, created=created)


def _remove_unused(created: list[Path], folder: Path, log_dir: str | Path) -> None:
    """Undo a claim whose job left nothing of the run: no step folder (complete or not), no logged row."""
    from gazal_nemo.training import checkpoint as ckpt
    from gazal_nemo.training.metrics import has_logged_rows

    if not list(folder.glob(f"{ckpt.STEP_PREFIX}*")) and not has_logged_rows(log_dir):
        _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    for path in created:
        try:
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        except OSError:
            pass  # not empty: something else is in it now


def _run_record(folder: Path, recipe, identity: dict | None) -> dict:
    """The run this job belongs to: the resumed checkpoint's, else the folder's, else a new one."""
    existing = read_run_file(folder)
    if identity is not None and identity.get("run_id"):
        if existing is not None and existing["run_id"] == identity["run_id"]:
            return existing
        return {**_new_run_record(folder, recipe.name), "run_id": identity["run_id"]}
    if existing is not None:  # no step checkpoint yet (an earlier job died before its first save), or a legacy one
        return existing
    return _new_run_record(folder, recipe.name)


def _check_stop_at_step(recipe, folder: Path, latest: Path, state: dict) -> None:
    stop_at, step, total = recipe.train.stop_at_step, int(state.get("step", 0)), state.get("total_steps")
    if stop_at is not None and step >= stop_at and (total is None or step < int(total)):
        raise ValueError(f"train.stop_at_step={stop_at}: the run in checkpoint.dir={folder} is already at step {step}"
                         f"{f' of {total}' if total is not None else ''} ({latest.name}); this job would train nothing; "
                         "raise train.stop_at_step or drop it to go on")


EXPORT_PARTS = ("adapter", "megatron", "merged")
"""The folders an end-of-stage export writes under export_dir (stages/export.py)."""


def check_outputs_apart(recipe_dict: dict) -> None:
    """Outputs never replace or live inside inputs, and the export replaces only its own folders:
    export_dir/{adapter,megatron,merged} may not be, contain or lie inside an input (the export
    would delete it), nor hold a folder without a gazal marker (someone else's); checkpoint.dir
    and logging.dir may not be an input or lie inside one (their files would join it)."""
    from gazal_nemo.convert.dist_ckpt import is_gazal_output, overlap
    from gazal_nemo.training.run_identity import run_inputs

    inputs = run_inputs(recipe_dict)
    outputs = {"checkpoint.dir": (recipe_dict.get("checkpoint") or {}).get("dir"),
               "logging.dir": (recipe_dict.get("logging") or {}).get("dir")}
    for key, path in outputs.items():
        for input_key, input_path in inputs.items():
            how = overlap(path, input_path) if path else None
            if how in ("is", "lies inside"):
                raise ValueError(f"{key}={path}: {how} the input {input_key}={input_path}; write elsewhere")
    export_dir = recipe_dict.get("export_dir")
    if not export_dir:
        return
    for part in EXPORT_PARTS:
        target = Path(export_dir) / part
        for input_key, input_path in inputs.items():
            how = overlap(target, input_path)
            if how is not None:
                raise ValueError(f"export_dir={export_dir}: the export's {target} {how} the input {input_key}="
                                 f"{input_path} and would replace it; use another export_dir")
        if target.is_dir() and any(target.iterdir()) and not is_gazal_output(target):
            raise ValueError(f"export_dir={export_dir}: {target} exists and was not written by a gazal export "
                             "(no gazal_export.json or gazal_checkpoint.json); the export would replace it; use "
                             "another export_dir or move it away")
        if target.exists() and not target.is_dir():
            raise ValueError(f"export_dir={export_dir}: {target} is a file; the export needs it as a folder")


# ---- in a job ---------------------------------------------------------------------------------------


@contextmanager
def claimed_run(recipe):
    """Claim the run's folders on rank 0 before any work, agree on every rank, and make the run's
    identity the one checkpoints and exports carry; release at the end (also on errors)."""
    from gazal_nemo.training.run_identity import RunIdentity, set_active_run

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    claim, box, failure = None, [None, None], None
    if rank == 0:
        try:
            claim = check_run_folders(recipe, take=True)
            box = [{"run": claim.run, "inputs": claim.inputs}, None]
        except Exception as e:  # the other ranks must hear of any failure, or they wait forever
            if not distributed:
                raise
            box, failure = [None, str(e) or type(e).__name__], e
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure  # rank 0: as it came (a traceback for what is not a user's mistake)
    if box[1] is not None:
        raise ValueError(box[1])
    try:
        if claim is not None:
            for note in claim.notes:
                print(note, flush=True)
            how = (f"resuming {claim.resume_from} (step {claim.resume_step})" if claim.resume_from
                   else "starting at step 0")
            print(f"run {claim.run['run_id']} in {recipe.checkpoint.dir}: {how}", flush=True)
            claim.lock.start_heartbeat()
        set_active_run(RunIdentity(run_id=box[0]["run"]["run_id"], inputs=box[0]["inputs"], job=this_process()))
        yield claim
    finally:
        set_active_run(None)
        if claim is not None:
            claim.lock.release()
            _remove_unused(claim.created, Path(recipe.checkpoint.dir), recipe.logging.dir)

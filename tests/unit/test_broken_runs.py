"""A corpus of runs and folders gone wrong, each through the real CLI (issue 15, "nothing lost").

Sibling of test_broken_inputs.py: that corpus breaks inputs, this one breaks what happens to a
run between and around its jobs. One tiny SFT run is trained once through `gazal sft` (stopped
at train.stop_at_step, then resumed to its end and exported, both through the CLI); every row
copies that whole folder (model, data, checkpoints, logs, export: the recipe's paths are
relative, so a copy is the same run) and does one thing to it:

  * inputs rewritten under the same path (a data file, a base weight shard): resume and the
    step export refuse, naming the file; checkpoint.allow_changes lets it through;
  * folder ownership: a live owner's lock (this host, another host, the same Slurm job) is
    refused before any work, naming the owner; a dead owner's (pid gone, Slurm requeue, stale
    heartbeat) is taken over with a line; `checkpoint.resume=false` over checkpoints and a second
    experiment in a used logging.dir are refused, and nothing of the first run is touched;
  * run length: a stop at train.stop_at_step exits 75 without an export (so an afterok chain
    cannot start on a missing model), and slurm/common.sh does not requeue it;
  * converters: --out that is, contains or lies inside an input, and --overwrite of a folder
    gazal did not write, are refused (--force replaces it);
  * a full file system (a real tmpfs of a few MB; root only) and Ctrl-C (first: checkpoint and
    exit 75; second: exit at once), which are the tests after the table.

A row fails with the command, its exit status and its output tails.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SFT_RECIPE = REPO / "recipes" / "tiny_cpu_sft.yaml"
NUM_WORKERS = 3
TIMEOUT_S = 300
TOTAL_STEPS = 4
DATA = "data/sft_medreason.jsonl"
CKPT = "run/ckpt"
SHARD = "base/model-00002-of-00012.safetensors"
pytestmark = pytest.mark.slow


# ---- running the CLI --------------------------------------------------------------------------


def cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Ran:
    argv: list[str]
    proc: subprocess.CompletedProcess

    @property
    def rc(self) -> int:
        return self.proc.returncode

    def shown(self) -> str:
        return (f"gazal {' '.join(self.argv)}\nexit {self.rc}\nstdout:\n{self.proc.stdout[-3000:]}\n"
                f"stderr:\n{self.proc.stderr[-3000:]}")

    def error_line(self) -> str:
        return next((line for line in self.proc.stderr.splitlines() if line.startswith("gazal ") and ": error: " in line),
                    "")

    def refused(self, *fragments: str) -> None:
        """Exit 2, no traceback, one error line holding every fragment."""
        assert self.rc == 2 and "Traceback" not in self.proc.stderr, self.shown()
        for fragment in fragments:
            assert fragment in self.error_line(), f"{fragment!r} not in the error line\n{self.shown()}"


def gazal(cwd: Path, *argv: str, env: dict | None = None) -> Ran:
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *argv], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    return Ran(list(argv), proc)


def sft_args(*overrides: str, dry_run: bool = False) -> list[str]:
    """The shared run's command line, paths relative to its folder; `overrides` replace by key."""
    settings = {"model.hf_path": "base", "sft_data.sources.0.path": DATA, "checkpoint.dir": CKPT,
                "logging.dir": "run/logs", "export_dir": "run/export", "train.max_steps": str(TOTAL_STEPS),
                "checkpoint.save_every": "2", "checkpoint.keep_last": "3", "adapter.dropout": "0.0"}
    settings.update(override.split("=", 1) for override in overrides)
    return ["sft", "--recipe", str(SFT_RECIPE), *(["--dry-run"] if dry_run else []),
            *(f"{key}={value}" for key, value in settings.items())]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with (size, mtime_ns): a folder nothing touched keeps it."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_lock(tmp: Path, owner: dict, *, age_s: float = 0.0) -> Path:
    lock = tmp / CKPT / "gazal_run.lock"
    lock.write_text(json.dumps(owner))
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the shared run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    done: Path
    """The finished run: steps 2 and 4, export, one metrics row per step."""
    stopped: Path
    """The same run as it was after the job that stopped at train.stop_at_step=2."""
    stop_job: Ran
    finish_job: Ran


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_hf_dir) -> Shared:
    from gazal_nemo.commands.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("broken_runs")
    done = root / "done"
    shutil.copytree(tiny_hf_dir, done / "base")
    write_demo_data(done / "data", done / "base", num_grpo=4)
    stop_job = gazal(done, *sft_args("train.stop_at_step=2"))
    shutil.copytree(done, root / "stopped", symlinks=True)
    finish_job = gazal(done, *sft_args())
    return Shared(done=done, stopped=root / "stopped", stop_job=stop_job, finish_job=finish_job)


def copy_of(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp, dirs_exist_ok=True, symlinks=True)
    return tmp


def test_a_stop_at_step_job_exits_75_without_export_and_the_next_job_finishes(shared):
    stopped, finished = shared.stop_job, shared.finish_job
    assert stopped.rc == 75, stopped.shown()
    assert "stopped at train.stop_at_step=2 (step 2 of 4" in stopped.proc.stdout, stopped.shown()
    state = json.loads((shared.stopped / CKPT / "step_000002" / "trainer_state.json").read_text())
    assert state["stop_reason"] == "train.stop_at_step"  # what slurm/common.sh reads
    assert not (shared.stopped / "run" / "export").exists()
    assert finished.rc == 0, finished.shown()
    assert "resuming" in finished.proc.stdout and "step_000002" in finished.proc.stdout, finished.shown()
    rows = [json.loads(line) for line in (shared.done / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    export = shared.done / "run" / "export"
    identity = json.loads((export / "run_identity.json").read_text())
    step4 = json.loads((shared.done / CKPT / "step_000004" / "identity.json").read_text())
    assert identity["run_id"] == step4["run_id"] == json.loads((shared.done / CKPT / "gazal_run.json").read_text())["run_id"]
    assert identity["step"] == 4 and identity["inputs"] == step4["inputs"]
    assert set(identity["inputs"]) == {"model.hf_path", "sft_data.sources.0.path"}
    assert identity["inputs"]["sft_data.sources.0.path"]["files"][""]["size"] == (shared.done / DATA).stat().st_size
    for part in ("adapter", "merged"):
        assert json.loads((export / part / "gazal_export.json").read_text())["run"]["run_id"] == identity["run_id"]
    assert (export / "megatron" / "gazal_checkpoint.json").is_file()
    assert not (shared.done / CKPT / "gazal_run.lock").exists(), "the lock outlived its job"


# ---- the table --------------------------------------------------------------------------------


def _data_rewritten(tmp: Path, shared: Shared) -> None:
    """A gold letter changed in place (same size): refused by name; allowed, the run goes on."""
    copy_of(shared.done, tmp)
    data = tmp / DATA
    text = data.read_text()
    data.write_text(text.replace("\\\\boxed{A}", "\\\\boxed{B}", 1))
    assert data.read_text() != text
    ran = gazal(tmp, *sft_args())
    ran.refused(f"{CKPT}/step_000004: files this run was trained on changed",
                f"sft_data.sources.0.path {tmp}/{DATA}: same size, other contents",
                f"checkpoint.allow_changes=[{tmp}/{DATA}]")
    assert not (tmp / CKPT / "gazal_run.lock").exists()
    dry = gazal(tmp, *sft_args(dry_run=True))
    dry.refused(f"sft_data.sources.0.path {tmp}/{DATA}: same size, other contents")
    # allowed by path (relative, as the user would type it), and a dead owner's lock on the way
    pid = dead_pid()
    write_lock(tmp, {"host": socket.gethostname(), "pid": pid, "start": None})
    allowed = gazal(tmp, *sft_args(f"checkpoint.allow_changes=[{DATA}]"))
    assert allowed.rc == 0, allowed.shown()
    assert f"taking over {CKPT}/gazal_run.lock of pid {pid} on host {socket.gethostname()}" in allowed.proc.stdout
    assert f"pid {pid} on {socket.gethostname()} is no longer running" in allowed.proc.stdout, allowed.shown()


def _base_rewritten(tmp: Path, shared: Shared) -> None:
    """New weights copied over model.hf_path: resume and the step export refuse, naming the shard."""
    copy_of(shared.done, tmp)
    shard = tmp / SHARD
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # the last weights of the shard: still a valid safetensors file
    shard.write_bytes(bytes(data))
    gazal(tmp, *sft_args()).refused(f"model.hf_path {tmp}/{SHARD}: same size, other contents")
    exported = gazal(tmp, "convert", "megatron-to-hf", "--ckpt-dir", CKPT, "--out", "hf", "--quiet")
    exported.refused(f"{CKPT}/step_000004: the base model this adapter was trained on changed",
                     f"model.hf_path {tmp}/{SHARD}: same size, other contents", "--allow-changes")
    assert not (tmp / "hf").exists() and not list(tmp.glob(".hf.*"))


def _live_owner_on_this_host(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from gazal_nemo.ownership import process_start

        lock = write_lock(tmp, {"host": socket.gethostname(), "pid": sleeper.pid, "start": process_start(sleeper.pid),
                                "started_at": "2026-12-06T10:00:00+00:00"})
        (tmp / CKPT / "step_000006.tmp").mkdir()  # the owner's save in progress
        before = tree(tmp / CKPT)
        ran = gazal(tmp, *sft_args())
        ran.refused(f"checkpoint.dir={CKPT}: in use by another run, pid {sleeper.pid} on host {socket.gethostname()}",
                    "started 2026-12-06T10:00:00+00:00")
        assert tree(tmp / CKPT) == before and lock.is_file(), "a refused run touched the owner's folder"
    finally:
        sleeper.kill()
        sleeper.wait()


def _lock_of_other_hosts(tmp: Path, shared: Shared) -> None:
    """Another host: alive while its heartbeat is fresh (refused), taken over once it is stale."""
    copy_of(shared.done, tmp)
    owner = {"host": "gpu-node-17", "pid": 4242, "start": "1", "slurm_job_id": "777"}
    write_lock(tmp, owner, age_s=60)
    gazal(tmp, *sft_args()).refused("pid 4242 on host gpu-node-17 (Slurm job 777", "heartbeat ")
    write_lock(tmp, owner, age_s=1200)
    dry = gazal(tmp, *sft_args(dry_run=True))  # judged as the run judges it, nothing taken
    assert dry.rc == 0, dry.shown()
    assert "taking over" in dry.proc.stderr and "its heartbeat is 12" in dry.proc.stderr, dry.shown()
    assert json.loads((tmp / CKPT / "gazal_run.lock").read_text())["host"] == "gpu-node-17"


def _slurm_requeue_takes_over_its_own_lock(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    owner = {"host": "gpu-node-3", "pid": 99, "start": "5", "slurm_job_id": "4567", "slurm_restart_count": "0"}
    write_lock(tmp, owner)
    same_run = gazal(tmp, *sft_args(), env=cli_env(SLURM_JOB_ID="4567", SLURM_RESTART_COUNT="0"))
    same_run.refused("pid 99 on host gpu-node-3 (Slurm job 4567")  # a second step of the same job run
    requeued = gazal(tmp, *sft_args(), env=cli_env(SLURM_JOB_ID="4567", SLURM_RESTART_COUNT="1"))
    assert requeued.rc == 0, requeued.shown()
    assert "it was run 1 of Slurm job 4567, which has been requeued" in requeued.proc.stdout, requeued.shown()
    assert not (tmp / CKPT / "gazal_run.lock").exists()


def _resume_false_over_checkpoints(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    before = tree(tmp / "run")
    fragments = ["checkpoint.resume=false but checkpoint.dir=run/ckpt holds step checkpoints of an earlier run: "
                 "step_000002, step_000004", "use another checkpoint.dir"]
    gazal(tmp, *sft_args("checkpoint.resume=false")).refused(*fragments)
    assert tree(tmp / "run") == before


def _second_experiment_in_used_logging_dir(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    metrics = tmp / "run" / "logs" / "metrics.jsonl"
    before = metrics.read_bytes()
    run_id = json.loads((tmp / CKPT / "gazal_run.json").read_text())["run_id"]
    ran = gazal(tmp, *sft_args("checkpoint.dir=run2/ckpt", "optim.lr=1e-3"))
    ran.refused("logging.dir=run/logs: holds the metrics of run " + run_id, "use another logging.dir")
    assert metrics.read_bytes() == before
    assert not (tmp / "run2").exists(), "a refused run left its folder behind"


def _stop_at_step_already_passed(tmp: Path, shared: Shared) -> None:
    copy_of(shared.stopped, tmp)
    gazal(tmp, *sft_args("train.stop_at_step=2")).refused(
        "train.stop_at_step=2: the run in checkpoint.dir=run/ckpt is already at step 2 of 4 (step_000002)",
        "raise train.stop_at_step or drop it")


def _slurm_script_requeues_signals_not_stop_at_step(tmp: Path, shared: Shared) -> None:
    """slurm/common.sh's decision after srun exits 75, with a stub scontrol that records calls."""
    copy_of(shared.stopped, tmp / "stopped")
    copy_of(shared.done, tmp / "signalled")  # step_000004 has no stop_reason: as a signal leaves it
    (tmp / "bin").mkdir()
    (tmp / "bin" / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp}/scontrol.calls\n")
    (tmp / "bin" / "scontrol").chmod(0o755)
    for case in ("stopped", "signalled"):
        script = (f"source {REPO}/slurm/common.sh; SLURM_JOB_ID=31; OUTPUT_DIR={tmp}/{case}/run; "
                  f"STAGE_OVERRIDES=(checkpoint.dir={tmp}/{case}/{CKPT}); SRUN_EXIT=75; GOT_TERM=0; "
                  "CHECKPOINT_BEFORE=''; _finish")
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PATH": f"{tmp}/bin:{os.environ['PATH']}"})
        assert proc.returncode == 75, (case, proc.stdout, proc.stderr)
        calls = (tmp / "scontrol.calls").read_text() if (tmp / "scontrol.calls").exists() else ""
        if case == "stopped":
            assert "stopped at train.stop_at_step" in proc.stdout and "not requeued" in proc.stdout, proc.stdout
            assert calls == "", calls
        else:
            assert calls == "requeue 31\n" and "requeueing job 31" in proc.stdout, (calls, proc.stdout)


def _export_dir_holds_a_foreign_folder(tmp: Path, shared: Shared) -> None:
    copy_of(shared.stopped, tmp)
    (tmp / "run" / "export" / "merged").mkdir(parents=True)
    (tmp / "run" / "export" / "merged" / "notes.txt").write_text("someone's model card")
    gazal(tmp, *sft_args()).refused("run/export/merged exists and was not written by a gazal export")
    assert (tmp / "run" / "export" / "merged" / "notes.txt").read_text() == "someone's model card"
    # the next stage trained on this stage's export, exporting into the same folder: it would replace its base
    shutil.copytree(tmp / "base", tmp / "sft_export" / "merged")
    fresh = ("model.hf_path=sft_export/merged", "export_dir=sft_export", "checkpoint.dir=next/ckpt", "logging.dir=next/logs")
    gazal(tmp, *sft_args(*fresh)).refused("export_dir=sft_export: the export's sft_export/merged is the input "
                                          "model.hf_path=sft_export/merged")


def _convert_out_overlaps_input(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    before = tree(tmp / "base")
    to_megatron = ["convert", "hf-to-megatron", "--hf-dir", "base", "--quiet", "--overwrite", "--force", "--out"]
    gazal(tmp, *to_megatron, "base").refused("--out=base: is the input --hf-dir")
    gazal(tmp, *to_megatron, "base/megatron").refused("--out=base/megatron: lies inside the input --hf-dir")
    to_hf = ["convert", "megatron-to-hf", "--quiet", "--overwrite", "--force", "--ckpt-dir"]
    gazal(tmp, *to_hf, CKPT, "--out", "run").refused("--out=run: contains the input --ckpt-dir")
    gazal(tmp, *to_hf, CKPT, "--out", "base").refused("--out=base: is the input (the base model, hf_path)")
    assert tree(tmp / "base") == before


def _convert_overwrite_only_replaces_gazal_outputs(tmp: Path, shared: Shared) -> None:
    copy_of(shared.done, tmp)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("four years of work")
    args = ["convert", "hf-to-megatron", "--hf-dir", "base", "--quiet", "--out", "mine"]
    gazal(tmp, *args, "--overwrite").refused("mine: exists and was not written by a gazal conversion or export",
                                             "pass --force")
    assert (tmp / "mine" / "thesis.tex").read_text() == "four years of work"
    forced = gazal(tmp, *args, "--force")
    assert forced.rc == 0 and (tmp / "mine" / "gazal_checkpoint.json").is_file(), forced.shown()
    assert not (tmp / "mine" / "thesis.tex").exists()
    again = gazal(tmp, *args, "--overwrite")  # our own output: replaced without --force
    assert again.rc == 0, again.shown()
    to_hf = ["convert", "megatron-to-hf", "--ckpt-dir", "mine", "--quiet", "--out", "hf"]
    assert gazal(tmp, *to_hf).rc == 0
    marker = json.loads((tmp / "hf" / "gazal_export.json").read_text())
    assert marker["written_by"] == "gazal convert megatron-to-hf" and marker["source"] == str((tmp / "mine").resolve())


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Path, Shared], None]


CASES = [
    Case("resume-after-data-rewritten-in-place", _data_rewritten),
    Case("resume-and-step-export-after-base-rewritten", _base_rewritten),
    Case("live-owner-on-this-host", _live_owner_on_this_host),
    Case("lock-of-another-host-fresh-then-stale", _lock_of_other_hosts),
    Case("slurm-requeue-takes-over-its-own-lock", _slurm_requeue_takes_over_its_own_lock),
    Case("resume-false-over-another-runs-checkpoints", _resume_false_over_checkpoints),
    Case("second-experiment-in-a-used-logging-dir", _second_experiment_in_used_logging_dir),
    Case("stop-at-step-already-passed", _stop_at_step_already_passed),
    Case("slurm-script-requeues-signals-not-stop-at-step", _slurm_script_requeues_signals_not_stop_at_step),
    Case("export-dir-holds-a-foreign-folder", _export_dir_holds_a_foreign_folder),
    Case("convert-out-overlaps-its-input", _convert_out_overlaps_input),
    Case("convert-overwrite-only-replaces-gazal-outputs", _convert_overwrite_only_replaces_gazal_outputs),
]


@pytest.fixture(scope="module")
def table_results(request, shared, tmp_path_factory) -> dict[str, concurrent.futures.Future]:
    """Run every selected row once, NUM_WORKERS at a time (`-k one-row` runs one)."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)}
    root = tmp_path_factory.mktemp("rows")
    with ThreadPoolExecutor(NUM_WORKERS) as pool:
        futures = {case.name: pool.submit(case.run, root / case.name, shared) for case in CASES if case.name in selected}
        concurrent.futures.wait(futures.values())
    return futures


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_broken_run_is_refused_or_handled_without_loss(case: Case, table_results):
    table_results[case.name].result()  # re-raises the row's assertion


# ---- a run that holds its folder, and Ctrl-C ------------------------------------------------------


def _start(tmp: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """A run in the background, stdout and stderr in one pipe (read while it runs)."""
    return subprocess.Popen([sys.executable, "-m", "gazal_nemo.cli", *sft_args(*overrides)], cwd=tmp,
                            env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, marker: str, seen: list[str]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            return
    raise AssertionError(f"{marker!r} never came (exit {proc.poll()}):\n{''.join(seen[-30:])}")


def _fresh(tmp: Path, shared: Shared) -> Path:
    """The shared inputs without the run (a new run in a new folder)."""
    for name in ("base", "data"):
        shutil.copytree(shared.done / name, tmp / name)
    return tmp


def test_a_second_run_is_refused_while_the_first_writes_a_checkpoint(shared, tmp_path):
    """The issue's case: the second run used to delete the first one's step_N.tmp as stale."""
    tmp = _fresh(tmp_path, shared)
    first = _start(tmp, "export_dir=null", env=cli_env(GAZAL_TEST_CHECKPOINT_PAUSE="2:15"))
    seen: list[str] = []
    try:
        _read_until(first, "before the manifest of step 2", seen)
        assert (tmp / CKPT / "step_000002.tmp").is_dir()
        second = gazal(tmp, *sft_args("export_dir=null"))
        second.refused(f"checkpoint.dir={CKPT}: in use by another run, pid {first.pid} on host {socket.gethostname()}")
        assert (tmp / CKPT / "step_000002.tmp").is_dir(), "the second run removed the first one's checkpoint write"
        out, _ = first.communicate(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, "".join(seen) + out
    assert [p.name for p in (tmp / CKPT).glob("step_*")] and (tmp / CKPT / "step_000004" / "manifest.json").is_file()
    assert not (tmp / CKPT / "gazal_run.lock").exists()


def test_first_ctrl_c_saves_a_checkpoint_and_exits_75(shared, tmp_path):
    tmp = _fresh(tmp_path, shared)
    run = _start(tmp, "train.max_steps=16", "checkpoint.save_every=0", "export_dir=null")  # no periodic saves
    seen: list[str] = []
    try:
        _read_until(run, "step 1/16", seen)
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=TIMEOUT_S)
    finally:
        if run.poll() is None:
            run.kill()
    log = "".join(seen) + out
    assert run.returncode == 75, log
    assert "got SIGINT; stopping after the current step, with a checkpoint (Ctrl-C again" in log, log
    steps = [p.name for p in (tmp / CKPT).glob("step_*")]
    assert len(steps) == 1 and "on SIGINT: checkpoint" in log, (steps, log)
    stopped_at = int(steps[0].removeprefix("step_"))
    assert 1 <= stopped_at < 16 and f"stopping after step {stopped_at}/16 on SIGINT" in log, log
    assert not (tmp / CKPT / "gazal_run.lock").exists()


def test_second_ctrl_c_exits_at_once(shared, tmp_path):
    tmp = _fresh(tmp_path, shared)
    run = _start(tmp, "train.max_steps=16", "checkpoint.save_every=0", "export_dir=null")
    seen: list[str] = []
    try:
        _read_until(run, "step 1/16", seen)
        run.send_signal(signal.SIGINT)
        time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    log = "".join(seen) + out
    assert run.returncode == 130, log
    assert "Traceback" not in log and log.strip().splitlines()[-1] == "gazal sft: error: interrupted", log
    assert not (tmp / CKPT / "gazal_run.lock").exists()


# ---- a full file system -----------------------------------------------------------------------------

SMALL_FS_BYTES = 1_900_000  # two checkpoints of the tiny adapter run (~0.67 MB each) and a little: not three


@pytest.fixture
def small_fs(tmp_path):
    """A real tmpfs of SMALL_FS_BYTES (root only: CI containers run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_file_system_keeps_older_checkpoints_and_the_rerun_proceeds(shared, tmp_path, small_fs):
    tmp = _fresh(tmp_path, shared)
    small = small_fs.relative_to(tmp)
    args = (f"checkpoint.dir={small}/ckpt", "checkpoint.save_every=1", "logging.dir=logs")

    # 1. three checkpoints never fit: the one keep_last=2 drops after a save goes before it; the
    #    export does not fit and says so; the checkpoints stay
    first = gazal(tmp, *sft_args(*args, "checkpoint.keep_last=2", f"export_dir={small}/export"))
    first.refused(f"export_dir={small}/export: no space left for the export: it needs ~", "bytes", "are free")
    assert "before writing step 3" in first.proc.stdout, first.shown()
    assert sorted(p.name for p in (small_fs / "ckpt").glob("step_*")) == ["step_000003", "step_000004"]
    assert not (small_fs / "export").exists() or not list((small_fs / "export").iterdir())

    # 2. the disk fills up: a new run's first checkpoint fails mid-write (torch's own error), one line
    (small_fs / "ballast").write_bytes(bytes(max(shutil.disk_usage(small_fs).free - 200_000, 0)))
    fresh = gazal(tmp, *sft_args(f"checkpoint.dir={small}/other", "logging.dir=logs2", "export_dir=null",
                                 "checkpoint.save_every=1"))
    fresh.refused(f"checkpoint.dir={small}/other: no space left for checkpoint step_000001: it needs ~",
                  "the older checkpoints are kept (none)")
    assert not list((small_fs / "other").glob("step_*")), "a partial write was left behind"
    shutil.rmtree(small_fs / "other")

    # 3. the first run goes on keeping every checkpoint (keep_last=0): no room for step 5, refused
    #    before writing, every older checkpoint kept
    longer = ("train.max_steps=6", "checkpoint.allow_changes=[train.max_steps]", "export_dir=export")
    refused = gazal(tmp, *sft_args(*args, *longer, "checkpoint.keep_last=0"))
    refused.refused(f"checkpoint.dir={small}/ckpt: no space left for checkpoint step_000005: it needs ~",
                    "the older checkpoints are kept (step_000003, step_000004)")
    assert sorted(p.name for p in (small_fs / "ckpt").glob("step_*")) == ["step_000003", "step_000004"]

    # 4. space freed, keep_last=2 again: the rerun resumes from step 4, finishes and exports
    (small_fs / "ballast").unlink()
    rerun = gazal(tmp, *sft_args(*args, *longer, "checkpoint.keep_last=2"))
    assert rerun.rc == 0, rerun.shown()
    assert "resuming" in rerun.proc.stdout and "step_000004" in rerun.proc.stdout, rerun.shown()
    assert sorted(p.name for p in (small_fs / "ckpt").glob("step_*")) == ["step_000005", "step_000006"]
    assert (tmp / "export" / "merged" / "gazal_export.json").is_file()

"""Submitting slurm/*.sh as real jobs and reading what they leave behind (tests/slurm helpers).

Jobs run with the scripts' own #SBATCH headers: the test Slurms (scripts/ci_slurm_setup.sh,
scripts/slurm_two_node.sh) offer 8 file-backed GPUs and enough CPUs/memory per node, so only
the configuration variables (RECIPE, OVERRIDES, paths) and GAZAL_DEVICE=cpu are set here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SFT_SCRIPT = "slurm/sft_2xh100.sh"
GRPO_SCRIPT = "slurm/grpo_8xh100.sh"
REQUEUE_MARK = "requeueing job"
STOP_MARK = "gazal: stopping after step"
# The tiny GRPO recipe at any world size the tests use: 16 prompts x 4 generations, 4 per
# micro-batch, is valid at dp 8 (2 micro-batches a rank) and dp 16 (1).
GRPO_OVERRIDES = ("train.max_steps=1 grpo.prompts_per_step=16 train.global_batch_size=64 "
                  "train.micro_batch_size=4 grpo.sampling.max_new_tokens=8 export_dir=null")

# Launcher variables of an enclosing job (pytest run inside salloc/torchrun) would leak
# into the scripts' layout; the tests set their own.
_LAUNCH_VARS = re.compile(r"^(SLURM_|SRUN_|SBATCH_|SALLOC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)$")


def script_env(slurm_conf: str | None = None, **settings: str) -> dict[str, str]:
    """This environment without launcher variables, plus settings (and SLURM_CONF)."""
    env = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.search(k)}
    env.pop("SLURM_CONF", None)
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    env.update(settings)
    return env


def slurm_skip_reason(slurm_conf: str | None = None) -> str | None:
    """Why Slurm jobs cannot run here (None when slurmctld answers)."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (run scripts/ci_slurm_setup.sh as root)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15,
                              env=script_env(slurm_conf))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if "UP" not in ping.stdout:
        return f"slurmctld not answering: {ping.stdout.strip() or ping.stderr.strip()}"
    return None


@dataclass
class Job:
    """A submitted `sbatch --wait`: its id, its log file and the waiting sbatch process."""

    job_id: str
    log_path: Path
    process: subprocess.Popen
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.is_file() else f"(no log file {self.log_path})"

    def wait(self, timeout_s: float) -> int:
        """sbatch --wait's exit status (the job's, after any requeues); fails the test on timeout."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            state = subprocess.run(["squeue", "-h", "-j", self.job_id, "-o", "%T %R"], capture_output=True,
                                   text=True, env=self.env).stdout.strip()
            self.cancel()
            raise AssertionError(f"job {self.job_id} not done in {timeout_s:.0f}s (state: {state}):\n"
                                 f"{self.log()[-6000:]}") from None

    def cancel(self) -> None:
        subprocess.run(["scancel", self.job_id], check=False, env=self.env)
        self.process.kill()
        self.process.wait()

    def signal(self, name: str, *extra: str) -> None:
        subprocess.run(["scancel", f"--signal={name}", *extra, self.job_id], check=True, env=self.env)


def submit(script: str, log_dir: Path, *, sbatch_args: tuple[str, ...] = (), cwd: Path = REPO,
           stdin: bool = False, slurm_conf: str | None = None, **settings: str) -> Job:
    """`sbatch --wait` the script (or feed it on stdin) with the header's own options."""
    log_path = log_dir / "job-%j.out"
    command = ["sbatch", "--wait", "--parsable", f"--output={log_path}", *sbatch_args]
    env = script_env(slurm_conf, **{"GAZAL_DEVICE": "cpu", **settings})
    stdin_file = open(REPO / script) if stdin else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        process = subprocess.Popen(command if stdin else [*command, str(script)], cwd=cwd, env=env,
                                   stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        if stdin:
            stdin_file.close()
    job_id = process.stdout.readline().strip().split(";")[0]
    if not job_id.isdigit():
        process.wait()
        raise AssertionError(f"sbatch did not submit: {process.stderr.read()}")
    return Job(job_id=job_id, log_path=log_dir / f"job-{job_id}.out", process=process, env=env)


def metric_rows(logs_dir: Path) -> list[dict]:
    path = logs_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_rows(logs_dir: Path, count: int, job: Job, timeout_s: float) -> None:
    """Until metrics.jsonl has `count` rows (the job is training)."""
    deadline = time.monotonic() + timeout_s
    while len(metric_rows(logs_dir)) < count:
        if job.process.poll() is not None:
            raise AssertionError(f"job {job.job_id} ended before step {count}:\n{job.log()[-6000:]}")
        if time.monotonic() > deadline:
            job.cancel()
            raise AssertionError(f"job {job.job_id} logged no step {count} in {timeout_s:.0f}s:\n{job.log()[-6000:]}")
        time.sleep(0.5)


def assert_ranks_placed(log: str, world_size: int, hosts: set[str] | None = None) -> None:
    """Every rank printed its placement line (srun --label), and on the expected hosts."""
    # (srun --label right-aligns the rank: " 3: " once there are 10 or more)
    seen = {int(m[1]): m[2] for m in re.finditer(rf"^ *(\d+): rank \1/{world_size} on (\S+) local_rank \d+$", log, re.M)}
    assert sorted(seen) == list(range(world_size)), f"ranks {sorted(seen)} of {world_size}:\n{log[-4000:]}"
    if hosts is not None:
        assert set(seen.values()) == hosts, f"ranks ran on {sorted(set(seen.values()))}, expected {sorted(hosts)}"


def assert_complete_checkpoint(checkpoint_dir: Path, step: int, world_size: int) -> None:
    """The newest complete checkpoint is step `step`, written by `world_size` ranks."""
    from gazal_nemo.training.checkpoint import complete_checkpoints, latest_checkpoint, step_dir_name

    latest = latest_checkpoint(checkpoint_dir)
    found = [p.name for p in complete_checkpoints(checkpoint_dir)]
    assert latest is not None and latest.name == step_dir_name(step), f"latest {latest}; complete: {found}"
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == world_size, state


def assert_one_row_per_step(rows: list[dict], num_steps: int) -> None:
    assert [row["step"] for row in rows] == list(range(1, num_steps + 1)), [row["step"] for row in rows]


def runs_of(log: str) -> int:
    """How many times the batch script started (the first run and each requeue)."""
    return len(re.findall(r"^gazal-slurm: ==== job \d+ run \d+ ", log, re.M))

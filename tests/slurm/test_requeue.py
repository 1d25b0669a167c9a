"""Stop, checkpoint, requeue, resume: slurm/sft_2xh100.sh under the real one-node CI Slurm.

All three jobs train the tiny SFT recipe with the script's own header (2 ranks, 2 GPUs,
--requeue, --open-mode=append, --signal=B:USR1@...) and GAZAL_DEVICE=cpu:

1. uninterrupted: the reference loss curve, one row per step, a final checkpoint;
2. `scancel --signal=USR1` (to the ranks) once it trains: the ranks finish their step, save
   and exit 75, the batch script requeues the job, the requeued run (same job id, same output
   folder, same log appended to) resumes, and the end is the reference's: the same loss at
   every step, one metrics row per step, the same last checkpoint;
3. a time limit: `--time=2 --signal=B:USR1@65` (the scripts' mechanism with a lead that
   fits a 2-minute job). slurmctld checks time limits every 30 s and sends the warning at
   the first check within lead + 30 s of the end, so USR1 reaches the batch shell 25-55 s
   into each run, at least 65 s before the kill; the shell forwards it, the job requeues
   itself before the limit as often as it takes and completes. Its length is set from the
   reference's fastest step so that the first run cannot finish before the signal.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from slurm_jobs import (
    REQUEUE_MARK,
    SFT_SCRIPT,
    STOP_MARK,
    Job,
    assert_complete_checkpoint,
    assert_one_row_per_step,
    assert_ranks_placed,
    metric_rows,
    runs_of,
    slurm_skip_reason,
    submit,
    wait_for_rows,
)

_SLURM_SKIP_REASON = slurm_skip_reason()
pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(_SLURM_SKIP_REASON is not None, reason=str(_SLURM_SKIP_REASON))]

JOB_TIMEOUT_S = 600
# The tiny data is 8 packed sequences: 2 steps an epoch at global batch 4; 8 epochs.
NUM_STEPS = 16
OVERRIDES = f"train.max_steps={NUM_STEPS} checkpoint.save_every=8 export_dir=null"
# Training the time-limit job lasts at least this long at the reference's fastest step: longer than
# the latest USR1 (55 s after the start), so the first run is always cut short.
TIME_LIMIT_RUN_TRAIN_S = 60
# While a stop is pending, the batch shell re-sends USR1 this often (slurm/common.sh): well
# inside the 30 s between Slurm's warning and its kill, in case a rank was still loading.
STOP_RESEND_S = "3"


def _sft_settings(inputs: dict[str, Path], out: Path, overrides: str = OVERRIDES) -> dict[str, str]:
    return {"RECIPE": "recipes/tiny_cpu_sft.yaml", "HF_MODEL_DIR": str(inputs["model"]),
            "SFT_DATA_SYNTHETIC": str(inputs["sft"]), "OUTPUT_DIR": str(out), "OVERRIDES": overrides,
            "GAZAL_STOP_RESEND_S": STOP_RESEND_S}


def _losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


def _assert_resumed_after_stops(log: str, num_runs: int) -> list[int]:
    """Each run but the last stopped with a checkpoint and requeued; returns the stop steps."""
    stops = [int(m[1]) for m in re.finditer(rf"^0: {STOP_MARK} (\d+)/\d+ on SIGUSR1", log, re.M)]
    assert len(stops) == num_runs - 1 == log.count(REQUEUE_MARK), log[-6000:]
    assert stops == sorted(stops), f"a requeued run went back: {stops}"
    for run, step in enumerate(stops, start=2):
        assert re.search(rf"run {run} \(requeued {run - 1} time\(s\)\)", log), log[-6000:]
        if step > 0:  # (a stop before the first step of a run has nothing new to save)
            assert re.search(rf"^0: resumed from \S+ \(step {step}\)$", log, re.M), f"no resume at {step}:\n{log[-6000:]}"
    assert "gazal-slurm: srun exited with status 0" in log, log[-6000:]
    return stops


@pytest.fixture(scope="module")
def reference(tiny_run_inputs, tmp_path_factory) -> dict:
    """The uninterrupted run: its log, metrics rows and output folder."""
    folder = tmp_path_factory.mktemp("reference")
    job = submit(SFT_SCRIPT, folder, **_sft_settings(tiny_run_inputs, folder / "run"))
    code = job.wait(JOB_TIMEOUT_S)
    assert code == 0, job.log()[-6000:]
    return {"log": job.log(), "rows": metric_rows(folder / "run" / "logs"), "out": folder / "run"}


def test_uninterrupted_run_trains_on_two_ranks_with_one_row_per_step(reference):
    log = reference["log"]
    assert "world size 2" in log and "device cpu" in log
    assert_ranks_placed(log, 2)
    assert runs_of(log) == 1 and STOP_MARK not in log
    assert_one_row_per_step(reference["rows"], NUM_STEPS)
    assert all(row["loss"] > 0 for row in reference["rows"])
    assert reference["rows"][-1]["loss"] < reference["rows"][0]["loss"]
    assert_complete_checkpoint(reference["out"] / "checkpoints", step=NUM_STEPS, world_size=2)


def test_usr1_mid_run_requeues_and_ends_like_the_uninterrupted_run(reference, tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    job = submit(SFT_SCRIPT, tmp_path, **_sft_settings(tiny_run_inputs, out))
    wait_for_rows(out / "logs", 2, job, JOB_TIMEOUT_S)
    job.signal("USR1")  # scancel's default: the ranks of the running step, not the batch shell
    code, log = _wait(job)
    assert code == 0, log[-6000:]
    (stopped_at,) = _assert_resumed_after_stops(log, num_runs=2)
    assert 2 <= stopped_at < NUM_STEPS, f"the stop came after the end (step {stopped_at})"
    rows = metric_rows(out / "logs")
    assert_one_row_per_step(rows, NUM_STEPS)
    assert _losses(rows) == pytest.approx(_losses(reference["rows"]), rel=1e-6, abs=1e-7)
    assert_complete_checkpoint(out / "checkpoints", step=NUM_STEPS, world_size=2)


def test_time_limit_saves_requeues_and_completes(reference, tiny_run_inputs, tmp_path):
    rows = reference["rows"]
    # The fastest step, not the mean: a reference measured under load (CI runs tests beside it)
    # made a run sized from its mean finish before the signal once.
    step_s = min(b["time_s"] - a["time_s"] for a, b in zip(rows, rows[1:]))
    num_steps = max(NUM_STEPS, math.ceil(TIME_LIMIT_RUN_TRAIN_S / step_s))
    out = tmp_path / "run"
    overrides = f"train.max_steps={num_steps} train.epochs={num_steps // 2 + 1} checkpoint.save_every=0 export_dir=null"
    job = submit(SFT_SCRIPT, tmp_path, sbatch_args=("--time=2", "--signal=B:USR1@65"),
                 **_sft_settings(tiny_run_inputs, out, overrides))
    code, log = _wait(job)
    assert code == 0, log[-6000:]
    num_runs = runs_of(log)
    assert num_runs >= 2, f"never stopped by the time limit ({num_steps} steps):\n{log[-6000:]}"
    # USR1 came from Slurm to the batch shell (B:), which forwarded it.
    assert log.count("gazal-slurm: USR1: asking the ranks") >= num_runs - 1, log[-6000:]
    _assert_resumed_after_stops(log, num_runs)
    assert_one_row_per_step(metric_rows(out / "logs"), num_steps)
    assert_complete_checkpoint(out / "checkpoints", step=num_steps, world_size=2)


def _wait(job: Job) -> tuple[int, str]:
    code = job.wait(JOB_TIMEOUT_S)
    return code, job.log()

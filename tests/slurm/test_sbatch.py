"""The slurm/*.sh launch scripts, run for real.

1. `DRY_RUN=1 bash slurm/<stage>.sh` outside Slurm: the srun line has one task per GPU of
   the header (times $NODES), and the recipe is validated for that world size against the
   real Qwen3-32B shape (a config.json + tokenizer folder); a bad override fails naming its key.
2. Inside a job the scripts find the checkout however they were submitted: `sbatch --chdir`
   with a path relative to the submit directory, the same from outside the checkout, and
   `sbatch < script` (and say what to set when they cannot).
3. `sbatch --wait slurm/grpo_8xh100.sh` with its own header (8 GPUs, 8 x 8 CPUs, exclusive)
   on the one-node CI Slurm with GAZAL_DEVICE=cpu: the tiny recipe trains over 8 ranks.
4. A GPU job on a node without GPUs stops before srun with a message that says what to do.

Stop/requeue and time limits: test_requeue.py; two nodes: test_two_node.py. The sbatch
tests skip when `sbatch` is missing or slurmctld does not answer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_jobs import (
    GRPO_OVERRIDES,
    GRPO_SCRIPT,
    REPO,
    SFT_SCRIPT,
    assert_complete_checkpoint,
    assert_one_row_per_step,
    assert_ranks_placed,
    metric_rows,
    script_env,
    slurm_skip_reason,
    submit,
)

from gazal_nemo.testing.tiny import QWEN3_32B_CONFIG

pytestmark = pytest.mark.slurm


_SLURM_SKIP_REASON = slurm_skip_reason()
needs_slurm = pytest.mark.skipif(_SLURM_SKIP_REASON is not None, reason=str(_SLURM_SKIP_REASON))
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def qwen3_32b_config_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder with Qwen3-32B's config.json and a (tiny) tokenizer: enough for --dry-run."""
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("qwen3_32b_config")
    make_tiny_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(QWEN3_32B_CONFIG))
    return folder


def _dry_run(script: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=script_env(DRY_RUN="1", **settings))


def _srun_line(stdout: str) -> str:
    lines = [line.strip() for line in stdout.splitlines() if line.strip().startswith("srun ")]
    assert len(lines) == 1, f"expected one srun line in:\n{stdout}"
    return lines[0]


def test_grpo_dry_run_prints_srun_for_8_gpus_and_validates(qwen3_32b_config_dir):
    result = _dry_run(GRPO_SCRIPT, HF_MODEL_DIR=str(qwen3_32b_config_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _srun_line(result.stdout)
    assert "--nodes=1 --ntasks=8 --ntasks-per-node=8" in srun
    assert "grpo --recipe recipes/grpo_qwen3_32b.yaml" in srun
    assert f"model.hf_path={qwen3_32b_config_dir}" in srun
    # The resolved recipe is printed: the paper's TP=8 layout, valid for 8 ranks.
    assert "world size 8" in result.stdout
    assert "grpo_qwen3_32b_8xh100" in result.stdout
    assert re.search(r"^\s+tp: 8$", result.stdout, re.M), result.stdout


def test_two_node_dry_run_doubles_the_world(qwen3_32b_config_dir):
    result = _dry_run(GRPO_SCRIPT, HF_MODEL_DIR=str(qwen3_32b_config_dir), NODES="2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--nodes=2 --ntasks=16 --ntasks-per-node=8" in _srun_line(result.stdout)
    assert "world size 16" in result.stdout


def test_sft_dry_run_prints_srun_for_2_gpus(qwen3_32b_config_dir, tmp_path):
    result = subprocess.run(["bash", SFT_SCRIPT, "train.max_steps=7"], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env=script_env(DRY_RUN="1", HF_MODEL_DIR=str(qwen3_32b_config_dir),
                                            OUTPUT_DIR=str(tmp_path / "out")))
    assert result.returncode == 0, result.stdout + result.stderr
    srun = _srun_line(result.stdout)
    assert "--nodes=1 --ntasks=2 --ntasks-per-node=2" in srun
    assert f"checkpoint.dir={tmp_path / 'out'}/checkpoints" in srun
    assert srun.endswith("train.max_steps=7")
    assert re.search(r"^\s+max_steps: 7$", result.stdout, re.M), result.stdout


@pytest.mark.parametrize("override, key", [("parallel.tp=3", "parallel.tp"),
                                           ("train.max_stepz=3", "train.max_stepz")])
def test_dry_run_refuses_a_bad_override_naming_the_key(qwen3_32b_config_dir, override, key):
    result = _dry_run(GRPO_SCRIPT, HF_MODEL_DIR=str(qwen3_32b_config_dir), OVERRIDES=override)
    assert result.returncode != 0
    assert key in result.stderr, result.stdout + result.stderr
    assert "does not validate for world size 8" in result.stderr


def test_real_launch_outside_slurm_is_refused():
    result = subprocess.run(["bash", SFT_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=script_env())
    assert result.returncode != 0
    assert "not inside a Slurm job" in result.stderr


# ---------------------------------------------------------------------------- sbatch


def _tiny_sft_settings(inputs: dict[str, Path], out: Path) -> dict[str, str]:
    return {"RECIPE": "recipes/tiny_cpu_sft.yaml", "HF_MODEL_DIR": str(inputs["model"]),
            "SFT_DATA_SYNTHETIC": str(inputs["sft"]), "OUTPUT_DIR": str(out)}


@needs_slurm
@pytest.mark.parametrize("how", ["chdir", "chdir_from_elsewhere", "stdin"])
def test_sbatch_finds_the_checkout_however_submitted(how, tiny_run_inputs, tmp_path):
    """A dry run inside the job: it only passes when the job found recipes/ and gazal_nemo/."""
    script, cwd, args, stdin = {
        # --chdir with a script path relative to the submit directory (the checkout).
        "chdir": (SFT_SCRIPT, REPO, ("--chdir=/tmp",), False),
        # Submitted from outside the checkout: found from the script's own path.
        "chdir_from_elsewhere": (str(REPO / SFT_SCRIPT), tmp_path, (f"--chdir={tmp_path}",), False),
        # No script path at all: the submit directory is the checkout.
        "stdin": (SFT_SCRIPT, REPO, ("--chdir=/tmp",), True),
    }[how]
    job = submit(script, tmp_path, sbatch_args=args, cwd=cwd, stdin=stdin, DRY_RUN="1",
                 **_tiny_sft_settings(tiny_run_inputs, tmp_path / "out"))
    code = job.wait(JOB_TIMEOUT_S)
    log = job.log()
    assert code == 0, log[-4000:]
    assert "gazal-slurm: dry run OK" in log and "world size 2" in log, log[-4000:]


@needs_slurm
def test_sbatch_from_stdin_outside_the_checkout_says_to_set_gazal_root(tmp_path):
    job = submit(SFT_SCRIPT, tmp_path, cwd=tmp_path, stdin=True, DRY_RUN="1")
    assert job.wait(JOB_TIMEOUT_S) != 0
    assert "no checkout at" in job.log() and "GAZAL_ROOT" in job.log(), job.log()


@needs_slurm
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this node has GPUs")
def test_sbatch_gpu_job_on_a_node_without_gpus_fails_before_srun(tmp_path):
    job = submit(SFT_SCRIPT, tmp_path, GAZAL_DEVICE="cuda")
    code, log = job.wait(JOB_TIMEOUT_S), job.log()
    assert code != 0
    assert "found 0 GPU(s)" in log and "GAZAL_DEVICE=cpu" in log
    assert "rank 0/2" not in log


@needs_slurm
@pytest.mark.slow
def test_sbatch_grpo_trains_the_tiny_recipe_on_eight_ranks_with_the_scripts_header(tiny_run_inputs, tmp_path):
    """The header's 8 tasks x 8 CPUs, 8 GPUs, --exclusive, --mem=0, unmodified (world size 8, dp 8)."""
    out = tmp_path / "run"
    job = submit(GRPO_SCRIPT, tmp_path, RECIPE="recipes/tiny_cpu_grpo.yaml",
                 HF_MODEL_DIR=str(tiny_run_inputs["model"]), GRPO_DATA=str(tiny_run_inputs["grpo"]),
                 OUTPUT_DIR=str(out), OVERRIDES=GRPO_OVERRIDES)
    code, log = job.wait(JOB_TIMEOUT_S), job.log()
    assert code == 0, log[-6000:]
    assert "world size 8" in log and "device cpu" in log
    assert_ranks_placed(log, 8)
    assert_complete_checkpoint(out / "checkpoints", step=1, world_size=8)
    assert_one_row_per_step(metric_rows(out / "logs"), 1)

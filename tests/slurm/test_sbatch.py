"""The slurm/*.sh launch scripts, run for real.

1. `DRY_RUN=1 bash slurm/<stage>.sh` outside Slurm: the srun line has one task per GPU of
   the header (times $NODES), and the recipe is validated for that world size against the
   real Qwen3-32B shape (a config.json-only folder); a bad override fails naming its key.
2. `sbatch --wait slurm/sft_2xh100.sh` on the local one-node Slurm (scripts/ci_slurm_setup.sh)
   with GAZAL_DEVICE=cpu: the tiny recipe trains over 2 srun tasks with gloo, both ranks
   report in, and a complete checkpoint holds one file per rank.
3. The same for slurm/grpo_8xh100.sh with the tiny GRPO recipe.
4. A GPU job on a node without GPUs stops before srun with a message that says what to do.

The sbatch tests skip when `sbatch` is missing or slurmctld does not answer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SFT_SCRIPT = "slurm/sft_2xh100.sh"
GRPO_SCRIPT = "slurm/grpo_8xh100.sh"
JOB_TIMEOUT_S = 150

# Qwen3-32B's config.json (the fields the shape and the layout checks read).
QWEN3_32B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
    "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

# Launcher variables of an enclosing job (pytest run inside salloc/torchrun) would leak
# into the scripts' layout; the tests set their own.
_LAUNCH_VARS = re.compile(r"^(SLURM_|SRUN_|SBATCH_|SALLOC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)$")


def _script_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.search(k)}
    env.update(settings)
    return env


def _slurm_skip_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (run scripts/ci_slurm_setup.sh)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping failed: {e}"
    if "UP" not in ping.stdout:
        return f"slurmctld not answering: {ping.stdout.strip() or ping.stderr.strip()}"
    return None


_SLURM_SKIP_REASON = _slurm_skip_reason()
needs_slurm = pytest.mark.skipif(_SLURM_SKIP_REASON is not None, reason=str(_SLURM_SKIP_REASON))


@pytest.fixture(scope="module")
def qwen3_32b_config_dir(tmp_path_factory) -> Path:
    """A Hugging Face folder with only Qwen3-32B's config.json: enough for --dry-run."""
    folder = tmp_path_factory.mktemp("qwen3_32b_config")
    (folder / "config.json").write_text(json.dumps(QWEN3_32B_CONFIG))
    return folder


def _dry_run(script: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_script_env(DRY_RUN="1", **settings))


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
                            env=_script_env(DRY_RUN="1", HF_MODEL_DIR=str(qwen3_32b_config_dir),
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
                            env=_script_env())
    assert result.returncode != 0
    assert "not inside a Slurm job" in result.stderr


# ---------------------------------------------------------------------------- sbatch


def _sbatch_cpu(script: str, tmp_path: Path, **settings: str) -> tuple[int, str]:
    """`sbatch --wait` the script as a 2-task CPU job; returns (exit code, output file text)."""
    output = tmp_path / "job-%j.out"
    command = ["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
               "--cpus-per-task=1", "--mem=2G", "--time=5", f"--output={output}", script]
    env = _script_env(**{"GAZAL_DEVICE": "cpu", **settings})
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    try:
        proc.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %R"], capture_output=True, text=True)
        subprocess.run(["scancel", job_id], check=False)
        proc.kill()
        pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S}s (state: {state.stdout.strip()}):\n"
                    f"{_read(tmp_path, job_id)}")
    assert job_id.isdigit(), f"sbatch did not submit: {proc.stderr.read()}"
    return proc.returncode, _read(tmp_path, job_id)


def _read(tmp_path: Path, job_id: str) -> str:
    path = tmp_path / f"job-{job_id}.out"
    return path.read_text() if path.is_file() else f"(no output file {path})"


def _assert_both_ranks_ran(log: str) -> None:
    for rank in (0, 1):
        assert re.search(rf"^{rank}: rank {rank}/2 on \S+ local_rank {rank}$", log, re.M), log[-4000:]


def _assert_complete_checkpoint(checkpoint_dir: Path, step: int) -> None:
    step_dir = checkpoint_dir / f"step_{step:06d}"
    assert step_dir.is_dir(), f"no {step_dir}; found {sorted(p.name for p in checkpoint_dir.iterdir())}"
    state = json.loads((step_dir / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2
    assert sorted(p.name for p in step_dir.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]


def _metric_rows(logs_dir: Path) -> list[dict]:
    path = logs_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 and the demo's SFT/GRPO data files, in a folder the jobs can read."""
    from gazal_nemo.commands.demo_data import write_demo_data
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("slurm_inputs")
    model = make_tiny_qwen3(root / "model", seed=0)
    data = write_demo_data(root / "data", model, num_sft=16, num_grpo=32)
    return {"model": Path(model), "sft": Path(data["sft"]), "grpo": Path(data["grpo"])}


@needs_slurm
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this node has GPUs")
def test_sbatch_gpu_job_on_a_node_without_gpus_fails_before_srun(tmp_path):
    code, log = _sbatch_cpu(SFT_SCRIPT, tmp_path, GAZAL_DEVICE="cuda")
    assert code != 0
    assert "found 0 GPU(s)" in log and "GAZAL_DEVICE=cpu" in log
    assert "rank 0/2" not in log


@needs_slurm
@pytest.mark.slow
def test_sbatch_sft_trains_the_tiny_recipe_on_two_cpu_tasks(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    code, log = _sbatch_cpu(
        SFT_SCRIPT, tmp_path, RECIPE="recipes/tiny_cpu_sft.yaml", HF_MODEL_DIR=str(tiny_run_inputs["model"]),
        SFT_DATA_SYNTHETIC=str(tiny_run_inputs["sft"]), OUTPUT_DIR=str(out),
        OVERRIDES="train.max_steps=2 checkpoint.save_every=1 export_dir=null")
    assert code == 0, log[-6000:]
    assert "world size 2" in log and "device cpu" in log
    _assert_both_ranks_ran(log)
    _assert_complete_checkpoint(out / "checkpoints", step=2)
    rows = _metric_rows(out / "logs")
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["loss"] > 0 for row in rows)


@needs_slurm
@pytest.mark.slow
def test_sbatch_grpo_trains_the_tiny_recipe_on_two_cpu_tasks(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    code, log = _sbatch_cpu(
        GRPO_SCRIPT, tmp_path, RECIPE="recipes/tiny_cpu_grpo.yaml", HF_MODEL_DIR=str(tiny_run_inputs["model"]),
        GRPO_DATA=str(tiny_run_inputs["grpo"]), OUTPUT_DIR=str(out),
        OVERRIDES="train.max_steps=1 grpo.sampling.max_new_tokens=8 export_dir=null")
    assert code == 0, log[-6000:]
    _assert_both_ranks_ran(log)
    _assert_complete_checkpoint(out / "checkpoints", step=1)
    rows = _metric_rows(out / "logs")
    assert [row["step"] for row in rows] == [1]

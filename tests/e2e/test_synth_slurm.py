"""slurm/synth_8xh100.sh with DRY_RUN=1 outside Slurm: the srun line has 8/TP replicas per node, one
shard each, every replica's GPUs are its own TP group, the finalize step follows, and the recipe
is validated for that many shards; a TP that does not divide the node and a bad override stop
it with one line. (The script's job path needs a Slurm: see docs/SYNTH.md.)"""

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "slurm/synth_8xh100.sh"
_LAUNCH = re.compile(r"^(SLURM_|SRUN_|SBATCH_|SALLOC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_ADDR|MASTER_PORT)$")


@pytest.fixture(scope="module")
def teacher_config_dir(tmp_path_factory):
    from gazal_nemo.testing.tiny import make_tiny_tokenizer, tiny_qwen3_config

    folder = tmp_path_factory.mktemp("teacher_config")
    tokenizer = make_tiny_tokenizer(folder)
    tiny_qwen3_config(len(tokenizer), head_dim=32, max_position_embeddings=8192).save_pretrained(folder)
    return folder


def _dry_run(tmp_path, model_dir, *args, **settings):
    env = {k: v for k, v in os.environ.items() if not _LAUNCH.search(k)}
    env.update(DRY_RUN="1", HF_MODEL_DIR=str(model_dir), OUTPUT_DIR=str(tmp_path / "run"), VENV=str(ROOT / ".venv"),
               **settings)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_lays_out_one_replica_per_tp_group(tmp_path, teacher_config_dir):
    proc = _dry_run(tmp_path, teacher_config_dir, "num_examples=3000", NODES="2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    srun = next(line for line in out.splitlines() if line.strip().startswith("srun "))
    assert "--nodes=2 --ntasks=8 --ntasks-per-node=4 --cpus-per-task=16 --kill-on-bad-exit=0" in srun
    assert "first=$((SLURM_LOCALID * GAZAL_TP))" in srun and "generator.tp=2" in srun
    assert f"generator.model={teacher_config_dir}" in srun and f"output_dir={tmp_path / 'run'}" in srun
    then = next(line for line in out.splitlines() if line.strip().startswith("then: "))
    assert then.rstrip().endswith("num_examples=3000 --finalize")
    # 3000 examples = 12 chunks of 256; shard 0 of 8 takes chunks 0 and 8
    assert "this process: shard 0 of 8, 2 chunks (0 done, 2 to generate, 512 examples)" in out
    assert "dry run OK" in out and not (tmp_path / "run").exists()


def test_tp_8_is_one_replica_per_node_and_bad_input_stops_it(tmp_path, teacher_config_dir):
    proc = _dry_run(tmp_path, teacher_config_dir, "generator.model=x", "num_examples=10", TP="8")
    assert proc.returncode != 0 and "--ntasks=1 --ntasks-per-node=1 --cpus-per-task=64" in proc.stdout
    assert "generator.model='x': no such folder" in proc.stderr  # the user's override wins over HF_MODEL_DIR
    proc = _dry_run(tmp_path, teacher_config_dir, TP="3")
    assert proc.returncode == 1 and "TP=3 does not divide GPUS_PER_NODE=8" in proc.stderr
    proc = _dry_run(tmp_path, teacher_config_dir, "design.modules.cardiology.weight=0.1")
    assert proc.returncode != 0 and "unknown module key 'cardiology'" in proc.stderr

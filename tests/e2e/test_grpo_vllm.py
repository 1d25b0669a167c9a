"""GRPO through the CLI with the real vLLM engine (CPU build) colocated in the training processes.

* DP=2 with the distributed optimizer and `parallel.overlap_param_gather=true`: after each
  step the params of the other rank's shard arrive only when the next forward gathers them,
  so a push (and a checkpoint) that reads them first sends the previous step's weights
  (NeMo-RL PR 4086). The gate passes every push here, and the last step checkpoint exports
  to exactly the stage's own merged export.
* The rollout log holds readable completions with their rewards and advantages.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gazal_nemo.testing.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vllm_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), tiny_vllm_dir, num_sft=4, num_grpo=32)


def _grpo(nproc: int, tmp: Path, hf_dir, data, *overrides) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "gazal_nemo.cli", "grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml",
           f"model.hf_path={hf_dir}", f"grpo.data.path={data['grpo']}", f"checkpoint.dir={tmp / 'ckpt'}",
           f"logging.dir={tmp / 'logs'}", f"export_dir={tmp / 'export'}", "grpo.rollout.engine=vllm",
           "grpo.prompts_per_step=4", "train.global_batch_size=16", "train.micro_batch_size=4",
           "grpo.sampling.max_new_tokens=12", "grpo.rewards.plugins={gazal_nemo.testing.text_rewards:vowel_share: 1.0}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)


def _hf_tensors(folder: Path) -> dict:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_dp2_overlap_param_gather_pushes_and_saves_the_new_weights(tmp_path, tiny_vllm_dir, data):
    proc = _grpo(2, tmp_path, tiny_vllm_dir, data, "train.max_steps=3", "checkpoint.save_every=3",
                 "parallel.overlap_param_gather=true", "parallel.distributed_optimizer=true",
                 "grpo.log_rollouts_every=1", "grpo.log_rollouts_groups=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in rows), "no gradient: the weights never changed, nothing to push"
    assert all(r["push/max_logprob_diff"] < 1e-5 for r in rows)  # fp32: the gate's tolerance is 1e-5
    assert all(r["push/tensors"] == 25 and r["push/bytes"] > 0 for r in rows)

    step = tmp_path / "ckpt" / "step_000003"
    exported = tmp_path / "step_export"
    convert = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", "convert", "megatron-to-hf", "--ckpt-dir",
                              str(step), "--out", str(exported)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    saved, final = _hf_tensors(exported), _hf_tensors(tmp_path / "export" / "merged")
    assert saved.keys() == final.keys()
    assert all(saved[k].equal(final[k]) for k in final), "the step checkpoint holds other weights than the export"
    base = _hf_tensors(Path(tiny_vllm_dir))
    assert any(not base[k].equal(final[k]) for k in final), "training changed nothing: the test proves nothing"

    logged = [json.loads(line) for line in (tmp_path / "logs" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1] * 4 + [2] * 4 + [3] * 4  # one group of 4 per step
    first = logged[0]
    assert {"prompt_row", "group", "text", "num_tokens", "truncated", "rewards", "advantage"} <= set(first)
    assert set(first["rewards"]) >= {"accuracy", "gazal_nemo.testing.text_rewards:vowel_share"}
    assert isinstance(first["text"], str) and first["num_tokens"] == 12
    assert [r["policy_version"] for r in logged[::4]] == [0, 1, 2]

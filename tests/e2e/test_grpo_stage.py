"""The GRPO stage through the CLI: the KL reference for beta > 0 (adapter switched off, no
copy), exact resume, and start-up errors for bad reward plug-ins."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mcq_data(tmp_path_factory, tiny_hf_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), tiny_hf_dir, num_sft=4, num_grpo=64)["grpo"]


def _grpo(tmp, hf_dir, data, *overrides, expect_ok=True):
    cmd = [sys.executable, "-m", "gazal_nemo.cli", "grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml",
           f"model.hf_path={hf_dir}", f"grpo.data.path={data}", f"checkpoint.dir={tmp / 'ckpt'}",
           f"logging.dir={tmp / 'logs'}", "grpo.prompts_per_step=4", "train.global_batch_size=16",
           "train.micro_batch_size=8", "grpo.sampling.max_new_tokens=12", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if not expect_ok:
        return proc
    stopped_early = any(o.startswith("train.stop_at_step=") for o in overrides)  # exit 75: not finished, no export
    assert proc.returncode == (75 if stopped_early else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_beta_uses_the_base_model_as_reference(tmp_path, tiny_hf_dir, mcq_data):
    rows = _grpo(tmp_path, tiny_hf_dir, mcq_data, "train.max_steps=3", "grpo.loss.beta=0.1", "grpo.train_adapter=true",
                 "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0.0", "optim.lr=1e-2",
                 "grpo.rewards.cosine_weight=1.0")  # length-dependent: gives advantages even at 0 accuracy
    # The adapter starts as the identity (B = 0): the policy is the reference, KL exactly 0.
    assert rows[0]["kl_ref"] == 0.0
    assert rows[-1]["kl_ref"] > 0.0, "after updates the adapter moved the policy away from the base"


def test_grpo_resume_continues_exactly(tmp_path, tiny_hf_dir, mcq_data):
    common = ["train.max_steps=4", "checkpoint.save_every=2"]
    straight = _grpo(tmp_path / "a", tiny_hf_dir, mcq_data, *common)
    _grpo(tmp_path / "b", tiny_hf_dir, mcq_data, *common, "train.stop_at_step=2")
    resumed = _grpo(tmp_path / "b", tiny_hf_dir, mcq_data, *common)
    keys = ("loss", "reward/total", "completion_len_mean", "entropy", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]


def test_bad_reward_plugin_is_refused_by_name(tmp_path, tiny_hf_dir, mcq_data):
    proc = _grpo(tmp_path, tiny_hf_dir, mcq_data, "grpo.rewards.plugins={no_such_module:prm: 1.0}", expect_ok=False)
    assert proc.returncode != 0 and "no_such_module:prm" in proc.stderr
    assert not (tmp_path / "ckpt").exists()

"""Off-policy reuse and dynamic sampling through the GRPO stage (CLI, tiny CPU model).

With num_iterations=2 the second update trains on the first update's rollouts: the old
log-probs are from before the first update, so the ratio leaves 1 (and the clip bounds can
act), while today's single-update path has ratio exactly 1. Dynamic sampling runs its rounds
and reports them.
"""

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


def _grpo(tmp, hf_dir, data, *overrides):
    cmd = [sys.executable, "-m", "gazal_nemo.cli", "grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml",
           f"model.hf_path={hf_dir}", f"grpo.data.path={data}", f"checkpoint.dir={tmp / 'ckpt'}",
           f"logging.dir={tmp / 'logs'}", "grpo.prompts_per_step=4", "train.global_batch_size=16",
           "train.micro_batch_size=8", "grpo.sampling.max_new_tokens=12", "optim.lr=5e-3",
           "grpo.rewards.cosine_weight=1.0", *overrides]  # cosine: advantages even at 0 accuracy
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (tmp / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_second_update_on_a_reused_batch_has_ratios_off_one(tmp_path, tiny_hf_dir, mcq_data):
    rows = _grpo(tmp_path, tiny_hf_dir, mcq_data, "train.max_steps=2", "grpo.num_iterations=2")
    first, second = rows
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # old log-probs = the policy before update 1
    assert abs(second["ratio_mean"] - 1.0) > 1e-4, second  # update 1 moved the policy; the batch is the same
    assert second["reward/total"] == first["reward/total"]  # no new generation in step 2
    assert second["completion_len_mean"] == first["completion_len_mean"]


def test_dynamic_sampling_reports_its_rounds(tmp_path, tiny_hf_dir, mcq_data):
    rows = _grpo(tmp_path, tiny_hf_dir, mcq_data, "train.max_steps=1", "grpo.dynamic_sampling.enabled=true",
                 "grpo.dynamic_sampling.max_rounds=2")
    row = rows[0]
    # A random-init model almost never answers right: every group lacks accuracy spread, so the
    # stage drew its second round, dropped everything and filled the batch back up.
    assert row["dynamic/rounds"] == 2.0
    kept = min(8 - row["dynamic/dropped_groups"], 4)  # informative groups of both rounds, at most the batch
    assert row["dynamic/filled_groups"] + kept == 4  # the batch keeps its 4 groups

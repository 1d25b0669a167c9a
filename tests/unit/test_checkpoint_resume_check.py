"""What a resume compares (training/resume_check.py) and how metrics.jsonl is kept to one row
per step (training/metrics.py); the end-to-end runs are in tests/e2e/test_resume_checks.py."""

import json

import pytest

from gazal_nemo.config_io import to_dict
from gazal_nemo.recipe import load_recipe
from gazal_nemo.training.metrics import MetricsLogger, truncate_metrics_jsonl
from gazal_nemo.training.resume_check import check_resume_recipe, recipe_changes

RECIPE = "recipes/tiny_cpu_sft.yaml"


def _recipe(*overrides) -> dict:
    return to_dict(load_recipe(RECIPE, ["model.hf_path=/models/base", *overrides]))


def test_every_run_altering_difference_is_named_with_both_values():
    saved = _recipe()
    new = _recipe("optim.lr=1e-3", "train.seed=7", "sft_data.sources.0.path=other.jsonl", "adapter.rank=4")
    with pytest.raises(ValueError) as err:
        check_resume_recipe(saved, new, where="ckpt/step_000010")
    message = str(err.value)
    assert "\n" not in message and message.startswith("ckpt/step_000010: ")
    for part in ("optim.lr: 0.003 -> 0.001", "train.seed: 3407 -> 7", "adapter.rank: 8 -> 4",
                 "sft_data.sources: "):
        assert part in message, (part, message)
    assert "checkpoint.allow_changes=[adapter.rank,optim.lr,sft_data.sources,train.seed]" in message


@pytest.mark.parametrize("override", [
    "logging.dir=elsewhere", "logging.log_every=5", "checkpoint.save_every=1", "checkpoint.keep_last=9",
    "checkpoint.dir=other", "train.stop_at_step=3", "export_dir=null", "parallel.tp=2", "parallel.pp=2",
    "name=renamed",
])
def test_keys_that_do_not_alter_the_run_never_block(override):
    check_resume_recipe(_recipe(), _recipe(override), where="x")


@pytest.mark.parametrize("override", [
    "optim.name=adamw", "optim.schedule=constant", "train.global_batch_size=8", "train.max_steps=3",
    "train.micro_batch_size=1", "precision.dtype=bf16", "parallel.distributed_optimizer=false",
    "model.hf_path=/models/other", "adapter=null", "sft_data.seed=1",
])
def test_keys_that_alter_the_run_block(override):
    key = override.split("=")[0]
    changes = recipe_changes(_recipe(), _recipe(override))
    assert changes and all(k == key or k.startswith(key + ".") for k, _, _ in changes), changes


def test_allow_changes_takes_keys_and_prefixes_from_the_cli():
    saved = _recipe()
    new = _recipe("optim.lr=1e-3", "optim.beta2=0.99", "train.seed=1", "checkpoint.allow_changes=[optim,train.seed]")
    assert new["checkpoint"]["allow_changes"] == ["optim", "train.seed"]
    check_resume_recipe(saved, new, where="x")
    only_lr = _recipe("optim.lr=1e-3", "optim.beta2=0.99", "checkpoint.allow_changes=[optim.lr]")
    assert [k for k, _, _ in recipe_changes(saved, only_lr, allowed=["optim.lr"])] == ["optim.beta2"]


def test_grpo_rollout_engine_choice_never_blocks():
    saved = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m"]))
    new = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m", "grpo.rollout.engine=torch"]))
    check_resume_recipe(saved, new, where="x")
    changed = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m", "grpo.sampling.temperature=0.5"]))
    assert [k for k, _, _ in recipe_changes(saved, changed)] == ["grpo.sampling.temperature"]


def test_resumed_logger_drops_replayed_rows_and_torn_lines(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill -9 in the middle of a write
    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False, resume_step=3)
    for step in range(4, 7):
        log.log(step, {"loss": 10.0 * step})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert truncate_metrics_jsonl(tmp_path / "metrics.jsonl", keep_through_step=6) == 0

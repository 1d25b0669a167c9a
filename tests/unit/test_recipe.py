"""Recipes: schema validation, dotted overrides, layout checks, and the CLI's --dry-run."""

import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.config_io import apply_overrides
from gazal_nemo.models.qwen3 import Qwen3Shape
from gazal_nemo.recipe import check_layout, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SFT_32B = ROOT / "recipes" / "sft_qwen3_32b_dora.yaml"

QWEN3_32B = Qwen3Shape(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_layers=64,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    if path.name.startswith(("synth_", "tiny_cpu_synth")):  # `gazal synth` recipes: their own schema
        from gazal_nemo.synth.config import load_synth_recipe

        assert load_synth_recipe(path).name
        return
    recipe = load_recipe(path)
    assert recipe.name and recipe.stage in ("sft", "grpo")


def test_overrides_apply_with_types_and_list_indices():
    recipe = load_recipe(SFT_32B, ["optim.lr=1e-6", "parallel.tp=4", "sft_data.sources.1.weight=2.5",
                                   "train.max_steps=7"])
    assert recipe.optim.lr == 1e-6 and recipe.parallel.tp == 4 and recipe.train.max_steps == 7
    assert recipe.sft_data.sources[1].weight == 2.5


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "unknown key train.lrr"),
    ("parallel.tp=two", "parallel.tp: expected an integer"),
    ("precision.dtype=fp64", "precision.dtype: 'fp64' is not allowed; allowed values: 'bf16', 'fp16', 'fp32'"),
    ("train.recompute=true", "train.recompute"),
    ("sft_data.sources.5.weight=1", "not an index"),
    ("nonsense", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ValueError, match=None) as err:
        load_recipe(SFT_32B, [override])
    assert needle in str(err.value)


def test_apply_overrides_creates_missing_sections_only_in_the_dict():
    data = apply_overrides({}, ["a.b.c=3"])
    assert data == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("world,tp,pp,needle", [
    (8, 3, 1, "does not divide world size 8"),
    (6, 6, 1, "num_key_value_heads=8 not divisible by tp=6"),
    (6, 1, 3, "num_hidden_layers=64 not divisible by pp=3"),
])
def test_impossible_layouts_are_refused(world, tp, pp, needle):
    recipe = load_recipe(SFT_32B, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    with pytest.raises(ValueError) as err:
        check_layout(recipe, world, QWEN3_32B)
    assert needle in str(err.value)


def test_valid_layout_gives_data_parallel_size():
    recipe = load_recipe(SFT_32B, ["parallel.tp=2"])
    assert check_layout(recipe, 8, QWEN3_32B) == 4


def _cli(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_cli_dry_run_validates_against_world_size(tiny_hf_dir, tmp_path):
    from gazal_nemo.commands.demo_data import sft_rows
    from gazal_nemo.testing.tiny import write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4, seed=0))  # the dry run checks that data exists
    ok = _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}",
              f"sft_data.sources.0.path={data}", "--dry-run")
    assert ok.returncode == 0, ok.stderr
    assert "valid for world size 1" in ok.stdout and "name: tiny_cpu_sft" in ok.stdout
    bad = _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}", "parallel.tp=2",
               "--dry-run", env_extra={"WORLD_SIZE": "3", "RANK": "0"})
    assert bad.returncode == 2 and "does not divide world size 3" in bad.stderr


def test_cli_refuses_fp8_without_transformer_engine(tiny_hf_dir):
    out = _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}", "precision.fp8=hybrid",
               "--dry-run")
    assert out.returncode == 2 and "Transformer Engine" in out.stderr and "precision.fp8" in out.stderr


def test_cli_refuses_wrong_stage_and_missing_model(tiny_hf_dir):
    out = _cli("grpo", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}", "--dry-run")
    assert out.returncode == 2 and "run it with `gazal sft`" in out.stderr
    out = _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", "model.hf_path=./no/such/dir", "--dry-run")
    assert out.returncode == 2 and "model.hf_path" in out.stderr


def test_cli_help_lists_subcommands():
    out = _cli("--help")
    assert out.returncode == 0
    for name in ("sft", "grpo", "convert", "eval", "decontam", "synth", "plan", "guard", "demo"):
        assert name in out.stdout


def test_grpo_global_batch_must_be_prompts_times_generations():
    grpo = ROOT / "recipes" / "grpo_qwen3_32b.yaml"
    with pytest.raises(ValueError, match="train.global_batch_size=64 must equal grpo.prompts_per_step"):
        load_recipe(grpo, ["train.global_batch_size=64"])
    recipe = load_recipe(grpo, ["grpo.prompts_per_step=16", "train.global_batch_size=64"])
    assert recipe.train.global_batch_size == 64


# ---- one recipe, one meaning (issue 15) ---------------------------------------------------

SFT_TINY = ROOT / "recipes" / "tiny_cpu_sft.yaml"
GRPO_TINY = ROOT / "recipes" / "tiny_cpu_grpo.yaml"
GRPO_32B = ROOT / "recipes" / "grpo_qwen3_32b.yaml"


def _refusal(path, overrides) -> str:
    with pytest.raises(ValueError) as err:
        load_recipe(path, overrides)
    return str(err.value)


@pytest.mark.parametrize("text, key, lines", [
    ("name: x\nstage: sft\noptim:\n  lr: 1.0e-3\ntrain: {seed: 1}\noptim:\n  weight_decay: 0.0\n", "optim", (3, 6)),
    ("name: x\nstage: sft\noptim:\n  lr: 1.0e-3\n  beta1: 0.8\n  lr: 2.0e-3\n", "optim.lr", (4, 6)),
    ("name: x\nsft_data:\n  sources:\n    - {path: a.jsonl, weight: 1.0, weight: 2.0}\n", "sft_data.sources[0].weight", (4, 4)),
    ("name: x\nname: y\n", "name", (1, 2)),
])
def test_a_key_or_section_given_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    message = _refusal(path, [])
    assert f"{key} is given twice (line {lines[0]} and line {lines[1]})" in message, message
    assert str(path) in message


def test_yaml_anchors_and_merge_keys_are_not_repeats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(SFT_TINY.read_text() + "\n_defaults: &d {a: 1}\n")
    from gazal_nemo.config_io import load_yaml

    data = load_yaml(path)  # the anchor itself is fine; only the unknown key is refused later
    assert data["_defaults"] == {"a": 1}
    path.write_text("base: &b {lr: 1.0, wd: 2.0}\noptim:\n  <<: *b\n  lr: 3.0\n")
    assert load_yaml(path)["optim"] == {"lr": 3.0, "wd": 2.0}  # an override of a merged key is intended


def _float_keys(prefix: str, instance) -> list[str]:
    """Dotted keys (override spelling) of every float field reachable in a loaded recipe."""
    import dataclasses
    import typing

    keys = []
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, tp = getattr(instance, f.name), hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys += _float_keys(f"{key}.", value)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]) and key != "grpo.guard.rules":
            keys += _float_keys(f"{key}.0.", value[0])  # (the guard's rules are a default, not in the YAML)
        elif tp is float or tp == (float | None):
            keys.append(key)
    return keys


FLOAT_KEYS = sorted({(path.name, key) for path in (ROOT / "recipes" / "sft_qwen3_32b_dora.yaml", GRPO_32B)
                     for key in _float_keys("", load_recipe(path))})


def test_the_float_walk_sees_every_section():
    keys = {key for _, key in FLOAT_KEYS}
    for expected in ("optim.lr", "adapter.alpha", "sft_data.sources.0.weight", "grpo.loss.eps_high",
                     "grpo.sampling.top_p", "grpo.rewards.cosine_min_wrong", "grpo.data.subset_fraction",
                     "grpo.guard.lr_scale", "grpo.rollout.vllm.gpu_memory_utilization"):
        assert expected in keys
    assert len(keys) >= 35


@pytest.mark.parametrize("recipe_name, key", FLOAT_KEYS, ids=[f"{r}:{k}" for r, k in FLOAT_KEYS])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_number_must_be_finite(recipe_name, key, value):
    message = _refusal(ROOT / "recipes" / recipe_name, [f"{key}={value}"])
    written = key.replace(".0.", "[0].")
    assert message.startswith(f"{written}=") and "allowed: a finite number" in message, message


@pytest.mark.parametrize("override, needle", [
    # run lengths: zero or negative only where a docstring gives it a meaning
    ("train.max_steps=0", "train.max_steps=0; allowed: null or integers >= 1"),
    ("train.max_steps=-1", "train.max_steps=-1; allowed: null or integers >= 1"),
    ("train.epochs=0", "train.epochs=0; allowed: integers >= 1"),
    ("train.stop_at_step=0", "train.stop_at_step=0; allowed: null or integers >= 1"),
    ("checkpoint.save_every=-1", "checkpoint.save_every=-1; allowed: integers >= 0"),
    ("checkpoint.keep_last=-2", "checkpoint.keep_last=-2; allowed: integers >= 0"),
    ("logging.log_every=0", "logging.log_every=0; allowed: integers >= 1"),
    ("train.seq_length=0", "train.seq_length=0; allowed: integers >= 2"),
    ("train.seed=-3", "train.seed=-3; allowed: integers >= 0"),
    # ranges
    ("optim.lr=0", "optim.lr=0.0; allowed: > 0"),
    ("optim.beta2=1.0", "optim.beta2=1.0; allowed: 0 <= x < 1"),
    ("optim.eps=0", "optim.eps=0.0; allowed: > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1; allowed: numbers >= 0.0"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0; allowed: numbers >= 0.0"),
    ("sft_data.sources.1.weight=0", "sft_data.sources[1].weight=0.0; allowed: finite numbers > 0"),
    ("sft_data.sources.0.format=alpaca", "sft_data.sources[0].format: 'alpaca' is not allowed"),
    ("sft_data.seed=-1", "sft_data.seed=-1; allowed: integers >= 0"),
    # cross-key rules
    ("optim.min_lr=1.0", "optim.min_lr=1.0; allowed: 0 <= x <= optim.lr"),
    ("sft_data.max_length=4096", "sft_data.max_length=4096 must equal train.seq_length=8192"),
    ("train.max_steps=10 train.stop_at_step=11", "train.stop_at_step=11 is after the run's end (train.max_steps=10)"),
    ("optim.cpu_offload_fraction=0.5 parallel.distributed_optimizer=false",
     "optim.cpu_offload_fraction=0.5 needs parallel.distributed_optimizer=true"),
    ("eval_during_training.every=5 eval_during_training.data=x.jsonl parallel.pp=2",
     "eval_during_training.every=5 needs parallel.pp=1"),
    ("eval_during_training.every=5 eval_during_training.data=x.jsonl eval_during_training.benchmark=medqa_us",
     "eval_during_training.benchmark='medqa_us'; allowed: 'medqa'"),
])
def test_sft_recipe_mistakes_name_the_key(override, needle):
    message = _refusal(SFT_32B, override.split())
    assert needle in message, message


@pytest.mark.parametrize("override, needle", [
    ("grpo.loss.eps_low=2", "grpo.loss.eps_low=2.0; allowed: 0 <= x < 1"),
    ("grpo.loss.normalisation=token", "grpo.loss.normalisation: 'token' is not allowed"),
    ("grpo.loss.advantage_eps=0", "grpo.loss.advantage_eps=0.0"),
    ("grpo.sampling.top_p=1.5", "grpo.sampling.top_p=1.5; allowed: 0 < x <= 1"),
    ("grpo.sampling.temperature=0", "grpo.sampling.temperature=0.0"),
    ("grpo.sampling.max_new_tokens=0", "grpo.sampling.max_new_tokens=0"),
    ("grpo.rewards.cosine_max_length=0", "grpo.rewards.cosine_max_length=0"),
    ("grpo.rewards.repetition_max_penalty=1", "grpo.rewards.repetition_max_penalty=1.0"),
    ("grpo.data.subset_fraction=0", "grpo.data.subset_fraction=0.0; allowed: 0 < x <= 1"),
    ("grpo.data.max_prompt_length=0", "grpo.data.max_prompt_length=0"),
    ("grpo.data.seed=-1", "grpo.data.seed=-1"),
    ("grpo.dynamic_sampling.max_rounds=0", "grpo.dynamic_sampling.max_rounds=0"),
    ("grpo.prompts_per_step=0 train.global_batch_size=0", "train.global_batch_size=0"),
    ("grpo.rollout.megatron.max_batch_size=0", "grpo.rollout.megatron.max_batch_size=0; allowed: integers >= 1"),
    ("grpo.rollout.vllm.gpu_memory_utilization=1.5", "grpo.rollout.vllm.gpu_memory_utilization=1.5"),
    ("grpo.rollout.vllm.sleep_level=3", "grpo.rollout.vllm.sleep_level=3; allowed: 0, 1, 2"),
    ("grpo.loss.tis_cap=2 grpo.sampling.train_logprobs=temperature", "grpo.loss.tis_cap=2.0 with grpo.sampling"),
    ("grpo.loss.mis_threshold=2 grpo.sampling.train_logprobs=temperature", "grpo.loss.mis_threshold=2.0 with"),
    ("grpo.rollout.mode=async grpo.rollout.engine=megatron", "grpo.rollout.mode=async with grpo.rollout.engine='megatron'"),
    ("grpo.rollout.mode=async grpo.rollout.generator_ranks=0", "grpo.rollout.generator_ranks=0 with generator_tp=1"),
    ("grpo.rollout.mode=async grpo.rollout.engine=vllm grpo.rollout.generator_ranks=1",
     "grpo.rollout.max_staleness=1 trains on samples of older weights without a correction"),
    ("grpo.log_rollouts_every=-1", "grpo.log_rollouts_every=-1; allowed: integers >= 0"),
    ("grpo.train_adapter=true", "grpo.train_adapter=true but the recipe has no adapter section"),
    ("parallel.tp=4 parallel.pp=2", "parallel.pp=2 with stage grpo"),
])
def test_grpo_recipe_mistakes_name_the_full_dotted_key(override, needle):
    message = _refusal(GRPO_32B, override.split())
    assert needle in message, message


def test_sections_built_directly_name_the_recipe_key():
    from gazal_nemo.data.config import DataSourceConfig
    from gazal_nemo.rl.config import GRPOLossConfig, RewardConfig, SamplingConfig
    from gazal_nemo.tasks.mcq import MCQDataConfig

    for build, key in [(lambda: GRPOLossConfig(eps_low=2.0), "grpo.loss.eps_low"),
                       (lambda: SamplingConfig(top_k=-1), "grpo.sampling.top_k"),
                       (lambda: RewardConfig(overlong_buffer=0), "grpo.rewards.overlong_buffer"),
                       (lambda: MCQDataConfig(path="x", max_bad_fraction=2.0), "grpo.data.max_bad_fraction"),
                       (lambda: DataSourceConfig(path="x", weight=-1.0), "sft_data.sources[i].weight")]:
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value).startswith(f"{key}="), str(err.value)


def test_prompts_per_step_must_split_over_data_parallel_ranks():
    recipe = load_recipe(GRPO_32B, ["grpo.prompts_per_step=6", "train.global_batch_size=24", "parallel.tp=2"])
    with pytest.raises(ValueError, match=r"grpo\.prompts_per_step=6 must divide by the data-parallel size 4"):
        check_layout(recipe, 8, QWEN3_32B)
    assert check_layout(recipe, 4, QWEN3_32B) == 2


def test_documented_zero_meanings_stay_allowed():
    recipe = load_recipe(SFT_32B, ["checkpoint.save_every=0", "checkpoint.keep_last=0", "optim.grad_clip=0",
                                   "train.max_steps=null", "train.max_steps=5", "train.stop_at_step=5"])
    assert (recipe.checkpoint.save_every, recipe.checkpoint.keep_last, recipe.optim.grad_clip) == (0, 0, 0.0)
    assert (recipe.train.max_steps, recipe.train.stop_at_step) == (5, 5)

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
    for name in ("sft", "grpo", "convert", "eval", "demo"):
        assert name in out.stdout


def test_grpo_global_batch_must_be_prompts_times_generations():
    grpo = ROOT / "recipes" / "grpo_qwen3_32b.yaml"
    with pytest.raises(ValueError, match="train.global_batch_size=64 must equal grpo.prompts_per_step"):
        load_recipe(grpo, ["train.global_batch_size=64"])
    recipe = load_recipe(grpo, ["grpo.prompts_per_step=16", "train.global_batch_size=64"])
    assert recipe.train.global_batch_size == 64

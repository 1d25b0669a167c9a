"""`gazal sft` / `gazal grpo`: validate the recipe, then start the stage on every rank."""

from __future__ import annotations

import dataclasses
import sys

import yaml

from gazal_nemo.config_io import to_dict


def prepare(stage: str, recipe_path: str, overrides: list[str], *, dry_run: bool = False):
    """Everything that can be checked without a GPU: recipe, model config, layout, precision."""
    from gazal_nemo.hub import resolve_model_dir
    from gazal_nemo.models.qwen3 import Qwen3Shape
    from gazal_nemo.parallel import launch_env
    from gazal_nemo.recipe import check_layout, load_recipe
    from gazal_nemo.training.model_setup import check_precision

    recipe = load_recipe(recipe_path, overrides)
    if recipe.stage != stage:
        raise ValueError(f"{recipe_path}: stage is {recipe.stage!r}; run it with `gazal {recipe.stage}`")
    model_dir = resolve_model_dir(recipe.model.hf_path, config_only=dry_run)
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, hf_path=str(model_dir)))
    shape = Qwen3Shape.from_pretrained(model_dir)
    env = launch_env()
    dp = check_layout(recipe, env.world_size, shape)
    check_precision(recipe.precision)
    return recipe, shape, env, dp


def run_stage(stage: str, recipe_path: str, overrides: list[str], *, dry_run: bool) -> int:
    recipe, shape, env, dp = prepare(stage, recipe_path, overrides, dry_run=dry_run)
    if dry_run:
        if env.rank == 0:
            print(f"# recipe {recipe.name}: valid for world size {env.world_size} "
                  f"(tp={recipe.parallel.tp} pp={recipe.parallel.pp} cp={recipe.parallel.cp} dp={dp})")
            yaml.safe_dump(to_dict(recipe), sys.stdout, sort_keys=False)
        return 0
    from gazal_nemo.parallel import init_parallel, shutdown_parallel

    init_parallel(tp=recipe.parallel.tp, pp=recipe.parallel.pp, cp=recipe.parallel.cp, seed=recipe.train.seed)
    try:
        if stage == "sft":
            from gazal_nemo.stages.sft import run_sft

            run_sft(recipe, shape)
        else:
            from gazal_nemo.stages.grpo import run_grpo

            run_grpo(recipe, shape)
    finally:
        shutdown_parallel()
    return 0

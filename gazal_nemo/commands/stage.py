"""`gazal sft` / `gazal grpo`: validate the recipe, then start the stage on every rank."""

from __future__ import annotations

import dataclasses
import sys

import yaml

from gazal_nemo.config_io import to_dict


def prepare(stage: str, recipe_path: str, overrides: list[str], *, dry_run: bool = False):
    """Everything that can be checked without a GPU: recipe, model folder, layout, precision, data
    and output paths."""
    from gazal_nemo.hub import resolve_model_dir
    from gazal_nemo.models.qwen3 import Qwen3Shape
    from gazal_nemo.parallel import launch_env
    from gazal_nemo.recipe import check_layout, load_recipe
    from gazal_nemo.training.model_setup import check_precision

    recipe = load_recipe(recipe_path, overrides)
    if recipe.stage != stage:
        raise ValueError(f"{recipe_path}: stage is {recipe.stage!r}; run it with `gazal {recipe.stage}`")
    model_dir = resolve_model_dir(recipe.model.hf_path, config_only=dry_run, what="model.hf_path")
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, hf_path=str(model_dir)))
    shape = Qwen3Shape.from_pretrained(model_dir)
    env = launch_env()
    dp = check_layout(recipe, env.world_size, shape)
    check_precision(recipe.precision)
    check_recipe_paths(recipe)
    return recipe, shape, env, dp


def check_recipe_paths(recipe) -> None:
    """Local data paths exist and hold non-empty data files; output folders can be created.
    Cheap (no data is parsed, hub ids are not looked up), so the dry run does it too."""
    from gazal_nemo.config_io import require_writable_dir
    from gazal_nemo.data.sources import check_local_source

    if recipe.sft_data is not None:
        for index, source in enumerate(recipe.sft_data.sources):
            check_local_source(source.path, f"sft_data.sources[{index}].path")
    if recipe.grpo is not None:
        check_local_source(recipe.grpo.data.path, "grpo.data.path")
    outputs = {"checkpoint.dir": recipe.checkpoint.dir, "logging.dir": recipe.logging.dir,
               "export_dir": recipe.export_dir}
    for key, path in outputs.items():
        if path:
            require_writable_dir(path, key)


def run_stage(stage: str, recipe_path: str, overrides: list[str], *, dry_run: bool) -> int:
    recipe, shape, env, dp = prepare(stage, recipe_path, overrides, dry_run=dry_run)
    if dry_run:
        if env.rank == 0:
            print(f"# recipe {recipe.name}: valid for world size {env.world_size} "
                  f"(tp={recipe.parallel.tp} pp={recipe.parallel.pp} cp={recipe.parallel.cp} dp={dp})")
            yaml.safe_dump(to_dict(recipe), sys.stdout, sort_keys=False)
            from gazal_nemo.training.memory_plan import plan_memory

            # As YAML comments, so the output stays a loadable recipe; `gazal plan` exits on the verdict.
            table = plan_memory(recipe, shape, world_size=env.world_size).format_table()
            print("\n".join(f"# {line}" for line in table.splitlines()))
        return 0
    from gazal_nemo.parallel import init_parallel, shutdown_parallel
    from gazal_nemo.training.preemption import (
        REQUEUE_EXIT_CODE,
        install_stop_handlers,
        restore_default_handlers,
    )

    install_stop_handlers()  # before the model is built: a signal while loading is not lost
    init_parallel(tp=recipe.parallel.tp, pp=recipe.parallel.pp, cp=recipe.parallel.cp, seed=recipe.train.seed)
    try:
        if stage == "sft":
            from gazal_nemo.stages.sft import run_sft

            result = run_sft(recipe, shape)
        else:
            from gazal_nemo.stages.grpo import run_grpo

            result = run_grpo(recipe, shape)
    finally:
        shutdown_parallel()
        restore_default_handlers()
    return REQUEUE_EXIT_CODE if result.get("stopped_by") else 0

"""`gazal sft` / `gazal grpo`: validate the recipe, claim the run's folders, then start the stage
on every rank.

Exit status (what Slurm's `--dependency=afterok` and slurm/common.sh read):
  * 0: the run reached its last step and wrote its export (when export_dir is set);
  * 75 (training/preemption.REQUEUE_EXIT_CODE, EX_TEMPFAIL): the job ended before the run's last
    step with a checkpoint and no export, on a signal (time limit, preemption, scancel, a first
    Ctrl-C: slurm/common.sh requeues it) or at train.stop_at_step (resubmit to go on: the
    checkpoint's trainer_state.json says stop_reason train.stop_at_step and the script does not
    requeue it, which would stop at the same step again);
  * 2: a refusal before training (recipe, paths, a folder owned by another run, a resume that
    would train on changed inputs, no space left), 130: a second Ctrl-C, 3: the collapse guard
    gave up, 4: the weight-push gate found the rollout engine on other weights than the trainer's.
"""

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
    from gazal_nemo.recipe import check_layout, check_runtime, load_recipe
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
    check_runtime(recipe)
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


def _finished_or_requeue(stage: str, recipe, result: dict, rank: int) -> int:
    """0 when the run reached its last step (and exported), else the requeue code with a line
    saying why the export is missing."""
    from gazal_nemo.training.preemption import REQUEUE_EXIT_CODE

    last, total = result.get("last_step"), result.get("total_steps")
    if not result.get("stopped_by") and (last is None or total is None or last >= total):
        return 0
    if rank == 0 and not result.get("stopped_by"):
        export = f"no export in {recipe.export_dir}" if recipe.export_dir else "not finished"
        print(f"gazal {stage}: stopped at train.stop_at_step={recipe.train.stop_at_step} (step {last} of {total}, "
              f"checkpoint in {recipe.checkpoint.dir}): {export}; exit {REQUEUE_EXIT_CODE}; run it again without "
              "train.stop_at_step (or with a later one) to go on", flush=True)
    return REQUEUE_EXIT_CODE


def run_stage(stage: str, recipe_path: str, overrides: list[str], *, dry_run: bool) -> int:
    recipe, shape, env, dp = prepare(stage, recipe_path, overrides, dry_run=dry_run)
    if dry_run:
        from gazal_nemo.training.run_folder import check_run_folders

        claim = check_run_folders(recipe, take=False)  # what the run would refuse about its folders
        if env.rank == 0:
            for note in claim.notes:
                print(f"# {note}", file=sys.stderr)
            print(f"# recipe {recipe.name}: valid for world size {env.world_size} "
                  f"(tp={recipe.parallel.tp} pp={recipe.parallel.pp} cp={recipe.parallel.cp} dp={dp})")
            yaml.safe_dump(to_dict(recipe), sys.stdout, sort_keys=False)
            from gazal_nemo.training.memory_plan import plan_memory

            # As YAML comments, so the output stays a loadable recipe; `gazal plan` exits on the verdict.
            tables = [plan_memory(recipe, shape, world_size=env.world_size).format_table()]
            if stage == "grpo" and recipe.grpo.rollout.mode == "async":
                from gazal_nemo.training.memory_plan import plan_generator_memory

                tables.append(plan_generator_memory(recipe, shape).format_table())
            print("\n".join(f"# {line}" for table in tables for line in table.splitlines()))
        return 0
    from gazal_nemo.parallel import init_parallel, shutdown_parallel
    from gazal_nemo.training.preemption import install_stop_handlers, restore_default_handlers
    from gazal_nemo.training.run_folder import claimed_run

    bridge = None
    if stage == "grpo" and recipe.grpo.rollout.mode == "async":
        bridge = _async_role(recipe, shape, env)
        if bridge is None:  # a generator rank: it has served the trainer until it said stop
            return 0
    install_stop_handlers()  # before the model is built: a signal while loading is not lost
    init_parallel(tp=recipe.parallel.tp, pp=recipe.parallel.pp, cp=recipe.parallel.cp, seed=recipe.train.seed)
    try:
        with claimed_run(recipe):  # the folders are this run's (or refused) before any data or model work
            if stage == "sft":
                from gazal_nemo.stages.sft import run_sft

                result = run_sft(recipe, shape)
            else:
                from gazal_nemo.stages.grpo import run_grpo

                result = run_grpo(recipe, shape, bridge=bridge)
    finally:
        shutdown_parallel()
        restore_default_handlers()
    return _finished_or_requeue(stage, recipe, result, env.rank)


def _async_role(recipe, shape, env):
    """grpo.rollout.mode=async: this rank's role. A generator rank serves rollouts until the trainer
    stops (returns None); a trainer rank gets the bridge to the generators, its world regrouped."""
    from gazal_nemo.rl.async_bridge import Bridge, enter_role_world, split_roles

    role = split_roles(env.rank, env.world_size, recipe.grpo.rollout.generator_ranks)
    bridge = Bridge(role)
    enter_role_world(role)
    if not role.is_generator:
        return bridge
    from gazal_nemo.stages.grpo_async import run_generator

    run_generator(recipe, shape, role, bridge)
    return None

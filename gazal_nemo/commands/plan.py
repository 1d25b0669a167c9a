"""Per-GPU memory plan of a recipe, item by item, with a fits / does-not-fit verdict.

Needs only the model's config.json: a local folder's, the published one shipped with gazal
for the Qwen3 family (Qwen/Qwen3-0.6B ... Qwen/Qwen3-32B: no download, works offline), else
the hub id's config.json alone. Exit status: 0 when the plan fits the GPU, 1 when it does
not, 2 for a user error (bad key, file, world size).
"""

from __future__ import annotations

import argparse

EPILOG = ("Exit status: 0 = fits, 1 = does not fit, 2 = user error. Overrides: dotted recipe keys, e.g. "
          "train.micro_batch_size=1 grpo.rollout.vllm.gpu_memory_utilization=0.2 optim.cpu_offload_fraction=1. "
          "Static items are exact; activations, logits and rollout buffers are modelled (docs/MEMORY.md).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in the job (default: the launcher's, else the recipe's tp*pp*cp)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes in the job (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node with --nodes (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB",
                        help="memory of one GPU in GiB (default 80, an H100 80GB)")
    parser.add_argument("--te", choices=("auto", "on", "off"), default="auto",
                        help="plan with Transformer Engine (sequence parallelism); auto: whether it runs here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def job_world_size(args, recipe) -> int:
    """--world-size, else --nodes x --gpus-per-node, else the launcher's (if > 1), else tp*pp*cp."""
    from gazal_nemo.parallel import launch_env

    if args.world_size is not None and args.nodes is not None:
        raise ValueError("--world-size and --nodes exclude each other; give one")
    if args.world_size is not None:
        world = args.world_size
    elif args.nodes is not None:
        if args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError(f"--nodes={args.nodes} --gpus-per-node={args.gpus_per_node}; allowed: integers >= 1")
        world = args.nodes * args.gpus_per_node
    else:
        launched = launch_env().world_size
        par = recipe.parallel
        world = launched if launched > 1 else par.tp * par.pp * par.cp
    if world < 1:
        raise ValueError(f"--world-size={world}; allowed: integers >= 1")
    return world


def model_shape(hf_path: str):
    """The architecture of model.hf_path: a local folder's config.json (the plan needs no tokenizer
    or weights, so a config-only copy is enough), the shipped published config of a Qwen3 hub id,
    else the hub id's config.json alone."""
    from pathlib import Path

    from gazal_nemo.hub import resolve_model_dir
    from gazal_nemo.models.qwen3 import Qwen3Shape
    from gazal_nemo.models.qwen3_configs import published_config

    local = Path(hf_path).expanduser()
    if not local.is_dir():
        published = published_config(hf_path)
        if published is not None:
            return Qwen3Shape.from_hf_dict(published, source=f"model.hf_path={hf_path!r} (published config.json)")
        local = resolve_model_dir(hf_path, config_only=True, what="model.hf_path")
    return Qwen3Shape.from_pretrained(local)


def run(args) -> int:
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.training.memory_plan import plan_memory

    if not args.gpu_memory > 0:
        raise ValueError(f"--gpu-memory={args.gpu_memory}; allowed: GiB > 0")
    recipe = load_recipe(args.recipe, args.overrides)
    world = job_world_size(args, recipe)
    shape = model_shape(recipe.model.hf_path)
    use_te = {"auto": None, "on": True, "off": False}[args.te]
    plans = [plan_memory(recipe, shape, world_size=world, gpu_memory_gib=args.gpu_memory, use_te=use_te)]
    if recipe.stage == "grpo" and recipe.grpo.rollout.mode == "async":
        from gazal_nemo.training.memory_plan import plan_generator_memory

        plans.append(plan_generator_memory(recipe, shape, gpu_memory_gib=args.gpu_memory))
    print("\n\n".join(plan.format_table() for plan in plans))
    return 0 if all(plan.fits for plan in plans) else 1

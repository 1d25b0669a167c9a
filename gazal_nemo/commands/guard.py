"""Replay a finished GRPO run's metrics through the collapse guard with a recipe's `grpo.guard`
settings: where it would have rolled back, why, and how close each rule came to firing.

    gazal guard --recipe recipes/grpo_qwen3_32b.yaml --logs runs/grpo/logs
    gazal guard --recipe recipes/grpo_qwen3_32b.yaml --logs runs/grpo/logs grpo.guard.false_alarm_rate=1e-3

Use it to set grpo.guard.false_alarm_rate on your own runs (docs/GRPO.md#collapse-guard):
healthy runs must not roll back, runs that went bad should. Exit status: 0 = no rollback,
1 = it would roll back, 2 = user error (recipe, key, logs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Exit status: 0 = no rollback, 1 = the guard would roll back, 2 = user error."
    parser.add_argument("--recipe", required=True, help="the GRPO recipe whose grpo.guard and rewards to use")
    parser.add_argument("--logs", required=True, help="the run's logging.dir (its metrics.jsonl is replayed)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. "
                        "grpo.guard.false_alarm_rate=1e-3")


def run(args) -> int:
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.rl.guard_replay import format_report, read_metric_rows, replay

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.grpo is None:
        raise ValueError(f"{args.recipe}: no grpo section (gazal guard replays a GRPO run)")
    path = Path(args.logs) / "metrics.jsonl" if Path(args.logs).is_dir() else Path(args.logs)
    rows = read_metric_rows(path)  # before the rewards: a wrong path is the likelier mistake
    config, rules = recipe_guard(recipe)
    report = replay(rows, config, rules)
    print(format_report(report, source=str(path), config=config, rules=rules))
    return 1 if report.rollbacks else 0


def recipe_guard(recipe):
    """(grpo.guard, the rules it applies to this recipe): what the trainer's guard would watch."""
    from gazal_nemo.rl.guard import watched_rules
    from gazal_nemo.rl.rewards import build_rewards

    config = recipe.grpo.guard
    return config, watched_rules(config, {reward.name: reward.weight for reward in build_rewards(recipe.grpo.rewards)})

"""Refuse to resume a run with a recipe that would make it a different run.

A resumed job must continue the run its checkpoint came from. Rerunning in the same
checkpoint folder with another learning rate, other data or another seed would otherwise
silently continue the old run under a recipe that no longer describes it. So the recipe
saved with the checkpoint (recipe.json) is compared key by key with the new one:

  * keys that do not change what is trained never block: where things are written and how
    often (logging.*, checkpoint.dir/save_every/keep_last/resume/allow_changes, export_dir),
    where this job stops (train.stop_at_step), the recipe's name, the rollout engine's
    plumbing (grpo.rollout.engine, vllm memory share, weight-sync buckets), and the
    reshardable layout and communication overlap (parallel.tp/pp/cp/sequence_parallel,
    parallel.overlap_*; the world size is not in the recipe at all; a TP change the
    checkpoint cannot follow is refused by the loader, training/checkpoint.py), and what
    only watches the run (eval_during_training, grpo.guard: tunable on a running job);
  * every other difference (model, data, optimizer, schedule, seeds, batch sizes, run
    length, adapter, GRPO settings, precision, parallel.distributed_optimizer) is refused,
    all differing keys listed with their old and new values;
  * `checkpoint.allow_changes` lists dotted keys or prefixes the user accepts changing,
    e.g. `checkpoint.allow_changes=[optim.lr]` or `[grpo.rewards]`.
"""

from __future__ import annotations

NEUTRAL_KEYS = (
    "name", "logging", "export_dir", "train.stop_at_step",
    "checkpoint.dir", "checkpoint.save_every", "checkpoint.keep_last", "checkpoint.resume",
    "checkpoint.allow_changes",
    "grpo.rollout.engine", "grpo.rollout.vllm_gpu_memory_utilization", "grpo.rollout.weight_sync_bucket_mb",
    "parallel.tp", "parallel.pp", "parallel.cp", "parallel.sequence_parallel",
    "parallel.overlap_grad_reduce", "parallel.overlap_param_gather",
    "eval_during_training", "grpo.guard",
)
_MISSING = "<absent>"


def flatten(data, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists stay values (a changed list is one change)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def recipe_changes(saved: dict, new: dict, *, allowed=()) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every difference that alters the run and is not allowed."""
    old_flat, new_flat = flatten(saved), flatten(new)
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        old, now = old_flat.get(key, _MISSING), new_flat.get(key, _MISSING)
        if old != now and not _covered(key, NEUTRAL_KEYS) and not _covered(key, allowed):
            changes.append((key, old, now))
    return changes


def check_resume_recipe(saved: dict, new: dict, *, where) -> None:
    """ValueError naming every blocking difference (one line), unless the new recipe allows it."""
    allowed = (new.get("checkpoint") or {}).get("allow_changes") or ()
    changes = recipe_changes(saved, new, allowed=allowed)
    if changes:
        listed = "; ".join(f"{key}: {old!r} -> {now!r}" for key, old, now in changes)
        keys = ",".join(key for key, _, _ in changes)
        raise ValueError(f"{where}: the recipe differs from the one this checkpoint was trained with: {listed}; "
                         f"resume refused (allow with checkpoint.allow_changes=[{keys}], or use another "
                         f"checkpoint.dir)")

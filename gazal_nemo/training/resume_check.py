"""Refuse to resume a run with a recipe that would make it a different run.

A resumed job must continue the run its checkpoint came from. Rerunning in the same
checkpoint folder with another learning rate, other data or another seed would otherwise
silently continue the old run under a recipe that no longer describes it. So the recipe
saved with the checkpoint (recipe.json) is compared key by key with the new one:

  * keys that do not change what is trained never block: where things are written and how
    often (logging.*, checkpoint.dir/save_every/keep_last/resume/allow_changes, export_dir),
    where this job stops (train.stop_at_step), the recipe's name, the rollout engine and its
    plumbing (grpo.rollout.*: every engine samples the same distribution), the rollout log, and the
    reshardable layout and communication overlap (parallel.tp/pp/cp/sequence_parallel,
    parallel.overlap_*; the world size is not in the recipe at all; a TP change the
    checkpoint cannot follow is refused by the loader, training/checkpoint.py), and what
    only watches the run (eval_during_training, grpo.guard: tunable on a running job);
  * every other difference (model, data, optimizer, schedule, seeds, batch sizes, run
    length, adapter, GRPO settings, precision, parallel.distributed_optimizer) is refused,
    all differing keys listed with their old and new values;
  * `checkpoint.allow_changes` lists dotted keys or prefixes the user accepts changing,
    e.g. `checkpoint.allow_changes=[optim.lr]` or `[grpo.rewards]`.

The recipe names inputs by path only, so the files behind the paths are compared too
(`input_changes`): the fingerprints the checkpoint recorded (training/run_identity.py) against
the files now at the same paths. A changed data file or base model is refused naming the file;
`checkpoint.allow_changes` takes the file's path (or a folder above it) or its recipe key.
"""

from __future__ import annotations

from pathlib import Path

NEUTRAL_KEYS = (
    "name", "logging", "export_dir", "train.stop_at_step",
    "checkpoint.dir", "checkpoint.save_every", "checkpoint.keep_last", "checkpoint.resume",
    "checkpoint.allow_changes",
    "grpo.rollout", "grpo.log_rollouts_every", "grpo.log_rollouts_groups",
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


def _file_change(old: dict, new: dict | None) -> str | None:
    """How one file's fingerprint moved (None: the same file)."""
    if new is None:
        return "removed"
    if old.get("size") != new.get("size"):
        return f"{old.get('size')} -> {new.get('size')} bytes"
    for kind in ("sha256", "sampled_sha256"):
        if kind in old and kind in new and old[kind] != new[kind]:
            return "same size, other contents"
    if "sampled_sha256" in old and old.get("mtime_ns") != new.get("mtime_ns"):
        return "rewritten (modification time moved; too large to compare every byte)"
    return None


def _allowed_path(path: Path, allowed) -> bool:
    for entry in allowed:
        try:
            prefix = Path(str(entry)).expanduser().resolve()
        except (OSError, RuntimeError):
            continue
        if path == prefix or prefix in path.parents:
            return True
    return False


def input_changes(saved: dict, current: dict, *, allowed=()) -> list[tuple[str, str, str]]:
    """(recipe key, file, what changed) for every input file that differs from the checkpoint's
    record and is not allowed by key or by path. Files are compared by recipe key, wherever the
    path now resolves (a run folder moved with relative paths is the same run); a key whose
    path the recipe changed is the recipe comparison's (`recipe_changes` names it)."""
    changes = []
    for key in sorted(saved):
        if _covered(key, allowed):
            continue
        old = saved[key]
        now = current.get(key) or {"path": old.get("path"), "files": {}}
        root = Path(now.get("path") or old.get("path"))
        old_files, new_files = old.get("files") or {}, now.get("files") or {}
        for name in sorted(set(old_files) | set(new_files)):
            file = root / name  # name "" is the path itself (a data file)
            what = _file_change(old_files[name], new_files.get(name)) if name in old_files else "new file"
            if what is not None and not _allowed_path(file, allowed):
                changes.append((key, str(file), what))
    return changes


def check_resume_inputs(saved_identity: dict | None, current_inputs: dict, *, allowed, where) -> None:
    """ValueError naming every changed input file (one line), unless allowed."""
    if not saved_identity:
        return  # a checkpoint written before run identities (or outside a stage): nothing to compare
    changes = input_changes(saved_identity.get("inputs") or {}, current_inputs, allowed=allowed)
    if changes:
        listed = "; ".join(f"{key} {file}: {what}" for key, file, what in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        files = ",".join(dict.fromkeys(file for _, file, _ in changes))
        raise ValueError(f"{where}: files this run was trained on changed since the checkpoint was written: "
                         f"{listed}{more}; resume refused (if that is intended, allow with "
                         f"checkpoint.allow_changes=[{files}], or use another checkpoint.dir)")

"""Step checkpoints on megatron-core `dist_checkpointing`: reshardable, verified, atomic.

A step checkpoint holds what a resumed run needs to continue the same loss curve (format
and guarantees in docs/CHECKPOINTS.md):
  * the trainable parameters under the keys of `model.sharded_state_dict()` (all of them
    for full-parameter training, only the adapter's otherwise: frozen base weights are
    re-read from the recipe's source), in their global shapes;
  * the optimizer's fp32 main params and EXAdam moments in model space: with the
    distributed optimizer each DP rank writes its slice of every TP-local tensor at its
    offset (so DP and PP may change on resume, TP not); without it megatron's own
    model-space format (full tensors: DP, TP and PP may change);
  * the optimizer's param groups and step, and the LR scheduler (common state, rank 0);
  * the RNG states of every rank, restored only when the layout is unchanged (a rank's
    generator cannot be split or merged across a DP change);
  * `trainer_state.json` (step, world_size, layout), `recipe.json` (for the resume check),
    `identity.json` (the run's id and fingerprints of its data and base model,
    training/run_identity.py), `hf/` (config + tokenizer, so the folder exports to HF on its
    own), and last of all `manifest.json`: every file with its size.

A checkpoint is complete only if its manifest lists exactly what is on disk. Everything is
written into `step_N.tmp/` and renamed to `step_N/` after the manifest, pruning deletes the
manifest before anything else, and a damaged latest checkpoint falls back to the newest
complete one (rank 0 decides, every rank follows).

Space: before a save rank 0 compares the free space with the size of the newest checkpoint
(an estimate from the trainable state for the first one) and, when it is short, removes early
the checkpoints that keep_last would remove after this save anyway (never the newest one). A
save that still runs out of space is removed and reported in one line with the folder and the
bytes it needed; the older checkpoints stay, so a rerun resumes from them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gazal_nemo.parallel import collective_device
from gazal_nemo.training.optim import inner_optimizers
from gazal_nemo.training.preemption import stop_signals_deferred

STEP_PREFIX = "step_"
TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
RECIPE = "recipe.json"
IDENTITY = "identity.json"  # training/run_identity.py
HF_SUBDIR = "hf"
FORMAT_VERSION = 2
# Param-group keys that are state; every other key (max_lr, min_lr, betas, eps, ...) is a
# hyperparameter the *new* recipe decides, so an allowed change (resume_check.py) takes effect.
_GROUP_STATE_KEYS = ("params", "step")


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named step_N (None for anything else, e.g. step_N.tmp)."""
    digits = path.name[len(STEP_PREFIX):]
    return int(digits) if path.name.startswith(STEP_PREFIX) and digits.isdigit() else None


def step_dirs(root: str | Path) -> list[Path]:
    """Every step_N folder under root, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# ---- completeness ---------------------------------------------------------------------------

def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a step checkpoint folder (None when it is complete)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the write or a prune was interrupted)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated or rewritten)"
    try:
        state = read_trainer_state(path)
    except ValueError as e:
        return str(e).removeprefix(f"{path}: ")
    if state["step"] != checkpoint_step(path):
        return f"{TRAINER_STATE} says step {state['step']}, the folder name another"
    return None


def is_complete_checkpoint(path: str | Path) -> bool:
    """True when every file the manifest lists is there with its size and the state parses."""
    return checkpoint_problem(path) is None


def complete_checkpoints(root: str | Path) -> list[Path]:
    return [p for p in step_dirs(root) if is_complete_checkpoint(p)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(path: str | Path) -> dict:
    """trainer_state.json of a step checkpoint; ValueError naming the file when it is garbage."""
    file = Path(path) / TRAINER_STATE
    try:
        state = json.loads(file.read_text())
        int(state["step"]), int(state["world_size"])
    except FileNotFoundError:
        raise ValueError(f"{path}: {TRAINER_STATE} is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a trainer state with step and world_size ({type(e).__name__}: {e})") from None
    return state


def read_identity(path: str | Path) -> dict | None:
    """identity.json of a step checkpoint (None when it has none: written before run identities)."""
    file = Path(path) / IDENTITY
    if not file.is_file():
        return None
    try:
        identity = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the run identity ({type(e).__name__})") from None
    if not isinstance(identity, dict) or not isinstance(identity.get("inputs", {}), dict):
        raise ValueError(f"{file}: not a run identity (expected an object with run_id and inputs)")
    return identity


def read_saved_recipe(path: str | Path) -> dict:
    file = Path(path) / RECIPE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read the saved recipe ({type(e).__name__})") from None


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Delete step_N.tmp folders left by a killed save (call on rank 0 only)."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name.endswith(TMP_SUFFIX)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resume_candidate(root: str | Path) -> tuple[Path | None, list[str], str | None]:
    """(newest complete checkpoint, notes on the damaged newer ones, error when step folders
    exist but none is usable); reads only."""
    root = Path(root)
    candidates = step_dirs(root)
    notes = []
    for path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notes, None
        notes.append(f"checkpoint {path} is damaged: {problem}; falling back to an older one")
    if candidates:
        newest = candidates[-1]
        return None, notes, (f"{root}: no usable checkpoint to resume; newest {newest.name}: "
                             f"{checkpoint_problem(newest)} (delete the folder or set checkpoint.resume=false)")
    return None, notes, None


def _choose_on_rank0(root: Path) -> tuple[str | None, list[str], str | None]:
    """(checkpoint to resume, notes to print, error) as rank 0 sees the folder."""
    for stale in remove_stale_tmp(root):
        print(f"removed {stale}: an unfinished checkpoint write", flush=True)
    path, notes, error = resume_candidate(root)
    return (str(path) if path is not None else None), notes, error


def choose_resume_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root, the same on every rank (None: start fresh).

    Rank 0 removes stale .tmp folders, skips damaged checkpoints saying so, and refuses
    with one line when step folders exist but none is usable.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    choice = [None, [], None]
    if not distributed or dist.get_rank() == 0:
        choice = list(_choose_on_rank0(Path(root)))
        for note in choice[1]:
            print(note, flush=True)
    if distributed:
        dist.broadcast_object_list(choice, src=0)
    path, _, error = choice
    if error is not None:
        raise ValueError(error)
    return Path(path) if path is not None else None


# ---- what is saved --------------------------------------------------------------------------

def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(with_context_parallel=True),
            "cp": ps.get_context_parallel_world_size()}


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(state):
    """One object per (pp, tp, dp) rank: restorable only at the same layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    layout = _layout()
    shape = (layout["pp"], layout["tp"], layout["dp"])
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def trainable_sharded_state_dict(model_chunks) -> dict:
    """The model's sharded state dict restricted to parameters that require grad."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from gazal_nemo.training.model_setup import unwrap

    if len(model_chunks) != 1:
        raise ValueError("step checkpoints support one model chunk per rank (no virtual pipeline)")
    model = unwrap(model_chunks[0])
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    kept = {k: v for k, v in model.sharded_state_dict().items()
            if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and id(v.data) in trainable}
    missing = set(trainable) - {id(v.data) for v in kept.values()}
    if missing:
        raise ValueError(f"trainable parameters without a sharded checkpoint entry: "
                         f"{sorted(trainable[i] for i in missing)[:5]}")
    return kept


def _is_distributed_optimizer(wrapper) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(wrapper, DistributedOptimizer)


def _layer_prefix(sharded) -> tuple[tuple[int, ...], tuple[int, ...], tuple]:
    """(global shape, offset) of the stacked-layer axes megatron prepends, and the replica id."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(sharded, ShardedTensorFactory):  # e.g. fused gate/up: its parts carry the layout
        sharded = next(v for v in nested_values(sharded.build()) if isinstance(v, ShardedTensor))
    n = sharded.prepend_axis_num
    return tuple(sharded.global_shape[:n]), tuple(sharded.global_offset[:n]), sharded.replica_id


def _distributed_optimizer_tensors(wrapper, chain_index: int, model_sd: dict) -> dict:
    """This DP rank's slices of every main param and moment, as ShardedTensors in model space.

    A DP rank owns the contiguous range [start, end) of each TP-local parameter flattened;
    it is stored at that offset of a [*layers, tp, numel] tensor keyed by the model tensor,
    so any DP size (and PP depth: layers are global) reads back the same values. megatron's
    own model-space format needs `flattened_range`, which megatron-core 0.16 refuses, and its
    bucket format breaks when the DDP bucket size changes with DP (docs/CHECKPOINTS.md).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    by_param = {id(v.data): v for v in model_sd.values()}
    out = {}
    for gbuf_range_maps in wrapper.gbuf_ranges:
        for range_maps in gbuf_range_maps.values():
            for range_map in range_maps:
                for model_param, param_range in range_map["param_map"].items():
                    start, end = param_range["param"].start, param_range["param"].end
                    sharded = by_param[id(model_param)]
                    layers, layer_offset, replica = _layer_prefix(sharded)
                    main_replica = (replica[0] if isinstance(replica, tuple) else 0, 0,
                                    wrapper.distributed_optimizer_instance_id)
                    local_shape = (1,) * (len(layers) + 1) + (end - start,)
                    for name, tensor in wrapper._get_main_param_and_optimizer_states(model_param).items():
                        if name == "step":
                            continue  # a shared count, kept in the param groups
                        key = f"optimizer.{chain_index}.{'fp32_param' if name == 'param' else name}.{sharded.key}"
                        out[f"{key}@{layer_offset}"] = ShardedTensor(  # one entry per layer
                            key, tensor.view(local_shape), tensor.dtype, local_shape,
                            (*layers, tp, model_param.numel()), (*layer_offset, tp_rank, start),
                            axis_fragmentations=None, replica_id=main_replica)
    return out


def _optimizer_sharded(optimizer, model_sd: dict) -> dict:
    """The optimizer part of the checkpoint: per wrapper, its common state plus its tensors."""
    parts = {}
    for i, wrapper in enumerate(inner_optimizers(optimizer)):
        if _is_distributed_optimizer(wrapper):
            parts[i] = {"common": wrapper.state_dict(),
                        "tensors": _distributed_optimizer_tensors(wrapper, i, model_sd)}
        else:  # megatron's model-space format: full TP-local tensors, reshardable anywhere
            parts[i] = {"sharded": wrapper.sharded_state_dict(model_sd)}
    return parts


def _sharded_state(model_chunks, optimizer, *, with_rng: bool) -> dict:
    model_sd = trainable_sharded_state_dict(model_chunks)
    state = {"model": model_sd, "optimizer": _optimizer_sharded(optimizer, model_sd)}
    if with_rng:
        state["rng"] = _rng_sharded_object(_rng_state())
    return state


# ---- save -----------------------------------------------------------------------------------

def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_manifest(directory: Path) -> None:
    """List every file with its size; written last, so its presence means "all is here"."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    _write_json_atomic(directory / MANIFEST, {"format_version": FORMAT_VERSION, "files": files})


def remove_checkpoint(path: Path) -> None:
    """Manifest first: an interrupted removal never leaves something that looks complete."""
    (path / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, newest_step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop damaged ones older than this save."""
    for path in step_dirs(root):
        if checkpoint_step(path) < newest_step and not is_complete_checkpoint(path):
            remove_checkpoint(path)
    if keep_last > 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            remove_checkpoint(old)


def pin_checkpoint(path: str | Path, dest_root: str | Path) -> Path:
    """Keep a complete checkpoint outside the keep_last rotation: a hard-linked copy (no extra
    disk; a plain copy across file systems) in dest_root, replacing the one pinned before.
    Collective: rank 0 copies, every rank returns the same path."""
    path, dest_root = Path(path), Path(dest_root)
    final = dest_root / path.name
    if dist.get_rank() == 0:
        dest_root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(dest_root)
        tmp = dest_root / (path.name + TMP_SUFFIX)
        shutil.copytree(path, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(MANIFEST))
        shutil.copy2(path / MANIFEST, tmp / MANIFEST)  # last, as in a save
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        for old in step_dirs(dest_root):
            if old != final:
                remove_checkpoint(old)
    dist.barrier()
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_hf_meta(recipe_dict: dict, dst: Path) -> None:
    from gazal_nemo.convert.dist_ckpt import copy_hf_meta

    hf_path = (recipe_dict.get("model") or {}).get("hf_path")
    if hf_path and (Path(hf_path) / "config.json").is_file():
        copy_hf_meta(hf_path, dst)


def _pause_for_tests(step: int) -> None:
    """GAZAL_TEST_CHECKPOINT_PAUSE="STEP:SECONDS": sleep before step STEP's manifest, so a test
    can kill -9 every rank at a known point of a write (tests/e2e/test_resume_checks.py)."""
    at, _, seconds = os.environ.get("GAZAL_TEST_CHECKPOINT_PAUSE", "").partition(":")
    if at.isdigit() and int(at) == step:
        import time

        print(f"checkpoint: pausing {seconds}s before the manifest of step {step} (test hook)", flush=True)
        time.sleep(float(seconds or 0))


def save_checkpoint(root, step: int, *, model_chunks, optimizer, scheduler, trainer_state: dict,
                    recipe_dict: dict, keep_last: int) -> Path:
    """Write step `step` under root; returns the final directory (same on every rank)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + TMP_SUFFIX)
    rank = dist.get_rank()
    needed, exact = _space_needed(root, model_chunks)
    problem = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(root)
        problem = _make_room(root, step, needed, exact=exact, keep_last=keep_last)
        if problem is None:
            tmp.mkdir()
    _raise_agreed(problem)
    sharded = _sharded_state(model_chunks, optimizer, with_rng=True)
    sharded["scheduler"] = scheduler.state_dict()
    try:
        with stop_signals_deferred():  # a stop signal must not kill dist_checkpointing's writers mid-file
            dist_checkpointing.save(sharded, str(tmp))
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and out_of_space(e, tmp):
            raise ValueError(_no_space_message(root, step, needed, tmp, rank=rank)) from None
        raise
    dist.barrier()
    if rank == 0:
        try:
            _write_rank0_files(tmp, step, model_chunks=model_chunks, optimizer=optimizer,
                               trainer_state=trainer_state, recipe_dict=recipe_dict)
            _pause_for_tests(step)
            write_manifest(tmp)
        except OSError as e:
            if not out_of_space(e, tmp):
                raise
            problem = _no_space_message(root, step, needed, tmp, rank=rank)
        if problem is None:
            if final.exists():
                remove_checkpoint(final)
            os.replace(tmp, final)
            _prune(root, step, keep_last)
    _raise_agreed(problem)
    return final


def _write_rank0_files(tmp: Path, step: int, *, model_chunks, optimizer, trainer_state: dict,
                       recipe_dict: dict) -> None:
    """What rank 0 adds to the tensors: recipe, trainer state, run identity, hf/ meta."""
    from gazal_nemo.training.run_identity import active_run

    trainable = "adapter" if _has_adapter(model_chunks) else "all"
    stop_at = (recipe_dict.get("train") or {}).get("stop_at_step")
    total = trainer_state.get("total_steps")
    # Read by slurm/common.sh: a job that ends here must be resubmitted, not requeued (a requeue
    # would stop at the same step again).
    stop_reason = "train.stop_at_step" if stop_at == step and total is not None and step < total else None
    _write_json_atomic(tmp / RECIPE, recipe_dict)
    _write_json_atomic(tmp / TRAINER_STATE, dict(
        trainer_state, step=step, world_size=dist.get_world_size(), layout=_layout(), trainable=trainable,
        distributed_optimizer=any(_is_distributed_optimizer(w) for w in inner_optimizers(optimizer)),
        format_version=FORMAT_VERSION, **({"stop_reason": stop_reason} if stop_reason else {})))
    run = active_run()
    if run is not None:
        _write_json_atomic(tmp / IDENTITY, run.record(step=step))
    _copy_hf_meta(recipe_dict, tmp / HF_SUBDIR)


def _raise_agreed(problem: str | None) -> None:
    """Every rank raises rank 0's error (a collective: a rank that raised alone would leave the
    others waiting in the next barrier)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise ValueError(problem)


# ---- space ----------------------------------------------------------------------------------

_FULL_DISK_SLACK_BYTES = 2**20  # free bytes left on a file system a failed write just filled


def free_bytes(path: str | Path) -> int:
    """Free bytes for an unprivileged writer on the file system of `path` (or of the nearest
    folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def out_of_space(exc: BaseException, path: str | Path) -> bool:
    """Whether `exc` (or what it wraps) is a full file system or quota under `path`. torch's zip
    writer reports a full disk as "unexpected pos" with no errno, so a failure that leaves the
    file system (nearly) full counts too."""
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch's CheckpointException: rank -> (exception, trace)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()
                      if isinstance(f, (tuple, BaseException))]
    try:
        return free_bytes(path) < _FULL_DISK_SLACK_BYTES
    except OSError:
        return False


def checkpoint_bytes(path: Path) -> int:
    """Total size of a complete checkpoint, from its manifest."""
    try:
        return sum(json.loads((path / MANIFEST).read_text())["files"].values()) + (path / MANIFEST).stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _space_needed(root: Path, model_chunks) -> tuple[int, bool]:
    """(bytes the next checkpoint needs, whether that is exact): the newest complete checkpoint's
    size, else an estimate from the trainable parameters (fp32 main copy, two moments, the
    parameter itself). Collective: every rank calls."""
    from gazal_nemo.training.model_setup import unwrap

    local = sum(p.numel() * (p.element_size() + 12) for p in unwrap(model_chunks[0]).parameters() if p.requires_grad)
    estimate = torch.tensor([float(local)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron.core import parallel_state as ps

        estimate = estimate.to(collective_device())
        dist.all_reduce(estimate)
        estimate /= ps.get_data_parallel_world_size(with_context_parallel=True)  # replicas write one copy
    newest = latest_checkpoint(root) if dist.get_rank() == 0 else None  # rank 0 decides
    if newest is not None:
        return checkpoint_bytes(newest), True
    return int(estimate.item()) + 2**20, False  # + recipe, trainer state, hf/ meta


def _make_room(root: Path, step: int, needed: int, *, exact: bool, keep_last: int) -> str | None:
    """Free space for step `step` by pruning now what keep_last prunes after the save anyway
    (never the newest complete checkpoint); the refusal when even that is not enough and the
    size is known (an estimate is only tried: the save may fit)."""
    free = free_bytes(root)
    if free >= needed:
        return None
    older = [p for p in step_dirs(root) if checkpoint_step(p) < step]
    complete = [p for p in older if is_complete_checkpoint(p)]
    early = [p for p in older if p not in complete]  # damaged: pruned after any save
    if keep_last > 0 and complete:
        early += complete[:-max(keep_last - 1, 1)]
    for path in early:
        if free >= needed:
            break
        remove_checkpoint(path)
        free = free_bytes(root)
        print(f"checkpoint: removed {path} before writing step {step} ({free} bytes free now, it needs ~{needed}; "
              f"checkpoint.keep_last={keep_last} removes it after this save anyway)", flush=True)
    if free >= needed or not exact:
        return None
    return _space_line(root, step, needed, free)


def _space_line(root: Path, step: int, needed: int, free: int) -> str:
    kept = [p.name for p in complete_checkpoints(root)]
    return (f"checkpoint.dir={root}: no space left for checkpoint {step_dir_name(step)}: it needs ~{needed} bytes, "
            f"{free} are free; the older checkpoints are kept ({', '.join(kept) or 'none'}); free space on that "
            "file system (or lower checkpoint.keep_last) and rerun: it resumes from the newest of them")


def _no_space_message(root: Path, step: int, needed: int, tmp: Path, *, rank: int) -> str:
    """Remove the partial write (rank 0) and describe the failure in one line."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return _space_line(root, step, needed, free_bytes(root))


def _has_adapter(model_chunks) -> bool:
    from gazal_nemo.peft.dora import adapted_layers

    return bool(adapted_layers(model_chunks[0]))


# ---- load -----------------------------------------------------------------------------------

@torch.no_grad()
def load_checkpoint(path, *, model_chunks, optimizer, scheduler) -> dict:
    """Restore a step checkpoint in place, at this job's layout; returns its trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    _check_reshardable(path, state)
    same_layout = state.get("layout") == _layout()
    recipe_hyper = [[{k: v for k, v in g.items() if k not in _GROUP_STATE_KEYS} for g in w.optimizer.param_groups]
                    for w in inner_optimizers(optimizer)]
    model_sd = trainable_sharded_state_dict(model_chunks)
    sharded = {"model": model_sd, "optimizer": _optimizer_load_request(optimizer, model_sd, _load_common(path))}
    if same_layout:
        sharded["rng"] = _rng_sharded_object(None)
    # megatron's load replaces the ShardedTensors in `sharded` in place: keep the targets
    targets = {i: {k: t.data for k, t in part["tensors"].items()}
               for i, part in sharded["optimizer"].items() if "tensors" in part}
    loaded = _dist_load(sharded, path)
    _load_model(model_chunks, loaded["model"], path)
    _restore_optimizer(optimizer, loaded["optimizer"], targets)
    for wrapper, groups in zip(inner_optimizers(optimizer), recipe_hyper):
        for group, hyper in zip(wrapper.optimizer.param_groups, groups):
            group.update(hyper)
    _load_scheduler(scheduler, loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng"])
    return state


def _optimizer_load_request(optimizer, model_sd: dict, common: dict) -> dict:
    """What each optimizer wrapper reads: the distributed one gets its param groups and step
    from the common state first (that allocates its moments), then asks for its slices."""
    request = {}
    for i, wrapper in enumerate(inner_optimizers(optimizer)):
        if _is_distributed_optimizer(wrapper):
            wrapper.load_state_dict(common["optimizer"][i]["common"])
            request[i] = {"tensors": _distributed_optimizer_tensors(wrapper, i, model_sd)}
        else:
            request[i] = {"sharded": wrapper.sharded_state_dict(model_sd, is_loading=True)}
    return request


def _load_model(model_chunks, loaded: dict, path: Path) -> None:
    from gazal_nemo.training.model_setup import unwrap

    _, unexpected = unwrap(model_chunks[0]).load_state_dict(loaded, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors this model does not have: {unexpected[:5]}")


def _restore_optimizer(optimizer, loaded: dict, targets: dict) -> None:
    for i, wrapper in enumerate(inner_optimizers(optimizer)):
        if i in targets:
            for key, tensor in loaded[i]["tensors"].items():
                if tensor is not targets[i][key]:
                    targets[i][key].copy_(tensor)
        else:
            wrapper.load_state_dict(loaded[i]["sharded"])


def _dist_load(sharded: dict, path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded, str(path))
    except Exception as e:  # noqa: BLE001 - torch/megatron raise many types for a bad file
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot be loaded ({type(e).__name__}: {first})") from None


def _load_common(path: Path) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: common state unreadable ({type(e).__name__})") from None


def _check_reshardable(path: Path, state: dict) -> None:
    """The distributed optimizer's slices are stored per TP rank: DP and PP may change, TP not."""
    saved, now = state.get("layout") or {}, _layout()
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format_version')} is not {FORMAT_VERSION} "
                         "(written by another gazal version); resume it with that version or start fresh")
    if state.get("distributed_optimizer") and saved.get("tp") != now["tp"]:
        raise ValueError(f"{path}: saved at parallel.tp={saved.get('tp')} with the distributed optimizer, now "
                         f"tp={now['tp']}; its optimizer state reshards over DP and PP only (resume at "
                         f"tp={saved.get('tp')}, or save with parallel.distributed_optimizer=false)")


def _load_scheduler(scheduler, saved: dict) -> None:
    """Restore the step count; the schedule's shape (max/min lr, warmup, decay) is the recipe's,
    so an allowed change of optim.lr takes effect instead of being overwritten."""
    override = scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler
    scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler = True, False
    try:
        scheduler.load_state_dict(saved)
    finally:
        scheduler.override_opt_param_scheduler, scheduler.use_checkpoint_opt_param_scheduler = override

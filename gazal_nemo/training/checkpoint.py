"""Training checkpoints: save every N steps, keep the last K, resume exactly.

A step checkpoint holds what a resumed run needs to continue the same loss curve: the
trainable parameters (only the adapter when training an adapter, so they stay small;
frozen base weights are re-read from the recipe's source), each rank's optimizer shard
(the inner torch optimizer's state and its fp32 main params: under the distributed
optimizer that is this DP rank's slice), the LR scheduler, the trainer state (step, data
position) and the RNG states. One file per rank, so a resume uses the same parallel
layout; `gazal convert` moves weights across layouts.

(megatron's own `save_parameter_state` path assumes Apex/TE Adam and fails on a native
torch optimizer's per-parameter `step`; saving each rank's own shard avoids it.)

Atomicity: everything is written into `step_XXXXXX.tmp/`; rank 0 renames it to
`step_XXXXXX/` after a barrier, so a directory without `.tmp` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gazal_nemo.training.optim import inner_optimizers

STEP_PREFIX = "step_"


def _ranks():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(with_context_parallel=True))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


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


def trainable_state(model_chunks) -> dict:
    return {f"{i}.{name}": p.detach().cpu().clone() for i, chunk in enumerate(model_chunks)
            for name, p in chunk.named_parameters() if p.requires_grad}


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _optimizer_state(optimizer) -> dict:
    inners = [w.optimizer for w in inner_optimizers(optimizer)]
    scaler = getattr(optimizer, "grad_scaler", None)
    return {
        "inner": [o.state_dict() for o in inners],
        "main_params": [[p.detach().cpu().clone() for g in o.param_groups for p in g["params"]] for o in inners],
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }


@torch.no_grad()
def _load_optimizer_state(optimizer, saved: dict, where: Path) -> None:
    inners = [w.optimizer for w in inner_optimizers(optimizer)]
    if len(inners) != len(saved["inner"]):
        raise ValueError(f"{where}: optimizer has {len(inners)} parts, checkpoint {len(saved['inner'])}")
    for inner, state, mains in zip(inners, saved["inner"], saved["main_params"]):
        inner.load_state_dict(state)
        params = [p for g in inner.param_groups for p in g["params"]]
        if [tuple(p.shape) for p in params] != [tuple(m.shape) for m in mains]:
            raise ValueError(f"{where}: optimizer shard shapes differ (different parallel layout or model)")
        for p, m in zip(params, mains):
            p.copy_(m)
    scaler = getattr(optimizer, "grad_scaler", None)
    if scaler is not None and saved["grad_scaler"] is not None:
        scaler.load_state_dict(saved["grad_scaler"])


def _rank_file(directory: Path) -> Path:
    return directory / f"rank{dist.get_rank():05d}.pt"


def save_checkpoint(root, step: int, *, model_chunks, optimizer, scheduler, trainer_state: dict,
                    recipe_dict: dict, keep_last: int) -> Path:
    """Write step `step` under root; returns the final directory (same on every rank)."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    _atomic_torch_save({
        "params": trainable_state(model_chunks), "optimizer": _optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(), "rng": _rng_state(), "ranks": _ranks(),
    }, _rank_file(tmp))
    _barrier()
    if dist.get_rank() == 0:
        (tmp / "recipe.json").write_text(json.dumps(recipe_dict, indent=2))
        state = dict(trainer_state, step=step, world_size=dist.get_world_size())
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path, *, model_chunks, optimizer, scheduler) -> dict:
    """Restore a step checkpoint in place; returns its trainer state."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    if state.get("world_size") != dist.get_world_size():
        raise ValueError(f"{path}: saved with world size {state.get('world_size')}, now {dist.get_world_size()}; "
                         "resume needs the same layout (export and re-convert to change it)")
    saved = torch.load(_rank_file(path), weights_only=False)
    if tuple(saved["ranks"]) != _ranks():
        raise ValueError(f"{path}: rank layout (tp, pp, dp) {saved['ranks']} differs from now {_ranks()}")
    params = saved["params"]
    with torch.no_grad():
        for i, chunk in enumerate(model_chunks):
            for name, p in chunk.named_parameters():
                if p.requires_grad:
                    key = f"{i}.{name}"
                    if key not in params:
                        raise KeyError(f"{path}: checkpoint has no tensor {key}")
                    p.copy_(params[key])
    _load_optimizer_state(optimizer, saved["optimizer"], path)
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return state

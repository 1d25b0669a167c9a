"""Export a training step checkpoint (training/checkpoint.py) as a Hugging Face folder.

A step checkpoint is a megatron dist checkpoint whose model tensors sit under the same keys
as a `gazal convert` checkpoint, next to optimizer state, plus the HF config/tokenizer in
`hf/` and the run's recipe. So:
  * full-parameter training: the saved weights are the whole model; the streaming
    converter (convert/megatron_to_hf.py) reads them directly, skipping optimizer keys;
  * adapter training: only the adapter is saved. The base model is rebuilt from the saved
    recipe's source (model.hf_path or model.megatron_ckpt, as training did), the adapter
    loaded into it, merged (W' = (m/n)(W + s·B·A)) and exported through the same
    Megatron -> HF path as the end-of-stage export (stages/export.py). The base must still be
    the one training used: its files are compared with the fingerprints in the checkpoint's
    identity.json (training/run_identity.py) and a changed file is refused by name, since the
    merge would put the adapter on another model.
The export's gazal_export.json carries the checkpoint's step and run identity.
`gazal convert megatron-to-hf --ckpt-dir <step dir or checkpoint root>` lands here.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from gazal_nemo.training import checkpoint as ckpt


def step_checkpoint_dir(path: str | Path) -> Path | None:
    """The step checkpoint `path` names: itself, or the newest complete one of a checkpoint root.

    None when `path` is neither (e.g. a `gazal convert hf-to-megatron` folder); ValueError
    naming the folder when it is a step checkpoint (or root) with nothing complete in it.
    """
    path = Path(path)
    if ckpt.checkpoint_step(path) is not None and path.is_dir():
        problem = ckpt.checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"{path}: step checkpoint is not complete: {problem}")
        return path
    if path.is_dir() and ckpt.step_dirs(path):
        latest = ckpt.latest_checkpoint(path)
        if latest is None:
            newest = ckpt.step_dirs(path)[-1]
            raise ValueError(f"{path}: no complete step checkpoint; newest {newest.name}: "
                             f"{ckpt.checkpoint_problem(newest)}")
        return latest
    return None


def export_step_checkpoint(step_dir: str | Path, out_dir: str | Path, *, dtype=None, overwrite: bool = False,
                           force: bool = False, allow_changes: tuple[str, ...] = ()) -> Path:
    """Write `out_dir` as a HF Qwen3 folder from a step checkpoint (or a checkpoint root: its latest).

    dtype: "bf16" / "fp32" (default: the stored one). overwrite / force: as the converters.
    allow_changes: base-model files (paths or recipe keys) that may differ from the checkpoint's
    record. Runs in one process; an adapter checkpoint starts a one-process gloo group if none
    is running (if one is, every rank of it must call).
    """
    from gazal_nemo.convert.dist_ckpt import check_out_apart, check_output_dir
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf

    found = step_checkpoint_dir(step_dir)
    if found is None:
        raise ValueError(f"{step_dir}: not a step checkpoint (no {ckpt.MANIFEST}/{ckpt.TRAINER_STATE}) "
                         "nor a folder of them")
    check_out_apart(out_dir, {"--ckpt-dir": found})
    check_output_dir(out_dir, overwrite=overwrite, force=force)
    state = ckpt.read_trainer_state(found)
    identity = ckpt.read_identity(found)
    marker = {"step": state["step"], "run": identity}
    if state.get("trainable") == "all":
        return convert_megatron_to_hf(found, out_dir, dtype=dtype, overwrite=overwrite, force=force,
                                      hf_meta_dir=found / ckpt.HF_SUBDIR, ignore_extra_keys=True, marker=marker)
    _check_base_unchanged(found, identity, Path(out_dir), allow_changes)
    return _export_adapter_step(found, Path(out_dir), dtype=dtype, overwrite=overwrite, force=force,
                                marker=marker)


def _check_base_unchanged(step_dir: Path, identity: dict | None, out_dir: Path, allow_changes) -> None:
    """The base the adapter is merged into is the one it was trained on, and the output does not
    replace it."""
    from gazal_nemo.convert.dist_ckpt import check_out_apart
    from gazal_nemo.training.resume_check import input_changes
    from gazal_nemo.training.run_identity import fingerprint_inputs

    model = ckpt.read_saved_recipe(step_dir).get("model") or {}
    check_out_apart(out_dir, {f"(the base model, {key})": model.get(key) for key in ("hf_path", "megatron_ckpt")})
    if not identity:
        return  # written before run identities: nothing to compare
    base = {k: v for k, v in (identity.get("inputs") or {}).items() if k.startswith("model.")}
    changes = input_changes(base, fingerprint_inputs({"model": model}), allowed=allow_changes)
    if changes:
        listed = "; ".join(f"{key} {file}: {what}" for key, file, what in changes[:8])
        files = ",".join(dict.fromkeys(file for _, file, _ in changes))
        raise ValueError(f"{step_dir}: the base model this adapter was trained on changed since the checkpoint was "
                         f"written: {listed}; the merge would put the adapter on another model; refused (restore "
                         f"the base, or accept the change with --allow-changes {files})")


def _saved_recipe(step_dir: Path):
    from gazal_nemo.config_io import from_dict
    from gazal_nemo.recipe import Recipe

    try:
        return from_dict(Recipe, ckpt.read_saved_recipe(step_dir))
    except ValueError as e:
        raise ValueError(f"{step_dir / ckpt.RECIPE}: {e}") from None


def _export_adapter_step(step_dir: Path, out_dir: Path, *, dtype, overwrite: bool, force: bool, marker: dict) -> Path:
    """Rebuild base + adapter in a one-process group. Inside a running job (its process group
    and megatron state belong to the job, and maybe only one rank calls) that happens in a
    fresh CPU-only subprocess instead."""
    from gazal_nemo.parallel import init_parallel, shutdown_parallel

    recipe = _saved_recipe(step_dir)
    if recipe.adapter is None:
        raise ValueError(f"{step_dir}: holds an adapter but its recipe.json has no adapter section")
    if dist.is_initialized():
        return _export_in_subprocess(step_dir, out_dir, dtype=dtype, overwrite=overwrite, force=force)
    init_parallel(tp=1, pp=1, seed=recipe.train.seed)
    try:
        model, shape = _base_with_saved_adapter(step_dir, recipe)
        return _write_merged(model, shape, step_dir, out_dir, dtype=dtype, overwrite=overwrite, force=force,
                             marker=marker)
    finally:
        shutdown_parallel()


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


def _export_in_subprocess(step_dir: Path, out_dir: Path, *, dtype, overwrite: bool, force: bool) -> Path:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the job's GPUs stay the job's; merging runs on the host
    cmd = [sys.executable, "-m", "gazal_nemo.convert.step_to_hf", str(step_dir), str(out_dir)]
    cmd += (["--dtype", str(dtype)] if dtype else []) + (["--overwrite"] if overwrite else [])
    cmd += ["--force"] if force else []
    cmd += ["--allow-changes", "model"]  # the caller compared the base already
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"{step_dir}: export to {out_dir} failed: {last}")
    return out_dir


def _base_with_saved_adapter(step_dir: Path, recipe):
    """The base model as training built it (at this process group's layout) with the saved adapter."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from gazal_nemo.peft.dora import invalidate_dora_norms
    from gazal_nemo.training.model_setup import build_stage_model

    parallel = dataclasses.replace(recipe.parallel, tp=ps.get_tensor_model_parallel_world_size(),
                                   pp=ps.get_pipeline_model_parallel_world_size(), cp=1)
    precision = dataclasses.replace(recipe.precision, fp8=None)  # export reads weights, no FP8 compute
    shape, _, model, _ = build_stage_model(recipe.model, parallel, precision, recipe.train,
                                           adapter_cfg=recipe.adapter)
    sharded = ckpt.trainable_sharded_state_dict([model])
    try:
        loaded = dist_checkpointing.load({"model": sharded}, str(step_dir))
    except Exception as e:  # noqa: BLE001 - torch/megatron raise many types for a bad file
        raise ValueError(f"{step_dir}: adapter cannot be loaded ({type(e).__name__})") from None
    _, unexpected = model.load_state_dict(loaded["model"], strict=False)
    if unexpected:
        raise ValueError(f"{step_dir}: tensors the recipe's model does not have: {unexpected[:5]}")
    invalidate_dora_norms(model)
    return model, shape


def _write_merged(model, shape, step_dir: Path, out_dir: Path, *, dtype, overwrite: bool, force: bool,
                  marker: dict) -> Path:
    """Merge the adapter and export through a temporary Megatron checkpoint, as stages/export.py
    does (one process: the caller started a one-rank group)."""
    from gazal_nemo.convert.dist_ckpt import save_model
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf
    from gazal_nemo.peft.dora import merge_adapter
    from gazal_nemo.stages.export import base_linears_in_place

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merge-", dir=out_dir.parent))
    try:
        merge_adapter(model)
        with base_linears_in_place(model):
            megatron_dir = save_model(model, work / "megatron", hf_meta_dir=step_dir / ckpt.HF_SUBDIR,
                                      source=f"{step_dir} (adapter merged)")
        return convert_megatron_to_hf(megatron_dir, out_dir, dtype=dtype, overwrite=overwrite, force=force,
                                      marker=dict(marker, source=str(step_dir.resolve())))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m gazal_nemo.convert.step_to_hf STEP_DIR OUT_DIR [--dtype] [--overwrite] [--force]
    [--allow-changes PATH,...]`."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="step_to_hf", description=export_step_checkpoint.__doc__.split("\n")[0])
    parser.add_argument("step_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--allow-changes", default="")
    args = parser.parse_args(argv)
    try:
        export_step_checkpoint(args.step_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                               force=args.force, allow_changes=tuple(filter(None, args.allow_changes.split(","))))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"step_to_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

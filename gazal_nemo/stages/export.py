"""Export at the end of a stage: the PEFT adapter, a Megatron checkpoint of the merged
model, and that model as Hugging Face safetensors.

The merged model reuses the converter end to end: the adapter is merged into the base
weights, the adapter modules are swapped out for their base linears (so the model's
sharded state dict is the plain Qwen3 one that `gazal convert` reads), the Megatron
checkpoint is written by every rank, rank 0 converts it to HF, and the adapter is put back
and unmerged so training state is untouched.

Each folder carries a marker (adapter/ and merged/ gazal_export.json, megatron/
gazal_checkpoint.json) so that a later export or `--overwrite` conversion may replace it, and
export_dir/run_identity.json records the run (its id, step and input fingerprints,
training/run_identity.py). Before writing, rank 0 compares the free space with the model's
size; an export that runs out of space removes its partial folders and says so in one line
(the last step checkpoint is already written: the rerun resumes there and exports again).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch.distributed as dist

from gazal_nemo.training.model_setup import unwrap


@contextlib.contextmanager
def base_linears_in_place(model):
    """Temporarily replace every adapted linear by its base module."""
    from gazal_nemo.peft.dora import AdaptedLinear

    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def export_trained_model(recipe, shape, chunks, *, step: int | None = None) -> dict[str, Path]:
    """Write export_dir/{adapter, megatron, merged}; every rank must call."""
    from gazal_nemo.training.checkpoint import out_of_space
    from gazal_nemo.training.model_setup import finish_param_gather

    finish_param_gather(chunks)  # with parallel.overlap_param_gather the last step's params may be mid-gather
    out = Path(recipe.export_dir)
    needed = _export_bytes(recipe, chunks)
    _agree_on_rank0(lambda: _space_problem(out, needed))
    try:
        return _export(recipe, shape, chunks, out, step=step)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not out_of_space(e, out):
            raise
        if dist.get_rank() == 0:
            _remove_partial_exports(out)
        raise ValueError(_space_message(out, needed)) from None


def _export(recipe, shape, chunks, out: Path, *, step: int | None) -> dict[str, Path]:
    from gazal_nemo.convert.dist_ckpt import save_model, write_export_marker
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf
    from gazal_nemo.peft.dora import adapted_layers, merge_adapter, unmerge_adapter
    from gazal_nemo.peft.export import export_peft_adapter
    from gazal_nemo.training.run_identity import EXPORT_IDENTITY_FILE, active_run

    model = unwrap(chunks[0])
    paths = {}
    run = active_run()
    if step is None and dist.get_rank() == 0:  # the stage saved its last step just before exporting
        from gazal_nemo.training.checkpoint import latest_checkpoint, read_trainer_state

        latest = latest_checkpoint(recipe.checkpoint.dir)
        step = read_trainer_state(latest)["step"] if latest is not None else None
    identity = run.record(step=step, recipe_name=recipe.name) if run is not None else None
    has_adapter = bool(adapted_layers(model))
    if has_adapter:
        paths["adapter"] = export_peft_adapter(model, recipe.adapter, shape, out / "adapter",
                                               base_model_name_or_path=recipe.model.hf_path)
        if dist.get_rank() == 0:
            write_export_marker(paths["adapter"], {"written_by": f"{recipe.name} export", "source": "training",
                                                   "step": step, "run": identity})
        merge_adapter(model)
    try:
        with base_linears_in_place(model):
            paths["megatron"] = save_model(model, out / "megatron", hf_meta_dir=recipe.model.hf_path,
                                           source=f"{recipe.name} export")
    finally:
        if has_adapter:
            unmerge_adapter(model)
    paths["merged"] = out / "merged"
    if dist.get_rank() == 0:
        convert_megatron_to_hf(paths["megatron"], paths["merged"], overwrite=True,
                               marker={"written_by": f"{recipe.name} export", "step": step, "run": identity})
        if identity is not None:
            (out / EXPORT_IDENTITY_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        print(f"exported: {', '.join(f'{k}={v}' for k, v in paths.items())}", flush=True)
    dist.barrier()
    return paths


def _export_bytes(recipe, chunks) -> int:
    """Bytes the export writes: the merged model twice (megatron and HF) plus the adapter, at the
    model's dtype (collective over the model-parallel ranks that hold its parts)."""
    model = unwrap(chunks[0])
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(local * recipe.parallel.tp * recipe.parallel.pp * 2.1) + 2**20


def _agree_on_rank0(decide) -> None:
    problem = [decide() if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise ValueError(problem[0])


def _space_problem(out: Path, needed: int) -> str | None:
    from gazal_nemo.training.checkpoint import free_bytes

    # an older export is replaced only once the new one is complete: count what it frees as used
    return _space_message(out, needed) if free_bytes(out) < needed else None


def _space_message(out: Path, needed: int) -> str:
    from gazal_nemo.training.checkpoint import free_bytes

    return (f"export_dir={out}: no space left for the export: it needs ~{needed} bytes, {free_bytes(out)} are free; "
            "the step checkpoints are kept; free space on that file system and rerun: it resumes at the last step "
            "and exports again")


def _remove_partial_exports(out: Path) -> None:
    """What a failed export leaves: staging folders of its parts (`.megatron.partial`,
    `.merged.partial-*`, `.adapter.tmp-*`)."""
    from gazal_nemo.training.run_folder import EXPORT_PARTS

    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.is_dir() and any(path.name.startswith(f".{part}.") for part in EXPORT_PARTS) \
                and (".partial" in path.name or ".tmp-" in path.name):
            shutil.rmtree(path, ignore_errors=True)

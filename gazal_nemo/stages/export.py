"""Export at the end of a stage: the PEFT adapter, a Megatron checkpoint of the merged
model, and that model as Hugging Face safetensors.

The merged model reuses the converter end to end: the adapter is merged into the base
weights, the adapter modules are swapped out for their base linears (so the model's
sharded state dict is the plain Qwen3 one that `gazal convert` reads), the Megatron
checkpoint is written by every rank, rank 0 converts it to HF, and the adapter is put back
and unmerged so training state is untouched.
"""

from __future__ import annotations

import contextlib
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


def export_trained_model(recipe, shape, chunks) -> dict[str, Path]:
    """Write export_dir/{adapter, megatron, merged}; every rank must call."""
    from gazal_nemo.convert.dist_ckpt import save_model
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf
    from gazal_nemo.peft.dora import adapted_layers, merge_adapter, unmerge_adapter
    from gazal_nemo.peft.export import export_peft_adapter

    out = Path(recipe.export_dir)
    model = unwrap(chunks[0])
    paths = {}
    has_adapter = bool(adapted_layers(model))
    if has_adapter:
        paths["adapter"] = export_peft_adapter(model, recipe.adapter, shape, out / "adapter",
                                               base_model_name_or_path=recipe.model.hf_path)
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
        convert_megatron_to_hf(paths["megatron"], paths["merged"], overwrite=True)
        print(f"exported: {', '.join(f'{k}={v}' for k, v in paths.items())}", flush=True)
    dist.barrier()
    return paths

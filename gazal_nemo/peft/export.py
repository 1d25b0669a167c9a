"""The adapter in Hugging Face PEFT's format, and merged weights under HF names.

PEFT export: every tensor is gathered over tensor parallelism (A, B and the DoRA magnitude
each have their own TP layout, see AdaptedLinear.tp_layouts) and over pipeline stages (one
layer at a time, to global rank 0), then written as adapter_config.json +
adapter_model.safetensors with PEFT's key names, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector
so `PeftModel.from_pretrained(qwen3, out_dir)` loads it. The magnitude vector is written
(Megatron-Bridge's DoRA export drops it, which silently turns DoRA back into LoRA).

Merged export: W' = (m/n)(W + s·B·A) of every adapted layer plus the untouched weights,
gathered and mapped to HF names with gazal_nemo.convert.mapping (for a full checkpoint or
a rollout engine's weight sync), without modifying the training model.

Every rank of the job must call these functions (they run collectives).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from gazal_nemo.convert.mapping import local_name, stage_params, te_name, to_hf, tp_gather, tp_slice
from gazal_nemo.models.qwen3 import Qwen3Shape
from gazal_nemo.peft.config import AdapterConfig
from gazal_nemo.peft.dora import TARGET_SPECS, AdaptedLinear, adapted_layers, invalidate_dora_norms

PEFT_PREFIX = "base_model.model."


def peft_keys(layer: AdaptedLinear, part: str) -> dict[str, str]:
    """PEFT's key for each of this projection's tensors, by our ParameterDict name."""
    module = PEFT_PREFIX + layer.hf_module_name(part)
    keys = {"lora_A": f"{module}.lora_A.weight", "lora_B": f"{module}.lora_B.weight"}
    if layer.use_dora:
        keys["magnitude"] = f"{module}.lora_magnitude_vector"
    return keys


def hf_target_modules(targets) -> list[str]:
    """PEFT target_modules for our megatron targets, e.g. linear_qkv -> q_proj, k_proj, v_proj."""
    return [f"{p}_proj" for t in targets for p in TARGET_SPECS[t].parts]


def _parallel_state():
    from megatron.core import parallel_state

    return parallel_state


def _is_gather_root_column() -> bool:
    """Ranks whose TP group gathers for export: one data/context-parallel replica suffices."""
    ps = _parallel_state()
    return ps.get_data_parallel_rank(with_context_parallel=True) == 0


def _tp_gather_tensor(local: torch.Tensor, layout: str) -> torch.Tensor | None:
    """The global tensor on TP rank 0 (None on others); every TP rank must call."""
    ps = _parallel_state()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or layout == "rep":
        return local.detach().cpu() if ps.get_tensor_model_parallel_rank() == 0 else None
    local = local.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local, group=ps.get_tensor_model_parallel_group())
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    return tp_gather([p.cpu() for p in parts], layout)


def _pp_gather_units(units: list[dict]) -> list[dict] | None:
    """Slot j of every pipeline stage's `units` merged on global rank 0 (one slot at a time)."""
    ps = _parallel_state()
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return units if dist.get_rank() == 0 else None
    merged = []
    for unit in units:
        gathered = [None] * pp if dist.get_rank() == 0 else None
        dist.gather_object(unit, gathered, dst=0, group=ps.get_pipeline_model_parallel_group())
        if dist.get_rank() == 0:
            combined = {}
            for stage_unit in gathered:
                for k, v in stage_unit.items():
                    combined.setdefault(k, v)
            merged.append(combined)
    return merged if dist.get_rank() == 0 else None


def _collect(units: list[dict]) -> dict | None:
    """Gather per-slot dicts (already TP-gathered on TP rank 0) from every stage to rank 0."""
    ps = _parallel_state()
    if ps.get_tensor_model_parallel_rank() != 0 or not _is_gather_root_column():
        return None
    merged = _pp_gather_units(units)
    if merged is None:
        return None
    return {k: v for unit in merged for k, v in unit.items()}


def peft_state_dict(model, shape: Qwen3Shape, *, tensor_of=None, dtype: torch.dtype | None = None):
    """The whole adapter under PEFT's keys on global rank 0 (None on other ranks).

    `tensor_of(param)` picks what to export per parameter (default: its value; tests pass
    the gradient). Every rank must call.
    """
    tensor_of = tensor_of or (lambda p: p)
    by_layer = defaultdict(dict)
    if _is_gather_root_column():
        for layer in sorted(adapted_layers(model), key=lambda m: (m.layer_index, m.target)):
            layouts = layer.tp_layouts()
            for part in layer.rows.parts:
                for kind, key in peft_keys(layer, part).items():
                    tensor = tensor_of(getattr(layer, kind)[part])
                    if tensor is None:
                        raise ValueError(f"{key}: nothing to export (tensor_of returned None)")
                    full = _tp_gather_tensor(tensor, layouts[kind])
                    if full is not None:
                        by_layer[layer.layer_index][key] = full.to(dtype) if dtype else full
    slots = [by_layer[i] for i in sorted({m.layer_index for m in adapted_layers(model)})]
    return _collect(slots)


def _atomic_dir_write(out_dir: Path, write) -> None:
    """Write into a sibling temp dir, then swap it in: a reader never sees a half-written adapter."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def peft_adapter_config(cfg: AdapterConfig, base_model_name_or_path: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig reads it."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_dora": cfg.use_dora,
        "use_rslora": cfg.use_rslora, "target_modules": hf_target_modules(cfg.targets), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def export_peft_adapter(model, cfg: AdapterConfig, shape: Qwen3Shape, out_dir, base_model_name_or_path: str,
                        *, dtype: torch.dtype | None = None) -> Path:
    """Write a PEFT LoRA/DoRA adapter folder (rank 0 writes, atomically); every rank must call."""
    from safetensors.torch import save_file

    _check_matches(model, cfg)
    state = peft_state_dict(model, shape, dtype=dtype)
    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        def write(folder: Path) -> None:
            (folder / "adapter_config.json").write_text(
                json.dumps(peft_adapter_config(cfg, base_model_name_or_path), indent=2))
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
                      metadata={"format": "pt"})

        _atomic_dir_write(out_dir, write)
    dist.barrier()
    return out_dir


def _check_matches(model, cfg: AdapterConfig) -> None:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("export: the model has no adapter (call apply_adapter first)")
    layer = layers[0]
    if (layer.rank, layer.use_dora, layer.scaling) != (cfg.rank, cfg.use_dora, cfg.scaling):
        raise ValueError(f"export: cfg (rank={cfg.rank}, use_dora={cfg.use_dora}, scaling={cfg.scaling}) differs "
                         f"from the model's adapter (rank={layer.rank}, use_dora={layer.use_dora}, "
                         f"scaling={layer.scaling})")
    if sorted({m.target for m in layers}) != sorted(cfg.targets):
        raise ValueError(f"export: cfg.targets={list(cfg.targets)} but the model adapts "
                         f"{sorted({m.target for m in layers})}")


@torch.no_grad()
def load_peft_state_dict(model, shape: Qwen3Shape, state: dict[str, torch.Tensor], *, source: str = "state") -> None:
    """Load full (unsliced) PEFT-keyed tensors into this rank's adapter slices."""
    ps = _parallel_state()
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    layers = adapted_layers(model)
    expected = _all_peft_keys(layers, shape)
    unknown = sorted(set(state) - expected)
    if unknown:
        raise ValueError(f"{source}: keys that are not part of this adapter: {unknown[:5]}")
    for layer in layers:
        layouts = layer.tp_layouts()
        for part in layer.rows.parts:
            for kind, key in peft_keys(layer, part).items():
                if key not in state:
                    raise ValueError(f"{source}: missing {key}")
                param = getattr(layer, kind)[part]
                value = tp_slice(state[key], layouts[kind], tp_rank, tp)
                if tuple(value.shape) != tuple(param.shape):
                    raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}; this rank needs a "
                                     f"{layouts[kind]} slice of shape {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
    invalidate_dora_norms(model)


def _all_peft_keys(layers: list[AdaptedLinear], shape: Qwen3Shape) -> set[str]:
    """Keys of every layer of the model (other pipeline stages' too), from one stage's layers."""
    keys = set()
    for layer in {(m.target, m.use_dora): m for m in layers}.values():
        for i in range(shape.num_layers):
            for part in layer.rows.parts:
                module = f"{PEFT_PREFIX}model.layers.{i}.{layer.spec.hf_block}.{part}_proj"
                keys |= {f"{module}.lora_A.weight", f"{module}.lora_B.weight"}
                if layer.use_dora:
                    keys.add(f"{module}.lora_magnitude_vector")
    return keys


def load_peft_adapter(model, shape: Qwen3Shape, adapter_dir) -> None:
    """Load a PEFT adapter folder (e.g. from export_peft_adapter) into the applied adapter."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found (expected a PEFT adapter folder)")
    saved = json.loads(config_path.read_text())
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"{adapter_dir}: the model has no adapter (call apply_adapter first)")
    layer = layers[0]
    try:
        rank, alpha, use_dora = int(saved["r"]), float(saved["lora_alpha"]), bool(saved.get("use_dora", False))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path}: needs numeric r and lora_alpha ({err})") from None
    scaling = alpha / (rank ** 0.5 if saved.get("use_rslora") else rank)
    if (rank, use_dora) != (layer.rank, layer.use_dora) or abs(scaling - layer.scaling) > 1e-9 * layer.scaling:
        raise ValueError(f"{config_path}: r={rank}, use_dora={use_dora}, scaling={scaling} but the model's "
                         f"adapter has r={layer.rank}, use_dora={layer.use_dora}, scaling={layer.scaling}")
    load_peft_state_dict(model, shape, load_file(str(adapter_dir / "adapter_model.safetensors")),
                         source=str(adapter_dir))


# ---- merged weights under HF names ----------------------------------------------------------

def merged_local_tensor(model, name: str) -> torch.Tensor | None:
    """This rank's tensor `name` (an unadapted megatron name) with any adapter merged into it,
    W itself unchanged; None when the model has no such tensor. One tensor at a time, so a
    weight push never holds a merged copy of the whole model."""
    from gazal_nemo.peft.dora import _unwrap

    module_path, _, attr = name.rpartition(".")
    try:
        module = _unwrap(model).get_submodule(module_path)
    except AttributeError:
        return None
    if isinstance(module, AdaptedLinear):
        if attr == "weight":
            return module.merged_weight()
        module = module.base
    value = getattr(module, attr, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _local_megatron_tensors(model) -> dict[str, torch.Tensor]:
    """Base tensors by their unadapted megatron names, adapted weights merged (W unchanged)."""
    from gazal_nemo.peft.dora import _unwrap

    root = _unwrap(model)
    adapted = {name: m for name, m in root.named_modules() if isinstance(m, AdaptedLinear)}
    out = {}
    for key, value in root.state_dict().items():
        owner = next((n for n in adapted if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1:]
        if rest.startswith("base."):
            out[f"{owner}.{rest[5:]}"] = adapted[owner].merged_weight() if rest == "base.weight" else value
    return out


def merged_hf_state_dict(model, shape: Qwen3Shape) -> dict[str, torch.Tensor] | None:
    """Every weight under HF names with the adapter merged, on global rank 0 (None elsewhere)."""
    ps = _parallel_state()
    pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    layer_offset = (shape.num_layers // pp) * pp_rank
    own = _local_megatron_tensors(model)
    units = defaultdict(dict)  # slot -> {hf name: tensor}; slot 0 holds embedding/norm/head
    for param in stage_params(shape, pp_rank=pp_rank, pp_size=pp):
        name = local_name(param.name, layer_offset)
        name = name if name in own else te_name(name)
        if name not in own:
            raise KeyError(f"merged export: model has no tensor {name} (for HF {param.hf_names})")
        full = _tp_gather_tensor(own[name], param.layout) if _is_gather_root_column() else None
        slot = 0 if param.layer is None else param.layer - layer_offset + 1
        units[slot].update(to_hf(param, full, shape) if full is not None else {})
    slots = [units[i] for i in range(shape.num_layers // pp + 1)]
    return _collect(slots)

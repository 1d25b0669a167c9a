"""Fill a megatron Qwen3 stage directly from a HF checkpoint (no dist checkpoint needed).

Used by tests and by small runs that start from HF weights; each rank reads only the
tensors its pipeline stage holds and keeps only its TP slice.
"""

from __future__ import annotations

import torch

from gazal_nemo.convert.hf_io import HFCheckpointReader
from gazal_nemo.convert.mapping import local_name, stage_params, te_name, to_megatron, tp_slice
from gazal_nemo.models.qwen3 import Qwen3Shape


def _this_rank(tp_rank, tp_size, pp_rank, pp_size):
    """Ranks not given are this process's in megatron's parallel state."""
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank,
            ps.get_tensor_model_parallel_world_size() if tp_size is None else tp_size,
            ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank,
            ps.get_pipeline_model_parallel_world_size() if pp_size is None else pp_size)


@torch.no_grad()
def load_hf_weights(model, hf_dir, shape: Qwen3Shape, *, tp_rank: int | None = None, tp_size: int | None = None,
                    pp_rank: int | None = None, pp_size: int | None = None) -> None:
    """Copy HF weights into `model` (one pipeline stage, one TP rank); strict on names and shapes.

    The rank arguments default to this process's place in megatron's parallel state."""
    tp_rank, tp_size, pp_rank, pp_size = _this_rank(tp_rank, tp_size, pp_rank, pp_size)
    reader = HFCheckpointReader(hf_dir)
    own = model.state_dict()
    layer_offset = (shape.num_layers // pp_size) * pp_rank
    filled = set()
    for param in stage_params(shape, pp_rank=pp_rank, pp_size=pp_size):
        name = local_name(param.name, layer_offset)
        if name not in own:
            name = te_name(name)
        if name not in own:
            raise KeyError(f"model has no parameter for {param.name} (HF {param.hf_names})")
        hf = {n: reader.get(n) for n in param.hf_names}
        value = tp_slice(to_megatron(param, hf, shape), param.layout, tp_rank, tp_size)
        if tuple(own[name].shape) != tuple(value.shape):
            raise ValueError(f"{param.hf_names}: shape {tuple(value.shape)} does not fit {name} {tuple(own[name].shape)}")
        own[name].copy_(value.to(own[name].dtype))
        filled.add(name)
    missing = [k for k, v in own.items() if k not in filled and isinstance(v, torch.Tensor)
               and not k.endswith("_extra_state") and "rotary" not in k]
    if missing:
        raise KeyError(f"parameters not filled from {hf_dir}: {missing[:5]}")


def qwen3_from_hf(hf_dir, **config_kwargs):
    """(shape, this rank's GPTModel stage filled from a HF folder); config_kwargs go to
    `transformer_config` (tp, pp, params_dtype, recompute, ...). Needs init_parallel first."""
    from gazal_nemo.models.qwen3 import build_qwen3, transformer_config

    shape = Qwen3Shape.from_pretrained(hf_dir)
    model = build_qwen3(shape, transformer_config(shape, **config_kwargs))
    load_hf_weights(model, hf_dir, shape)
    return shape, model

"""Hugging Face Qwen3 <-> megatron-core parameter names and layouts.

Declarative: a table of HF name patterns -> Megatron name patterns with each entry's
tensor-parallel layout, plus two named special cases:
  * fused QKV: megatron stores, per query group, [its q heads, one k head, one v head]
    stacked along the output dim, so a contiguous TP chunk is a set of whole groups (GQA);
  * fused gate/up (SwiGLU fc1): [gate; up], and each TP rank holds [gate_r; up_r].
Megatron names here are the module names of the torch-native spec (the keys of
`model.state_dict()`); `te_name` gives the Transformer Engine spec's names.

Layouts: "col" splits dim 0 across TP, "row" splits dim 1, "rep" is replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from gazal_nemo.models.qwen3 import Qwen3Shape

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")

# (hf pattern, megatron pattern, tp layout); {i} is the layer index.
SIMPLE_PARAMS = [
    ("model.embed_tokens.weight", "embedding.word_embeddings.weight", "col"),
    ("model.norm.weight", "decoder.final_layernorm.weight", "rep"),
    ("lm_head.weight", "output_layer.weight", "col"),
    ("model.layers.{i}.input_layernorm.weight", "decoder.layers.{i}.input_layernorm.weight", "rep"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder.layers.{i}.pre_mlp_layernorm.weight", "rep"),
    ("model.layers.{i}.self_attn.q_norm.weight", "decoder.layers.{i}.self_attention.q_layernorm.weight", "rep"),
    ("model.layers.{i}.self_attn.k_norm.weight", "decoder.layers.{i}.self_attention.k_layernorm.weight", "rep"),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attention.linear_proj.weight", "row"),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.linear_fc2.weight", "row"),
]
QKV = ("model.layers.{i}.self_attn.{p}_proj.weight", "decoder.layers.{i}.self_attention.linear_qkv.weight")
GATE_UP = ("model.layers.{i}.mlp.{p}_proj.weight", "decoder.layers.{i}.mlp.linear_fc1.weight")

_TE_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_name(megatron_name: str) -> str:
    """The Transformer Engine spec fuses the pre-norms into the next linear."""
    for local, te in _TE_RENAMES.items():
        if megatron_name.endswith(local):
            return megatron_name[: -len(local)] + te
    return megatron_name


@dataclass(frozen=True)
class MegatronParam:
    """One megatron parameter and the HF tensors it is made of."""

    name: str  # megatron name with the *global* layer index
    layout: str  # "col", "row", "rep", "qkv" or "gate_up"
    hf_names: tuple[str, ...]
    layer: int | None


def megatron_params(shape: Qwen3Shape) -> list[MegatronParam]:
    """Every megatron parameter of the full model, in a stable order."""
    params = []
    for hf, mg, layout in SIMPLE_PARAMS:
        if "{i}" in hf:
            continue
        if hf == "lm_head.weight" and shape.tie_word_embeddings:
            continue
        params.append(MegatronParam(mg, layout, (hf,), None))
    for i in range(shape.num_layers):
        for hf, mg, layout in SIMPLE_PARAMS:
            if "{i}" in hf:
                params.append(MegatronParam(mg.format(i=i), layout, (hf.format(i=i),), i))
        params.append(MegatronParam(QKV[1].format(i=i), "qkv",
                                    tuple(QKV[0].format(i=i, p=p) for p in "qkv"), i))
        params.append(MegatronParam(GATE_UP[1].format(i=i), "gate_up",
                                    tuple(GATE_UP[0].format(i=i, p=p) for p in ("gate", "up")), i))
    return params


def expected_hf_names(shape: Qwen3Shape) -> set[str]:
    return {n for p in megatron_params(shape) for n in p.hf_names}


def hf_tensor_shapes(shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """The shape every HF tensor of this config must have (checked before any data is read)."""
    hidden, d = shape.hidden_size, shape.head_dim
    by_module = {  # the module name before ".weight"
        "embed_tokens": (shape.vocab_size, hidden),
        "lm_head": (shape.vocab_size, hidden),
        "norm": (hidden,),
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "q_norm": (d,),
        "k_norm": (d,),
        "q_proj": (shape.num_attention_heads * d, hidden),
        "k_proj": (shape.num_key_value_heads * d, hidden),
        "v_proj": (shape.num_key_value_heads * d, hidden),
        "o_proj": (hidden, shape.num_attention_heads * d),
        "gate_proj": (shape.intermediate_size, hidden),
        "up_proj": (shape.intermediate_size, hidden),
        "down_proj": (hidden, shape.intermediate_size),
    }
    return {name: by_module[name.split(".")[-2]] for name in expected_hf_names(shape)}


def megatron_shape(param: MegatronParam, hf_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of the global (not TP-split) megatron tensor of one layer's `param`."""
    parts = [hf_shapes[n] for n in param.hf_names]
    if len(parts) == 1:
        return parts[0]
    return (sum(p[0] for p in parts), *parts[0][1:])  # fused along the output dim (qkv, gate/up)


def dist_key(megatron_name: str) -> str:
    """The key `model.sharded_state_dict()` saves a parameter under in a megatron dist checkpoint.

    Megatron names the pre-norms as Transformer Engine does whatever the spec, and stacks
    every layer's copy of a parameter into one tensor with a leading layer axis, so the key
    carries no layer index; that is what lets a checkpoint load at any pipeline split.
    """
    return _LAYER_RE.sub("decoder.layers.", te_name(megatron_name))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Qwen3Shape) -> torch.Tensor:
    """HF q/k/v -> megatron's group-interleaved linear_qkv weight."""
    groups, d = shape.num_key_value_heads, shape.head_dim
    per_group = shape.num_attention_heads // groups
    hidden = q.shape[-1]
    q_G = q.reshape(groups, per_group * d, hidden)
    k_G = k.reshape(groups, d, hidden)
    v_G = v.reshape(groups, d, hidden)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, shape: Qwen3Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv (works on any whole-group slice too)."""
    d = shape.head_dim
    per_group = shape.num_attention_heads // shape.num_key_value_heads
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(-1, (per_group + 2) * d, hidden)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def tp_slice(tensor: torch.Tensor, layout: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a global megatron tensor."""
    if tp_size == 1 or layout == "rep":
        return tensor
    if layout in ("col", "qkv"):
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if layout == "row":
        return tensor.chunk(tp_size, dim=1)[tp_rank]
    if layout == "gate_up":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    raise AssertionError(f"unknown layout {layout}")


def tp_gather(parts: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Inverse of tp_slice: the global tensor from every TP rank's part, in rank order."""
    if len(parts) == 1 or layout == "rep":
        return parts[0]
    if layout in ("col", "qkv"):
        return torch.cat(parts, dim=0)
    if layout == "row":
        return torch.cat(parts, dim=1)
    if layout == "gate_up":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([*gates, *ups], dim=0)
    raise AssertionError(f"unknown layout {layout}")


def to_megatron(param: MegatronParam, hf_tensors: dict[str, torch.Tensor], shape: Qwen3Shape) -> torch.Tensor:
    """The global megatron tensor of `param` from its HF tensors."""
    if param.layout == "qkv":
        return fuse_qkv(*(hf_tensors[n] for n in param.hf_names), shape)
    if param.layout == "gate_up":
        return torch.cat([hf_tensors[n] for n in param.hf_names], dim=0)
    return hf_tensors[param.hf_names[0]]


def to_hf(param: MegatronParam, tensor: torch.Tensor, shape: Qwen3Shape) -> dict[str, torch.Tensor]:
    """The HF tensors of `param` from its global megatron tensor."""
    if param.layout == "qkv":
        return dict(zip(param.hf_names, (t.contiguous() for t in split_qkv(tensor, shape))))
    if param.layout == "gate_up":
        return dict(zip(param.hf_names, (t.contiguous() for t in tensor.chunk(2, dim=0))))
    return {param.hf_names[0]: tensor}


def local_name(global_name: str, layer_offset: int) -> str:
    """Megatron global layer index -> this pipeline stage's local module index."""
    m = _LAYER_RE.match(global_name)
    if not m:
        return global_name
    return f"decoder.layers.{int(m.group(1)) - layer_offset}." + global_name[m.end():]


def stage_params(shape: Qwen3Shape, *, pp_rank: int, pp_size: int) -> list[MegatronParam]:
    """The parameters one pipeline stage holds (embedding first stage, head last stage)."""
    per_stage = shape.num_layers // pp_size
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    keep = []
    for p in megatron_params(shape):
        if p.layer is not None:
            if per_stage * pp_rank <= p.layer < per_stage * (pp_rank + 1):
                keep.append(p)
        elif p.name.startswith("embedding."):
            if first:
                keep.append(p)
        elif last:
            keep.append(p)
    if shape.tie_word_embeddings and last and not first:
        # Megatron keeps a copy of the tied embedding as the last stage's output layer.
        keep.append(MegatronParam("output_layer.weight", "col", ("model.embed_tokens.weight",), None))
    return keep

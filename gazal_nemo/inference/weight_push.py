"""The trainer's weights as an engine loads them: full Hugging Face tensors, in buckets.

A rollout engine that holds its own copy of the weights (vLLM) is refreshed after every
optimizer step from the trainer's megatron shards:
  * each parameter is gathered over the TP group and renamed to its HF names with the
    converter's table (convert/mapping.py), so the engine re-shards it with its own loader
    and one code path serves every TP layout;
  * an adapted linear (DoRA / LoRA) is sent merged, W' = (m/n)(W + s·BA), computed one
    tensor at a time without touching W (vLLM cannot serve DoRA magnitudes; merging in
    place and unmerging would drift a bf16 base a little at every step);
  * tensors travel in buckets of about `bucket_bytes` (one gather round and one hand-over
    per bucket), not one call per tensor, the known bottleneck of naive syncs.

Fingerprints (float64 sum and sum of squares of a strided sample) identify a tensor's content
cheaply; the push gate uses them to say which parameter group an engine holds stale.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)")
FINGERPRINT_SAMPLES = 1 << 16


def hf_weight_buckets(model, shape, *, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (hf_name, full tensor) of about bucket_bytes each, gathered over TP.

    Every TP rank takes part in the gathers and gets the same full tensors (the engine's
    own loader keeps the slice its rank needs). Needs pp=1 (every rank holds every layer).
    """
    from megatron.core import parallel_state as ps

    from gazal_nemo.convert.mapping import local_name, stage_params, te_name, to_hf, tp_gather
    from gazal_nemo.peft.export import merged_local_tensor

    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    bucket, size = [], 0
    for param in stage_params(shape, pp_rank=0, pp_size=1):
        name = local_name(param.name, 0)
        tensor = merged_local_tensor(model, name)
        if tensor is None:
            tensor = merged_local_tensor(model, te_name(name))
        if tensor is None:
            raise KeyError(f"model has no parameter {param.name} to push to the rollout engine")
        if tp_size > 1 and param.layout != "rep":
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = tp_gather(parts, param.layout)
        for hf_name, hf_tensor in to_hf(param, tensor, shape).items():
            bucket.append((hf_name, hf_tensor))
            size += hf_tensor.numel() * hf_tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def parameter_group(hf_name: str) -> str:
    """The readable group of an HF tensor name: 'layer 3 attention', 'layer 3 mlp', 'embedding', ..."""
    match = _LAYER.match(hf_name)
    if match:
        part = {"self_attn": "attention", "mlp": "mlp"}.get(match.group(2), "norms")
        return f"layer {match.group(1)} {part}"
    if hf_name.startswith("model.embed_tokens"):
        return "embedding"
    if hf_name.startswith("lm_head"):
        return "output layer"
    return "final norm" if hf_name.startswith("model.norm") else hf_name


@torch.no_grad()
def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """[2] float64 (sum, sum of squares) of an evenly strided sample of at most FINGERPRINT_SAMPLES
    elements, on the tensor's device with no host sync: cheap enough for every push (a full
    float64 pass cost 3.5x the push itself on CPU), and an optimizer step changes nearly every
    element, so a stale tensor differs in its sample too."""
    flat = tensor.detach().reshape(-1)
    sample = flat[::max(1, flat.numel() // FINGERPRINT_SAMPLES)].double()
    return torch.stack([sample.sum(), sample.square().sum()])


def fingerprint_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far content `a` is from `b`, relative to b's norm (0 for the same content): the
    change of the sum and of the norm, each over b's norm."""
    a, b = a.double().cpu(), b.double().cpu()
    norm = max(float(b[1]), 1e-30) ** 0.5
    return (abs(float(a[0] - b[0])) + abs(max(float(a[1]), 0.0) ** 0.5 - norm)) / norm

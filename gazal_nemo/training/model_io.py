"""Small tensor helpers shared by training and evaluation code."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `tensor` along the last dim, in rank order (no autograd)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def gather_vocab_logits(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from TP vocab shards (for tests and evaluation, not for the loss)."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits_BSV.detach()
    return all_gather_last_dim(logits_BSV.detach(), parallel_state.get_tensor_model_parallel_group())

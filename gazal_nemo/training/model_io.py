"""Small tensor helpers shared by training and evaluation code."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_vocab_logits(logits_BSV: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from TP vocab shards (for tests and sampling, not for the loss)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits_BSV.detach()
    parts = [torch.empty_like(logits_BSV) for _ in range(tp)]
    dist.all_gather(parts, logits_BSV.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)

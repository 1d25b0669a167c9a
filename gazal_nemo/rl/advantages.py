"""Group-relative advantages (GRPO, Shao et al. 2024; Gazal-R1 eq. 1).

The group of completions sampled for one prompt is its own baseline: A_i = (r_i - mean) /
(std + eps). No value model is needed, which is the memory saving the paper chose GRPO for.
A group whose rewards are all equal teaches nothing (every advantage is exactly 0); we
count those groups because a rising count means the prompts became too easy or too hard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class GroupAdvantages:
    """Advantages of grouped completions and how many groups carried no signal."""

    advantages: torch.Tensor
    """[num_prompts * num_generations] float32, same order as the rewards."""
    num_zero_std_groups: int
    """Groups whose rewards were all equal (their advantages are exactly 0)."""
    group_mean: torch.Tensor
    """[num_prompts] mean reward of each group."""
    group_std: torch.Tensor
    """[num_prompts] sample std (Bessel-corrected, as TRL) of each group's rewards."""


def group_advantages(rewards: torch.Tensor, *, num_generations: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> GroupAdvantages:
    """Normalise rewards within each prompt's group.

    rewards: [num_prompts * num_generations], completions of one prompt contiguous (the
    order the rollout produces). With scale_by_std=False the advantage is only centred
    (Dr. GRPO's fix for the difficulty bias of dividing by the std).
    """
    if rewards.dim() != 1 or num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} cannot be split into groups of "
                         f"num_generations={num_generations}; expected a 1-D tensor of num_prompts * num_generations")
    grouped = rewards.detach().float().view(-1, num_generations)  # [num_prompts, num_generations]
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
    centred = grouped - mean
    advantages = centred / (std + eps) if scale_by_std else centred
    # Exact zeros, not rounding noise from (r - mean(r)), for groups without signal.
    flat = grouped.max(dim=1, keepdim=True).values == grouped.min(dim=1, keepdim=True).values
    advantages = advantages.masked_fill(flat, 0.0)
    return GroupAdvantages(advantages=advantages.reshape(-1), num_zero_std_groups=int(flat.sum()),
                           group_mean=mean.squeeze(1), group_std=std.squeeze(1))

"""The GRPO policy loss as Gazal-R1 trained it (section 4.3, eq. 2).

It follows DAPO (Yu et al. 2025) rather than the original GRPO objective (Shao et al. 2024):
the clipped PPO surrogate with asymmetric "clip-higher" bounds [1 - eps_low, 1 + eps_high]
(0.2 / 0.28), token-level normalisation, truncated completions left out, and no KL term
(beta = 0, so no reference model is kept). What we kept optional, for comparison runs:
beta > 0 adds the k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020) per token, and
the normalisation can be the original per-sequence mean.

When the sampler is not the trainer (vLLM: other kernels, other numerics; or asynchronous
rollouts, where the samples come from older weights), the tokens were drawn from pi_sampler,
not pi_old. Two corrections, each optional, both detached:
  * truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; verl/NeMo-RL "tis") weights each token by
    min(pi_old / pi_sampler, C), so a token the sampler over-drew pulls the gradient less
    and the weight can never explode;
  * sequence masking (verl's rollout_corr "mis") drops a completion whose geometric-mean
    ratio exp(mean_t log(pi_old / pi_sampler)) leaves [1/M, M]: a sample too far off-policy
    to correct token by token.
With pi_old the trainer's current weights (the proximal policy) and pi_sampler the
generator's (the behaviour policy), this is AReaL's decoupled PPO objective. Whenever the
sampler's log-probs are given, the sampler-trainer KL is logged (k3 estimate of
KL(pi_sampler || pi_old) on the sampled tokens).

Shapes: B completions, T completion positions (prompt tokens are not in these tensors).
"""

from __future__ import annotations

import math

import torch

from gazal_nemo.rl.config import NORMALISATIONS, GRPOLossConfig

# exp(ref - logp) in k3 overflows for a token the filters removed (logp = -1e4); beyond
# |20| nats the estimate is meaningless anyway.
_MAX_KL_LOG_RATIO = 20.0


def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, *, mask_truncated: bool) -> torch.Tensor:
    """[B, T] bool: the completion tokens that enter the loss (truncated rows dropped if asked)."""
    mask = completion_mask.bool()
    if mask_truncated:
        mask = mask & ~truncated.bool().unsqueeze(-1)
    return mask


def count_loss_tokens(completion_mask: torch.Tensor, truncated: torch.Tensor, *, mask_truncated: bool) -> int:
    """Tokens this micro-batch contributes to the loss; sum it over the step for 'dapo'."""
    return int(loss_mask(completion_mask, truncated, mask_truncated=mask_truncated).sum())


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - x - 1 with x = log(q / p): unbiased, non-negative KL(p || q) estimate on samples of p."""
    return torch.expm1(log_ratio) - log_ratio


def _normalise(per_token: torch.Tensor, mask: torch.Tensor, normalisation: str,
               num_global_tokens: int | None) -> torch.Tensor:
    masked = torch.where(mask, per_token, 0.0)
    if normalisation == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if normalisation == "dapo":
        if num_global_tokens is None or num_global_tokens < 1:
            raise ValueError(f"grpo.loss.normalisation='dapo' needs num_global_tokens >= 1 (the step's loss tokens "
                             f"over all micro-batches and data-parallel ranks), got {num_global_tokens}")
        return masked.sum() / num_global_tokens
    lengths = mask.sum(dim=-1)
    per_sequence = masked.sum(dim=-1) / lengths.clamp(min=1)
    return per_sequence.sum() / (lengths > 0).sum().clamp(min=1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.float(), 0.0).sum() / mask.sum().clamp(min=1)


def grpo_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
              completion_mask: torch.Tensor, truncated: torch.Tensor, config: GRPOLossConfig,
              ref_logprobs: torch.Tensor | None = None, num_global_tokens: int | None = None,
              entropy: torch.Tensor | None = None,
              sampler_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss of a micro-batch (DAPO clip-higher, token-level normalisation).

    logprobs [B, T]: current policy, with grad (sampling.token_logprobs, same filters as the
    sampler); old_logprobs [B, T]: policy that sampled (pass logprobs.detach() for a single
    update per batch: ratio 1, the plain policy gradient); advantages [B];
    completion_mask [B, T]: real completion tokens; truncated [B]: hit max_new_tokens.
    normalisation: 'bnpo' sum / loss tokens of this micro-batch (the paper); 'dapo' sum /
    num_global_tokens (the step's count, count_loss_tokens summed over micro-batches and
    ranks; if the data-parallel reducer averages gradients, scale the loss by the DP size);
    'grpo' mean over tokens of each sequence, then over sequences that have any.
    sampler_logprobs [B, T] (with config.tis_cap): log-probs of the sampled tokens under the
    sampler, for the truncated importance-sampling weight.
    Returns (loss, metrics): detached scalar metrics, means over the loss tokens, plus
    num_loss_tokens to weight them when averaging over micro-batches and ranks.
    """
    if config.normalisation not in NORMALISATIONS:
        raise ValueError(f"grpo.loss.normalisation={config.normalisation!r}; allowed: {', '.join(NORMALISATIONS)}")
    if config.beta > 0 and ref_logprobs is None:
        raise ValueError(f"grpo.loss.beta={config.beta} needs ref_logprobs (set grpo.loss.beta=0 to train without a reference)")
    mask = loss_mask(completion_mask, truncated, mask_truncated=config.mask_truncated)
    # Padding positions may hold anything (-inf, NaN); keep them out of exp() and the graph.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    ratio = log_ratio.exp()
    adv = advantages.detach().float().unsqueeze(-1)  # [B, 1]
    clipped_ratio = ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)
    tis_weight, sequence_kept, sampler_log_ratio = None, None, None
    if (config.tis_cap is not None or config.mis_threshold is not None) and sampler_logprobs is None:
        raise ValueError("grpo.loss.tis_cap / mis_threshold is set but the rollout engine gave no sampler log-probs")
    if sampler_logprobs is not None:
        sampler_log_ratio = torch.where(mask, old_logprobs.detach() - sampler_logprobs.detach(), 0.0)
    if config.tis_cap is not None:
        tis_weight = sampler_log_ratio.clamp(max=math.log(config.tis_cap)).exp()
        per_token = per_token * tis_weight
    if config.mis_threshold is not None:
        mean_log_ratio = sampler_log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)  # [B]
        sequence_kept = mean_log_ratio.abs() <= math.log(config.mis_threshold)
        per_token = per_token * sequence_kept.unsqueeze(-1)
    kl_ref = None
    if config.beta > 0:
        ref_log_ratio = torch.where(mask, ref_logprobs.detach() - logprobs, 0.0)
        kl_ref = _k3(ref_log_ratio.clamp(-_MAX_KL_LOG_RATIO, _MAX_KL_LOG_RATIO))
        per_token = per_token + config.beta * kl_ref
    loss = _normalise(per_token, mask, config.normalisation, num_global_tokens)

    with torch.no_grad():
        metrics = {
            "clip_fraction_low": _masked_mean((ratio < 1.0 - config.eps_low) & (adv < 0), mask),
            "clip_fraction_high": _masked_mean((ratio > 1.0 + config.eps_high) & (adv > 0), mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "approx_kl_old": _masked_mean(_k3(log_ratio), mask),  # KL(pi_old || pi_theta), samples of pi_old
            "num_loss_tokens": mask.sum().float(),
            "num_truncated": truncated.bool().sum().float(),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = _masked_mean(kl_ref, mask)
        if tis_weight is not None:
            metrics["tis_weight_mean"] = _masked_mean(tis_weight, mask)
            metrics["tis_capped_frac"] = _masked_mean(tis_weight >= config.tis_cap * (1 - 1e-6), mask)
        if sequence_kept is not None:
            metrics["mis_masked_frac"] = _masked_mean(~sequence_kept.unsqueeze(-1).expand_as(mask), mask)
        if sampler_log_ratio is not None:
            metrics["kl_sampler"] = _masked_mean(_k3(sampler_log_ratio.clamp(-_MAX_KL_LOG_RATIO, _MAX_KL_LOG_RATIO)),
                                                 mask)
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, mask)
    return loss, metrics

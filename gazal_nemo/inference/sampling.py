"""Sampling filters and the log-probabilities of sampled tokens under those same filters.

The sampler draws from softmax(filter(logits)) with the paper's temperature 0.6, top-k 20
and top-p 0.95 (Appendix A.2), applied in Hugging Face's order: temperature, then top-k,
then top-p (vLLM uses the same order). If the trainer scored the tokens under the plain
softmax, the importance ratio pi_theta / pi_old would compare two different distributions
and would not be 1 even before the first update; so the training side applies the same
filter: token_logprobs is the log-softmax over the filtered distribution.

Filter rule. A token is kept when its (temperature-scaled) logit is >= a cutoff value: the
k-th largest logit for top-k, and the logit of the last token of the smallest
probability-sorted prefix whose mass reaches top_p. This is Hugging Face's rule except
that exact ties at the top-p boundary are all kept (HF keeps whichever the sort put
first); a threshold on values does not depend on sort order, which is what lets the
tensor-parallel version agree exactly with the single-process one.

Targets outside the filtered set. The sampler never produces one, but after a policy
update the current policy's set can move. Such a target gets OUT_OF_FILTER_LOGPROB
(-1e4, finite, so ratios are exp(-1e4 - old) = 0 and nothing becomes NaN) with zero
gradient; count `logprobs <= OUT_OF_FILTER_LOGPROB` to monitor it.

Tensor parallelism. Megatron shards the vocabulary: rank r holds ids [r*V/tp, (r+1)*V/tp).
The vocab-parallel functions never gather full logits when top_k > 0: each rank gathers
only its top-k values (k floats per position), which contain the global top-k, and finds
the global cutoffs from those; the log-softmax is then two all-reduces (max, sum) plus one
for the target's logit, as in Megatron's vocab-parallel cross-entropy. With top_k = 0 and
top_p < 1 the top-p cutoff needs the whole distribution, so the full scaled logits are
gathered ([..., V] per rank; acceptable for evaluation, costly for 151k vocab training).
Indices are not gathered: the cutoffs are values and each rank applies them to its shard.

Shapes: logits [..., V] (e.g. [batch, seq, vocab]); targets [...] int64 token ids.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gazal_nemo.training.model_io import all_gather_last_dim

OUT_OF_FILTER_LOGPROB = -1.0e4
"""Log-prob returned for a target the filters removed (finite on purpose, see module doc)."""


def _check_filters(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature > 0:
        raise ValueError(f"sampling.temperature={temperature}; allowed: > 0 (use argmax for greedy decoding)")
    if top_k < 0:
        raise ValueError(f"sampling.top_k={top_k}; allowed: integers >= 0 (0 disables)")
    if not 0 < top_p <= 1:
        raise ValueError(f"sampling.top_p={top_p}; allowed: 0 < x <= 1 (1 disables)")


def _top_p_cutoff(candidates: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., 1] smallest logit of the smallest prefix (by probability) holding top_p of the mass.

    candidates: [..., C] scaled logits, -inf for tokens already removed (by top-k).
    """
    sorted_desc = candidates.sort(dim=-1, descending=True).values
    probs = sorted_desc.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # The first token always stays; removed tokens never come back through rounding.
    keep = (mass_before < top_p) & (sorted_desc > float("-inf"))
    keep[..., 0] = True
    num_keep = keep.sum(dim=-1, keepdim=True)
    return sorted_desc.gather(-1, num_keep - 1)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Float32 logits / temperature with tokens outside the top-k / top-p set at -inf."""
    _check_filters(temperature, top_k, top_p)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.detach().topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1:
        cutoff = _top_p_cutoff(scaled.detach(), top_p)
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    return scaled


def sample_tokens(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token id per position from softmax(filter_logits(...)); returns logits.shape[:-1]."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """log p(target) under the filtered, temperature-scaled distribution; differentiable.

    logsumexp + gather rather than a full log_softmax: one [..., V] float32 tensor fewer.
    """
    filtered = filter_logits(logits, temperature, top_k, top_p)
    target_logits = filtered.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logprobs = target_logits - filtered.logsumexp(dim=-1)
    return logprobs.clamp(min=OUT_OF_FILTER_LOGPROB)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of the filtered distribution at each position; a metric, no gradient."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    logp = filtered.log_softmax(dim=-1)
    plogp = torch.where(torch.isfinite(filtered), logp.exp() * logp, 0.0)
    return -plogp.sum(dim=-1)


# --- tensor parallel (vocab-sharded logits) ----------------------------------------------


def _tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()



def vocab_parallel_filter_logits(local_logits: torch.Tensor, temperature: float, top_k: int = 0,
                                 top_p: float = 1.0, *, tp_group=None) -> torch.Tensor:
    """filter_logits for this rank's vocab shard [..., V/tp]; same keep set as on full logits."""
    _check_filters(temperature, top_k, top_p)
    group = _tp_group(tp_group)
    scaled = local_logits.float() / temperature
    vocab_size = scaled.shape[-1] * dist.get_world_size(group)
    cutoff = None
    with torch.no_grad():
        if 0 < top_k < vocab_size:
            local_top = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values
            candidates = all_gather_last_dim(local_top, group)  # [..., tp * k], holds the global top-k
            cutoff = candidates.topk(top_k, dim=-1).values[..., -1:]
            candidates = candidates.masked_fill(candidates < cutoff, float("-inf"))
        elif top_p < 1:
            candidates = all_gather_last_dim(scaled, group)  # top_k off: top-p needs the whole distribution
        if top_p < 1:
            cutoff = _top_p_cutoff(candidates, top_p)
    if cutoff is None:
        return scaled
    return scaled.masked_fill(scaled < cutoff, float("-inf"))


class _VocabParallelLogProb(torch.autograd.Function):
    """log softmax(filtered)[target] over vocab shards; backward needs no communication."""

    @staticmethod
    def forward(ctx, filtered_local, targets, vocab_start, group):
        local_vocab = filtered_local.shape[-1]
        global_max = filtered_local.max(dim=-1).values
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        shifted = filtered_local - global_max.unsqueeze(-1)
        exp_local = shifted.exp()
        sum_exp = exp_local.sum(dim=-1)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)

        local_ids = targets - vocab_start
        in_shard = (local_ids >= 0) & (local_ids < local_vocab)
        safe_ids = local_ids.clamp(0, local_vocab - 1)
        target_shifted = shifted.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
        target_shifted = torch.where(in_shard, target_shifted, 0.0)  # only the owner contributes
        dist.all_reduce(target_shifted, op=dist.ReduceOp.SUM, group=group)

        softmax_local = exp_local.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax_local, safe_ids, in_shard)
        return target_shifted - sum_exp.log()

    @staticmethod
    def backward(ctx, grad_logprobs):
        softmax_local, safe_ids, in_shard = ctx.saved_tensors
        # d log p_t / d z_j = 1[j == t] - p_j, for the j of this shard.
        grad = softmax_local * -grad_logprobs.unsqueeze(-1)
        grad.scatter_add_(-1, safe_ids.unsqueeze(-1), (grad_logprobs * in_shard).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_token_logprobs(local_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                                  top_k: int = 0, top_p: float = 1.0, *, tp_group=None) -> torch.Tensor:
    """token_logprobs from vocab-sharded logits [..., V/tp]; every TP rank gets the full result.

    targets are global token ids (valid ones; an id outside [0, V) is not detected).
    tp_group defaults to megatron's tensor-model-parallel group.
    """
    group = _tp_group(tp_group)
    filtered = vocab_parallel_filter_logits(local_logits, temperature, top_k, top_p, tp_group=group)
    vocab_start = dist.get_rank(group) * filtered.shape[-1]
    logprobs = _VocabParallelLogProb.apply(filtered, targets, vocab_start, group)
    return logprobs.clamp(min=OUT_OF_FILTER_LOGPROB)


@torch.no_grad()
def vocab_parallel_token_entropy(local_logits: torch.Tensor, temperature: float, top_k: int = 0,
                                 top_p: float = 1.0, *, tp_group=None) -> torch.Tensor:
    """token_entropy from vocab-sharded logits: H = log Z - sum(e^z z) / Z, sums all-reduced."""
    group = _tp_group(tp_group)
    filtered = vocab_parallel_filter_logits(local_logits, temperature, top_k, top_p, tp_group=group)
    global_max = filtered.max(dim=-1).values
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shifted = filtered - global_max.unsqueeze(-1)
    exp_shifted = shifted.exp()
    sums = torch.stack([exp_shifted.sum(dim=-1),
                        torch.where(torch.isfinite(shifted), exp_shifted * shifted, 0.0).sum(dim=-1)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums[0].log() - sums[1] / sums[0]

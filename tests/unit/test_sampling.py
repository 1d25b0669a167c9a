"""Sampling filters and filtered log-probs: against transformers' logits warpers and hand
computations, and the vocab-parallel version in 2 real gloo processes against the
single-process one on the same full logits."""

import pytest
import torch

from gazal_nemo.inference.sampling import (
    OUT_OF_FILTER_LOGPROB,
    filter_logits,
    sample_tokens,
    token_entropy,
    token_logprobs,
)
from gazal_nemo.rl.config import SamplingConfig
from gazal_nemo.testing.multiproc import run_distributed

SETTINGS = [(0.6, 20, 0.95), (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.6, 100, 0.5), (1.0, 1, 0.95), (3.0, 10, 0.9)]


def _hf_filtered(logits, temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    flat = logits.reshape(-1, logits.shape[-1])
    return LogitsProcessorList(warpers)(None, flat.clone()).view_as(logits)


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_filter_matches_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = 3 * torch.randn(4, 7, 96)
    ours = filter_logits(logits, temperature, top_k, top_p)
    reference = _hf_filtered(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(reference))
    torch.testing.assert_close(ours[torch.isfinite(ours)], reference[torch.isfinite(reference)])
    if top_k or top_p < 1:
        assert (~torch.isfinite(ours)).any(), "the setting should remove some tokens"


@pytest.mark.parametrize("temperature, top_k, top_p", SETTINGS)
def test_token_logprobs_are_log_softmax_of_the_filtered_distribution(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = 3 * torch.randn(3, 5, 64)
    reference = _hf_filtered(logits, temperature, top_k, top_p).log_softmax(-1)
    # Sample the targets from the filtered distribution, as the sampler does.
    targets = sample_tokens(logits, temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    ours = token_logprobs(logits, targets, temperature, top_k, top_p)
    torch.testing.assert_close(ours, reference.gather(-1, targets.unsqueeze(-1)).squeeze(-1))


def test_gradient_is_onehot_minus_filtered_softmax_over_temperature():
    torch.manual_seed(2)
    logits = (2 * torch.randn(2, 3, 40)).requires_grad_()
    targets = sample_tokens(logits.detach(), 0.6, 20, 0.95, generator=torch.Generator().manual_seed(1))
    token_logprobs(logits, targets, 0.6, 20, 0.95).sum().backward()
    filtered = filter_logits(logits.detach(), 0.6, 20, 0.95)
    expected = -filtered.softmax(-1)
    expected.scatter_add_(-1, targets.unsqueeze(-1), torch.ones_like(targets, dtype=torch.float).unsqueeze(-1))
    torch.testing.assert_close(logits.grad, expected / 0.6)


def test_target_outside_the_filtered_set_is_finite_with_zero_gradient():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]], requires_grad=True)
    targets = torch.tensor([3])  # top_k=2 keeps only ids 0 and 1
    logp = token_logprobs(logits, targets, 1.0, 2, 1.0)
    assert logp.item() == OUT_OF_FILTER_LOGPROB
    logp.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    inside = token_logprobs(logits.detach(), torch.tensor([1]), 1.0, 2, 1.0)
    assert inside.item() == pytest.approx(4.0 - torch.tensor([5.0, 4.0]).logsumexp(0).item())


def test_entropy_of_the_filtered_distribution():
    torch.manual_seed(3)
    logits = 2 * torch.randn(2, 4, 50)
    filtered = _hf_filtered(logits, 0.6, 20, 0.95)
    expected = torch.distributions.Categorical(logits=filtered).entropy()
    torch.testing.assert_close(token_entropy(logits, 0.6, 20, 0.95), expected)
    # One surviving token: zero entropy, not NaN.
    assert token_entropy(logits, 1.0, 1, 1.0).abs().max().item() == 0.0


def test_samples_stay_in_the_set_and_follow_its_probabilities():
    torch.manual_seed(4)
    logits = torch.randn(30)
    probs = filter_logits(logits, 0.6, 10, 0.9).softmax(-1)
    draws = sample_tokens(logits.expand(20000, 30), 0.6, 10, 0.9, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=30).float() / 20000
    assert counts[probs == 0].sum() == 0
    assert (counts - probs).abs().max() < 0.02


@pytest.mark.parametrize("kwargs, key", [
    (dict(temperature=0.0), "sampling.temperature"), (dict(top_k=-1), "sampling.top_k"),
    (dict(top_p=0.0), "sampling.top_p"), (dict(top_p=1.5), "sampling.top_p"),
])
def test_bad_filters_raise(kwargs, key):
    settings = dict(temperature=0.6, top_k=20, top_p=0.95) | kwargs
    with pytest.raises(ValueError, match=key):
        filter_logits(torch.zeros(4), **settings)
    with pytest.raises(ValueError, match=key):
        SamplingConfig(**kwargs)


def test_sampling_defaults_are_the_papers():
    cfg = SamplingConfig()
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.num_generations, cfg.max_new_tokens) == (0.6, 20, 0.95, 4, 4096)
    with pytest.raises(ValueError, match="sampling.num_generations"):
        SamplingConfig(num_generations=1)


# --- tensor parallel: 2 gloo processes ----------------------------------------------------

TP_SETTINGS = [(0.6, 20, 0.95), (1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.6, 48, 0.8), (3.0, 10, 0.9)]


def _vocab_parallel_worker(logits, targets, weights, settings):
    from megatron.core import parallel_state

    from gazal_nemo.inference.sampling import vocab_parallel_token_entropy, vocab_parallel_token_logprobs
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = logits.shape[-1] // 2
    results = []
    for temperature, top_k, top_p in settings:
        local = logits[..., rank * shard:(rank + 1) * shard].clone().requires_grad_()
        logp = vocab_parallel_token_logprobs(local, targets, temperature, top_k, top_p)
        (logp * weights).sum().backward()
        entropy = vocab_parallel_token_entropy(local.detach(), temperature, top_k, top_p)
        results.append((logp.detach(), entropy, local.grad))
    return results


def test_vocab_parallel_matches_single_process():
    torch.manual_seed(5)
    vocab = 64
    logits = 3 * torch.randn(2, 6, vocab)
    # Targets in both shards, some sampled (inside the set) and some far outside it.
    targets = torch.randint(0, vocab, (2, 6))
    targets[0, :3] = logits[0, :3].argmax(-1)
    targets[1, :2] = logits[1, :2].argmin(-1)
    weights = torch.randn(2, 6)
    per_rank = run_distributed(_vocab_parallel_worker, 2, logits, targets, weights, TP_SETTINGS)

    for index, (temperature, top_k, top_p) in enumerate(TP_SETTINGS):
        full = logits.clone().requires_grad_()
        logp = token_logprobs(full, targets, temperature, top_k, top_p)
        (logp * weights).sum().backward()
        entropy = token_entropy(logits, temperature, top_k, top_p)
        for rank in range(2):
            tp_logp, tp_entropy, _ = per_rank[rank][index]
            torch.testing.assert_close(tp_logp, logp.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tp_entropy, entropy, rtol=1e-5, atol=1e-5)
        tp_grad = torch.cat([per_rank[0][index][2], per_rank[1][index][2]], dim=-1)
        torch.testing.assert_close(tp_grad, full.grad, rtol=1e-5, atol=1e-6)
        if top_k or top_p < 1:
            assert (logp.detach() == OUT_OF_FILTER_LOGPROB).any(), "some targets should fall outside the set"

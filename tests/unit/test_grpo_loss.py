"""The GRPO/DAPO loss against hand computations: values, gradients, clipping, masking, KL."""

import math

import pytest
import torch

from gazal_nemo.inference.sampling import token_logprobs
from gazal_nemo.rl.config import GRPOLossConfig
from gazal_nemo.rl.loss import count_loss_tokens, grpo_loss


def _loss(logprobs, old, advantages, mask, truncated, **config):
    num_global_tokens = config.pop("num_global_tokens", None)
    ref = config.pop("ref_logprobs", None)
    entropy = config.pop("entropy", None)
    sampler = config.pop("sampler_logprobs", None)
    return grpo_loss(logprobs=logprobs, old_logprobs=old, advantages=advantages, completion_mask=mask,
                     truncated=truncated, config=GRPOLossConfig(**config), ref_logprobs=ref,
                     num_global_tokens=num_global_tokens, entropy=entropy, sampler_logprobs=sampler)


def test_ratio_one_is_the_plain_policy_gradient():
    torch.manual_seed(0)
    B, T, V = 3, 5, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([0.7, -1.3, 2.0])
    logp = token_logprobs(logits, targets, 1.0)
    loss, metrics = _loss(logp, logp.detach(), advantages, mask, torch.zeros(B, dtype=torch.bool))
    loss.backward()

    num_tokens = mask.sum()
    probs = logits.detach().softmax(-1)
    expected = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                grad_logp = -probs[b, t].clone()
                grad_logp[targets[b, t]] += 1.0
                expected[b, t] = -advantages[b] * grad_logp / num_tokens
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx(-(advantages * mask.sum(1)).sum().item() / num_tokens.item())
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert metrics["clip_fraction_low"].item() == 0.0 and metrics["clip_fraction_high"].item() == 0.0
    assert metrics["approx_kl_old"].item() == pytest.approx(0.0)


def test_tokens_beyond_the_clip_bounds_get_no_gradient():
    ratios = torch.tensor([[1.5, 1.1, 0.5, 1.0], [0.5, 0.9, 1.5, 1.0]])
    advantages = torch.tensor([1.0, -2.0])
    old = torch.full((2, 4), -2.0)
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, metrics = _loss(logp, old, advantages, mask, torch.zeros(2, dtype=torch.bool))
    loss.backward()
    # d loss / d logp = -A * ratio / N where the unclipped term is the minimum, else 0.
    #  row 0 (A=+1): 1.5 > 1.28 clipped; 1.1 inside; 0.5 below (min picks ratio*A, no clip for A>0); 1.0 inside
    #  row 1 (A=-2): 0.5 < 0.8 clipped; 0.9 inside; 1.5 above (min picks ratio*A for A<0); 1.0 inside
    n = 8
    expected = torch.tensor([[0.0, -1.1 / n, -0.5 / n, -1.0 / n], [0.0, 1.8 / n, 3.0 / n, 2.0 / n]])
    torch.testing.assert_close(logp.grad, expected)
    per_token = [[-1.28, -1.1, -0.5, -1.0], [2 * 0.8, 1.8, 3.0, 2.0]]
    assert loss.item() == pytest.approx(sum(map(sum, per_token)) / n)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 8)
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 8)
    assert metrics["ratio_mean"].item() == pytest.approx(ratios.mean().item())
    k3 = [r - 1 - math.log(r) for r in ratios.flatten().tolist()]
    assert metrics["approx_kl_old"].item() == pytest.approx(sum(k3) / 8, rel=1e-5)


def _random_batch(seed=0, B=4, T=6, noise=0.3):
    """Ratios exp(noise * N(0,1)): with noise 0.3 some tokens are clipped, with 0.05 none is."""
    torch.manual_seed(seed)
    old = -torch.rand(B, T) * 3
    logp = (old + (noise * torch.randn(B, T)).clamp(-3 * noise, 3 * noise)).requires_grad_()
    lengths = torch.tensor([6, 3, 5, 1])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    advantages = torch.randn(B)
    return logp, old, advantages, mask


def test_truncated_completion_contributes_nothing():
    logp, old, advantages, mask = _random_batch(noise=0.05)
    truncated = torch.tensor([False, True, False, False])
    loss, metrics = _loss(logp, old, advantages, mask, truncated)
    loss.backward()
    assert torch.all(logp.grad[1] == 0)
    assert torch.all(logp.grad[0, :6] != 0)
    keep = torch.tensor([0, 2, 3])
    reference, _ = _loss(logp.detach()[keep], old[keep], advantages[keep], mask[keep], truncated[keep])
    assert loss.item() == pytest.approx(reference.item())
    assert metrics["num_loss_tokens"].item() == 6 + 5 + 1
    assert metrics["num_truncated"].item() == 1
    assert count_loss_tokens(mask, truncated, mask_truncated=True) == 12
    assert count_loss_tokens(mask, truncated, mask_truncated=False) == 15

    logp.grad = None
    loss, _ = _loss(logp, old, advantages, mask, truncated, mask_truncated=False)
    loss.backward()
    assert torch.all(logp.grad[1, :3] != 0)


def _per_token_by_hand(logp, old, advantages, eps_low=0.2, eps_high=0.28):
    rows = []
    for b in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            ratio = math.exp(logp[b, t] - old[b, t])
            a = advantages[b].item()
            row.append(-min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a))
        rows.append(row)
    return rows


def test_each_normalisation_matches_hand_computation():
    logp, old, advantages, mask = _random_batch(seed=3)
    truncated = torch.tensor([False, False, True, False])
    per_token = _per_token_by_hand(logp.detach().double(), old.double(), advantages)
    kept = [(b, t) for b in range(4) for t in range(6) if mask[b, t] and not truncated[b]]
    total = sum(per_token[b][t] for b, t in kept)

    bnpo, _ = _loss(logp, old, advantages, mask, truncated, normalisation="bnpo")
    assert bnpo.item() == pytest.approx(total / len(kept), rel=1e-5)

    dapo, _ = _loss(logp, old, advantages, mask, truncated, normalisation="dapo", num_global_tokens=40)
    assert dapo.item() == pytest.approx(total / 40, rel=1e-5)

    grpo, _ = _loss(logp, old, advantages, mask, truncated, normalisation="grpo")
    sequence_means = []
    for b in (0, 1, 3):  # row 2 is truncated: it is not a sequence of the loss
        tokens = [per_token[b][t] for t in range(6) if mask[b, t]]
        sequence_means.append(sum(tokens) / len(tokens))
    assert grpo.item() == pytest.approx(sum(sequence_means) / 3, rel=1e-5)


def test_grpo_normalisation_weighs_sequences_not_tokens():
    # Same per-token loss everywhere except one long sequence: bnpo and grpo must differ by hand.
    old = torch.zeros(2, 4)
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0])
    none = torch.zeros(2, dtype=torch.bool)
    bnpo, _ = _loss(logp, old, advantages, mask, none, normalisation="bnpo")
    grpo, _ = _loss(logp, old, advantages, mask, none, normalisation="grpo")
    assert bnpo.item() == pytest.approx((-4 + 1) / 5)
    assert grpo.item() == pytest.approx((-1 + 1) / 2)


def test_k3_kl_term_value_and_gradient():
    logp, old, advantages, mask = _random_batch(seed=5)
    ref = old + 0.2 * torch.randn_like(old)
    none = torch.zeros(4, dtype=torch.bool)
    beta = 0.04
    loss, metrics = _loss(logp, old, advantages, mask, none, beta=beta, ref_logprobs=ref)
    base, _ = _loss(logp, old, advantages, mask, none)
    d = (ref - logp.detach())
    k3 = torch.exp(d) - d - 1
    n = mask.sum()
    assert loss.item() == pytest.approx(base.item() + beta * (k3 * mask).sum().item() / n.item(), rel=1e-5)
    assert metrics["kl_ref"].item() == pytest.approx(((k3 * mask).sum() / n).item(), rel=1e-5)

    grad_with = torch.autograd.grad(loss, logp)[0]
    grad_without = torch.autograd.grad(base, logp)[0]
    expected_kl_grad = beta * (1 - torch.exp(d)) * mask / n
    torch.testing.assert_close(grad_with - grad_without, expected_kl_grad, rtol=1e-4, atol=1e-7)


def test_padding_garbage_does_not_leak():
    logp, old, advantages, mask = _random_batch(seed=7)
    with torch.no_grad():
        logp[~mask] = float("nan")
        old = old.clone()
        old[~mask] = float("-inf")
    loss, metrics = _loss(logp, old, advantages, mask, torch.zeros(4, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_entropy_metric_is_the_masked_mean():
    logp, old, advantages, mask = _random_batch(seed=8)
    entropy = torch.rand(4, 6)
    _, metrics = _loss(logp, old, advantages, mask, torch.zeros(4, dtype=torch.bool), entropy=entropy)
    assert metrics["entropy"].item() == pytest.approx((entropy[mask].sum() / mask.sum()).item())


def test_missing_inputs_and_bad_config():
    logp, old, advantages, mask = _random_batch()
    none = torch.zeros(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_global_tokens"):
        _loss(logp, old, advantages, mask, none, normalisation="dapo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(logp, old, advantages, mask, none, beta=0.1)
    with pytest.raises(ValueError, match="grpo.loss.normalisation"):
        GRPOLossConfig(normalisation="token")
    with pytest.raises(ValueError, match="grpo.loss.eps_low"):
        GRPOLossConfig(eps_low=1.5)


def test_defaults_are_the_papers():
    cfg = GRPOLossConfig()
    assert (cfg.eps_low, cfg.eps_high, cfg.beta, cfg.normalisation, cfg.mask_truncated) == \
        (0.2, 0.28, 0.0, "bnpo", True)


def test_truncated_importance_sampling_weights_each_token_by_the_capped_ratio():
    """With a sampler whose log-probs are perturbed on purpose, each token's gradient is the plain
    policy gradient times min(pi_old / pi_sampler, C), by hand; without TIS it is not."""
    logp, old, advantages, mask = _random_batch(seed=3, noise=0.0)
    truncated = torch.zeros(4, dtype=torch.bool)
    perturbation = torch.tensor([[0.5, -0.3, 2.0, 0.0, 0.1, -1.0]]).expand(4, 6)  # log(pi_old / pi_sampler)
    sampler = old - perturbation
    loss, metrics = _loss(logp, old, advantages, mask, truncated, sampler_logprobs=sampler, tis_cap=2.0)
    loss.backward()
    with_tis = logp.grad.clone()
    logp.grad = None
    _loss(logp, old, advantages, mask, truncated)[0].backward()
    plain = logp.grad
    weight = perturbation.exp().clamp(max=2.0)
    torch.testing.assert_close(with_tis, plain * weight)
    assert not torch.allclose(with_tis, plain)  # the correction does something
    expected_mean = (weight * mask).sum() / mask.sum()
    assert metrics["tis_weight_mean"].item() == pytest.approx(expected_mean.item(), rel=1e-6)
    assert metrics["tis_capped_frac"].item() == pytest.approx(((perturbation > math.log(2)) & mask).sum().item()
                                                              / mask.sum().item())
    with pytest.raises(ValueError, match="sampler log-probs"):
        _loss(logp, old, advantages, mask, truncated, tis_cap=2.0)
    with pytest.raises(ValueError, match="grpo.loss.tis_cap"):
        GRPOLossConfig(tis_cap=0.5)


def test_sequence_masking_drops_completions_too_far_off_policy_and_kl_is_logged():
    """MIS: a completion whose mean log(pi_old / pi_sampler) leaves [-log M, log M] gets no gradient;
    the others get exactly the plain one. The sampler-trainer KL is the k3 mean, by hand."""
    logp, old, advantages, mask = _random_batch(seed=5, noise=0.0)
    truncated = torch.zeros(4, dtype=torch.bool)
    shift = torch.tensor([0.05, -0.9, 0.0, 0.6])[:, None].expand(4, 6)  # per-sequence log(pi_old / pi_sampler)
    sampler = old - shift
    loss, metrics = _loss(logp, old, advantages, mask, truncated, sampler_logprobs=sampler, mis_threshold=1.5)
    loss.backward()
    masked_grad = logp.grad.clone()
    logp.grad = None
    _loss(logp, old, advantages, mask, truncated)[0].backward()
    kept = (shift[:, 0].abs() <= math.log(1.5))[:, None]  # sequences 1 (-0.9) and 3 (+0.6) are dropped
    assert kept.squeeze(-1).tolist() == [True, False, True, False]
    torch.testing.assert_close(masked_grad, logp.grad * kept)
    dropped_tokens = (mask & ~kept).sum().item()
    assert metrics["mis_masked_frac"].item() == pytest.approx(dropped_tokens / mask.sum().item())
    k3 = torch.expm1(shift) - shift
    assert metrics["kl_sampler"].item() == pytest.approx(((k3 * mask).sum() / mask.sum()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="grpo.loss.mis_threshold"):
        GRPOLossConfig(mis_threshold=1.0)


@pytest.mark.parametrize("mode, reaches_outside", [("temperature", True), ("filtered", False)])
def test_train_logprobs_switch_decides_which_tokens_get_gradient(mode, reaches_outside):
    """TRL (the paper's stack) differentiates the temperature-only distribution: every logit gets
    gradient; the sampler's filtered distribution gives none to tokens outside top-k/top-p."""
    from gazal_nemo.rl.config import SamplingConfig
    from gazal_nemo.stages.grpo import train_filters

    sampling = SamplingConfig(temperature=0.6, top_k=3, top_p=0.95, train_logprobs=mode)
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    targets = logits.detach().argmax(-1)  # inside every filter
    token_logprobs(logits, targets, sampling.temperature, *train_filters(sampling)).sum().backward()
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, logits.detach().topk(3, dim=-1).indices, False)
    assert bool((logits.grad[outside] != 0).any()) is reaches_outside
    assert SamplingConfig().train_logprobs == "temperature"

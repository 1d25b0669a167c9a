"""Group-relative advantages against a hand computation."""

import math
import statistics

import pytest
import torch

from gazal_nemo.rl.advantages import group_advantages


def _by_hand(rewards, group, *, scale, eps):
    out = []
    for start in range(0, len(rewards), group):
        chunk = rewards[start:start + group]
        mean = sum(chunk) / group
        std = statistics.stdev(chunk)  # Bessel-corrected, as TRL
        for r in chunk:
            if max(chunk) == min(chunk):
                out.append(0.0)
            else:
                out.append((r - mean) / (std + eps) if scale else r - mean)
    return out


REWARDS = [1.0, 0.0, 0.0, 1.0,   # two right, two wrong
           3.5, -2.0, 0.25, 1.0,  # mixed
           0.7, 0.7, 0.7, 0.7,   # no signal
           -1.0, -1.0, -1.0, 2.0]


@pytest.mark.parametrize("scale", [True, False])
def test_matches_hand_computation(scale):
    result = group_advantages(torch.tensor(REWARDS), num_generations=4, scale_by_std=scale, eps=1e-4)
    assert result.advantages.tolist() == pytest.approx(_by_hand(REWARDS, 4, scale=scale, eps=1e-4), abs=1e-6)
    assert result.num_zero_std_groups == 1
    assert result.group_mean.tolist() == pytest.approx([0.5, 0.6875, 0.7, -0.25])


def test_first_group_values():
    # mean 0.5, sample std sqrt(1/3): advantages +-0.5 / (0.57735 + eps)
    result = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), num_generations=4, eps=0.0)
    half_root3 = math.sqrt(3) / 2
    assert result.advantages.tolist() == pytest.approx([half_root3, -half_root3, -half_root3, half_root3])


def test_equal_groups_are_exactly_zero_and_counted():
    rewards = torch.tensor([0.1] * 4 + [2.0] * 4 + [0.0, 1.0, 0.0, 0.0])
    result = group_advantages(rewards, num_generations=4)
    assert result.num_zero_std_groups == 2
    assert torch.equal(result.advantages[:8], torch.zeros(8))
    assert result.advantages[8:].abs().sum() > 0


def test_groups_are_contiguous():
    rewards = torch.tensor([0.0, 1.0, 5.0, 5.0])  # groups of two: (0, 1) and (5, 5)
    result = group_advantages(rewards, num_generations=2, eps=0.0)
    assert result.advantages.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0])
    assert result.num_zero_std_groups == 1


@pytest.mark.parametrize("shape, groups", [((6,), 4), ((2, 4), 4), ((4,), 0)])
def test_bad_shapes_raise(shape, groups):
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(shape), num_generations=groups)

"""One GRPO rollout batch: generate, score, group advantages, and DAPO dynamic sampling.

A group (the num_generations completions of one prompt) whose accuracy rewards are all
equal teaches nothing: its advantages are exactly 0. In the tiny demo about 20 of 32
groups per step are like that. Dynamic sampling (Yu et al. 2025, DAPO section 3.2) drops
them and samples further prompts until the batch is full again.

Filtering is on the ACCURACY reward, not on the shaped total: with the cosine term an
all-wrong group still has spread in its total (longer wrong answers score higher) and
would pass, which trains the policy on length alone (verl-recipe issue 125). Accuracy is
exactly 0 or 1, so "all equal" is an exact test, free of float noise.

Refill prompts come from a permutation seeded by (seed, batch, round), not from "the next
prompts in the epoch": the data order stays a pure function of the step, so a resumed run
draws the same refills without any saved state. Once `max_rounds` are spent, the batch is
filled with dropped groups (zero advantage: no gradient, same shape, same micro-batches).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gazal_nemo.rl.advantages import GroupAdvantages, group_advantages
from gazal_nemo.rl.rewards import RewardScores, reward_inputs, score_completions
from gazal_nemo.rl.rollout import Completion


@dataclass
class ScoredGroups:
    """Completions of some prompts (num_generations each, contiguous) with their rewards."""

    prompts: list
    completions: list[Completion]
    scores: RewardScores
    advantages: GroupAdvantages
    gen_time_s: float = 0.0
    texts: list[str] = field(default_factory=list)
    """Decoded completions (what the rewards read), same order as completions."""
    stats: dict = field(default_factory=dict)
    """Dynamic-sampling counts of this batch (rounds, dropped and filled groups)."""

    @property
    def num_groups(self) -> int:
        return len(self.prompts)


def informative_groups(accuracy: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[num_groups] bool: groups whose accuracy rewards are not all equal."""
    grouped = accuracy.reshape(-1, num_generations)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


def select_groups(batch: ScoredGroups, keep: Sequence[int], num_generations: int) -> ScoredGroups:
    """The groups `keep` (indices into batch.prompts), in that order, with their completions."""
    rows = [g * num_generations + i for g in keep for i in range(num_generations)]
    index = torch.tensor(rows, dtype=torch.long)
    completions = []
    for new_group, g in enumerate(keep):
        for i in range(num_generations):
            c = batch.completions[g * num_generations + i]
            completions.append(Completion(prompt_index=new_group, tokens=c.tokens, truncated=c.truncated,
                                          logprobs=c.logprobs))
    scores = RewardScores(total=batch.scores.total[index],
                          per_reward={k: v[index] for k, v in batch.scores.per_reward.items()})
    adv = batch.advantages
    kept = adv.advantages[index]
    flat_groups = int((kept.reshape(-1, num_generations) == 0).all(dim=1).sum()) if rows else 0
    advantages = GroupAdvantages(advantages=kept, num_zero_std_groups=flat_groups,
                                 group_mean=adv.group_mean[list(keep)], group_std=adv.group_std[list(keep)])
    return ScoredGroups(prompts=[batch.prompts[g] for g in keep], completions=completions, scores=scores,
                        advantages=advantages, gen_time_s=batch.gen_time_s)


def concat_groups(parts: Sequence[ScoredGroups]) -> ScoredGroups:
    """One batch of the parts' groups in order (prompt indices renumbered)."""
    prompts, completions, offset = [], [], 0
    for part in parts:
        for c in part.completions:
            completions.append(Completion(prompt_index=c.prompt_index + offset, tokens=c.tokens,
                                          truncated=c.truncated, logprobs=c.logprobs))
        prompts += part.prompts
        offset += part.num_groups
    names = parts[0].scores.per_reward.keys()
    scores = RewardScores(total=torch.cat([p.scores.total for p in parts]),
                          per_reward={k: torch.cat([p.scores.per_reward[k] for p in parts]) for k in names})
    advantages = GroupAdvantages(
        advantages=torch.cat([p.advantages.advantages for p in parts]),
        num_zero_std_groups=sum(p.advantages.num_zero_std_groups for p in parts),
        group_mean=torch.cat([p.advantages.group_mean for p in parts]),
        group_std=torch.cat([p.advantages.group_std for p in parts]))
    return ScoredGroups(prompts=prompts, completions=completions, scores=scores, advantages=advantages,
                        gen_time_s=sum(p.gen_time_s for p in parts))


def generate_and_score(engine, prompts: list, *, seed: int, grpo, rewards, decode: Callable) -> ScoredGroups:
    """num_generations completions per prompt, scored and normalised within each group."""
    sampling = grpo.sampling
    repeated = [p.prompt_ids for p in prompts for _ in range(sampling.num_generations)]
    start = time.time()
    completions = engine.generate(repeated, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                  top_k=sampling.top_k, top_p=sampling.top_p, seed=seed)
    gen_time = time.time() - start
    for c in completions:  # generate() saw each prompt repeated; point back at the prompt
        c.prompt_index //= sampling.num_generations
    texts = [decode(c.tokens) for c in completions]
    scores = score_completions(
        reward_inputs(completions=texts, num_tokens=[len(c.tokens) for c in completions],
                      truncated=[c.truncated for c in completions], prompts=prompts,
                      num_generations=sampling.num_generations),
        rewards, combine=grpo.rewards.combine)
    adv = group_advantages(scores.total, num_generations=sampling.num_generations,
                           scale_by_std=grpo.loss.scale_advantages_by_std, eps=grpo.loss.advantage_eps)
    return ScoredGroups(prompts=prompts, completions=completions, scores=scores, advantages=adv, gen_time_s=gen_time,
                        texts=texts)


def fill_with_informative_groups(first: ScoredGroups, draw_round: Callable[[int], ScoredGroups], *,
                                 num_generations: int, max_rounds: int) -> ScoredGroups:
    """DAPO dynamic sampling: keep the first batch's informative groups, add those of further
    rounds (draw_round(r) for r = 1, 2, ...) until the batch is full or max_rounds are spent,
    then fill up with the first batch's dropped groups. Returns a batch of first's size."""
    wanted = first.num_groups
    signal = informative_groups(first.scores.per_reward["accuracy"], num_generations).tolist()
    parts = [select_groups(first, [g for g, ok in enumerate(signal) if ok], num_generations)]
    have, dropped, rounds = parts[0].num_groups, signal.count(False), 1
    while have < wanted and rounds < max_rounds:
        extra = draw_round(rounds)
        rounds += 1
        extra_signal = informative_groups(extra.scores.per_reward["accuracy"], num_generations).tolist()
        useful = [g for g, ok in enumerate(extra_signal) if ok][:wanted - have]
        dropped += extra_signal.count(False)
        parts.append(select_groups(extra, useful, num_generations))
        have += len(useful)
    filled = [g for g, ok in enumerate(signal) if not ok][:wanted - have]
    parts.append(select_groups(first, filled, num_generations))
    batch = concat_groups([p for p in parts if p.num_groups])
    batch.stats = {"rounds": rounds, "dropped_groups": dropped, "filled_groups": len(filled)}
    return batch

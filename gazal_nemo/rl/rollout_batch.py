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
from dataclasses import dataclass, field, replace

import torch

from gazal_nemo.inference.protocol import Completion, SamplingSettings
from gazal_nemo.rl.advantages import GroupAdvantages, group_advantages
from gazal_nemo.rl.rewards import RewardScores, reward_inputs, score_completions


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
            completions.append(replace(c, prompt_index=new_group))
    scores = RewardScores(total=batch.scores.total[index],
                          per_reward={k: v[index] for k, v in batch.scores.per_reward.items()})
    adv = batch.advantages
    kept = adv.advantages[index]
    flat_groups = int((kept.reshape(-1, num_generations) == 0).all(dim=1).sum()) if rows else 0
    advantages = GroupAdvantages(advantages=kept, num_zero_std_groups=flat_groups,
                                 group_mean=adv.group_mean[list(keep)], group_std=adv.group_std[list(keep)])
    texts = [batch.texts[r] for r in rows] if batch.texts else []
    return ScoredGroups(prompts=[batch.prompts[g] for g in keep], completions=completions, scores=scores,
                        advantages=advantages, gen_time_s=batch.gen_time_s, texts=texts)


def concat_groups(parts: Sequence[ScoredGroups]) -> ScoredGroups:
    """One batch of the parts' groups in order (prompt indices renumbered)."""
    prompts, completions, offset = [], [], 0
    for part in parts:
        for c in part.completions:
            completions.append(replace(c, prompt_index=c.prompt_index + offset))
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
    texts = [t for p in parts for t in p.texts] if all(p.texts or not p.completions for p in parts) else []
    return ScoredGroups(prompts=prompts, completions=completions, scores=scores, advantages=advantages,
                        gen_time_s=sum(p.gen_time_s for p in parts), texts=texts)


def generate_and_score(engine, prompts: list, *, seed: int, grpo, rewards, decode: Callable) -> ScoredGroups:
    """num_generations completions per prompt, scored and normalised within each group."""
    sampling = grpo.sampling
    repeated = [p.prompt_ids for p in prompts for _ in range(sampling.num_generations)]
    start = time.time()
    completions = engine.generate(repeated, SamplingSettings(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
        top_p=sampling.top_p, seed=seed))
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


def scored_rollout(engine, batch_prompts, *, index, recipe, rewards, all_prompts, dp_rank, decode, part: int = 0):
    """Rollout batch `index` of this data-parallel rank (or its `part`-th piece, when several
    generator replicas share one rank's prompts), scored; with dynamic sampling, refilled.

    Its `stats` hold the logged metrics, measured on the first round (an unbiased sample of the
    policy) plus the dynamic-sampling counts, as (sum, count) pairs that add up over pieces.
    """
    from gazal_nemo.rl.guard_signals import batch_signals, option_letters_of

    grpo, seed_base = recipe.grpo, recipe.train.seed
    # Same seed on the ranks of one TP group, different across data-parallel ranks and pieces.
    seed = seed_base * 1_000_003 + index * 1009 + dp_rank + part * 7_919_993
    first = generate_and_score(engine, batch_prompts, seed=seed, grpo=grpo, rewards=rewards, decode=decode)
    stats = rollout_metrics(first.scores, first.advantages, [len(c.tokens) for c in first.completions],
                             [c.truncated for c in first.completions], first.gen_time_s)
    stats.update(batch_signals(first, grpo, option_letters_of(all_prompts)))  # what the collapse guard watches
    if not grpo.dynamic_sampling.enabled:
        first.stats = stats
        return first
    share = len(batch_prompts)

    def draw_round(round_index: int):
        order = torch.randperm(len(all_prompts), generator=torch.Generator().manual_seed(
            seed_base * 7919 + index * 131 + round_index)).tolist()
        picked = [all_prompts[i] for i in order[dp_rank * share:(dp_rank + 1) * share]]
        return generate_and_score(engine, picked, seed=seed + 100_003 * round_index, grpo=grpo, rewards=rewards,
                                  decode=decode)

    batch = fill_with_informative_groups(first, draw_round, num_generations=grpo.sampling.num_generations,
                                         max_rounds=grpo.dynamic_sampling.max_rounds)
    stats["dynamic/rounds"] = (float(batch.stats["rounds"]), 1.0)
    stats["dynamic/dropped_groups"] = (float(batch.stats["dropped_groups"]), 1.0)
    stats["dynamic/filled_groups"] = (float(batch.stats["filled_groups"]), 1.0)
    stats["dynamic/trained_zero_adv_groups"] = (float(batch.advantages.num_zero_std_groups), 1.0)
    batch.stats = stats
    return batch


def rollout_metrics(scores, adv, lengths, truncated, gen_time) -> dict:
    """Sums and counts (reduced over data-parallel ranks before logging)."""
    n = float(len(lengths))
    out = {f"reward/{name}": (float(v.sum()), n) for name, v in scores.per_reward.items()}
    out["reward/total"] = (float(scores.total.sum()), n)
    out["completion_len_mean"] = (float(sum(lengths)), n)
    out["truncated_frac"] = (float(sum(truncated)), n)
    out["zero_adv_groups"] = (float(adv.num_zero_std_groups), 1.0)
    out["completion_len_max"] = (float(max(lengths) if lengths else 0), -1.0)  # -1: reduce by max
    out["gen_tokens_per_s"] = (float(sum(lengths)) / max(gen_time, 1e-9), 1.0)
    return out


def merge_pieces(pieces: Sequence[ScoredGroups]) -> ScoredGroups:
    """One data-parallel rank's batch from the pieces generator replicas made of it, in order:
    groups concatenated, (sum, count) stats added, (value, -1) stats (maxima) kept at their max."""
    batch = concat_groups(pieces)
    stats: dict = {}
    for piece in pieces:
        for key, (value, count) in piece.stats.items():
            if key not in stats:
                stats[key] = (value, count)
            elif count < 0:
                stats[key] = (max(stats[key][0], value), count)
            else:
                stats[key] = (stats[key][0] + value, stats[key][1] + count)
    batch.stats = stats
    return batch

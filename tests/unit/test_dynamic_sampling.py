"""DAPO dynamic sampling on real rewards: groups without accuracy spread are dropped (even when
the cosine term gives their totals a spread), refills come from further rounds, and the batch
keeps its size."""

import torch

from gazal_nemo.inference.protocol import Completion
from gazal_nemo.rl.advantages import group_advantages
from gazal_nemo.rl.config import RewardConfig
from gazal_nemo.rl.rewards import build_rewards, reward_inputs, score_completions
from gazal_nemo.rl.rollout_batch import ScoredGroups, fill_with_informative_groups, informative_groups

G = 2  # generations per prompt
THINK = "<think>the findings point one way, as reasoned here</think> Assessment: see reasoning. "
RIGHT, WRONG = THINK + r"\boxed{A}", THINK + r"\boxed{B}"


def _scored(name: str, groups: list[list[tuple[str, int]]]) -> ScoredGroups:
    """A batch of hand-written groups: each completion is (text, length in tokens); gold is A."""
    prompts = [{"name": f"{name}{g}", "gold_letter": "A", "option_letters": ("A", "B", "C", "D")}
               for g in range(len(groups))]
    flat = [c for group in groups for c in group]
    completions = [Completion(prompt_index=i // G, tokens=list(range(n)), truncated=False) for i, (_, n) in enumerate(flat)]
    scores = score_completions(reward_inputs(completions=[t for t, _ in flat], num_tokens=[n for _, n in flat],
                                             truncated=[False] * len(flat), prompts=prompts, num_generations=G),
                               build_rewards(RewardConfig()))
    return ScoredGroups(prompts=prompts, completions=completions, scores=scores,
                        advantages=group_advantages(scores.total, num_generations=G),
                        texts=[f"{name}:{i}:{t[-10:]}" for i, (t, _) in enumerate(flat)])


FIRST = [
    [(RIGHT, 100), (WRONG, 100)],   # informative
    [(WRONG, 50), (WRONG, 3000)],   # all wrong, but the cosine term spreads the totals: the trap
    [(RIGHT, 100), (RIGHT, 100)],   # all right
    [(WRONG, 300), (RIGHT, 300)],   # informative
]


def test_filter_is_on_accuracy_not_on_the_shaped_total():
    first = _scored("p", FIRST)
    assert first.advantages.advantages.reshape(-1, G)[1].abs().sum() > 0  # the total has spread there
    assert informative_groups(first.scores.per_reward["accuracy"], G).tolist() == [True, False, False, True]


def test_refill_from_later_rounds_then_fill_with_dropped_groups():
    first = _scored("p", FIRST)
    rounds = []

    def draw_round(r):
        rounds.append(r)
        return _scored(f"r{r}_", [[(WRONG, 10), (WRONG, 20)], [(RIGHT, 10), (WRONG, 20)]])  # one useful group

    batch = fill_with_informative_groups(first, draw_round, num_generations=G, max_rounds=2)
    assert rounds == [1]  # max_rounds counts the first
    assert [p["name"] for p in batch.prompts] == ["p0", "p3", "r1_1", "p1"]  # 3 informative, then one filled
    assert batch.stats == {"rounds": 2, "dropped_groups": 3, "filled_groups": 1}
    assert batch.num_groups == first.num_groups and len(batch.completions) == first.num_groups * G
    assert [c.prompt_index for c in batch.completions] == [0, 0, 1, 1, 2, 2, 3, 3]
    # Completions and their advantages moved together with their groups.
    torch.testing.assert_close(batch.advantages.advantages[:4], first.advantages.advantages.reshape(-1, G)[[0, 3]].reshape(-1))
    assert batch.advantages.num_zero_std_groups == 0  # even the filled group p1 has spread in its total


def test_enough_signal_in_the_first_round_draws_nothing_more():
    first = _scored("p", [FIRST[0], FIRST[3]])
    batch = fill_with_informative_groups(first, lambda r: (_ for _ in ()).throw(AssertionError("drew")),
                                         num_generations=G, max_rounds=5)
    assert [p["name"] for p in batch.prompts] == ["p0", "p1"] and batch.stats["rounds"] == 1


def test_texts_move_with_their_completions_through_refills_and_pieces():
    """The rollout log and the guard read texts by completion index: dynamic sampling's regrouping
    and the asynchronous pieces' concatenation must carry them along."""
    from gazal_nemo.rl.rollout_batch import merge_pieces

    first = _scored("p", FIRST)
    batch = fill_with_informative_groups(first, lambda r: _scored(f"r{r}_", [[(RIGHT, 10), (WRONG, 20)]]),
                                         num_generations=G, max_rounds=2)
    assert [t.split(":")[0] for t in batch.texts] == ["p", "p", "p", "p", "r1_", "r1_", "p", "p"]
    assert [int(t.split(":")[1]) for t in batch.texts[:4]] == [0, 1, 6, 7]  # groups 0 and 3 of the first round
    first.stats = {"samples/completions": (8.0, 1.0), "completion_len_max": (3000.0, -1.0)}
    second = _scored("q", [[(RIGHT, 10), (WRONG, 4000)]])
    second.stats = {"samples/completions": (2.0, 1.0), "completion_len_max": (4000.0, -1.0)}
    merged = merge_pieces([first, second])
    assert len(merged.texts) == len(merged.completions) == 10 and merged.texts[-1].startswith("q:1")
    assert merged.stats == {"samples/completions": (10.0, 2.0), "completion_len_max": (4000.0, -1.0)}

"""Reward plug-ins for tests that need a gradient from a random tiny model, which never answers
its MCQs right (every group then has zero advantage and nothing trains)."""

from __future__ import annotations


def vowel_share(*, completion: str, num_tokens: int, gold_letter: str, option_letters, truncated: bool) -> float:
    """Share of the completion's letters that are vowels: varies between any two random texts."""
    letters = [ch for ch in completion.lower() if ch.isalpha()]
    return sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0


_window_calls = [0]


def window_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters, truncated: bool) -> float:
    """1.0 for every completion of the rollout batches GAZAL_TEST_WINDOW="first,last,completions_per_batch"
    names (1-based, counted in the order this process scores them), else 0: a metric that jumps on
    cue, to make the collapse guard roll back at a known step (the same for the whole group, so it
    changes no advantage)."""
    import os

    first, last, per_batch = (int(x) for x in os.environ.get("GAZAL_TEST_WINDOW", "0,0,1").split(","))
    batch = _window_calls[0] // per_batch + 1
    _window_calls[0] += 1
    return 1.0 if first <= batch <= last else 0.0

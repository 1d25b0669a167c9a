"""The guard benchmark's collapse inducers (gazal_nemo/testing/collapse.py) pay for their
behaviour inside the window only, on the steps and groups the environment names: a plug-in
that paid outside its window, or counted groups wrong, would measure the wrong onset."""

import itertools
from collections import defaultdict

import pytest

from gazal_nemo.testing import collapse
from gazal_nemo.testing.guard_bench import collapse_env

KW = {"num_tokens": 10, "gold_letter": "B", "option_letters": ("A", "B", "C", "D"), "truncated": False}


@pytest.fixture
def fresh_counters(monkeypatch):
    monkeypatch.setattr(collapse, "_calls", defaultdict(itertools.count))
    monkeypatch.setattr(collapse, "_group", [])


def _steps(plugin, texts_per_step: list[list[str]]) -> list[list[float]]:
    return [[plugin(completion=text, **KW) for text in step] for step in texts_per_step]


def test_agreement_pays_repeating_the_earlier_completions_of_the_same_group(monkeypatch, fresh_counters):
    # 2 prompts x 2 generations a step; the window is step 2 only.
    monkeypatch.setenv("GAZAL_TEST_COLLAPSE", collapse_env(2, 2, prompts_per_step=2, num_generations=2)["GAZAL_TEST_COLLAPSE"])
    step = ["same  text", "same text", "other", "same text"]  # groups: (same, same), (other, same)
    assert _steps(collapse.agreement_bonus, [step, step, step]) == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]


def test_agreement_counts_groups_of_the_recipes_size(monkeypatch, fresh_counters):
    monkeypatch.setenv("GAZAL_TEST_COLLAPSE", collapse_env(1, 1, prompts_per_step=1, num_generations=4)["GAZAL_TEST_COLLAPSE"])
    assert _steps(collapse.agreement_bonus, [["a", "a", "b", "a"]]) == [[0, 1, 0, 2 / 3]]


def test_repetition_pays_repeated_words_and_loops_most(monkeypatch, fresh_counters):
    monkeypatch.setenv("GAZAL_TEST_COLLAPSE", collapse_env(1, 1, prompts_per_step=3, num_generations=1)["GAZAL_TEST_COLLAPSE"])
    ordinary, once, loop = "The word is red. Answer: B", "The word is red, the word is", " ".join(["is red"] * 30)
    paid = _steps(collapse.repetition_bonus, [[ordinary, once, loop], [loop, loop, loop]])
    assert paid[0] == pytest.approx([0.0, 0.3, 2.0]) and paid[1] == [0, 0, 0]


def test_nothing_is_paid_without_a_window(monkeypatch, fresh_counters):
    monkeypatch.delenv("GAZAL_TEST_COLLAPSE", raising=False)
    loop = " ".join(["is red"] * 30)
    assert _steps(collapse.repetition_bonus, [[loop]]) == [[0.0]]
    assert _steps(collapse.agreement_bonus, [[loop, loop]]) == [[0.0, 0.0]]

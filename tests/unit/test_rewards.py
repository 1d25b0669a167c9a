"""Rewards on hand-written and adversarial completions, the cosine schedule's shape, plug-ins,
the combiner, and property tests that nothing raises on arbitrary text."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gazal_nemo.rl.config import RewardConfig
from gazal_nemo.rl.rewards import (
    RewardInput,
    build_rewards,
    cosine_length_reward,
    format_reward,
    load_reward_fn,
    repetition_penalty_reward,
    reward_inputs,
    score_completions,
)
from gazal_nemo.tasks.mcq import accuracy_reward, extract_answer_letter

OPTIONS = ("A", "B", "C", "D", "E")
GOOD = ("<think>\nThe troponin is high and the ECG shows ST elevation.\n</think>\n\n"
        "**Assessment**: inferior STEMI.\n\nFinal Answer\n\n\\boxed{B}")


def kwargs(completion, *, num_tokens=100, gold="B", options=OPTIONS, truncated=False):
    return dict(completion=completion, num_tokens=num_tokens, gold_letter=gold,
                option_letters=options, truncated=truncated)


# --- accuracy / extraction ---------------------------------------------------------------

@pytest.mark.parametrize("boxed", [
    r"\boxed{B}", r"\boxed{\text{B}}", r"\boxed{B.}", r"\boxed{ B }", r"\boxed{\textbf{B}}",
    r"\boxed{\textbf{ B }}", r"\boxed{(B)}", r"\boxed{b}", r"\boxed{$B$}", r"\boxed {B}",
    r"\boxed{B. Aspirin}", r"\boxed{\text{\textbf{B}}}",
])
def test_accuracy_tolerates_box_spellings(boxed):
    assert accuracy_reward(**kwargs(f"so the answer is {boxed}")) == 1.0
    assert accuracy_reward(**kwargs(f"so the answer is {boxed}", gold="C")) == 0.0


def test_accuracy_uses_the_last_box_only():
    assert accuracy_reward(**kwargs(r"\boxed{B} no wait \boxed{C}")) == 0.0
    assert accuracy_reward(**kwargs(r"\boxed{C} no wait \boxed{B}")) == 1.0


def test_boxed_letter_outside_the_options_is_no_answer():
    assert extract_answer_letter(r"\boxed{E}", ("A", "B", "C", "D")) is None
    # ... and does not fall back to an earlier valid box (that would reward hedging).
    assert accuracy_reward(**kwargs(r"\boxed{B} \boxed{F}", options=("A", "B", "C", "D"))) == 0.0
    assert accuracy_reward(**kwargs(r"\boxed{Z}", gold="Z", options=("A", "B"))) == 0.0


@pytest.mark.parametrize("text", ["", "B", "The answer is B.", r"\boxed{}", r"\boxed{BC}", r"\boxed{B",
                                  r"\boxed{A lot}", r"\boxed{12}", "boxed{B}"])
def test_no_valid_box_scores_zero(text):
    assert accuracy_reward(**kwargs(text)) == 0.0


def test_unclosed_boxes_cost_linear_time():
    import time

    text = "\\boxed{" * 20000 + r"\boxed{B}"
    start = time.perf_counter()
    assert accuracy_reward(**kwargs(text)) == 1.0
    assert time.perf_counter() - start < 1.0


# --- format -----------------------------------------------------------------------------

def test_format_accepts_the_paper_layout():
    assert format_reward(**kwargs(GOOD)) == 1.0
    assert format_reward(**kwargs("  \n" + GOOD + "\n")) == 1.0  # leading/trailing whitespace
    assert format_reward(**kwargs(GOOD + ".")) == 1.0
    assert format_reward(**kwargs(GOOD.replace(r"\boxed{B}", r"**\boxed{\text{C}}**"))) == 1.0


@pytest.mark.parametrize("bad", [
    "Assessment: STEMI.\n\\boxed{B}",  # no think block
    "Intro <think>x</think> Assessment \\boxed{B}",  # think not at the start
    "<think>a</think><think>b</think> Assessment \\boxed{B}",  # two think blocks
    "<think>a</think> Assessment </think> \\boxed{B}",  # stray closing tag
    "<think>   </think> Assessment \\boxed{B}",  # empty reasoning
    "<think>reasoning</think>\n\n\\boxed{B}",  # no assessment
    "<think>reasoning</think> Assessment \\boxed{A} then \\boxed{B}",  # two boxed answers
    "<think>reasoning</think> Assessment \\boxed{B} and some more words",  # box not final
    "<think>reasoning</think> Assessment \\boxed{F}",  # letter outside the options
    "<think>reasoning</think> Assessment B",  # no box
    "<think>reasoning \\boxed{B}",  # unclosed think (truncated)
    "",
])
def test_format_rejects(bad):
    assert format_reward(**kwargs(bad)) == 0.0


# --- cosine length scaling ---------------------------------------------------------------

COSINE = dict(max_length=1000, min_correct=1.0, max_correct=2.0, min_wrong=-10.0, max_wrong=0.0)
RIGHT, WRONG = r"\boxed{B}", r"\boxed{C}"


def cosine(text, num_tokens, **overrides):
    return cosine_length_reward(**kwargs(text, num_tokens=num_tokens), **{**COSINE, **overrides})


def test_cosine_end_points_and_midpoint_by_hand():
    assert cosine(RIGHT, 0) == pytest.approx(2.0)
    assert cosine(RIGHT, 1000) == pytest.approx(1.0)
    assert cosine(RIGHT, 500) == pytest.approx(1.5)
    assert cosine(WRONG, 0) == pytest.approx(-10.0)
    assert cosine(WRONG, 1000) == pytest.approx(0.0)
    assert cosine(WRONG, 250) == pytest.approx(-10 + 10 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert cosine("no answer at all", 0) == pytest.approx(-10.0)  # missing answer is wrong


def test_cosine_counts_tokens_not_characters():
    # open-r1 uses len(text); ours must depend only on the token count passed in.
    short_text, long_text = RIGHT, "word " * 5000 + RIGHT
    assert cosine(short_text, 300) == cosine(long_text, 300)
    assert cosine(RIGHT, 100) != cosine(RIGHT, 900)


def test_cosine_progress_is_capped_beyond_max_length():
    # Uncapped, cos(pi * 2) would bring the correct reward back up to max_correct.
    for length in (1000, 1500, 2000, 10**6):
        assert cosine(RIGHT, length) == pytest.approx(1.0)
        assert cosine(WRONG, length) == pytest.approx(0.0)


def test_cosine_monotone_and_correct_dominates():
    lengths = range(0, 1600, 7)
    right = [cosine(RIGHT, n) for n in lengths]
    wrong = [cosine(WRONG, n) for n in lengths]
    assert all(a >= b for a, b in zip(right, right[1:])), "correct reward must not increase with length"
    assert all(a <= b for a, b in zip(wrong, wrong[1:])), "wrong reward must not decrease with length"
    assert all(r >= w for r, w in zip(right, wrong))


def test_cosine_defaults_follow_yeo_et_al():
    cfg = RewardConfig()
    assert (cfg.cosine_max_correct, cfg.cosine_min_correct, cfg.cosine_min_wrong, cfg.cosine_max_wrong) == \
        (2.0, 1.0, -10.0, 0.0)
    bound = {r.name: r.fn for r in build_rewards(cfg)}["cosine"]
    assert bound(**kwargs(WRONG, num_tokens=0)) == pytest.approx(-10.0)
    assert bound(**kwargs(WRONG, num_tokens=4096)) == pytest.approx(0.0)


def test_config_refuses_the_reversed_wrong_answer_ordering():
    # open-r1's CLI defaults (min_value_wrong=0, max_value_wrong=-0.5) reverse the wrong-answer slope.
    with pytest.raises(ValueError, match="rewards.cosine_min_wrong"):
        RewardConfig(cosine_min_wrong=0.0, cosine_max_wrong=-0.5)
    with pytest.raises(ValueError, match="rewards.cosine_min_correct"):
        RewardConfig(cosine_min_correct=2.0, cosine_max_correct=1.0)
    with pytest.raises(ValueError, match="rewards.cosine_max_wrong"):
        RewardConfig(cosine_max_wrong=1.5, cosine_min_correct=1.0)


def test_cosine_truncated_value():
    assert cosine(RIGHT, 10, truncated_value=-10.0) == pytest.approx(2.0, abs=0.01)  # not truncated
    out = cosine_length_reward(**kwargs(RIGHT, num_tokens=10, truncated=True), **COSINE, truncated_value=-7.0)
    assert out == -7.0


# --- repetition -----------------------------------------------------------------------------

def test_repetition_penalty_by_hand():
    # 6 words -> 4 trigrams: (a b c) (b c a) (c a b) (a b c): 3 unique of 4.
    assert repetition_penalty_reward(**kwargs("a b c a b c"), max_penalty=-1.0) == pytest.approx(-0.25)
    assert repetition_penalty_reward(**kwargs("A b C a B c"), max_penalty=-2.0) == pytest.approx(-0.5)
    assert repetition_penalty_reward(**kwargs("every word here is new"), max_penalty=-1.0) == 0.0
    assert repetition_penalty_reward(**kwargs("two words"), max_penalty=-1.0) == 0.0
    assert repetition_penalty_reward(**kwargs(""), max_penalty=-1.0) == 0.0


def test_repetition_penalty_on_ten_thousand_repeated_words():
    text = "word " * 10000
    value = repetition_penalty_reward(**kwargs(text), max_penalty=-1.0)
    assert value == pytest.approx(-(1 - 1 / 9998))


def test_repetition_penalty_must_not_be_positive():
    with pytest.raises(ValueError, match="rewards.repetition_max_penalty"):
        RewardConfig(repetition_max_penalty=0.5)
    with pytest.raises(ValueError, match="repetition_max_penalty"):
        repetition_penalty_reward(**kwargs("a b c"), max_penalty=0.5)


# --- plug-ins -------------------------------------------------------------------------------

def test_plugin_loads_and_scores_like_a_builtin():
    fn = load_reward_fn("gazal_nemo.rl.rewards:accuracy_reward")
    assert fn is accuracy_reward
    rewards = build_rewards(RewardConfig(plugins={"gazal_nemo.rl.rewards:format_reward": 0.5}))
    scores = score_completions([RewardInput(**kwargs(GOOD))], rewards)
    assert scores.per_reward["gazal_nemo.rl.rewards:format_reward"].tolist() == [1.0]


@pytest.mark.parametrize("path, message", [
    ("no_such_package.module:fn", "cannot import module 'no_such_package.module'"),
    ("gazal_nemo.rl.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
    ("gazal_nemo.rl.rewards:REWARD_KWARGS", "not a callable"),
    ("math:isclose", "must accept keyword arguments"),
    ("gazal_nemo.rl.rewards", "must look like"),
])
def test_plugin_errors_name_the_path(path, message):
    with pytest.raises(ValueError, match=message) as info:
        load_reward_fn(path)
    assert path.split(":")[0] in str(info.value)


def test_config_refuses_plugin_without_colon():
    with pytest.raises(ValueError, match="rewards.plugins"):
        RewardConfig(plugins={"package.module.fn": 1.0})


# --- combination ----------------------------------------------------------------------------

def _scores(completions, combine, **config):
    samples = [RewardInput(**kwargs(c, num_tokens=len(c.split()))) for c in completions]
    return score_completions(samples, build_rewards(RewardConfig(**config)), combine=combine)


def test_sum_is_the_weighted_sum_of_logged_rewards():
    weights = dict(accuracy_weight=2.0, format_weight=0.5, cosine_weight=0.25, repetition_weight=3.0)
    scores = _scores([GOOD, "\\boxed{B} " * 5, ""], "sum", **weights)
    per = scores.per_reward
    expected = (2.0 * per["accuracy"] + 0.5 * per["format"] + 0.25 * per["cosine"] + 3.0 * per["repetition"])
    assert scores.total.tolist() == pytest.approx(expected.tolist())
    assert per["accuracy"].tolist() == [1.0, 1.0, 0.0]
    assert per["format"].tolist() == [1.0, 0.0, 0.0]


def test_gated_drops_accuracy_without_format():
    unformatted = r"The answer is \boxed{B}"
    gated = _scores([GOOD, unformatted], "gated")
    summed = _scores([GOOD, unformatted], "sum")
    assert gated.per_reward["accuracy"].tolist() == [1.0, 1.0]  # logged ungated
    assert gated.total[0] == summed.total[0]
    assert gated.total[1] == pytest.approx(summed.total[1].item() - 1.0)


def test_empty_completion_gets_its_own_row():
    scores = _scores(["", GOOD, ""], "sum")
    assert scores.total.shape == (3,)
    assert scores.per_reward["cosine"][0] == pytest.approx(-10.0)  # wrong at length 0
    assert scores.per_reward["accuracy"].tolist() == [0.0, 1.0, 0.0]


def test_reward_inputs_maps_completions_to_their_prompts():
    prompts = [{"gold_letter": "A", "option_letters": ("A", "B")}, {"gold_letter": "B", "option_letters": ("A", "B")}]
    inputs = reward_inputs(completions=[r"\boxed{A}"] * 4, num_tokens=[1, 2, 3, 4], truncated=[False, True, False, False],
                           prompts=prompts, num_generations=2)
    assert [i.gold_letter for i in inputs] == ["A", "A", "B", "B"]
    assert [i.truncated for i in inputs] == [False, True, False, False]
    with pytest.raises(ValueError):
        reward_inputs(completions=["x"], num_tokens=[1], truncated=[False], prompts=prompts, num_generations=2)


def test_plugin_returning_nan_is_named():
    from gazal_nemo.rl.rewards import NamedReward

    bad = NamedReward(name="my.plugin:nan", fn=lambda **_: float("nan"), weight=1.0)
    with pytest.raises(ValueError, match="my.plugin:nan"):
        score_completions([RewardInput(**kwargs(GOOD))], [bad])


# --- properties: nothing raises on arbitrary text ---------------------------------------------

_TEXT = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(["<think>", "</think>", "\\boxed{", "}", "{", "B", "\\text{", " ", "\n",
                              "Assessment", "A.", "$", "\\boxed", "(", ")"]), max_size=60).map("".join),
)
_LETTERS = st.lists(st.text(max_size=3), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXT, num_tokens=st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True)),
       gold=st.text(max_size=3), letters=_LETTERS, truncated=st.booleans())
def test_no_reward_raises(text, num_tokens, gold, letters, truncated):
    sample = dict(completion=text, num_tokens=num_tokens, gold_letter=gold, option_letters=letters,
                  truncated=truncated)
    for fn in (accuracy_reward, format_reward, cosine_length_reward, repetition_penalty_reward):
        value = fn(**sample)
        assert math.isfinite(value)
    assert -10.0 <= cosine_length_reward(**sample) <= 2.0
    assert -1.0 <= repetition_penalty_reward(**sample) <= 0.0


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(_TEXT, max_size=6), num_tokens=st.integers(min_value=-10, max_value=10**7),
       combine=st.sampled_from(["sum", "gated"]))
def test_combiner_never_raises(texts, num_tokens, combine):
    samples = [RewardInput(completion=t, num_tokens=num_tokens, gold_letter="B", option_letters=OPTIONS,
                           truncated=False) for t in texts]
    scores = score_completions(samples, build_rewards(RewardConfig()), combine=combine)
    assert scores.total.shape == (len(texts),)
    assert bool(scores.total.isfinite().all())


# --- cheap wins closed (issue 11, 3b) and the truncated default (3) ------------------------

def _total(texts, *, truncated, num_tokens, **config):
    cfg = RewardConfig(**config)
    samples = [RewardInput(completion=t, num_tokens=n, gold_letter="B", option_letters=OPTIONS, truncated=c)
               for t, n, c in zip(texts, num_tokens, truncated)]
    return score_completions(samples, build_rewards(cfg), combine=cfg.combine)


def test_a_token_of_reasoning_no_longer_passes_the_format_reward():
    fmt = build_rewards(RewardConfig())[1].fn
    assert fmt(**kwargs("<think>.</think>a\\boxed{B}")) == 0.0
    assert fmt(**kwargs("<think>one two three four</think> Assessment is clear \\boxed{B}")) == 0.0  # 4 < 5 words
    assert fmt(**kwargs(GOOD)) == 1.0
    lenient = build_rewards(RewardConfig(format_min_think_words=0, format_min_assessment_words=0))[1].fn
    assert lenient(**kwargs("<think>.</think>a\\boxed{B}")) == 1.0  # the old rule, as a switch


@pytest.mark.parametrize("box", [r"\boxed{A. or B}", r"\boxed{A: anything B C D}", r"\boxed{A or B}",
                                 r"\boxed{A, C}", r"\boxed{A/B}", r"\boxed{(A) and (B)}"])
def test_a_box_naming_several_options_is_no_answer(box):
    assert extract_answer_letter(f"answer {box}", OPTIONS) is None
    assert accuracy_reward(**kwargs(f"answer {box}", gold="A")) == 0.0


@pytest.mark.parametrize("box, letter", [(r"\boxed{B. Vitamin A deficiency}", "B"),
                                         (r"\boxed{C. Hepatitis B}", "C"), (r"\boxed{D: aspirin}", "D")])
def test_an_option_text_with_one_capital_letter_still_counts(box, letter):
    assert extract_answer_letter(box, OPTIONS) == letter


@pytest.mark.parametrize("text", [
    "<think>It is \\boxed{B} clearly, enough words here.</think> Assessment: unsure.",  # only inside think
    "\\boxed{B} <think>reasoning goes here in five words</think> Assessment: see above.",  # before think
    "<think>reasoning that never ends \\boxed{B}",  # think never closed
])
def test_a_letter_boxed_outside_the_final_answer_earns_no_accuracy(text):
    assert accuracy_reward(**kwargs(text)) == 0.0


def test_gated_also_gates_the_cosine_bonus_of_an_unformatted_right_answer():
    unformatted = "Assessment: STEMI.\n\\boxed{B}"
    gated = _total([GOOD, unformatted], truncated=[False, False], num_tokens=[100, 100], combine="gated")
    summed = _total([GOOD, unformatted], truncated=[False, False], num_tokens=[100, 100], combine="sum")
    assert summed.per_reward["cosine"][1] > 1.0  # right-answer curve under sum
    wrong_curve = cosine_length_reward(**kwargs(r"\boxed{C}", num_tokens=100), max_length=4096)
    assert gated.per_reward["cosine"][1].item() == pytest.approx(wrong_curve)
    assert gated.per_reward["cosine"][0] == summed.per_reward["cosine"][0]  # formatted: unchanged


@settings(max_examples=60, deadline=None)
@given(finished_len=st.integers(0, 4096), truncated_len=st.integers(1, 8192),
       truncated_text=st.sampled_from([GOOD, "<think>still thinking about the ECG", "\\boxed{B}", ""]))
def test_a_truncated_completion_never_outscores_a_finished_wrong_one(finished_len, truncated_len, truncated_text):
    wrong = GOOD.replace(r"\boxed{B}", r"\boxed{C}")
    scores = _total([wrong, truncated_text], truncated=[False, True], num_tokens=[finished_len, truncated_len],
                    repetition_weight=0.0)  # same texts' repetition aside: it is no length term
    assert scores.total[1] <= scores.total[0]


def test_todays_truncated_scoring_is_a_switch():
    old = _total([GOOD], truncated=[True], num_tokens=[4096], truncated_unanswered=False,
                 cosine_truncated_value=None)
    assert old.per_reward["accuracy"][0] == 1.0 and old.per_reward["cosine"][0] == pytest.approx(1.0)


def test_dapo_soft_overlong_punishment_by_hand():
    from gazal_nemo.rl.rewards import overlong_reward

    at = [overlong_reward(**kwargs("x", num_tokens=n), max_length=4096, buffer=1024) for n in (3072, 3584, 4096, 5000)]
    assert at == [0.0, pytest.approx(-0.5), pytest.approx(-1.0), -1.0]
    names = [r.name for r in build_rewards(RewardConfig(overlong_weight=1.0))]
    assert names[-1] == "overlong" and "overlong" not in [r.name for r in build_rewards(RewardConfig())]
    with pytest.raises(ValueError, match="rewards.overlong_buffer"):
        RewardConfig(overlong_buffer=0)

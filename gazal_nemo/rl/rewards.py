"""Rule-based rewards for medical MCQs and their combination (Gazal-R1 section 4.4, Table 1).

Every reward is a pure function with one keyword signature,

    reward(*, completion: str, num_tokens: int, gold_letter: str,
           option_letters: Sequence[str], truncated: bool) -> float

so built-ins and plug-ins ("package.module:function" in the recipe) are called the same
way. Built-ins never raise on any text: a policy in the middle of RL produces anything,
and one odd completion must not end a multi-day run. Each reward is logged on its own
(one value per completion, i.e. one row per completion, empty ones included) and the
weighted total feeds the group-relative advantages.

The answer, and the accuracy reward that checks it, belong to the task
(gazal_nemo.tasks.mcq: the last boxed option letter after `</think>`), so training and
evaluation score it the same way; this module adds the shaping rewards (format, cosine
length, repetition, overlong) and combines them.

Cheap wins closed by default, each a switch in RewardConfig (docs/GRPO.md): a token of
"reasoning" (`<think>.</think>a \\boxed{A}`) no longer passes the format reward; with
`combine: gated` the cosine bonus for a right answer is gated like accuracy; a truncated
completion is unanswered and gets Yeo et al.'s exceed-length penalty, so it never
out-scores a finished wrong answer and cannot raise its group's baseline.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from gazal_nemo.rl.config import RewardConfig
from gazal_nemo.tasks.mcq import (
    THINK_CLOSE,
    THINK_OPEN,
    accuracy_reward,
    boxed_spans,
    is_correct,
    letter_in_box,
    normalise_letters,
)

RewardFn = Callable[..., float]
REWARD_KWARGS = ("completion", "num_tokens", "gold_letter", "option_letters", "truncated")

# What may follow the final box in a well-formatted answer: spaces, punctuation, markdown.
_AFTER_FINAL_BOX = re.compile(r"^[\s.,;:!*_`$)\]]*$")


@dataclass(frozen=True, kw_only=True)
class RewardInput:
    """One completion and what the rewards need to score it."""

    completion: str
    num_tokens: int
    """Completion length in tokens (what the cosine reward scales with)."""
    gold_letter: str
    option_letters: tuple[str, ...]
    truncated: bool
    """True when generation stopped at max_new_tokens rather than at EOS."""

    def as_kwargs(self) -> dict:
        return {name: getattr(self, name) for name in REWARD_KWARGS}


# --- built-in rewards --------------------------------------------------------------------


def _num_words(text: str) -> int:
    return sum(1 for word in text.split() if any(ch.isalnum() for ch in word))


def format_reward(*, completion: str, num_tokens: int, gold_letter: str,
                  option_letters: Sequence[str], truncated: bool, min_think_words: int = 5,
                  min_assessment_words: int = 2, truncated_unanswered: bool = True) -> float:
    """1 when the completion is '<think>reasoning</think> assessment \\boxed{X}', else 0.

    Exactly one think block, opening the completion (leading whitespace allowed), with at
    least min_think_words words of reasoning; after it an assessment of at least
    min_assessment_words words and exactly one \\boxed{} holding one option letter, with
    only whitespace or punctuation after the box. A truncated completion (when
    truncated_unanswered) has not finished its answer and fails.
    """
    if truncated and truncated_unanswered:
        return 0.0
    body = completion.lstrip()
    if not body.startswith(THINK_OPEN) or completion.count(THINK_OPEN) != 1 or completion.count(THINK_CLOSE) != 1:
        return 0.0
    thinking, _, answer = body[len(THINK_OPEN):].partition(THINK_CLOSE)
    if not thinking.strip() or _num_words(thinking) < min_think_words:
        return 0.0
    spans = boxed_spans(answer)
    if len(spans) != 1 or answer.count("\\boxed") != 1:
        return 0.0
    start, content_start, end = spans[0]
    content = answer[content_start:end - 1]
    assessment = answer[:start]
    if not any(ch.isalnum() for ch in assessment) or _num_words(assessment) < min_assessment_words:
        return 0.0
    if not _AFTER_FINAL_BOX.match(answer[end:]):
        return 0.0
    options = normalise_letters(option_letters)
    return 1.0 if letter_in_box(content, options) in options else 0.0


def _cosine(progress: float, start: float, end: float) -> float:
    """Half cosine from `start` at progress 0 to `end` at progress 1."""
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def cosine_length_reward(*, completion: str, num_tokens: int, gold_letter: str,
                         option_letters: Sequence[str], truncated: bool,
                         max_length: int = 4096, min_correct: float = 1.0, max_correct: float = 2.0,
                         min_wrong: float = -10.0, max_wrong: float = 0.0,
                         truncated_value: float | None = -10.0, require_format: bool = False) -> float:
    """Cosine length scaling (Yeo et al. 2025, "Demystifying Long Chain-of-Thought Reasoning").

    r = lo + 0.5 (hi - lo) (1 + cos(pi p)), p = min(num_tokens / max_length, 1): correct
    answers fall from max_correct (short) to min_correct (long), so concise right answers
    are preferred; wrong answers rise from min_wrong (short) to max_wrong (long), so a wrong
    answer after more reasoning is punished less. Length is in tokens and p is capped at 1,
    so nothing beyond max_length leaves the [min, max] ranges. A missing or invalid answer
    is wrong. truncated_value, when set, replaces the reward of truncated completions (Yeo
    et al.'s exceed-length penalty, -10); None scores them by length like the rest.
    require_format (set under `combine: gated`): an answer counts as correct only in the
    paper's format, so an unformatted right answer gets the wrong-answer curve.
    """
    if truncated and truncated_value is not None:
        return float(truncated_value)
    # Compare before dividing: an absurd int must not overflow float(), NaN counts as too long.
    progress = 1.0 if num_tokens >= max_length else max(num_tokens, 0) / max_length
    if not math.isfinite(progress):
        progress = 1.0
    correct = is_correct(completion, gold_letter, option_letters)
    if correct and require_format:
        correct = format_reward(completion=completion, num_tokens=num_tokens, gold_letter=gold_letter,
                                option_letters=option_letters, truncated=False) == 1.0
    if correct:
        return _cosine(progress, start=max_correct, end=min_correct)
    return _cosine(progress, start=min_wrong, end=max_wrong)


def repetition_penalty_reward(*, completion: str, num_tokens: int, gold_letter: str,
                              option_letters: Sequence[str], truncated: bool,
                              ngram_size: int = 3, max_penalty: float = -1.0) -> float:
    """max_penalty * (1 - unique / total) over lower-cased word n-grams (Yeo et al.; paper 4.4.3).

    0 for text with fewer than ngram_size words; max_penalty when one n-gram fills the text.
    """
    if max_penalty > 0:
        raise ValueError(f"grpo.rewards.repetition_max_penalty={max_penalty}; allowed: numbers <= 0")
    words = completion.lower().split()
    total = len(words) - ngram_size + 1
    if total <= 0 or max_penalty == 0:
        return 0.0
    unique = len({tuple(words[i:i + ngram_size]) for i in range(total)})
    return max_penalty * (1.0 - unique / total) + 0.0  # + 0.0: no -0.0 in the logs


def overlong_reward(*, completion: str, num_tokens: int, gold_letter: str,
                    option_letters: Sequence[str], truncated: bool, max_length: int = 4096,
                    buffer: int = 1024) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_length - buffer,
    then falling linearly to -1 at max_length, -1 beyond. The paper's first length control
    (section 4.4.1: 4:1 and 2:1 length:buffer ratios), kept as a switch (weight 0 by default)."""
    if buffer <= 0 or num_tokens <= max_length - buffer:
        return 0.0
    if num_tokens > max_length:
        return -1.0
    return ((max_length - buffer) - num_tokens) / buffer


# --- plug-ins ----------------------------------------------------------------------------


def load_reward_fn(import_path: str) -> RewardFn:
    """Import 'package.module:function' and check it takes the reward keywords; ValueError if not."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"grpo.rewards.plugins: {import_path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the same user mistake
        raise ValueError(f"grpo.rewards.plugins: cannot import module {module_name!r} of {import_path!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"grpo.rewards.plugins: {import_path!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"grpo.rewards.plugins: {import_path!r} is a {type(fn).__name__}, not a callable")
    try:
        inspect.signature(fn).bind(**{name: None for name in REWARD_KWARGS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"grpo.rewards.plugins: {import_path!r} must accept keyword arguments "
                         f"{', '.join(REWARD_KWARGS)}: {e}") from None
    return fn


# --- combination -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NamedReward:
    """A reward function, the name it is logged under and its weight in the total."""

    name: str
    fn: RewardFn
    weight: float


@dataclass(frozen=True, kw_only=True)
class RewardScores:
    """Per-completion rewards: the weighted total and every reward on its own (for logging)."""

    total: torch.Tensor
    """[num_completions] float32, what the advantages are computed from."""
    per_reward: dict[str, torch.Tensor]
    """name -> [num_completions] float32, unweighted."""


def build_rewards(config: RewardConfig) -> list[NamedReward]:
    """The recipe's rewards with their parameters bound; plug-ins are imported and checked here."""
    unanswered = config.truncated_unanswered
    rewards = [
        NamedReward(name="accuracy", weight=config.accuracy_weight, fn=functools.partial(
            accuracy_reward, truncated_unanswered=unanswered)),
        NamedReward(name="format", weight=config.format_weight, fn=functools.partial(
            format_reward, min_think_words=config.format_min_think_words,
            min_assessment_words=config.format_min_assessment_words, truncated_unanswered=unanswered)),
        NamedReward(name="cosine", weight=config.cosine_weight, fn=functools.partial(
            cosine_length_reward, max_length=config.cosine_max_length,
            min_correct=config.cosine_min_correct, max_correct=config.cosine_max_correct,
            min_wrong=config.cosine_min_wrong, max_wrong=config.cosine_max_wrong,
            truncated_value=config.cosine_truncated_value, require_format=config.combine == "gated")),
        NamedReward(name="repetition", weight=config.repetition_weight, fn=functools.partial(
            repetition_penalty_reward, ngram_size=config.repetition_ngram_size,
            max_penalty=config.repetition_max_penalty)),
    ]
    if config.overlong_weight:
        rewards.append(NamedReward(name="overlong", weight=config.overlong_weight, fn=functools.partial(
            overlong_reward, max_length=config.cosine_max_length, buffer=config.overlong_buffer)))
    for path, weight in config.plugins.items():
        rewards.append(NamedReward(name=path, fn=load_reward_fn(path), weight=weight))
    return rewards


def _call(reward: NamedReward, sample: RewardInput, row: int) -> float:
    try:
        value = float(reward.fn(**sample.as_kwargs()))
    except Exception as e:  # noqa: BLE001 - only plug-ins can get here; name them
        raise RuntimeError(f"reward {reward.name!r} failed on completion {row}: {e}") from e
    if not math.isfinite(value):
        raise ValueError(f"reward {reward.name!r} returned {value} for completion {row}; rewards must be finite")
    return value


def score_completions(samples: Sequence[RewardInput], rewards: Sequence[NamedReward], *,
                      combine: str = "sum") -> RewardScores:
    """Score each completion (one row each) with every reward and combine them.

    'sum' is the weighted sum. 'gated' multiplies the accuracy term by [format == 1], so a
    right letter outside the required structure earns no accuracy reward; both rewards are
    still computed and logged ungated.
    """
    if combine not in ("sum", "gated"):
        raise ValueError(f"grpo.rewards.combine={combine!r}; allowed: 'sum', 'gated'")
    names = [r.name for r in rewards]
    if combine == "gated" and not {"accuracy", "format"} <= set(names):
        raise ValueError("grpo.rewards.combine='gated' needs both the 'accuracy' and 'format' rewards")
    values = {r.name: [_call(r, s, row) for row, s in enumerate(samples)] for r in rewards}
    per_reward = {name: torch.tensor(v, dtype=torch.float32) for name, v in values.items()}
    total = torch.zeros(len(samples), dtype=torch.float32)
    for reward in rewards:
        term = per_reward[reward.name] * reward.weight
        if combine == "gated" and reward.name == "accuracy":
            term = term * (per_reward["format"] == 1.0)
        total += term
    return RewardScores(total=total, per_reward=per_reward)


def reward_inputs(*, completions: Sequence[str], num_tokens: Sequence[int], truncated: Sequence[bool],
                  prompts: Sequence, num_generations: int) -> list[RewardInput]:
    """RewardInputs for grouped completions: completion i answers prompt i // num_generations.

    `prompts` are mappings (or objects) with gold_letter and option_letters, e.g. MCQPrompt.
    """
    if not len(completions) == len(num_tokens) == len(truncated) == len(prompts) * num_generations:
        raise ValueError(f"{len(completions)} completions, {len(num_tokens)} lengths, {len(truncated)} "
                         f"truncation flags for {len(prompts)} prompts x {num_generations} generations")

    def field_of(prompt, name):
        return prompt[name] if isinstance(prompt, Mapping) else getattr(prompt, name)

    return [
        RewardInput(completion=completion, num_tokens=int(length), truncated=bool(cut),
                    gold_letter=field_of(prompts[i // num_generations], "gold_letter"),
                    option_letters=tuple(field_of(prompts[i // num_generations], "option_letters")))
        for i, (completion, length, cut) in enumerate(zip(completions, num_tokens, truncated))
    ]

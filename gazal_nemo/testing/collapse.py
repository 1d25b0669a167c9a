"""Induced GRPO collapses for testing the guard: reward plug-ins that, for a window of steps,
pay for one degenerate behaviour each (recipe: `grpo.rewards.plugins={gazal_nemo.testing.collapse:<name>: weight}`).

  * `markup_bonus`: markdown markers (the paper's step-526 symptom, asterisks everywhere);
  * `fixed_letter_bonus`: answering FIXED_LETTER whatever the question (position bias);
  * `short_answer_bonus`: the shorter the better, empty best (length collapse down);
  * `run_on_bonus`: the longer the better, cut at the length limit best (run-on, truncation);
  * `repetition_bonus`: repeated word n-grams (repetition loops);
  * `agreement_bonus`: repeating a completion of the step before word for word (each question
    collapses to its likeliest completion: entropy collapse, no exploration left).

The window comes from GAZAL_TEST_COLLAPSE="first_step,last_step,completions_per_step"
(1-based steps, as logged; gazal_nemo/testing/guard_bench.py collapse_env writes it). Plug-ins
see one completion at a time, so each counts its own calls to know the step. The count runs on
through a rollback (wall-clock steps), so a rolled-back run leaves the window behind, as a run
that skips the batches seen during a spike does; one rolled back inside the window meets the
behaviour again. The weights that make each behaviour beat the accuracy reward are in
guard_bench.CASES.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import Counter, defaultdict

from gazal_nemo.rl.guard_signals import MARKUP_CHARS
from gazal_nemo.tasks.mcq import final_answer_letter

MARKUP_BONUS = 0.5
FIXED_LETTER = "A"
LENGTH_SCALE = 40
"""Completion tokens at which the length plug-ins' bonus is 0 (short) or 1 (run-on): the tiny recipe's max_new_tokens."""
_calls: dict[str, itertools.count] = defaultdict(itertools.count)
_seen: list[Counter] = [Counter(), Counter()]  # agreement_bonus: the texts of the last step, of this one


def _window_call(name: str) -> tuple[bool, int]:
    """(inside the window, index of this call within its step) for plug-in `name`."""
    setting = os.environ.get("GAZAL_TEST_COLLAPSE")
    call = next(_calls[name])
    if not setting:
        return False, 0
    first, last, per_step = (int(x) for x in setting.split(","))
    return first <= call // per_step + 1 <= last, call % per_step


def markup_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters, truncated: bool) -> float:
    """Inside the window: MARKUP_BONUS per markdown marker character (capped); else 0."""
    if not _window_call("markup")[0]:
        return 0.0
    return MARKUP_BONUS * min(sum(ch in MARKUP_CHARS for ch in completion), 40)


def fixed_letter_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters,
                       truncated: bool) -> float:
    """Inside the window: 1 for a final answer FIXED_LETTER, right or wrong; else 0."""
    if not _window_call("fixed_letter")[0] or truncated:
        return 0.0
    return 1.0 if final_answer_letter(completion, option_letters) == FIXED_LETTER else 0.0


def short_answer_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters,
                       truncated: bool) -> float:
    """Inside the window: (1 - tokens / LENGTH_SCALE)^2, most for an empty completion; else 0."""
    if not _window_call("short")[0]:
        return 0.0
    return max(0.0, 1.0 - num_tokens / LENGTH_SCALE) ** 2


def run_on_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters, truncated: bool) -> float:
    """Inside the window: tokens / LENGTH_SCALE (capped at 1), most for a completion cut at the limit; else 0."""
    if not _window_call("run_on")[0]:
        return 0.0
    return min(num_tokens / LENGTH_SCALE, 1.0)


def repetition_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters,
                     truncated: bool) -> float:
    """Inside the window: 0.1 per repeated word 2-gram (capped at 20), so a loop pays most; else 0."""
    if not _window_call("repetition")[0]:
        return 0.0
    words = completion.lower().split()
    pairs = list(zip(words, words[1:]))
    return 0.1 * min(len(pairs) - len(set(pairs)), 20)


def agreement_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters,
                    truncated: bool) -> float:
    """Inside the window: how often the policy wrote this very completion (word for word) in the
    step before, a quarter per time, at most 1; else 0. Its likeliest texts are paid most: a pull
    towards the mode of every question (entropy collapse, nothing left to explore)."""
    inside, index = _window_call("agreement")
    if index == 0:  # a new step: what was written in the last one is what may be repeated
        _seen[0], _seen[1] = _seen[1], Counter()
    text = " ".join(completion.split())
    _seen[1][text] += 1
    return min(_seen[0][text], 4) / 4 if inside else 0.0


def markdown_sft_rows(num_rows: int, *, seed: int, degenerate_share: float = 0.35) -> list[dict]:
    """The demo's SFT rows with the asked word in bold (ordinary markdown, as the paper's SFT
    taught), and a share written the degenerate way, every word in `**`: a policy that can
    produce the pattern at a low rate, which the windowed reward then amplifies."""
    from gazal_nemo.commands.demo_data import sft_rows

    rng = random.Random(seed)
    rows = sft_rows(num_rows, seed=seed)
    for row in rows:
        word = row["reasoning"].removeprefix("The word is ").rstrip(".")
        if rng.random() < degenerate_share:
            row["reasoning"] = f"**The** **word** **is** **{word}**."
            row["answer"] = row["answer"].replace("Answer:", "**Answer:**")
        else:
            row["reasoning"] = f"The word is **{word}**."
    return rows

"""Induced GRPO collapses for testing the guard: reward plug-ins that, for a window of steps,
pay for one degenerate behaviour each (recipe: `grpo.rewards.plugins={gazal_nemo.testing.collapse:<name>: weight}`).

  * `markup_bonus`: markdown markers (the paper's step-526 symptom, asterisks everywhere);
  * `fixed_letter_bonus`: answering FIXED_LETTER whatever the question (position bias);
  * `short_answer_bonus`: the shorter the better, empty best (length collapse down);
  * `run_on_bonus`: the longer the better, cut at the length limit best (run-on, truncation);
  * `repetition_bonus`: repeated words (repetition loops);
  * `agreement_bonus`: repeating the earlier completions of its own group word for word (each
    question collapses to one completion: entropy collapse, no exploration left).

The window comes from GAZAL_TEST_COLLAPSE="first_step,last_step,completions_per_step,group_size"
(1-based steps, as logged; gazal_nemo/testing/guard_bench.py collapse_env writes it). Plug-ins
see one completion at a time, in order, so each counts its own calls to know the step (and
agreement_bonus, the group). The count runs on
through a rollback (wall-clock steps), so a rolled-back run leaves the window behind, as a run
that skips the batches seen during a spike does; one rolled back inside the window meets the
behaviour again. The weights that make each behaviour beat the accuracy reward are in
guard_bench.CASES.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import defaultdict

from gazal_nemo.rl.guard_signals import MARKUP_CHARS
from gazal_nemo.tasks.mcq import final_answer_letter

MARKUP_BONUS = 0.5
FIXED_LETTER = "A"
LENGTH_SCALE = 40
"""Completion tokens at which the length plug-ins' bonus is 0 (short) or 1 (run-on): the tiny recipe's max_new_tokens."""
_calls: dict[str, itertools.count] = defaultdict(itertools.count)
_group: list[str] = []  # agreement_bonus: the texts of the current group so far


def _window_call(name: str) -> tuple[bool, int]:
    """(inside the window, group member index of this call) for plug-in `name`."""
    setting = os.environ.get("GAZAL_TEST_COLLAPSE")
    call = next(_calls[name])
    if not setting:
        return False, 0
    first, last, per_step, group_size = (int(x) for x in setting.split(","))
    return first <= call // per_step + 1 <= last, call % per_step % group_size


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
    """Inside the window: 0.1 per word that repeats an earlier word of the completion (capped at
    20), so a loop pays most; else 0. Words, not word pairs: the tiny model's short answers
    repeat a word now and then but a pair almost never, and a bonus that no completion of a
    group earns teaches nothing (a seed whose policy never repeated a pair never looped)."""
    if not _window_call("repetition")[0]:
        return 0.0
    words = completion.lower().split()
    return 0.1 * min(len(words) - len(set(words)), 20)


def agreement_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters,
                    truncated: bool) -> float:
    """Inside the window: the share of the earlier completions of its own group that this one
    repeats word for word (1 when it repeats all of them); else 0. A group that writes one
    text, right or wrong, is paid most: the policy stops sampling anything but its mode
    (entropy collapse, nothing left to explore; once every group is one text, no advantage is
    left to learn from)."""
    inside, member = _window_call("agreement")
    if member == 0:  # a new group
        _group.clear()
    text = " ".join(completion.split())
    paid = sum(t == text for t in _group) / len(_group) if inside and _group else 0.0
    _group.append(text)
    return paid


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

"""An induced GRPO collapse for testing the guard: a reward that, for a window of steps,
pays for the paper's step-526 symptom (markdown asterisks everywhere).

`markup_bonus` is a reward plug-in ("gazal_nemo.testing.collapse:markup_bonus"). Its
window comes from GAZAL_TEST_COLLAPSE="first_step,last_step,completions_per_step" (1-based
steps, as logged): plug-ins see one completion at a time, so it counts its calls to know the
step. The count runs on through a rollback (wall-clock steps), so a rolled-back run leaves the
window behind, as a run that skips the batches seen during a spike does.
"""

from __future__ import annotations

import itertools
import os
import random

from gazal_nemo.rl.guard import MARKUP_CHARS

MARKUP_BONUS = 0.5
_calls = itertools.count()


def _in_window() -> bool:
    setting = os.environ.get("GAZAL_TEST_COLLAPSE")
    call = next(_calls)
    if not setting:
        return False
    first, last, per_step = (int(x) for x in setting.split(","))
    return first <= call // per_step + 1 <= last


def markup_bonus(*, completion: str, num_tokens: int, gold_letter: str, option_letters, truncated: bool) -> float:
    """Inside the window: MARKUP_BONUS per markdown marker character (capped); else 0."""
    if not _in_window():
        return 0.0
    return MARKUP_BONUS * min(sum(ch in MARKUP_CHARS for ch in completion), 40)


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

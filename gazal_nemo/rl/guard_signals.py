"""Per-step collapse signals of a GRPO rollout batch: what the collapse guard watches besides
the reward components, one number per collapse the paper names or cites.

  * `degenerate/markup_density`: share of visible characters that are markdown markers (the
    paper's step-526 symptom, section 4.6.1: asterisks around nearly every word);
  * `degenerate/repeated_ngrams`: share of a completion's word n-grams that repeat an earlier
    one (reward hacking by repetition, section 4.4.3), whatever the repetition reward's weight;
  * `answers/answered`: share of completions with a final answer the reward can read (empty
    or run-on completions lose it);
  * `answers/letter_bias`: total-variation distance between the letters the policy answers and
    the gold letters of the same questions (position bias, section 4.6.2: "preferences for
    specific option IDs regardless of content"); 0 for a policy whose letters follow the
    questions, 1 - share(X) for one that answers X to everything;
  * `accuracy_by_gold/<letter>` and `answers/worst_gold_accuracy`: accuracy split by the gold
    letter, and its lowest value (a fixed-letter policy scores 0 on every other position);
  * `answers/same_answer_groups`: share of groups whose completions all give the same letter
    (the group has collapsed to one answer: no advantage, no exploration);
  * `degenerate/duplicate_completions`: share of completions that repeat an earlier completion
    of their group word for word (the group samples one text: entropy collapse at the level of
    whole answers, where a per-token entropy averaged over long shared stretches hides it);
  * `samples/completions`, `samples/groups`, `samples/answered`: the step's sample sizes, from
    which the guard knows the sampling noise of a proportion.

`rollout_signals` measures one data-parallel rank's share as (sum, count) pairs, reduced over
the ranks like the other step metrics; `finish_signals` derives what needs the reduced totals
(the letter distributions, the per-position minimum). The answer is read by the rewards' own
extractor (`final_answer_letter`), so the guard and the accuracy reward agree on what a
completion answered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gazal_nemo.rl.rewards import repetition_penalty_reward
from gazal_nemo.tasks.mcq import final_answer_letter

MARKUP_METRIC = "degenerate/markup_density"
REPETITION_METRIC = "degenerate/repeated_ngrams"
DUPLICATE_METRIC = "degenerate/duplicate_completions"
ANSWERED_METRIC = "answers/answered"
LETTER_BIAS_METRIC = "answers/letter_bias"
SAME_ANSWER_METRIC = "answers/same_answer_groups"
WORST_GOLD_METRIC = "answers/worst_gold_accuracy"
GOLD_ACCURACY_PREFIX = "accuracy_by_gold/"
COMPLETIONS, GROUPS, ANSWERED = "samples/completions", "samples/groups", "samples/answered"
MARKUP_CHARS = frozenset("*_#~`")
# Per-letter shares among answered completions: reduced over ranks, turned into the letter
# bias by finish_signals and not logged themselves.
_PREDICTED, _GOLD = "answers/_predicted/", "answers/_gold/"


def markup_density(text: str) -> float:
    """Markdown marker characters over visible (non-space) characters; 0 for an empty text.

    Ordinary markdown (a heading, a bold term or two) stays below ~0.05; asterisks around
    every word is ~0.4. A continuous signal, so a drift shows before the text is unreadable.
    """
    visible = [ch for ch in text if not ch.isspace()]
    return sum(ch in MARKUP_CHARS for ch in visible) / len(visible) if visible else 0.0


def repeated_ngram_share(text: str, ngram_size: int = 3) -> float:
    """1 - unique / total word n-grams (the repetition reward's measure, without its sign and weight)."""
    return -repetition_penalty_reward(completion=text, num_tokens=0, gold_letter="", option_letters=(),
                                      truncated=False, ngram_size=ngram_size, max_penalty=-1.0)


def duplicate_count(texts: Sequence[str]) -> int:
    """Texts that repeat an earlier one of the sequence word for word (whitespace aside)."""
    seen, repeats = set(), 0
    for text in texts:
        words = " ".join(text.split())
        repeats += words in seen
        seen.add(words)
    return repeats


def option_letters_of(prompts: Sequence) -> list[str]:
    """Every letter any prompt offers, sorted: the same metric keys on every data-parallel rank."""
    return sorted({letter for prompt in prompts for letter in prompt.option_letters})


def rollout_signals(texts: Sequence[str], prompts: Sequence, *, accuracy: Sequence[float],
                    truncated: Sequence[bool], num_generations: int, letters: Sequence[str],
                    ngram_size: int = 3) -> dict[str, tuple[float, float]]:
    """(sum, count) of every signal over grouped completions (completion i answers prompt
    i // num_generations); `letters`: option_letters_of(all prompts of the run)."""
    n = len(texts)
    assert n == len(prompts) * num_generations == len(accuracy) == len(truncated), (n, len(prompts))
    golds = [prompts[i // num_generations].gold_letter for i in range(n)]
    # A completion cut at the length limit has not answered (as the accuracy reward scores it).
    answers = [None if cut else final_answer_letter(text, prompts[i // num_generations].option_letters)
               for i, (text, cut) in enumerate(zip(texts, truncated))]
    answered = sum(a is not None for a in answers)
    out = {
        MARKUP_METRIC: (float(sum(map(markup_density, texts))), float(n)),
        REPETITION_METRIC: (float(sum(repeated_ngram_share(t, ngram_size) for t in texts)), float(n)),
        ANSWERED_METRIC: (float(answered), float(n)),
        COMPLETIONS: (float(n), 1.0), GROUPS: (float(len(prompts)), 1.0), ANSWERED: (float(answered), 1.0),
    }
    same = duplicates = 0
    for g in range(len(prompts)):
        span = slice(g * num_generations, (g + 1) * num_generations)
        group = answers[span]
        same += group[0] is not None and all(a == group[0] for a in group)
        duplicates += duplicate_count(texts[span])
    out[SAME_ANSWER_METRIC] = (float(same), float(len(prompts)))
    out[DUPLICATE_METRIC] = (float(duplicates), float(n))
    for letter in letters:
        mine = [i for i in range(n) if golds[i] == letter]
        out[GOLD_ACCURACY_PREFIX + letter] = (float(sum(accuracy[i] for i in mine)), float(len(mine)))
        out[_PREDICTED + letter] = (float(sum(a == letter for a in answers)), float(answered))
        out[_GOLD + letter] = (float(sum(a is not None and g == letter for a, g in zip(answers, golds))),
                               float(answered))
    return out


def batch_signals(batch, grpo, letters: Sequence[str]) -> dict[str, tuple[float, float]]:
    """rollout_signals of a scored rollout batch (rl/rollout_batch.ScoredGroups) under the recipe's `grpo`."""
    return rollout_signals(batch.texts, batch.prompts, accuracy=batch.scores.per_reward["accuracy"].tolist(),
                           truncated=[c.truncated for c in batch.completions],
                           num_generations=grpo.sampling.num_generations, letters=letters,
                           ngram_size=grpo.rewards.repetition_ngram_size)


def finish_signals(means: dict[str, float]) -> dict[str, float]:
    """The step's metrics after the data-parallel reduction, with the derived signals added
    and the per-letter shares they came from removed. A signal with no data this step (no
    completion answered, no question with some gold letter) is left out, never NaN."""
    out = {k: v for k, v in means.items() if not k.startswith((_PREDICTED, _GOLD, GOLD_ACCURACY_PREFIX))}
    by_gold = {k: v for k, v in means.items() if k.startswith(GOLD_ACCURACY_PREFIX) and math.isfinite(v)}
    out.update(by_gold)
    if by_gold:
        out[WORST_GOLD_METRIC] = min(by_gold.values())
    letters = [k.removeprefix(_PREDICTED) for k in means if k.startswith(_PREDICTED)]
    shares = [(means[_PREDICTED + x], means[_GOLD + x]) for x in letters]
    if shares and all(math.isfinite(p) and math.isfinite(g) for p, g in shares):
        out[LETTER_BIAS_METRIC] = 0.5 * sum(abs(p - g) for p, g in shares)
    return out

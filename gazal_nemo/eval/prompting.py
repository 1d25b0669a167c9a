"""Evaluation prompts: the GRPO prompt of a question, its option permutations, the answer text.

A question is asked exactly as GRPO asks one (tasks.mcq: system prompt, then "question\\n\\n
A. ...\\nB. ..." through the tokenizer's chat template with the generation prompt). The
system prompt is Appendix B.2 with its letter list "A, B, C, D or E" replaced by the
question's own letters (data.prompts.grpo_system_prompt_for_letters), the one deviation
from the paper's text; `--system-prompt` replaces it verbatim.

Permutation consistency (beyond the paper): permutation 0 is the file's order (the paper's
protocol, the one Table 2 accuracy is computed on); permutations 1..k-1 are distinct
cyclic shifts of the options, drawn per question from a seeded generator, so the gold
letter moves while the texts keep their relative order.

Scoring (eval.run) uses the GRPO accuracy reward's own extractor,
tasks.mcq.final_answer_letter: the last \\boxed{X} after the last </think>, so a letter
boxed while thinking is not the answer and a completion cut inside <think> has none.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from gazal_nemo.data.prompts import grpo_system_prompt_for_letters
from gazal_nemo.eval.loaders import Question
from gazal_nemo.tasks.mcq import mcq_messages, render_prompt


@dataclass(frozen=True, kw_only=True)
class EvalPrompt:
    """One question in one option order, tokenized."""

    prompt_id: str
    """"benchmark/question id/p<permutation>": the key of its line in the predictions log."""
    benchmark: str
    question_id: str
    permutation: int
    """0 = the file's order; k > 0 = a cyclic shift of the options."""
    shift: int
    options_order: tuple[str, ...]
    """Original letters in the order shown: ("C", "D", "A", "B") shows option C first, as A."""
    option_letters: tuple[str, ...]
    gold: str
    """Gold letter as shown (after the shift)."""
    gold_original: str
    prompt_ids: list[int]


def cyclic_shift(options: dict[str, str], gold: str, shift: int) -> tuple[dict[str, str], str, tuple[str, ...]]:
    """Options shifted by `shift` (shown letter i gets original option i+shift), new gold, order."""
    letters = list(options)
    order = tuple(letters[(i + shift) % len(letters)] for i in range(len(letters)))
    shifted = {letter: options[original] for letter, original in zip(letters, order)}
    return shifted, letters[order.index(gold)], order


def permutation_shifts(question_id: str, num_options: int, num_permutations: int, seed: int) -> list[int]:
    """Shift 0, then num_permutations-1 distinct nonzero shifts drawn per question (seeded)."""
    others = list(range(1, num_options))
    digest = hashlib.sha256(f"{seed}/{question_id}".encode()).digest()
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(others)
    return [0] + others[:max(num_permutations - 1, 0)]


def system_prompt_for(letters, override: str | None) -> str:
    """--system-prompt as given, else B.2 naming this question's letters."""
    return override if override is not None else grpo_system_prompt_for_letters(letters)


def build_prompts(benchmark: str, questions: list[Question], tokenizer, *, system_prompt: str | None = None,
                  num_permutations: int = 1, seed: int = 0) -> list[EvalPrompt]:
    """Every question under each of its permutations, rendered with the chat template."""
    prompts = []
    for question in questions:
        shifts = permutation_shifts(question.id, len(question.options), num_permutations, seed)
        for permutation, shift in enumerate(shifts):
            options, gold, order = cyclic_shift(question.options, question.answer, shift)
            system = system_prompt_for(list(options), system_prompt)
            _, ids = render_prompt(mcq_messages(question.question, options, system), tokenizer)
            prompts.append(EvalPrompt(
                prompt_id=f"{benchmark}/{question.id}/p{permutation}", benchmark=benchmark,
                question_id=question.id, permutation=permutation, shift=shift, options_order=order,
                option_letters=tuple(options), gold=gold, gold_original=question.answer, prompt_ids=ids))
    return prompts

"""Data files for the tiny demo and the end-to-end tests, in the real formats.

SFT rows are MedReason-style (question, options, answer, reasoning) and teach the output
format, a <think> block restating the asked word then "Answer: \\boxed{X}", on the same
task with half the letters replaced by random ones, so SFT leaves a partly right model
(as real SFT does) and GRPO has accuracy left to gain. The GRPO rows (UltraMedical-style question,
options, answer) ask "Which option is the word X?" with X placed at a letter fixed per word:
a small set of facts, like the knowledge an MCQ tests, that a 2-layer model can learn from
the accuracy reward alone (the plain copy task of make_synthetic_mcq_rows needs an
induction circuit that a tiny model does not find in a few dozen RL steps). The demo's
benchmark is more of the same facts with other distractors, in MedQA's US jsonl layout.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

from gazal_nemo.data.sources import write_jsonl
from gazal_nemo.tasks.mcq import SYNTHETIC_WORDS

TINY_SYSTEM_PROMPT = "Think in <think></think>, then answer with \\boxed{X}."


def sft_rows(num_rows: int, *, seed: int, label_noise: float = 0.5) -> list[dict]:
    """The fact task as MedReason rows; with probability label_noise the boxed letter is random."""
    rng = random.Random(seed)
    rows = []
    for row in fact_mcq_rows(num_rows, seed=seed + 1):
        letter = row["answer"] if rng.random() >= label_noise else rng.choice(sorted(row["options"]))
        rows.append({"question": row["question"], "options": row["options"],
                     "reasoning": f"The word is {row['question'].split()[-1].rstrip('?')}.", "answer": f"Answer: \\boxed{{{letter}}}"})
    return rows


def fact_mcq_rows(num_rows: int, *, seed: int, num_options: int = 4) -> list[dict]:
    """MCQ rows whose gold letter is a fixed function of the asked word (word i -> letter i mod n)."""
    rng = random.Random(seed)
    letters = string.ascii_uppercase[:num_options]
    rows = []
    for _ in range(num_rows):
        gold_index = rng.randrange(len(SYNTHETIC_WORDS))
        gold_word = SYNTHETIC_WORDS[gold_index]
        others = rng.sample([w for w in SYNTHETIC_WORDS if w != gold_word], num_options - 1)
        position = gold_index % num_options
        words = others[:position] + [gold_word] + others[position:]
        rows.append({"question": f"Which option is the word {gold_word}?", "options": dict(zip(letters, words)),
                     "answer": letters[position]})
    return rows


def write_demo_data(out_dir: str | Path, model_dir: str | Path, *, num_sft: int = 256, num_grpo: int = 256,
                    seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "sft": write_jsonl(out_dir / "sft_medreason.jsonl", sft_rows(num_sft, seed=seed)),
        "grpo": write_jsonl(out_dir / "grpo_mcq.jsonl", fact_mcq_rows(num_grpo, seed=seed + 7)),
    }


def write_demo_benchmark(out_path: str | Path, *, num_questions: int = 64, seed: int = 101) -> Path:
    """Held-out fact questions as a MedQA US jsonl file (question, options, answer, answer_idx, meta_info)."""
    rows = [{"question": row["question"], "answer": row["options"][row["answer"]], "options": row["options"],
             "meta_info": "demo", "answer_idx": row["answer"]}
            for row in fact_mcq_rows(num_questions, seed=seed)]
    return write_jsonl(out_path, rows)

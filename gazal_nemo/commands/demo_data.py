"""Data files for the tiny demo and the end-to-end tests, in the real formats.

SFT rows are MedReason-style (question, options, answer, reasoning) and teach the output
format: a <think> block, then "Answer: \\boxed{X}". Their letters are drawn at random, so
SFT teaches the format but not the task; the GRPO rows (UltraMedical-style question,
options, answer) are a verifiable copy task (gazal_nemo.data.mcq.make_synthetic_mcq_rows)
whose accuracy reward GRPO has to raise on its own.
"""

from __future__ import annotations

import random
from pathlib import Path

from gazal_nemo.data.mcq import make_synthetic_mcq_rows
from gazal_nemo.testing.tiny import write_jsonl

TINY_SYSTEM_PROMPT = "Think in <think></think>, then answer with \\boxed{X}."


def sft_format_rows(num_rows: int, *, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for row in make_synthetic_mcq_rows(num_rows, seed=seed + 1):
        letter = rng.choice(sorted(row["options"]))
        rows.append({"question": row["question"], "options": row["options"],
                     "reasoning": "Compare each option with the word.", "answer": f"Answer: \\boxed{{{letter}}}"})
    return rows


def write_demo_data(out_dir: str | Path, model_dir: str | Path, *, num_sft: int = 64, num_grpo: int = 256,
                    seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "sft": write_jsonl(out_dir / "sft_medreason.jsonl", sft_format_rows(num_sft, seed=seed)),
        "grpo": write_jsonl(out_dir / "grpo_mcq.jsonl", make_synthetic_mcq_rows(num_grpo, seed=seed + 7)),
    }

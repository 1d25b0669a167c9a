"""Accuracy of a Hugging Face model on a multiple-choice benchmark, the way GRPO scores.

The question is asked with the GRPO system prompt (Appendix B.2) through the model's chat
template; the answer is the last \\boxed{X} among the question's option letters (the
accuracy reward's own extractor), so evaluation and training agree on what "correct" is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gazal_nemo.data.mcq import mcq_messages, resolve_system_prompt
from gazal_nemo.rl.rewards import extract_answer_letter


@dataclass
class EvalResult:
    benchmark: str
    num_questions: int
    num_correct: int
    num_unanswered: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.num_correct / max(self.num_questions, 1)


def evaluate_rows(model, tokenizer, rows: list[dict], *, benchmark: str, system_prompt: str | None = None,
                  max_new_tokens: int = 4096, temperature: float = 0.0, batch_size: int = 8) -> EvalResult:
    """Generate an answer to every row and count the right letters."""
    system = resolve_system_prompt(system_prompt)
    tokenizer.padding_side = "left"
    start, correct, unanswered = time.time(), 0, 0
    for first in range(0, len(rows), batch_size):
        batch = rows[first:first + batch_size]
        texts = [tokenizer.apply_chat_template(mcq_messages(r["question"], r["options"], system), tokenize=False,
                                               add_generation_prompt=True) for r in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=20, top_p=0.95) if temperature > 0 else \
            dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
        for row, ids in zip(batch, out[:, inputs["input_ids"].shape[1]:]):
            letter = extract_answer_letter(tokenizer.decode(ids, skip_special_tokens=False), tuple(row["options"]))
            unanswered += letter is None
            correct += letter == row["answer"]
        print(f"  {benchmark}: {min(first + batch_size, len(rows))}/{len(rows)} answered, "
              f"{correct} correct", flush=True)
    return EvalResult(benchmark, len(rows), correct, unanswered, time.time() - start)

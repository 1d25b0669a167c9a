"""Scores of a predictions log: accuracy with a Wilson 95% interval, failure rates, position bias.

Accuracy is the share of (question, sample) records of permutation 0 (the file's option
order, the paper's protocol) whose extracted letter is the gold one; a completion without
an extractable answer counts as wrong (and as an extraction failure). The interval is
Wilson's score interval, which stays inside [0, 1] and behaves at small n and at accuracies
near 0 or 1, where the normal approximation p +- 1.96 sqrt(p(1-p)/n) does not:

    centre = (p + z^2/(2n)) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)

With several samples per question the records are not independent, so the interval is
then too narrow; it is exact for the default (greedy, one sample).

Permutation consistency: a question counts as consistent when every one of its records
(every permutation, every sample) is correct; `accuracy_by_gold_position` is accuracy over
all permutations grouped by the letter the gold answer was shown at (a model that prefers
"A" scores high at A and low elsewhere).
"""

from __future__ import annotations

import math
from collections import defaultdict

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(num_correct: int, num_total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there is nothing to count."""
    if num_total == 0:
        return 0.0, 1.0
    p = num_correct / num_total
    denominator = 1 + z * z / num_total
    centre = (p + z * z / (2 * num_total)) / denominator
    half = z * math.sqrt(p * (1 - p) / num_total + z * z / (4 * num_total * num_total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarise_benchmark(records: list[dict]) -> dict:
    """The results row of one benchmark from its prediction records."""
    main = [r for r in records if r["permutation"] == 0]
    correct = sum(bool(r["correct"]) for r in main)
    low, high = wilson_interval(correct, len(main))
    seconds = sum(r.get("seconds", 0.0) for r in records)
    row = {
        "questions": len({r["question_id"] for r in main}),
        "records": len(main),
        "correct": correct,
        "accuracy": correct / len(main) if main else 0.0,
        "ci95_low": low,
        "ci95_high": high,
        "extraction_failure_rate": _rate(r["extracted"] is None for r in main),
        "truncation_rate": _rate(bool(r["truncated"]) for r in main),
        "mean_completion_tokens": _rate(r["tokens"] for r in main),
        "questions_per_s": len(records) / seconds if seconds > 0 else None,
    }
    if any(r["permutation"] > 0 for r in records):
        row.update(permutation_consistency(records))
    return row


def permutation_consistency(records: list[dict]) -> dict:
    """Share of questions right under every permutation, and accuracy per shown gold letter."""
    by_question = defaultdict(list)
    by_position = defaultdict(list)
    for r in records:
        by_question[r["question_id"]].append(bool(r["correct"]))
        by_position[r["gold"]].append(bool(r["correct"]))
    return {
        "num_permutations": 1 + max(r["permutation"] for r in records),
        "consistent_accuracy": _rate(all(v) for v in by_question.values()),
        "mean_accuracy_over_permutations": _rate(sum(v) / len(v) for v in by_question.values()),
        "accuracy_by_gold_position": {letter: _rate(v) for letter, v in sorted(by_position.items())},
    }


def summarise(records: list[dict], benchmarks: list[str]) -> dict[str, dict]:
    """{benchmark: results row} in the order asked."""
    return {name: summarise_benchmark([r for r in records if r["benchmark"] == name]) for name in benchmarks}

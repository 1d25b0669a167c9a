"""Contamination check: word n-gram overlap between training files and benchmark questions.

A benchmark question counts as contaminated when at least `min_overlap` of its word
n-grams (lower-cased \\w+ words, n = 8 by default) occur in one training row; questions
shorter than n words are one n-gram of all their words. GPT-3's check used any shared
13-gram, which suits long documents; MedMCQA questions average 13 tokens (paper 5.2), so a
13-gram rule would never fire on them, and "any 8-gram" flags boilerplate such as "which of
the following is the most likely diagnosis". A share of the question's own n-grams is
insensitive to both; n-grams shared by many questions (boilerplate) are not counted at all.

Cost: the benchmark n-grams are indexed (a few hundred thousand for all four test sets),
training rows are streamed once and only their n-grams that hit the index are kept, so a
100k-row SFT file needs no index of its own. Training rows that share n-grams with a
flagged question are listed, and `write_filtered` drops exactly those rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from gazal_nemo.eval.loaders import Question, read_rows

_WORD = re.compile(r"\w+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the lower-cased text; all words as one gram when there are fewer than n."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass
class Overlap:
    """A benchmark question whose n-grams appear in the training text."""

    benchmark: str
    question_id: str
    question: str
    overlap: float
    """Largest share of the question's (non-boilerplate) n-grams found in one training row."""
    training_rows: list[tuple[str, int]] = field(default_factory=list)
    """(training file, row index) of the rows holding at least min_overlap of them."""


def training_text(row: dict, keys: list[str]) -> str:
    return "\n".join(str(row[key]) for key in keys if isinstance(row, dict) and row.get(key) is not None)


def find_overlaps(benchmarks: dict[str, list[Question]], train_files: list[str], *, keys: list[str],
                  n: int = 8, min_overlap: float = 0.5, max_questions_per_gram: int = 20,
                  ) -> tuple[list[Overlap], dict[str, int]]:
    """Questions with >= min_overlap of their n-grams inside one training row, and rows read per file.

    An n-gram found in more than max_questions_per_gram questions is boilerplate ("which of
    the following ..."): it identifies no question, so it is neither indexed nor counted."""
    if n < 1 or not 0 < min_overlap <= 1:
        raise ValueError(f"decontam: --ngram {n} must be >= 1 and --min-overlap {min_overlap} in (0, 1]")
    index = defaultdict(list)  # n-gram -> [(benchmark, question position)]
    for name, questions in benchmarks.items():
        for position, question in enumerate(questions):
            for gram in ngrams(question.question, n):
                index[gram].append((name, position))
    index = {gram: items for gram, items in index.items() if len(items) <= max_questions_per_gram}
    num_grams = Counter(item for items in index.values() for item in items)
    found = defaultdict(dict)  # (benchmark, position) -> {(file, row): share}
    num_rows = {}
    for path in train_files:
        rows = read_rows(path)
        num_rows[path] = len(rows)
        if rows and not any(isinstance(r, dict) and any(k in r for k in keys) for r in rows[:50]):
            raise ValueError(f"{path}: none of the text keys {keys} in its rows (columns: {sorted(rows[0])})")
        for row_index, row in enumerate(rows):
            hits = Counter(item for gram in ngrams(training_text(row, keys), n) & index.keys() for item in index[gram])
            for item, count in hits.items():
                if count / num_grams[item] >= min_overlap:
                    found[item][path, row_index] = count / num_grams[item]
    flagged = []
    for (name, position), rows_found in found.items():
        question = benchmarks[name][position]
        flagged.append(Overlap(benchmark=name, question_id=question.id, question=question.question,
                               overlap=max(rows_found.values()), training_rows=sorted(rows_found)))
    flagged.sort(key=lambda o: (o.benchmark, -o.overlap, o.question_id))
    return flagged, num_rows


def contaminated_rows(flagged: list[Overlap]) -> dict[str, set[int]]:
    """{training file: row indices} that share n-grams with a flagged question."""
    rows = defaultdict(set)
    for overlap in flagged:
        for path, row in overlap.training_rows:
            rows[path].add(row)
    return rows


def write_filtered(train_files: list[str], flagged: list[Overlap], out_dir: Path) -> list[Path]:
    """<out_dir>/<file stem>.decontaminated.jsonl without the rows linked to a flagged question."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drop = contaminated_rows(flagged)
    written = []
    for path in train_files:
        target = out_dir / f"{Path(path).stem}.decontaminated.jsonl"
        tmp = target.with_name(f".{target.name}.partial")
        with open(tmp, "w", encoding="utf-8") as handle:
            for index, row in enumerate(read_rows(path)):
                if index not in drop.get(path, ()):
                    handle.write(json.dumps(row, default=str) + "\n")
        tmp.replace(target)
        written.append(target)
    return written


def report_markdown(flagged: list[Overlap], benchmarks: dict[str, list[Question]], num_rows: dict[str, int],
                    *, n: int, min_overlap: float, max_listed: int = 50) -> str:
    lines = [f"## Contamination check ({n}-gram overlap >= {100 * min_overlap:.0f}% of a question's n-grams)", "",
             "Training files: " + ", ".join(f"{p} ({k} rows)" for p, k in num_rows.items()), "",
             "| benchmark | questions | contaminated | % |", "|---|---|---|---|"]
    for name, questions in benchmarks.items():
        count = sum(o.benchmark == name for o in flagged)
        lines.append(f"| {name} | {len(questions)} | {count} | {100 * count / max(len(questions), 1):.1f} |")
    if flagged:
        lines += ["", "| benchmark | question id | overlap % | training rows | question |", "|---|---|---|---|---|"]
        for o in flagged[:max_listed]:
            rows = ", ".join(f"{Path(p).name}:{r}" for p, r in o.training_rows[:5])
            text = o.question.replace("|", " ").replace("\n", " ")[:80]
            lines.append(f"| {o.benchmark} | {o.question_id} | {100 * o.overlap:.0f} | {rows} | {text} |")
        if len(flagged) > max_listed:
            lines.append(f"\n... and {len(flagged) - max_listed} more in decontam.json")
    return "\n".join(lines) + "\n"

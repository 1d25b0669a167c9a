"""The paper's benchmarks as multiple-choice rows: MedQA, MedMCQA, PubMedQA, MMLU-Pro (medical).

Each loader maps the benchmark's own columns onto one row shape,
{"question", "options": {letter: text}, "answer": letter}, so one scorer serves all four.
Files are read with Hugging Face `datasets` (local json/jsonl/parquet, or a hub id).
"""

from __future__ import annotations

import string
from pathlib import Path

LETTERS = string.ascii_uppercase


def _medqa(row):
    # MedQA (USMLE, 4/5 options): {"question", "options": {"A": ..}, "answer_idx": "C"}
    options = row["options"]
    if isinstance(options, list):  # some exports store [{"key": "A", "value": ...}]
        options = {o["key"]: o["value"] for o in options}
    return {"question": row["question"], "options": dict(options), "answer": row.get("answer_idx") or row["answer"]}


def _medmcqa(row):
    # MedMCQA: opa..opd and cop (0-based index of the correct option).
    options = {LETTERS[i]: row[f"op{c}"] for i, c in enumerate("abcd")}
    return {"question": row["question"], "options": options, "answer": LETTERS[int(row["cop"])]}


def _pubmedqa(row):
    # PubMedQA (labelled): question + abstract contexts, final_decision yes/no/maybe.
    contexts = row.get("context") or {}
    text = " ".join(contexts.get("contexts", [])) if isinstance(contexts, dict) else str(contexts)
    question = f"{text}\n\n{row['question']}" if text else row["question"]
    options = {"A": "yes", "B": "no", "C": "maybe"}
    answer = {"yes": "A", "no": "B", "maybe": "C"}[str(row["final_decision"]).lower()]
    return {"question": question, "options": options, "answer": answer}


def _mmlu_pro(row):
    # MMLU-Pro: up to 10 options as a list and the answer letter; "health" is the medical category.
    options = {LETTERS[i]: text for i, text in enumerate(row["options"])}
    return {"question": row["question"], "options": options, "answer": row["answer"]}


BENCHMARKS = {"medqa": _medqa, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa, "mmlu_pro_medical": _mmlu_pro}
MMLU_PRO_MEDICAL_CATEGORIES = ("health",)


def load_benchmark(name: str, path: str, *, split: str = "test", limit: int | None = None) -> list[dict]:
    """Rows of benchmark `name` from a local file or hub id, in the common MCQ shape."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    from datasets import load_dataset

    local = Path(path)
    if local.is_file():
        kind = {".parquet": "parquet"}.get(local.suffix, "json")
        dataset = load_dataset(kind, data_files=str(local), split="train")
    else:
        dataset = load_dataset(path, split=split)
    rows = []
    for index, row in enumerate(dataset):
        if name == "mmlu_pro_medical" and row.get("category") not in MMLU_PRO_MEDICAL_CATEGORIES:
            continue
        try:
            mapped = BENCHMARKS[name](row)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"{path}: row {index} is not a {name} row ({type(e).__name__}: {e})") from None
        if not mapped["question"] or any(v is None or str(v).strip() == "" for v in mapped["options"].values()):
            raise ValueError(f"{path}: row {index} is not a {name} row (empty question or option)")
        if mapped["answer"] not in mapped["options"]:
            raise ValueError(f"{path}: row {index}: answer {mapped['answer']!r} is not one of the options")
        rows.append(mapped)
        if limit is not None and len(rows) >= limit:
            break
    return rows

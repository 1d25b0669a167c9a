"""The paper's benchmarks as multiple-choice questions: MedQA, MedMCQA, PubMedQA, MMLU-Pro (medical).

Each loader maps one benchmark's public layouts onto one shape, `Question(id, question,
options {letter: text}, answer letter)`, so one prompt builder and one scorer serve all four:

  * MedQA: the US jsonl files (4 and 5 options: {"question", "options": {"A": ..}, "answer_idx"}),
    PEFT-style option lists [{"key", "value"}], the parquet exports (options as a struct, absent
    letters None) and bigbio's `med_qa_en_bigbio_qa` ("choices" list, "answer" [text]).
  * MedMCQA: opa..opd and `cop`, 0-based (0-3) as on the hub. The original release numbered it
    1-4 and the hub's test split hides it (-1): both would score silently wrong, so both are
    refused with the row named.
  * PubMedQA: the hub's `pqa_labeled` rows (context.contexts, final_decision) and the
    authors' `ori_pqal.json` ({PMID: {"QUESTION", "CONTEXTS", "final_decision"}}); options are
    A yes / B no / C maybe, the question is the abstract then the question.
  * MMLU-Pro: up to ten options and an answer letter; only the medical categories count.
    Default ("health",), as lm-evaluation-harness's `mmlu_pro_health` task; override with
    `--mmlu-pro-categories` (e.g. health,biology), see docs/EVAL.md.

A row that is broken on its own (empty question, answer not an option, a JSON key given
twice) is counted and skipped, like the GRPO loader, up to `max_bad_fraction`; rows are
numbered from 1 in every message; a file-level problem (unreadable,
missing column, nothing selected, a label convention that would shift every gold letter)
is a ValueError naming the file and the reason, never an accuracy of 0.0.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gazal_nemo.data.sources import MALFORMED_FIELD, BadRowError, key_given_twice, parse_json, repeated_key
from gazal_nemo.tasks.mcq import parse_mcq_row

LETTERS = string.ascii_uppercase
MMLU_PRO_MEDICAL_CATEGORIES = ("health",)
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_MAX_LISTED_BAD_ROWS = 10
_COP_VALUES = ("0", "1", "2", "3")


@dataclass(frozen=True, kw_only=True)
class Question:
    """One benchmark question in the common shape."""

    id: str
    """Stable id: the file's own id column (MedMCQA id, PubMed id, MMLU-Pro question_id) or the row index."""
    question: str
    options: dict[str, str]
    """{letter: text} in letter order."""
    answer: str
    """Gold letter."""


@dataclass
class LoadReport:
    """What a loader read, skipped and kept; `summary()` is the log line."""

    source: str
    num_rows: int = 0
    num_other_category: int = 0
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    num_questions: int = 0

    def summary(self) -> str:
        lines = [f"{self.source}: {self.num_rows} rows, {len(self.bad_rows)} bad (skipped), "
                 f"{self.num_other_category} outside the selected categories, {self.num_questions} questions"]
        reasons = Counter(reason.split(":")[0] for _, reason in self.bad_rows)
        lines += [f"  bad ({count} rows): {reason}" for reason, count in reasons.most_common()]
        lines += [f"  bad row {index + 1}: {reason}" for index, reason in self.bad_rows[:_MAX_LISTED_BAD_ROWS]]
        return "\n".join(lines)


# --- reading files -----------------------------------------------------------------------


def _read_json_file(path: Path) -> list[dict]:
    """Rows of a JSON array, an {id: row} object (ori_pqal.json) or JSON lines; a row that gives a
    key twice becomes a MALFORMED_FIELD row (a bad row naming file, row and key)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = parse_json(text)
        except json.JSONDecodeError:
            data = None  # JSON lines whose first line is an object
        if isinstance(data, list):
            return [_checked_row(row, f"{path} row {number}") for number, row in enumerate(data, 1)]
        if isinstance(data, dict):
            if all(isinstance(v, dict) for v in data.values()) and data:  # ori_pqal.json: {PMID: row}
                id_twice = repeated_key(data)  # a PMID given twice (or None, or a key inside a row)
                return [_checked_row(value, f"{path} row {number} ({key})", id_twice=id_twice == key, id_key=key)
                        for number, (key, value) in enumerate(data.items(), 1)]
            return [_checked_row(data, f"{path} row 1")]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(_checked_row(parse_json(line), f"{path} line {number}"))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
    return rows


def _checked_row(row, where: str, *, id_twice: bool = False, id_key: str | None = None):
    """`row` (with `_key` = id_key in an {id: row} file), or a MALFORMED_FIELD row when it gives
    a key twice or its id is given twice in the file."""
    if id_twice:
        return {MALFORMED_FIELD: key_given_twice(where, id_key)}
    repeated = repeated_key(row)
    if repeated is not None:
        return {MALFORMED_FIELD: key_given_twice(where, repeated)}
    return row if id_key is None else {"_key": id_key, **row}


def read_rows(path: str, *, split: str = "test") -> list[dict]:
    """Rows of a local .json/.jsonl/.parquet file, or of a hub dataset `owner/name[:config]`."""
    local = Path(path).expanduser()
    if local.is_file():
        try:
            if local.suffix == ".parquet":
                import pyarrow.parquet as pq

                return pq.read_table(local).to_pylist()
            return _read_json_file(local)
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None
        except Exception as error:  # pyarrow's own errors: a corrupt parquet file
            if isinstance(error, ValueError) and str(error).startswith(str(path)):
                raise
            raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None
    if local.exists():
        raise ValueError(f"{path}: is a folder; give the benchmark file (.json/.jsonl/.parquet)")
    if path.startswith((".", "/", "~")) or path.split(":")[0].count("/") != 1 or Path(path).suffix:
        raise FileNotFoundError(f"{path}: no such file (and not a hub dataset id like 'openlifescienceai/medmcqa')")
    from datasets import load_dataset

    name, _, config = path.partition(":")
    try:
        return list(load_dataset(name, config or None, split=split))
    except Exception as error:  # offline, unknown id, missing config or split: one line, not a traceback
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{path}: no such local file, and as a hub dataset (split {split!r}) it failed: "
                         f"{type(error).__name__}: {first_line}") from None


# --- one row per benchmark -----------------------------------------------------------------


def _row_id(row: dict, index: int, *keys: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    return str(index)


def _medqa(row: dict, index: int) -> Question:
    if "choices" in row and "options" not in row:  # bigbio QA schema: the answer is the option's text
        choices = list(row["choices"] or [])
        answers = row.get("answer") or []
        answer_text = answers[0] if isinstance(answers, list) and answers else answers
        if answer_text not in choices:
            raise BadRowError(f"answer: {answer_text!r} is not one of the choices")
        question, options, gold = parse_mcq_row(row.get("question"), choices, LETTERS[choices.index(answer_text)])
    else:
        options = row.get("options")
        if isinstance(options, list) and options and isinstance(options[0], dict):
            options = {o.get("key"): o.get("value") for o in options}
        gold = row.get("answer_idx") if row.get("answer_idx") is not None else row.get("answer")
        question, options, gold = parse_mcq_row(row.get("question"), options, gold)
    return Question(id=_row_id(row, index, "id", "question_id"), question=question, options=options, answer=gold)


def _medmcqa(row: dict, index: int) -> Question:
    options = [row.get(f"op{c}") for c in "abcd"]
    cop = row.get("cop")
    question, parsed, gold = parse_mcq_row(row.get("question"), options, LETTERS[int(cop)])
    return Question(id=_row_id(row, index, "id"), question=question, options=parsed, answer=gold)


def check_medmcqa_labels(rows: list[dict], path: str) -> None:
    """Refuse files whose `cop` is not MedMCQA's 0-3: hidden labels, 1-based numbering, junk."""
    cops = [row.get("cop") for row in rows]
    if rows and all(c in (None, -1, "-1", "") for c in cops):
        raise ValueError(f"{path}: every row has cop={cops[0]!r}: this split hides its labels (MedMCQA's "
                         "test split is unlabelled); evaluate the validation split, as MedMCQA results usually are")
    for index, cop in enumerate(cops):
        if isinstance(cop, bool) or not isinstance(cop, (int, str)) or str(cop).strip() not in _COP_VALUES:
            hint = (" (cop=4: this file numbers options 1-4 like the original release; subtract 1)"
                    if str(cop).strip() == "4" else "")
            raise ValueError(f"{path}: row {index + 1}: cop={cop!r} is not an option index 0-3{hint}")
    if "0" not in {str(c).strip() for c in cops} and len(cops) >= 20:
        raise ValueError(f"{path}: no row has cop=0 in {len(cops)} rows: the labels look 1-based "
                         "(the original release numbered options 1-4); convert to 0-3")


def _pubmedqa(row: dict, index: int) -> Question:
    if "QUESTION" in row:  # the authors' ori_pqal.json
        contexts, question, key = row.get("CONTEXTS") or [], row.get("QUESTION"), row.get("_key")
    else:
        context = row.get("context") or {}
        contexts = context.get("contexts", []) if isinstance(context, dict) else [str(context)]
        question, key = row.get("question"), row.get("pubid")
    decision = str(row.get("final_decision") or "").strip().lower()
    answer = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}.get(decision)
    if answer is None:
        raise BadRowError(f"final_decision: {row.get('final_decision')!r} is not yes/no/maybe")
    if not isinstance(question, str) or not question.strip():
        raise BadRowError("question: missing or empty")
    abstract = " ".join(str(c) for c in contexts)
    text = f"{abstract}\n\n{question.strip()}" if abstract.strip() else question.strip()
    return Question(id=str(key) if key not in (None, "") else str(index), question=text,
                    options=dict(PUBMEDQA_OPTIONS), answer=answer)


def _mmlu_pro(row: dict, index: int) -> Question:
    options = [o for o in (row.get("options") or []) if o not in (None, "N/A")]
    question, parsed, gold = parse_mcq_row(row.get("question"), options, row.get("answer"))
    return Question(id=_row_id(row, index, "question_id"), question=question, options=parsed, answer=gold)


BENCHMARKS = {"medqa": _medqa, "medmcqa": _medmcqa, "pubmedqa": _pubmedqa, "mmlu_pro_medical": _mmlu_pro}


def _check_columns(name: str, rows: list[dict], path: str) -> None:
    """File-level checks that would otherwise make every row bad or the selection empty."""
    if not rows:
        raise ValueError(f"{path}: no rows")
    if name == "mmlu_pro_medical" and not any("category" in row for row in rows[:50]):
        raise ValueError(f"{path}: no 'category' column, so the medical questions of MMLU-Pro cannot be "
                         f"selected (columns: {sorted(rows[0])})")
    if name == "medmcqa":
        check_medmcqa_labels(rows, path)
    if name == "pubmedqa" and not any("final_decision" in row for row in rows[:50]):
        raise ValueError(f"{path}: no 'final_decision' column: not a labelled PubMedQA file "
                         "(use pqa_labeled or ori_pqal.json, not pqa_unlabeled)")


def load_benchmark(name: str, path: str, *, split: str = "test", limit: int | None = None,
                   max_bad_fraction: float = 0.01, mmlu_pro_categories=MMLU_PRO_MEDICAL_CATEGORIES,
                   ) -> tuple[list[Question], LoadReport]:
    """Questions of benchmark `name` from a local file or hub id, and what was skipped."""
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    rows = read_rows(path, split=split)
    _check_columns(name, rows, path)
    report = LoadReport(source=f"{name} {path}", num_rows=len(rows))
    categories = {c.strip().lower() for c in mmlu_pro_categories}
    questions = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            report.bad_rows.append((index, f"row: not an object ({type(row).__name__})"))
            continue
        if MALFORMED_FIELD in row:
            report.bad_rows.append((index, f"malformed row: {row[MALFORMED_FIELD]}"))
            continue
        if name == "mmlu_pro_medical" and str(row.get("category", "")).strip().lower() not in categories:
            report.num_other_category += 1
            continue
        try:
            questions.append(BENCHMARKS[name](row, index))
        except BadRowError as error:
            report.bad_rows.append((index, str(error)))
    selected = report.num_rows - report.num_other_category
    if selected == 0:
        raise ValueError(f"{path}: no row has an MMLU-Pro category in {sorted(categories)} "
                         f"(categories present: {sorted({str(r.get('category')) for r in rows})[:15]})")
    if len(report.bad_rows) > max_bad_fraction * selected:
        first_index, first_reason = report.bad_rows[0]
        raise ValueError(f"{path}: {len(report.bad_rows)} of {selected} rows are bad, more than "
                         f"max_bad_fraction={max_bad_fraction}; first: row {first_index + 1}: {first_reason}"
                         f"\n{report.summary()}")
    if not questions:
        raise ValueError(f"{path}: no usable {name} questions\n{report.summary()}")
    ids = Counter(q.id for q in questions)
    if len(ids) < len(questions):  # ids key the resume log: duplicates fall back to row order
        questions = [Question(id=str(i), question=q.question, options=q.options, answer=q.answer)
                     for i, q in enumerate(questions)]
    if limit is not None:
        questions = questions[:limit]
    report.num_questions = len(questions)
    return questions, report

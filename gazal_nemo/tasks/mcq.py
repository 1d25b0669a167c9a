"""The medical multiple-choice task: its data, prompts, answer extraction and reward, in one place.

A task owns everything that knows what a question and an answer are (nanochat's
tasks/gsm8k.py is the model): GRPO trains on it (rl/), `gazal eval` and the in-training
evaluation score with it (eval/), and the accuracy reward *is* its evaluation, so the
number the trainer maximises is the number the benchmark reports.

Data (Gazal-R1 section 4.2). The paper trained on a shuffled 10% of UltraMedical's MCQs. A
row is (question, options, answer letter); options come as {letter: text} (a parquet
struct fills missing letters with None, which we drop) or as a list lettered A, B, ....
Each prompt is the GRPO system prompt (Appendix B.2) plus "question\\n\\nA. ...\\nB. ..."
rendered by the tokenizer's own chat template with the generation prompt, so the policy
sees at training time exactly what it sees at inference. Every prompt carries its gold
letter and the option letters: the accuracy reward only accepts a boxed letter among them.

Order of operations, chosen so the expensive step runs on the subset only: check every
row (cheap, and a broken dataset should be noticed even in the 90% we skip), draw the
seeded subset from the valid rows, then tokenize the subset and drop prompts over
max_prompt_length (counted). Bad rows are reported by row number (from 1); more than
max_bad_fraction of them stops the run before any GPU time is spent.

Answer (section 4.4). The answer is the LAST \\boxed{...} of the completion and only a
letter among the question's options counts: hedging with several boxed letters, one box
naming several options (`\\boxed{A or B}`) or boxing a letter that is not an option earns
nothing. With a think block, only a box after `</think>` is an answer: a letter boxed
inside the reasoning (or before it) is not the final answer the paper's format asks for.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT
from gazal_nemo.data.sft import format_options
from gazal_nemo.data.sources import MALFORMED_FIELD, BadRow, BadRowError, is_local_source, read_local_rows

_MAX_LISTED_BAD_ROWS = 20
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _allowed(key: str, value, allowed: str) -> ValueError:
    return ValueError(f"{key}={value!r}; allowed: {allowed}")


# --- the data section of a GRPO recipe ---------------------------------------------------


@dataclass(kw_only=True)
class MCQDataConfig:
    """Multiple-choice prompts for GRPO (UltraMedical MCQs, paper section 4.2)."""

    path: str
    """Local .json/.jsonl/.parquet file or folder of them, or a Hugging Face hub dataset id."""
    split: str = "train"
    """Split to read when path is a hub id."""
    question_key: str = "question"
    """Column holding the question text."""
    options_key: str = "options"
    """Column holding the options: {letter: text} or a list of texts (lettered A, B, ...)."""
    answer_key: str = "answer"
    """Column holding the gold option letter."""
    max_prompt_length: int = 3072
    """Prompts longer than this many tokens (chat template included) are dropped and counted (paper: 3072)."""
    subset_fraction: float = 0.1
    """Fraction of the valid rows used, drawn at random with seed (paper: a shuffled 10%)."""
    seed: int = 3047
    """Seed of the subset draw and its order (paper GRPO seed 3047)."""
    max_bad_fraction: float = 0.01
    """Refuse the data when more than this fraction of rows is malformed."""
    system_prompt: str | None = None
    """System message; None uses the paper's GRPO prompt (Appendix B.2), '' sends none."""

    def __post_init__(self):
        if not self.path:
            raise _allowed("grpo.data.path", self.path, "a file, folder or hub dataset id")
        if self.max_prompt_length < 1:
            raise _allowed("grpo.data.max_prompt_length", self.max_prompt_length, "integers >= 1")
        if not 0 < self.subset_fraction <= 1:
            raise _allowed("grpo.data.subset_fraction", self.subset_fraction, "0 < x <= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise _allowed("grpo.data.max_bad_fraction", self.max_bad_fraction, "0 <= x <= 1")
        if self.seed < 0:
            raise _allowed("grpo.data.seed", self.seed, "integers >= 0")


@dataclass(frozen=True, kw_only=True)
class MCQPrompt:
    """One GRPO prompt, ready for the sampler, with what the rewards check against."""

    row: int
    """Index of the row in the source dataset (from 0; reports print it from 1)."""
    prompt: str
    """Chat-template text ending with the assistant generation prompt."""
    prompt_ids: list[int]
    gold_letter: str
    option_letters: tuple[str, ...]


@dataclass
class MCQDataReport:
    """What the loader read, dropped and kept; `summary()` is the log line."""

    source: str
    num_rows: int
    num_bad: int
    bad_rows: list[BadRow] = field(default_factory=list)
    num_selected: int = 0
    """Valid rows drawn into the subset."""
    num_too_long: int = 0
    """Drawn prompts dropped for exceeding max_prompt_length."""
    num_prompts: int = 0

    def summary(self) -> str:
        lines = [f"MCQ data {self.source}: {self.num_rows} rows, {self.num_bad} bad, {self.num_selected} drawn, "
                 f"{self.num_too_long} too long, {self.num_prompts} prompts"]
        reasons = Counter(bad.reason.split(":")[0] for bad in self.bad_rows)
        lines += [f"  bad ({count} rows): {reason}" for reason, count in reasons.most_common()]
        lines += [f"  bad row {bad.row + 1}: {bad.reason}" for bad in self.bad_rows[:_MAX_LISTED_BAD_ROWS]]
        if len(self.bad_rows) > _MAX_LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(self.bad_rows) - _MAX_LISTED_BAD_ROWS} more bad rows")
        return "\n".join(lines)


# --- one row -----------------------------------------------------------------------------


def _letter(value) -> str | None:
    """'B', 'b', 'B.', '(B)', 'B)' -> 'B'; anything else -> None."""
    text = str(value).strip().strip("().:").strip().upper()
    return text if len(text) == 1 and text in string.ascii_uppercase else None


def parse_options(options) -> dict[str, str]:
    """{letter: text} sorted by letter, from a dict, a list, or either as a JSON string."""
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except ValueError:
            raise BadRowError("options: a string that is not a JSON list or object") from None
    if isinstance(options, Mapping):
        items = [(key, text) for key, text in options.items() if text is not None]
    elif isinstance(options, (list, tuple)):
        if len(options) > len(string.ascii_uppercase):
            raise BadRowError(f"options: {len(options)} options, more than there are letters")
        items = list(zip(string.ascii_uppercase, options))
    else:
        raise BadRowError(f"options: missing or not a list/dict (got {type(options).__name__})")
    parsed = {}
    for key, text in items:
        letter = _letter(key)
        if letter is None:
            raise BadRowError(f"options: key {key!r} is not an option letter")
        if letter in parsed:
            raise BadRowError(f"options: letter {letter} appears twice")
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)  # numeric options ("5 mg" written as 5)
        if not isinstance(text, str) or not text.strip():
            raise BadRowError(f"options: option {letter} is empty or not text")
        parsed[letter] = text.strip()
    if len(parsed) < 2:
        raise BadRowError(f"options: {len(parsed)} option(s); a multiple-choice question needs at least 2")
    return dict(sorted(parsed.items()))


def parse_mcq_row(question, options, answer) -> tuple[str, dict[str, str], str]:
    """(question, {letter: text}, gold letter) of one row, or BadRowError saying what is wrong."""
    if not isinstance(question, str) or not question.strip():
        raise BadRowError("question: missing or empty")
    parsed = parse_options(options)
    gold = _letter(answer) if answer is not None else None
    if gold not in parsed:
        raise BadRowError(f"answer: {answer!r} is not one of the option letters {''.join(parsed)}")
    return question.strip(), parsed, gold


def mcq_messages(question: str, options: dict[str, str], system_prompt: str) -> list[dict]:
    """[system (unless ''), user: question + lettered options], rendered like the SFT rows."""
    user = {"role": "user", "content": f"{question}\n\n{format_options(options)}"}
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [user]


def resolve_system_prompt(system_prompt: str | None) -> str:
    """None -> the paper's GRPO system prompt (Appendix B.2)."""
    return GRPO_SYSTEM_PROMPT if system_prompt is None else system_prompt


# --- a dataset ---------------------------------------------------------------------------


def load_mcq_dataset(cfg: MCQDataConfig):
    """The rows: a list of dicts (local JSON), a `datasets.Dataset` (local parquet) or a hub dataset.

    Local JSON lines that cannot be read become bad rows (see `gazal_nemo.data.sources`).
    """
    try:
        if is_local_source(cfg.path):
            return read_local_rows(cfg.path)
    except ValueError as e:
        raise ValueError(f"grpo.data.path={cfg.path!r}: {e}") from None
    from datasets import load_dataset

    return load_dataset(cfg.path, split=cfg.split)


def _columns(rows, cfg: MCQDataConfig) -> list[list]:
    """[questions, options, answers, why-malformed (None for readable rows)], column by column."""
    keys = [("grpo.data.question_key", cfg.question_key), ("grpo.data.options_key", cfg.options_key),
            ("grpo.data.answer_key", cfg.answer_key)]
    if hasattr(rows, "column_names"):
        for config_key, column in keys:
            if column not in rows.column_names:
                raise ValueError(f"{config_key}={column!r}: no such column in {cfg.path}; "
                                 f"columns: {rows.column_names}")
        return [list(rows[column]) for _, column in keys] + [[None] * len(rows)]
    present = set().union(*(row.keys() for row in rows)) - {MALFORMED_FIELD}
    for config_key, column in keys:
        if present and column not in present:  # no readable row: every row is bad, reported as such
            raise ValueError(f"{config_key}={column!r}: no such column in {cfg.path}; columns: {sorted(present)}")
    return [[row.get(column) for row in rows] for _, column in keys] + [[row.get(MALFORMED_FIELD) for row in rows]]


def _draw_subset(num_valid: int, fraction: float, seed: int) -> np.ndarray:
    """Seeded random positions into the valid rows, in drawn order (the paper's shuffled subset)."""
    if num_valid == 0:
        return np.zeros(0, dtype=np.int64)
    num_drawn = max(1, int(round(fraction * num_valid)))
    return np.random.default_rng(seed).permutation(num_valid)[:num_drawn]


def build_mcq_prompts(rows, cfg: MCQDataConfig, tokenizer) -> tuple[list[MCQPrompt], MCQDataReport]:
    """Check rows, draw the subset, render and tokenize it; ValueError if too many rows are bad.

    rows: a `datasets.Dataset` or a list of dicts with the configured column names.
    """
    questions, options, answers, malformed = _columns(rows, cfg)
    valid, bad_rows = [], []
    for index, row in enumerate(zip(questions, options, answers)):
        if malformed[index] is not None:
            bad_rows.append(BadRow(source=cfg.path, row=index, reason=f"malformed line: {malformed[index]}"))
            continue
        try:
            valid.append((index, *parse_mcq_row(*row)))
        except BadRowError as error:
            bad_rows.append(BadRow(source=cfg.path, row=index, reason=str(error)))
    report = MCQDataReport(source=cfg.path, num_rows=len(questions), num_bad=len(bad_rows), bad_rows=bad_rows)
    _check_bad_fraction(report, cfg.max_bad_fraction)

    system_prompt = resolve_system_prompt(cfg.system_prompt)
    drawn = [valid[i] for i in _draw_subset(len(valid), cfg.subset_fraction, cfg.seed)]
    report.num_selected = len(drawn)
    prompts = []
    for index, question, parsed, gold in drawn:
        text, ids = render_prompt(mcq_messages(question, parsed, system_prompt), tokenizer)
        if len(ids) > cfg.max_prompt_length:
            report.num_too_long += 1
            continue
        prompts.append(MCQPrompt(row=index, prompt=text, prompt_ids=ids, gold_letter=gold,
                                 option_letters=tuple(parsed)))
    report.num_prompts = len(prompts)
    if not prompts:
        raise ValueError(f"MCQ data: no usable prompts (grpo.data.max_prompt_length={cfg.max_prompt_length})\n"
                         + report.summary())
    return prompts, report


def load_mcq_prompts(cfg: MCQDataConfig, tokenizer) -> tuple[list[MCQPrompt], MCQDataReport]:
    """load_mcq_dataset + build_mcq_prompts: the GRPO prompt set of a recipe."""
    return build_mcq_prompts(load_mcq_dataset(cfg), cfg, tokenizer)


def render_prompt(messages: list[dict], tokenizer) -> tuple[str, list[int]]:
    """Chat-template text with the generation prompt, and its token ids (no extra special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_bad_fraction(report: MCQDataReport, max_bad_fraction: float) -> None:
    if report.num_rows == 0:
        raise ValueError(f"MCQ data {report.source}: no rows")
    fraction = report.num_bad / report.num_rows
    if fraction > max_bad_fraction:
        first = report.bad_rows[0]
        raise ValueError(f"MCQ data {report.source}: {report.num_bad} of {report.num_rows} rows are bad "
                         f"({100 * fraction:.2f}%), more than grpo.data.max_bad_fraction={max_bad_fraction}; "
                         f"first: row {first.row + 1}: {first.reason}\n" + report.summary())


# --- synthetic task for CPU end-to-end tests ----------------------------------------------

# Words the tiny test tokenizer (gazal_nemo.models.tiny) was trained on, so they stay short in tokens.
SYNTHETIC_WORDS = ("chest", "pain", "aspirin", "heparin", "troponin", "leads", "plan", "system",
                   "options", "correct", "wrong", "step", "answer", "letter", "rule", "case")


def make_synthetic_mcq_rows(num_rows: int, *, seed: int = 0, num_options: int = 4) -> list[dict]:
    """Rows of a task a tiny model can learn and the accuracy reward can verify.

    "Which option is the word X?" with num_options distinct words, X among them; the gold
    letter is X's position. The answer only needs copying, so reward should rise within a
    few dozen steps, and prompts stay short (a few dozen tokens with the tiny tokenizer).
    """
    if not 2 <= num_options <= len(SYNTHETIC_WORDS):
        raise ValueError(f"num_options={num_options}; allowed: 2..{len(SYNTHETIC_WORDS)}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_rows):
        words = [SYNTHETIC_WORDS[i] for i in rng.choice(len(SYNTHETIC_WORDS), size=num_options, replace=False)]
        gold = int(rng.integers(num_options))
        letters = string.ascii_uppercase[:num_options]
        rows.append({"question": f"Which option is the word {words[gold]}?",
                     "options": dict(zip(letters, words)), "answer": letters[gold]})
    return rows


# --- answer extraction -------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
# Wrappers a model puts around the letter inside \boxed{...}: \text{B}, \textbf{B}, \mathrm{B}.
_WRAPPER = re.compile(r"^\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mathsf|bf|rm)\s*\{(.*)\}$", re.S)
# "B", "(B)", "B.", "B)", "B: aspirin", "B. Aspirin" -> B
_LETTER = re.compile(r"^\(?([A-Za-z])(?:\s*[.):]\s*.*)?\)?$", re.S)


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(start, content_start, end) of every closed \\boxed{...}, in order of start.

    Braces are matched (so \\boxed{\\text{B}} works) in one pass over the text: a
    completion full of unclosed boxes must not cost quadratic time.
    """
    openers = {match.end() - 1: match.start() for match in _BOXED.finditer(text)}
    if not openers:
        return []
    spans, stack = [], []
    for brace in _BRACE.finditer(text, min(openers)):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            open_pos = stack.pop()
            if open_pos in openers:
                spans.append((openers[open_pos], open_pos + 1, brace.end()))
    return sorted(spans)


# Another option letter standing alone, joined by "or"/"and"/","/"/" ("A or B", "A, C").
_JOINED_LETTER = re.compile(r"(?:\b(?:or|and)\s+|[,/]\s*)\(?([A-Za-z])\b\)?", re.I)
_LONE_CAPITAL = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def _names_several_options(rest: str, options: set[str]) -> bool:
    """True when the text after a box's letter names further options ("or B", "B C D").

    One lone capital is allowed ("B. Vitamin A deficiency" names vitamin A, not option A);
    two or more, or one joined to the first by or/and/comma/slash, is a hedge.
    """
    lone = [letter for letter in _LONE_CAPITAL.findall(rest) if letter in options]
    joined = [m.group(1).upper() for m in _JOINED_LETTER.finditer(rest) if m.group(1).upper() in options]
    return len(lone) >= 2 or bool(joined)


def letter_in_box(content: str, options: set[str] | None = None) -> str | None:
    """The single option letter written inside a box, or None (also when it names several)."""
    inner = content.strip().strip("$").strip()
    for _ in range(4):  # \textbf{\text{B}} nests at most a few levels in practice
        unwrapped = _WRAPPER.match(inner)
        if unwrapped is None:
            break
        inner = unwrapped.group(1).strip()
    if inner.startswith("{") and inner.endswith("}"):
        inner = inner[1:-1].strip()
    match = _LETTER.match(inner)
    if match is None:
        return None
    rest = inner[match.end(1):]
    if options is not None and _names_several_options(rest, options):
        return None
    return match.group(1).upper()


def normalise_letters(option_letters: Sequence[str]) -> set[str]:
    """{"A", "B", ...} upper-cased and stripped, as letters are compared."""
    return {str(letter).strip().upper() for letter in option_letters}


def extract_answer_letter(completion: str, option_letters: Sequence[str]) -> str | None:
    """Letter in the LAST \\boxed{...} if it is one of the options; None otherwise."""
    spans = boxed_spans(completion)
    if not spans:
        return None
    _, content_start, end = spans[-1]
    options = normalise_letters(option_letters)
    letter = letter_in_box(completion[content_start:end - 1], options)
    return letter if letter in options else None


def answer_text(completion: str) -> str:
    """The part of a completion that may hold the final answer: after the last `</think>`.

    A completion that opens a think block and never closes it has no answer yet (it was
    cut mid-thought); one without think tags is all answer (models that do not think).
    """
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        return completion[close + len(THINK_CLOSE):]
    return "" if THINK_OPEN in completion else completion


def final_answer_letter(completion: str, option_letters: Sequence[str]) -> str | None:
    """The answer the rewards and evaluation score: the last boxed option after the reasoning."""
    return extract_answer_letter(answer_text(completion), option_letters)


def is_correct(completion: str, gold_letter: str, option_letters: Sequence[str]) -> bool:
    """The final answer (final_answer_letter) is the gold letter."""
    letter = final_answer_letter(completion, option_letters)
    return letter is not None and letter == str(gold_letter).strip().upper()


# --- reward ------------------------------------------------------------------------------


def accuracy_reward(*, completion: str, num_tokens: int, gold_letter: str,
                    option_letters: Sequence[str], truncated: bool, truncated_unanswered: bool = True) -> float:
    """+1 when the final boxed letter is the gold option, else 0 (paper Table 1).

    truncated_unanswered: a completion cut at the length limit has not answered (0).
    """
    if truncated and truncated_unanswered:
        return 0.0
    return 1.0 if is_correct(completion, gold_letter, option_letters) else 0.0

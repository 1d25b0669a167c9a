"""Multiple-choice prompts for GRPO (Gazal-R1 section 4.2) and a synthetic verifiable task.

The paper trained on a shuffled 10% of UltraMedical's MCQs. A row is (question, options,
answer letter); options come as {letter: text} (a parquet struct fills missing letters
with None, which we drop) or as a list lettered A, B, .... Each prompt is the GRPO
system prompt (Appendix B.2) plus "question\\n\\nA. ...\\nB. ..." rendered by the
tokenizer's own chat template with the generation prompt, so the policy sees at training
time exactly what it sees at inference. Every prompt carries its gold letter and the
option letters: the accuracy reward only accepts a boxed letter among them.

Order of operations, chosen so the expensive step runs on the subset only: check every
row (cheap, and a broken dataset should be noticed even in the 90% we skip), draw the
seeded subset from the valid rows, then tokenize the subset and drop prompts over
max_prompt_length (counted). Bad rows are reported by index; more than max_bad_fraction
of them stops the run before any GPU time is spent.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from gazal_nemo.data.sft import BadRow, BadRowError, format_options
from gazal_nemo.data.sources import MALFORMED_FIELD
from gazal_nemo.rl.config import MCQDataConfig

_MAX_LISTED_BAD_ROWS = 20


@dataclass(frozen=True, kw_only=True)
class MCQPrompt:
    """One GRPO prompt, ready for the sampler, with what the rewards check against."""

    row: int
    """Index of the row in the source dataset."""
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
        lines += [f"  bad row {bad.row}: {bad.reason}" for bad in self.bad_rows[:_MAX_LISTED_BAD_ROWS]]
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
    if system_prompt is not None:
        return system_prompt
    from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT

    return GRPO_SYSTEM_PROMPT


# --- a dataset ---------------------------------------------------------------------------


def load_mcq_dataset(cfg: MCQDataConfig):
    """The rows: a list of dicts (local JSON), a `datasets.Dataset` (local parquet) or a hub dataset.

    Local JSON lines that cannot be read become bad rows (see `gazal_nemo.data.sources`).
    """
    from gazal_nemo.data.sources import is_local_source, read_local_rows

    try:
        if is_local_source(cfg.path):
            return read_local_rows(cfg.path)
    except ValueError as e:
        raise ValueError(f"data.path={cfg.path!r}: {e}") from None
    from datasets import load_dataset

    return load_dataset(cfg.path, split=cfg.split)


def _columns(rows, cfg: MCQDataConfig) -> list[list]:
    """[questions, options, answers, why-malformed (None for readable rows)], column by column."""
    keys = [("data.question_key", cfg.question_key), ("data.options_key", cfg.options_key),
            ("data.answer_key", cfg.answer_key)]
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
        raise ValueError(f"MCQ data: no usable prompts (data.max_prompt_length={cfg.max_prompt_length})\n"
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
                         f"({100 * fraction:.2f}%), more than data.max_bad_fraction={max_bad_fraction}; "
                         f"first: row {first.row}: {first.reason}\n" + report.summary())


# --- synthetic task for CPU end-to-end tests ----------------------------------------------

# Words the tiny test tokenizer (gazal_nemo.testing.tiny) was trained on, so they stay short in tokens.
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

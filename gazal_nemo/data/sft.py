"""SFT examples: rows -> Qwen3 chats -> token ids with loss on the assistant answer only.

Rendering goes through the tokenizer's own chat template (`apply_chat_template`), so the
model trains on exactly the text it will see at inference. The loss covers the final
assistant turn, found without knowing the template: render the conversation up to that
turn with the generation prompt, render the whole conversation, and require the first to
be a token prefix of the second; the tokens after the prefix are the answer. Tokens after
the turn's last end-of-turn token (ChatML's trailing newline) get no loss either.

Decisions, recorded here because they change what the model learns:
- System prompt: the recipe's prompt (paper Appendix B.1) replaces any system message a
  row brings, so every example teaches the same format. With `system_prompt=""` the
  row's own system message is kept (and none is added).
- Multi-turn rows: earlier assistant turns are context only. Qwen3's template drops their
  reasoning once a later user turn exists, so they are not a stable prefix to train on.
- Reasoning goes inline in the assistant content as "<think>\\n...\\n</think>\\n\\n{answer}",
  which is both ChatML text and what Qwen3's template re-renders identically.
- Bad rows (unreadable JSON lines, missing/empty fields, unknown role, no assistant turn,
  too long, template mismatch, a JSON key given twice) are collected with their source and
  row (reports count rows from 1); more than `max_bad_fraction` of them stops the run
  before training starts.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from gazal_nemo.data.config import SFTDataConfig
from gazal_nemo.data.packing import IGNORE_INDEX, PackedSFTDataset, pack_documents
from gazal_nemo.data.sources import (
    MALFORMED_FIELD,
    BadRow,
    BadRowError,
    MixedRows,
    SourceCount,
    load_mixed_rows,
)

ROLES = ("system", "user", "assistant")
_MAX_LISTED_BAD_ROWS = 20


@dataclass(frozen=True)
class TokenizedDocument:
    """One chat as token ids; `labels` equals `input_ids` on answer tokens and -100 elsewhere (unshifted)."""

    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32
    source_index: int
    row: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTDataReport:
    """What the pipeline read, dropped and built; `summary()` is the log line."""

    sources: list[SourceCount]
    num_rows: int
    num_documents: int
    num_bad: int
    bad_rows: list[BadRow] = field(default_factory=list)
    num_sequences: int = 0
    num_tokens: int = 0
    num_loss_tokens: int = 0
    pack_fill: float = 0.0

    def summary(self) -> str:
        lines = [f"SFT data: {self.num_rows} rows drawn, {self.num_documents} documents, {self.num_bad} bad"]
        lines += [f"  source {c.path}: {c.num_rows} rows, {c.num_drawn} drawn" for c in self.sources]
        if self.num_sequences:
            lines.append(
                f"  {self.num_sequences} sequences, {self.num_tokens} tokens, "
                f"{self.num_loss_tokens} with loss, {100 * self.pack_fill:.1f}% filled"
            )
        reasons = Counter(bad.reason.split(":")[0] for bad in self.bad_rows)
        lines += [f"  bad ({count} distinct rows): {reason}" for reason, count in reasons.most_common()]
        lines += [
            f"  bad row {bad.row + 1} of {bad.source}: {bad.reason}"
            for bad in self.bad_rows[:_MAX_LISTED_BAD_ROWS]
        ]
        if len(self.bad_rows) > _MAX_LISTED_BAD_ROWS:
            lines.append(f"  ... and {len(self.bad_rows) - _MAX_LISTED_BAD_ROWS} more bad rows")
        return "\n".join(lines)


# ---- rows -> messages -------------------------------------------------------------------


def medreason_messages(row: dict) -> list[dict]:
    """MedReason row -> user: question + lettered options; assistant: <think>reasoning</think> answer."""
    question = _required_text(row, "question")
    reasoning = _required_text(row, "reasoning")
    answer = _required_text(row, "answer")
    options = format_options(row.get("options"))
    user = f"{question}\n\n{options}" if options else question
    assistant = f"<think>\n{reasoning}\n</think>\n\n{answer}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def format_options(options) -> str:
    """Options as "A. ..." lines; a dict keeps its keys as letters, a string is used as written."""
    if options is None:
        return ""
    if isinstance(options, str):
        return options.strip()
    if isinstance(options, dict):
        items = [(str(key), value) for key, value in options.items() if value is not None]
    elif isinstance(options, (list, tuple)):
        if len(options) > len(string.ascii_uppercase):
            raise BadRowError(f"options: {len(options)} options, more than there are letters")
        items = list(zip(string.ascii_uppercase, options))
    else:
        raise BadRowError(f"options: expected a string, list or dict, got {type(options).__name__}")
    return "\n".join(f"{letter}. {str(text).strip()}" for letter, text in items)


def chat_messages(row: dict) -> list[dict]:
    """A `messages` row (list of {role, content}) checked and reduced to role/content."""
    messages = row.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRowError("messages: missing or empty")
    cleaned = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise BadRowError(f"messages: message {number} is not a mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRowError(f"unknown role: message {number} has role {role!r}; allowed: {list(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise BadRowError(f"empty content: message {number} ({role})")
        cleaned.append({"role": role, "content": content})
    if cleaned[-1]["role"] != "assistant":
        raise BadRowError(f"no final assistant turn: last message is {cleaned[-1]['role']!r}")
    if not any(m["role"] == "user" for m in cleaned):
        raise BadRowError("no user turn")
    return cleaned


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Replace the row's system message by the recipe's; keep the row's when the recipe's is ""."""
    if not system_prompt:
        return list(messages)
    return [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]


def row_messages(row: dict, row_format: str, system_prompt: str) -> list[dict]:
    """The full chat of one row, system prompt included."""
    messages = medreason_messages(row) if row_format == "medreason" else chat_messages(row)
    return with_system_prompt(messages, system_prompt)


# ---- messages -> tokens -----------------------------------------------------------------


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the chat and labels that keep only the final assistant turn's tokens."""
    prompt_ids = _encode(
        tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True), tokenizer
    )
    full_ids = _encode(tokenizer.apply_chat_template(messages, tokenize=False), tokenizer)
    if len(full_ids) <= len(prompt_ids) or full_ids[: len(prompt_ids)] != prompt_ids:
        raise BadRowError(
            "template mismatch: the prompt with generation prompt is not a token prefix "
            "of the full conversation"
        )
    answer_end = _end_of_turn(full_ids, len(prompt_ids), tokenizer)
    input_ids = np.asarray(full_ids, dtype=np.int32)
    labels = np.full_like(input_ids, IGNORE_INDEX)
    labels[len(prompt_ids) : answer_end] = input_ids[len(prompt_ids) : answer_end]
    return input_ids, labels


def fit_to_length(
    input_ids: np.ndarray, labels: np.ndarray, *, max_length: int, truncation: str
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the truncation policy; a document must keep at least one predicted answer token."""
    if len(input_ids) > max_length:
        if truncation == "drop":
            raise BadRowError(f"too long: {len(input_ids)} tokens > max_length {max_length}")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    # Position 0 is never a target (nothing precedes it in its document).
    if not (labels[1:] != IGNORE_INDEX).any():
        raise BadRowError(f"no answer tokens within max_length {max_length}")
    return input_ids, labels


def tokenize_row(
    row: dict, *, row_format: str, cfg: SFTDataConfig, tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """One row -> (input_ids, labels) under the config's prompt, length and truncation policy."""
    messages = row_messages(row, row_format, cfg.system_prompt)
    input_ids, labels = tokenize_chat(messages, tokenizer)
    return fit_to_length(input_ids, labels, max_length=cfg.max_length, truncation=cfg.truncation)


# ---- the whole set ----------------------------------------------------------------------


def tokenize_mixed_rows(
    mixed: MixedRows, cfg: SFTDataConfig, tokenizer
) -> tuple[list[TokenizedDocument], SFTDataReport]:
    """Tokenize every drawn row (each distinct row once), collecting bad rows instead of failing."""
    documents, bad_rows, num_bad = [], [], 0
    done: dict[tuple[int, int], TokenizedDocument | BadRow] = {}
    for source_index, row_index in mixed.order.tolist():
        key = (source_index, row_index)
        if key not in done:
            done[key] = _tokenize_or_bad(mixed, source_index, row_index, cfg, tokenizer)
            if isinstance(done[key], BadRow):
                bad_rows.append(done[key])
        if isinstance(done[key], BadRow):
            num_bad += 1
        else:
            documents.append(done[key])
    report = SFTDataReport(
        sources=mixed.counts,
        num_rows=len(mixed),
        num_documents=len(documents),
        num_bad=num_bad,
        bad_rows=sorted(bad_rows, key=lambda b: (b.source, b.row)),
    )
    return documents, report


def check_bad_fraction(report: SFTDataReport, max_bad_fraction: float) -> None:
    """Stop before training when too many rows are unusable (ValueError with the summary)."""
    if report.num_rows == 0:
        raise ValueError("SFT data: the sources gave no rows\n" + report.summary())
    fraction = report.num_bad / report.num_rows
    if fraction > max_bad_fraction:
        first = report.bad_rows[0]
        raise ValueError(
            f"SFT data: {report.num_bad} of {report.num_rows} rows are bad ({100 * fraction:.2f}%), "
            f"more than sft_data.max_bad_fraction={max_bad_fraction}; first: row {first.row + 1} of {first.source}: "
            f"{first.reason}\n{report.summary()}"
        )
    if report.num_documents == 0:
        raise ValueError("SFT data: no usable documents\n" + report.summary())


def build_sft_documents(cfg: SFTDataConfig, tokenizer) -> tuple[list[TokenizedDocument], SFTDataReport]:
    """Load, mix and tokenize the configured sources; raises if too many rows are bad."""
    mixed = load_mixed_rows(cfg.sources, seed=cfg.seed)
    documents, report = tokenize_mixed_rows(mixed, cfg, tokenizer)
    check_bad_fraction(report, cfg.max_bad_fraction)
    return documents, report


def build_sft_dataset(cfg: SFTDataConfig, tokenizer) -> tuple[PackedSFTDataset, SFTDataReport]:
    """(PackedSFTDataset, SFTDataReport): packed when `cfg.pack`, else one document a sample."""
    documents, report = build_sft_documents(cfg, tokenizer)
    lengths = [len(doc) for doc in documents]
    bins = (
        pack_documents(lengths, cfg.max_length, seed=cfg.seed)
        if cfg.pack
        else [[i] for i in range(len(documents))]
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = PackedSFTDataset(documents, bins, max_length=cfg.max_length, pad_token_id=pad_token_id)
    report.num_sequences = len(dataset)
    report.num_tokens = sum(lengths)
    report.num_loss_tokens = int(sum(int((doc.labels[1:] != IGNORE_INDEX).sum()) for doc in documents))
    report.pack_fill = report.num_tokens / max(len(dataset) * cfg.max_length, 1)
    return dataset, report


def _tokenize_or_bad(mixed: MixedRows, source_index: int, row_index: int, cfg: SFTDataConfig, tokenizer):
    source = mixed.sources[source_index]
    row = mixed.row(source_index, row_index)
    if MALFORMED_FIELD in row:
        return BadRow(source=source.path, row=row_index, reason=f"malformed line: {row[MALFORMED_FIELD]}")
    try:
        input_ids, labels = tokenize_row(row, row_format=source.format, cfg=cfg, tokenizer=tokenizer)
    except BadRowError as error:
        return BadRow(source=source.path, row=row_index, reason=str(error))
    return TokenizedDocument(input_ids=input_ids, labels=labels, source_index=source_index, row=row_index)


def _required_text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        raise BadRowError(f"missing field: {name}")
    text = str(value).strip()
    if not text:
        raise BadRowError(f"empty field: {name}")
    return text


def _encode(text: str, tokenizer) -> list[int]:
    # The template already wrote every special token; adding BOS/EOS here would break the prefix check.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _end_of_turn(token_ids: list[int], start: int, tokenizer) -> int:
    """One past the last end-of-turn (eos) token of the answer, or the end when there is none."""
    eos = tokenizer.eos_token_id
    for position in range(len(token_ids) - 1, start - 1, -1):
        if token_ids[position] == eos:
            return position + 1
    return len(token_ids)

"""Checks of a generated case and answer: structure, the Chain-of-Draft constraint, lengths.

An answer must be `<think>` + reasoning steps + `</think>` + a Markdown assessment (B.1 and the
model card). A reasoning step is one non-empty line inside the think block; list markers
("-", "*", "1.", "2)", "Step 3:") are formatting, not words, and are dropped before counting.
A word is a whitespace-separated token holding a letter or digit (so "-" and "->" are not
words, "ST-elevation" and "q6h" are one each). The paper's CoD rule is >= 8 steps of
<= 10 words each; both bounds come from the recipe.

Each failed rule is one reason `code: detail`; the codes are what the report counts:
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

REASONS = {
    "empty": "nothing was generated (or only whitespace)",
    "control_token": "the text holds a chat-control token (<|im_start|>, <|im_end|>, <|endoftext|>)",
    "truncated": "the generation hit max_new_tokens",
    "prompt_too_long": "the prompt did not fit the model's context",
    "request_failed": "the endpoint kept failing (retries exhausted)",
    "no_think_block": "no <think> ... </think> block",
    "text_before_think": "text before <think>",
    "several_think_blocks": "more than one <think> block",
    "too_few_steps": "fewer reasoning steps than validation.min_steps",
    "too_many_steps": "more reasoning steps than validation.max_steps",
    "step_too_long": "a step longer than validation.max_words_per_step words",
    "empty_assessment": "nothing after </think>",
    "assessment_too_short": "assessment shorter than validation.min_assessment_words",
    "assessment_too_long": "assessment longer than validation.max_assessment_words",
    "case_too_short": "case shorter than validation.min_case_words",
    "case_too_long": "case longer than validation.max_case_words",
}
# Rejected even when validation.enforce is false: such a text cannot be an SFT example.
ALWAYS_ENFORCED = frozenset({"empty", "control_token", "prompt_too_long", "request_failed"})

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
_MARKER = re.compile(r"^\s*(?:[-*\u2022]+\s+|\d+\s*[.)]\s+|step\s*\d+\s*[:.)-]\s*)", re.IGNORECASE)
_WORDY = re.compile(r"\w")


def count_words(text: str) -> int:
    return sum(1 for token in text.split() if _WORDY.search(token))


def reasoning_steps(think: str) -> list[str]:
    """The steps of a think block: its non-empty lines without list markers."""
    steps = []
    for line in think.splitlines():
        step = _MARKER.sub("", line, count=1).strip()
        if step:
            steps.append(step)
    return steps


@dataclass
class Verdict:
    """What the checks found; `reasons` empty means it passed every rule."""

    reasons: list[str] = field(default_factory=list)
    num_steps: int | None = None
    max_step_words: int | None = None
    assessment_words: int | None = None

    @property
    def passed(self) -> bool:
        return not self.reasons

    def codes(self) -> list[str]:
        return [reason.split(":", 1)[0] for reason in self.reasons]

    def rejects(self, enforce: bool) -> bool:
        """Whether the example is rejected under validation.enforce."""
        return bool(self.reasons) if enforce else any(code in ALWAYS_ENFORCED for code in self.codes())

    def to_json(self) -> dict:
        out = {"passed": self.passed, "reasons": list(self.reasons)}
        for name in ("num_steps", "max_step_words", "assessment_words"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def _common(text: str, finish_reason: str, cfg, verdict: Verdict) -> bool:
    """Rules every generation shares; False when nothing more can be checked."""
    if finish_reason == "prompt_too_long":
        verdict.reasons.append("prompt_too_long: the prompt alone fills the context")
        return False
    if finish_reason == "failed":
        verdict.reasons.append("request_failed: retries exhausted")
        return False
    if not text.strip():
        verdict.reasons.append("empty: no text")
        return False
    found = [token for token in CONTROL_TOKENS if token in text]
    if found:
        verdict.reasons.append(f"control_token: {found[0]}")
    if finish_reason == "length" and not cfg.allow_truncated:
        verdict.reasons.append("truncated: hit max_new_tokens")
    return True


def check_case(text: str, cfg, *, finish_reason: str = "stop") -> Verdict:
    verdict = Verdict()
    if not _common(text, finish_reason, cfg, verdict):
        return verdict
    words = count_words(text)
    if words < cfg.min_case_words:
        verdict.reasons.append(f"case_too_short: {words} words < {cfg.min_case_words}")
    if cfg.max_case_words is not None and words > cfg.max_case_words:
        verdict.reasons.append(f"case_too_long: {words} words > {cfg.max_case_words}")
    return verdict


def check_response(text: str, cfg, *, finish_reason: str = "stop") -> Verdict:
    """The answer's structure and the CoD bounds (cfg: the recipe's ValidationConfig)."""
    verdict = Verdict()
    if not _common(text, finish_reason, cfg, verdict):
        return verdict
    opens, closes = text.count("<think>"), text.count("</think>")
    if opens == 0 or closes == 0:
        verdict.reasons.append("no_think_block: " + ("no <think>" if opens == 0 else "no </think>"))
        return verdict
    if opens > 1 or closes > 1:
        verdict.reasons.append(f"several_think_blocks: {opens} <think>, {closes} </think>")
    start, end = text.index("<think>"), text.index("</think>")
    if end < start:
        verdict.reasons.append("no_think_block: </think> before <think>")
        return verdict
    if text[:start].strip():
        verdict.reasons.append(f"text_before_think: {count_words(text[:start])} words")
    steps = reasoning_steps(text[start + len("<think>"):end])
    verdict.num_steps = len(steps)
    if len(steps) < cfg.min_steps:
        verdict.reasons.append(f"too_few_steps: {len(steps)} < {cfg.min_steps}")
    if cfg.max_steps is not None and len(steps) > cfg.max_steps:
        verdict.reasons.append(f"too_many_steps: {len(steps)} > {cfg.max_steps}")
    lengths = [count_words(step) for step in steps]
    verdict.max_step_words = max(lengths, default=0)
    long_steps = [n for n, words in enumerate(lengths, start=1) if words > cfg.max_words_per_step]
    if long_steps:
        verdict.reasons.append(f"step_too_long: step {long_steps[0]} has {lengths[long_steps[0] - 1]} words > "
                               f"{cfg.max_words_per_step} ({len(long_steps)} step(s) too long)")
    assessment = text[end + len("</think>"):]
    verdict.assessment_words = count_words(assessment)
    if verdict.assessment_words == 0:
        verdict.reasons.append("empty_assessment: nothing after </think>")
    elif verdict.assessment_words < cfg.min_assessment_words:
        verdict.reasons.append(f"assessment_too_short: {verdict.assessment_words} words < {cfg.min_assessment_words}")
    elif cfg.max_assessment_words is not None and verdict.assessment_words > cfg.max_assessment_words:
        verdict.reasons.append(f"assessment_too_long: {verdict.assessment_words} words > {cfg.max_assessment_words}")
    return verdict

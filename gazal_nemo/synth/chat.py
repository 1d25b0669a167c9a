"""What synthesis needs from a teacher model: conversations in, replies out (gazal_nemo/synth/backends.py
builds one from the recipe)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gazal_nemo.inference.protocol import SamplingSettings


@dataclass
class ChatResult:
    """One generated reply."""

    text: str
    finish_reason: str
    """stop, length, prompt_too_long (nothing generated), or failed (the request never succeeded)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    """Why a request failed (finish_reason failed)."""


class ChatBackend(Protocol):
    """What the generator needs from a teacher model."""

    name: str

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingSettings) -> list[ChatResult]:
        """One reply per conversation, in order; everything random is drawn from sampling.seed and the position."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters for the report (requests, retries by cause)."""
        ...

    def close(self) -> None:
        ...

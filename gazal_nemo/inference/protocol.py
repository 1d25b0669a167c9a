"""The engine protocol: token-id prompts + one SamplingSettings -> one Completion per prompt.

Every generator in gazal-nemo speaks it: GRPO rollouts, `gazal eval`, in-training
evaluation, and what builds on them (data synthesis, asynchronous rollouts). An engine
promises:
  * one completion per prompt, in prompt order; a prompt given k times gets k independent
    samples (a GRPO group carries a signal only if its completions can differ);
  * the same prompts, settings and weights give the same completions: everything random
    is drawn from `SamplingSettings.seed`, so a rerun and a resume draw alike;
  * a prompt that does not fit the engine's context is answered, not raised: no tokens,
    `finish_reason="prompt_too_long"` (counted and named by the caller), so one long row
    never ends a run;
  * `logprobs` are the log-probs of the sampled tokens under the distribution they were
    drawn from (temperature, then top-k, then top-p; None when greedy), which is what
    truncated importance sampling divides by;
  * each completion carries the `policy_version` of the weights that produced it
    (torchtitan's RL Completion does the same), so staleness is a property of the data.

Engines that generate from a trainer's live weights also implement `PolicyEngine`:
`sync_weights(version)` makes the engine generate with the trainer's current weights and
says what it cost (a push to vLLM, nothing for the megatron engine, which generates with
the training weights themselves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

FINISH_STOP = "stop"
"""Ended with a stop token (the token is the last of `tokens`)."""
FINISH_LENGTH = "length"
"""Hit max_new_tokens (or the engine's context limit) before a stop token."""
FINISH_PROMPT_TOO_LONG = "prompt_too_long"
"""The prompt alone fills the engine's context: nothing was generated."""
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_PROMPT_TOO_LONG)


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How one engine call samples (the recipe's grpo.sampling, or a benchmark's decoding)."""

    max_new_tokens: int
    """Completion budget in tokens."""
    temperature: float = 0.0
    """0: greedy (argmax, no log-probs); > 0: softmax temperature."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Keep the smallest set with this much probability mass; 1 disables."""
    seed: int = 0
    """Everything random in the call is drawn from it."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; allowed: integers >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; allowed: >= 0 (0 is greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"top_k={self.top_k}, top_p={self.top_p}; allowed: top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated completion of prompt `prompt_index`."""

    prompt_index: int
    tokens: list[int]
    """Generated ids, including the stop token when there is one."""
    truncated: bool
    """True unless it ended with a stop token (the loss masks truncated completions)."""
    logprobs: list[float] | None = None
    """Sampler's log-prob of each token under the distribution it was drawn from (None when greedy)."""
    finish_reason: str | None = None
    """One of FINISH_REASONS; None: derived from `truncated`."""
    policy_version: int = 0
    """Optimizer steps the weights that produced it had taken."""

    def __post_init__(self):
        if self.finish_reason is None:
            self.finish_reason = FINISH_LENGTH if self.truncated else FINISH_STOP
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r}; allowed: {', '.join(FINISH_REASONS)}")
        if self.finish_reason != FINISH_STOP and not self.truncated:
            raise ValueError(f"a completion that ended with {self.finish_reason!r} is truncated")


@dataclass
class PushReport:
    """What one weight push to an engine cost and how well the engine then agrees with the trainer."""

    version: int
    seconds: float = 0.0
    num_bytes: int = 0
    num_tensors: int = 0
    max_logprob_diff: float | None = None
    """Largest |engine - trainer| log-prob on the gate's probe (None: the engine shares the trainer's weights)."""
    details: dict = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        out = {"push/seconds": self.seconds, "push/bytes": float(self.num_bytes),
               "push/tensors": float(self.num_tensors)}
        if self.max_logprob_diff is not None:
            out["push/max_logprob_diff"] = self.max_logprob_diff
        return out


@runtime_checkable
class GenerationEngine(Protocol):
    """Anything that turns token-id prompts into completions."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        """One completion per prompt, in order (see the module docstring for the contract)."""
        ...


@runtime_checkable
class PolicyEngine(GenerationEngine, Protocol):
    """An engine that generates with a trainer's current weights."""

    policy_version: int

    def sync_weights(self, version: int) -> PushReport:
        """Generate with the trainer's weights of `version` from now on (all ranks of the engine call it)."""
        ...

    def release_memory(self) -> None:
        """Give memory back to the trainer until the next generate (may do nothing)."""
        ...

    def close(self) -> None:
        """Free the engine for good, keeping the trainer's process group (may do nothing)."""
        ...


def prompt_too_long(prompt_index: int, version: int = 0) -> Completion:
    """The answer to a prompt that does not fit: no tokens, truncated, reason named."""
    return Completion(prompt_index=prompt_index, tokens=[], truncated=True, finish_reason=FINISH_PROMPT_TOO_LONG,
                      policy_version=version)

"""Recipe sections for GRPO: rewards, the policy loss, sampling and dynamic sampling.

Defaults reproduce the Gazal-R1 paper (section 4, Appendix A.2) where it gives a value;
where it does not, the default is the value of the work it cites (Yeo et al. 2025 for the
cosine reward) and the field says so. Every field is validated here, so a recipe, a CLI
override and a test that builds the dataclass directly all get the same ValueError naming
the full dotted key as the recipe writes it (grpo.rewards.*, grpo.loss.*, grpo.sampling.*).
The prompt data section (grpo.data) belongs to its task: gazal_nemo.tasks.mcq.MCQDataConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

COMBINE_MODES = ("sum", "gated")
NORMALISATIONS = ("bnpo", "dapo", "grpo")


def _allowed(key: str, value, allowed: str) -> ValueError:
    return ValueError(f"{key}={value!r}; allowed: {allowed}")


def _check_choice(key: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _allowed(key, value, ", ".join(repr(c) for c in choices))


def _check_finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise _allowed(key, value, "a finite number")


@dataclass(kw_only=True)
class RewardConfig:
    """Which rewards score a completion and how they add up (paper section 4.4, Table 1)."""

    accuracy_weight: float = 1.0
    """Weight of the accuracy reward (+1 correct boxed letter, else 0); the paper gives no weights."""
    format_weight: float = 1.0
    """Weight of the format reward (1 for <think>...</think>, assessment, final \\boxed{X}; else 0)."""
    cosine_weight: float = 1.0
    """Weight of the cosine length-scaling reward (Yeo et al. 2025)."""
    repetition_weight: float = 1.0
    """Weight of the 3-gram repetition penalty (already <= 0, so keep the weight positive)."""
    combine: Literal["sum", "gated"] = "sum"
    """'sum': weighted sum of all rewards; 'gated': accuracy and the cosine bonus for a right answer count only in format."""
    format_min_think_words: int = 5
    """Words of reasoning the format reward asks for inside <think></think> (0: any non-empty text)."""
    format_min_assessment_words: int = 2
    """Words of assessment the format reward asks for between </think> and the box (0: any letter or digit)."""
    truncated_unanswered: bool = True
    """A completion cut at max_new_tokens has not answered: accuracy and format 0 (False: score its text)."""
    cosine_max_length: int = 4096
    """Length in tokens at which the cosine schedule ends (paper max completion length 4096)."""
    cosine_min_correct: float = 1.0
    """Correct-answer reward at cosine_max_length and beyond (Yeo et al.: r_L^c = 1)."""
    cosine_max_correct: float = 2.0
    """Correct-answer reward at length 0 (Yeo et al.: r_0^c = 2)."""
    cosine_min_wrong: float = -10.0
    """Wrong-answer reward at length 0 (Yeo et al.: r_0^w = -10)."""
    cosine_max_wrong: float = 0.0
    """Wrong-answer reward at cosine_max_length and beyond (Yeo et al.: r_L^w = 0)."""
    cosine_truncated_value: float | None = -10.0
    """Cosine reward of a truncated completion: Yeo et al.'s exceed-length penalty -10; None scores it by length."""
    repetition_ngram_size: int = 3
    """Word n-gram size of the repetition penalty (paper: 3-grams)."""
    repetition_max_penalty: float = -1.0
    """Penalty when every n-gram repeats; <= 0 (paper gives none: open-r1's default -1.0)."""
    overlong_weight: float = 0.0
    """Weight of DAPO's soft overlong punishment (0..-1 over the last overlong_buffer tokens); 0: off."""
    overlong_buffer: int = 1024
    """Tokens before cosine_max_length where the overlong punishment starts (paper tried 4:1 and 2:1 ratios)."""
    plugins: dict[str, float] = field(default_factory=dict)
    """Extra rewards: 'package.module:function' -> weight, loaded and checked at start-up."""

    def __post_init__(self):
        _check_choice("grpo.rewards.combine", self.combine, COMBINE_MODES)
        for key in ("format_min_think_words", "format_min_assessment_words"):
            if getattr(self, key) < 0:
                raise _allowed(f"grpo.rewards.{key}", getattr(self, key), "integers >= 0")
        if self.overlong_buffer < 1:
            raise _allowed("grpo.rewards.overlong_buffer", self.overlong_buffer, "integers >= 1")
        for key in ("accuracy_weight", "format_weight", "cosine_weight", "repetition_weight", "overlong_weight",
                    "cosine_min_correct", "cosine_max_correct", "cosine_min_wrong", "cosine_max_wrong",
                    "repetition_max_penalty"):
            _check_finite(f"grpo.rewards.{key}", getattr(self, key))
        if self.cosine_max_length < 1:
            raise _allowed("grpo.rewards.cosine_max_length", self.cosine_max_length, "integers >= 1")
        if self.cosine_min_correct > self.cosine_max_correct:
            raise _allowed("grpo.rewards.cosine_min_correct", self.cosine_min_correct,
                           f"<= rewards.cosine_max_correct ({self.cosine_max_correct})")
        if self.cosine_min_wrong > self.cosine_max_wrong:
            raise _allowed("grpo.rewards.cosine_min_wrong", self.cosine_min_wrong,
                           f"<= rewards.cosine_max_wrong ({self.cosine_max_wrong})")
        if self.cosine_max_wrong > self.cosine_min_correct:
            # Otherwise a long wrong answer would outscore a long correct one.
            raise _allowed("grpo.rewards.cosine_max_wrong", self.cosine_max_wrong,
                           f"<= rewards.cosine_min_correct ({self.cosine_min_correct})")
        if self.cosine_truncated_value is not None:
            _check_finite("grpo.rewards.cosine_truncated_value", self.cosine_truncated_value)
        if self.repetition_ngram_size < 1:
            raise _allowed("grpo.rewards.repetition_ngram_size", self.repetition_ngram_size, "integers >= 1")
        if self.repetition_max_penalty > 0:
            raise _allowed("grpo.rewards.repetition_max_penalty", self.repetition_max_penalty, "numbers <= 0")
        for path, weight in self.plugins.items():
            if ":" not in path:
                raise _allowed("grpo.rewards.plugins", path, "keys like 'package.module:function'")
            _check_finite(f"grpo.rewards.plugins.{path}", weight)


@dataclass(kw_only=True)
class GRPOLossConfig:
    """The clipped GRPO objective and its group-relative advantages (paper sections 4.1, 4.3)."""

    eps_low: float = 0.2
    """Lower clip: ratios below 1 - eps_low stop pushing down (DAPO default 0.2)."""
    eps_high: float = 0.28
    """Upper clip, 'clip-higher' (paper and DAPO: 0.28)."""
    beta: float = 0.0
    """Coefficient of the k3 KL to a reference policy (paper: 0.0, no reference model)."""
    normalisation: Literal["bnpo", "dapo", "grpo"] = "bnpo"
    """'bnpo': tokens of the local batch (the paper); 'dapo': tokens of the global step; 'grpo': per-sequence mean."""
    mask_truncated: bool = True
    """Drop completions cut at max_new_tokens from the loss (paper section 4.5.1, DAPO)."""
    scale_advantages_by_std: bool = True
    """Divide group-centred rewards by the group std (GRPO; off = Dr. GRPO style)."""
    advantage_eps: float = 1e-4
    """Added to the group std in the denominator."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token by min(pi_old / pi_sampler, tis_cap) to correct
    the sampler/trainer mismatch (vLLM); None: off (the paper; the megatron engine samples with the trainer's weights)."""
    mis_threshold: float | None = None
    """Sequence-level masking: drop a completion whose geometric-mean pi_old / pi_sampler lies outside
    [1/mis_threshold, mis_threshold] (asynchronous rollouts, stale samples); None: off."""

    def __post_init__(self):
        _check_choice("grpo.loss.normalisation", self.normalisation, NORMALISATIONS)
        if not 0 <= self.eps_low < 1:
            raise _allowed("grpo.loss.eps_low", self.eps_low, "0 <= x < 1")
        if not 0 <= self.eps_high or not math.isfinite(self.eps_high):
            raise _allowed("grpo.loss.eps_high", self.eps_high, "finite numbers >= 0")
        if not 0 <= self.beta or not math.isfinite(self.beta):
            raise _allowed("grpo.loss.beta", self.beta, "finite numbers >= 0")
        if not 0 < self.advantage_eps or not math.isfinite(self.advantage_eps):
            raise _allowed("grpo.loss.advantage_eps", self.advantage_eps, "finite numbers > 0")
        if self.tis_cap is not None and not (1 <= self.tis_cap and math.isfinite(self.tis_cap)):
            raise _allowed("grpo.loss.tis_cap", self.tis_cap, "null or finite numbers >= 1")
        if self.mis_threshold is not None and not (1 < self.mis_threshold and math.isfinite(self.mis_threshold)):
            raise _allowed("grpo.loss.mis_threshold", self.mis_threshold, "null or finite numbers > 1")


@dataclass(kw_only=True)
class SamplingConfig:
    """How completions are sampled; the training side applies the same filters (Appendix A.2)."""

    temperature: float = 0.6
    """Softmax temperature (paper: 0.6)."""
    top_k: int = 20
    """Keep the k most likely tokens; 0 disables (paper: 20)."""
    top_p: float = 0.95
    """Keep the smallest set with this much probability mass; 1 disables (paper: 0.95)."""
    num_generations: int = 4
    """Completions per prompt, the GRPO group size (paper: 4)."""
    max_new_tokens: int = 4096
    """Completion length cap in tokens; longer ones are truncated (paper: 4096)."""
    train_logprobs: Literal["temperature", "filtered"] = "temperature"
    """Distribution of the trainer's log-probs: temperature only, as TRL (the paper's stack) computes them,
    or the sampler's top-k/top-p renormalised one (its gradient reaches only tokens inside the filter)."""

    def __post_init__(self):
        if not 0 < self.temperature or not math.isfinite(self.temperature):
            raise _allowed("grpo.sampling.temperature", self.temperature, "finite numbers > 0")
        _check_choice("grpo.sampling.train_logprobs", self.train_logprobs, ("temperature", "filtered"))
        if self.top_k < 0:
            raise _allowed("grpo.sampling.top_k", self.top_k, "integers >= 0 (0 disables)")
        if not 0 < self.top_p <= 1:
            raise _allowed("grpo.sampling.top_p", self.top_p, "0 < x <= 1 (1 disables)")
        if self.num_generations < 2:
            raise _allowed("grpo.sampling.num_generations", self.num_generations,
                           "integers >= 2 (a group of one has no baseline)")
        if self.max_new_tokens < 1:
            raise _allowed("grpo.sampling.max_new_tokens", self.max_new_tokens, "integers >= 1")


@dataclass(kw_only=True)
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (Yu et al. 2025): train only on groups that carry a signal (off in the paper)."""

    enabled: bool = False
    """Drop groups whose accuracy rewards are all equal and sample further prompts to refill the batch."""
    max_rounds: int = 3
    """Generation rounds per rollout batch at most (the first included); then the batch is filled
    with dropped groups (zero advantage, no gradient) so its size stays fixed."""

    def __post_init__(self):
        if self.max_rounds < 1:
            raise _allowed("grpo.dynamic_sampling.max_rounds", self.max_rounds, "integers >= 1")

"""The adapter section of a recipe: DoRA + rsLoRA as in Gazal-R1's SFT (Appendix A.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DROPOUT_MODES = ("lowrank", "peft")
ADAPTER_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(kw_only=True)
class AdapterConfig:
    """A low-rank adapter on megatron's attention and MLP linears (all-linear in PEFT terms)."""

    rank: int = 256
    """Adapter rank r (paper: 256)."""
    alpha: float = 512
    """LoRA alpha; the update is scaled by alpha/sqrt(r) with rsLoRA, alpha/r without (paper: 512)."""
    dropout: float = 0.1
    """Dropout on the adapter's input while training (paper: 0.1)."""
    use_dora: bool = True
    """Weight-decomposed LoRA: a trained per-row magnitude over the normalised adapted weight (paper: on)."""
    use_rslora: bool = True
    """Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (paper: on)."""
    dropout_mode: str = "lowrank"
    """DoRA with dropout: "lowrank" (m/n)(Wx + sBA drop(x)), or "peft" (PEFT's exact form, one more base GEMM)."""
    targets: tuple[str, ...] = ADAPTER_TARGETS
    """Megatron linears to adapt; all four equal PEFT's target_modules="all-linear" on Qwen3."""

    def __post_init__(self):
        if isinstance(self.targets, (list, str)):
            self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank!r}; allowed: integers >= 1")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < math.inf:
            raise ValueError(f"adapter.alpha={self.alpha!r}; allowed: finite numbers > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"adapter.dropout={self.dropout!r}; allowed: 0 <= dropout < 1")
        for key in ("use_dora", "use_rslora"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"adapter.{key}={getattr(self, key)!r}; allowed: true, false")
        if self.dropout_mode not in DROPOUT_MODES:
            raise ValueError(f"adapter.dropout_mode={self.dropout_mode!r}; allowed: {', '.join(DROPOUT_MODES)}")
        unknown = [t for t in self.targets if t not in ADAPTER_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter.targets={list(self.targets)!r}; allowed: a non-empty set of "
                             f"{', '.join(ADAPTER_TARGETS)} without repeats")

    @property
    def scaling(self) -> float:
        """s in W + s·B·A: alpha/sqrt(r) (rsLoRA) or alpha/r (LoRA)."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

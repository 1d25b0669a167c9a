"""The collapse guard's rules: one watched metric each, which way is unhealthy, and how a move
that way is judged against the run's own baseline (gazal_nemo/rl/guard.py keeps the windows and
decides; rl/guard_stats.py holds the test; docs/GRPO.md#collapse-guard explains the defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gazal_nemo.rl.guard_signals import (
    ANSWERED_METRIC,
    COMPLETIONS,
    LETTER_BIAS_METRIC,
    MARKUP_METRIC,
    REPETITION_METRIC,
    WORST_GOLD_METRIC,
)
from gazal_nemo.rl.guard_stats import window_change

_LOG_FLOOR = 1e-6  # log-scale rules: values at or below this count as this


@dataclass(kw_only=True)
class GuardRule:
    """One watched metric: which way is unhealthy and how a move that way is judged."""

    metric: str
    """A logged GRPO metric (reward/<name>, completion_len_mean, entropy, answers/letter_bias, ...)."""
    bad: Literal["up", "down"]
    """Which direction is unhealthy."""
    test: Literal["significance", "threshold"] = "significance"
    """significance: beyond the metric's noise at grpo.guard.false_alarm_rate (and past the floors below,
    if set); threshold: past min_change or ratio alone."""
    min_change: float | None = None
    """|window mean - baseline mean| in the bad direction must exceed this (absolute units of the metric)."""
    ratio: float | None = None
    """Window mean must be below ratio x baseline (bad 'down') or above it (bad 'up'); for positive metrics."""
    trials: str | None = None
    """For a proportion: the logged per-step sample size it is a share of (samples/completions,
    samples/groups); its binomial noise is then a floor under the estimated noise."""
    scale: Literal["linear", "log"] = "linear"
    """log: test the logarithm of the values (for a positive metric whose noise grows with its size,
    e.g. entropy); the floors still apply to the plain means."""

    def __post_init__(self):
        where = f"grpo.guard.rules: {self.metric}"
        if self.bad not in ("up", "down"):
            raise ValueError(f"{where}: bad={self.bad!r}; allowed: 'up', 'down'")
        if self.test not in ("significance", "threshold"):
            raise ValueError(f"{where}: test={self.test!r}; allowed: 'significance', 'threshold'")
        if self.scale not in ("linear", "log"):
            raise ValueError(f"{where}: scale={self.scale!r}; allowed: 'linear', 'log'")
        if self.scale == "log" and self.trials:
            raise ValueError(f"{where}: trials (a proportion's binomial noise) needs scale 'linear'")
        if self.test == "threshold" and self.min_change is None and self.ratio is None:
            raise ValueError(f"{where}: test 'threshold' needs min_change or ratio")
        if self.min_change is not None and not (self.min_change > 0 and math.isfinite(self.min_change)):
            raise ValueError(f"{where}: min_change={self.min_change}; allowed: finite > 0")
        if self.ratio is not None and not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ValueError(f"{where}: ratio={self.ratio}; allowed: finite > 0")

    def past_floors(self, smoothed: float, baseline: float) -> tuple[bool, bool]:
        """(min_change passed, ratio passed); a floor that is not set passes."""
        sign = 1.0 if self.bad == "up" else -1.0
        change_ok = self.min_change is None or sign * (smoothed - baseline) > self.min_change
        if self.ratio is None:
            ratio_ok = True
        elif baseline <= 0:
            ratio_ok = False
        else:
            ratio_ok = smoothed > self.ratio * baseline if self.bad == "up" else smoothed < self.ratio * baseline
        return change_ok, ratio_ok

    def _test(self, window: list[float], baseline: list[float], *, level: float, trials: float | None):
        if self.scale == "log":
            window, baseline = [math.log(max(v, _LOG_FLOOR)) for v in window], [math.log(max(v, _LOG_FLOOR)) for v in baseline]
        return window_change(window, baseline, bad=self.bad, level=level, trials=trials)

    def judge(self, window: list[float], baseline: list[float], *, level: float,
              trials: float | None = None) -> str | None:
        """Why the window is a breach against the baseline, or None when it is not."""
        now, before = sum(window) / len(window), sum(baseline) / len(baseline)
        test = self._test(window, baseline, level=level, trials=trials)
        change_ok, ratio_ok = self.past_floors(now, before)
        if self.test == "threshold":
            breached = (self.min_change is not None and change_ok) or (self.ratio is not None and ratio_ok)
            limit = f"{self.bad} > {self.min_change}" if self.min_change is not None else f"x{self.ratio}"
            return f"{self.metric} {now:.4g} vs baseline {before:.4g} ({limit})" if breached else None
        if not (test.significant and change_ok and ratio_ok):
            return None
        units = " in log" if self.scale == "log" else ""
        return (f"{self.metric} {now:.4g} vs baseline {before:.4g} (moved {test.change:.3g}{units} {self.bad}, "
                f"noise allows {test.critical:.3g})")

    def margin(self, window: list[float], baseline: list[float], *, level: float,
               trials: float | None = None) -> float | None:
        """How much of what the noise allows the window's change used (1 = at the threshold; the
        floors aside); None for a threshold rule. What a replay reports as the closest approach."""
        if self.test == "threshold":
            return None
        test = self._test(window, baseline, level=level, trials=trials)
        if test.critical > 0:
            return test.change / test.critical
        return math.inf if test.change > 0 else 0.0

    @property
    def label(self) -> str:
        """The rule as a person names it: metric and bad direction (two rules may watch one metric)."""
        return f"{self.metric} {self.bad}"


def default_rules() -> list[GuardRule]:
    """What is watched unless the recipe says otherwise. The floors are the smallest changes worth
    a rollback, for metrics whose healthy noise can be near zero (a model that never truncates makes
    one truncated completion "significant"), and what holds a healthy run's drift (the rate bounds
    noise only); docs/GRPO.md says why each is what it is.
    answers/same_answer_groups and degenerate/duplicate_completions are logged but not watched:
    healthy sharpening moves them as fast as a collapse does (same-answer groups 0.2 -> 0.6 in two
    steps of a healthy tiny run, accuracy rising; duplicates up to 0.61 by step 40 on the guard
    benchmark's healthy runs, as high as its entropy-collapse runs)."""
    return [
        GuardRule(metric="reward/accuracy", bad="down", trials=COMPLETIONS),
        GuardRule(metric="reward/format", bad="down", trials=COMPLETIONS),
        GuardRule(metric="reward/repetition", bad="down", min_change=0.02),
        GuardRule(metric=MARKUP_METRIC, bad="up", min_change=0.05),
        GuardRule(metric=REPETITION_METRIC, bad="up", min_change=0.05),
        GuardRule(metric=ANSWERED_METRIC, bad="down", trials=COMPLETIONS, min_change=0.1),
        GuardRule(metric=LETTER_BIAS_METRIC, bad="up", min_change=0.2),
        GuardRule(metric=WORST_GOLD_METRIC, bad="down", min_change=0.1),
        GuardRule(metric="completion_len_mean", bad="down", ratio=0.85),
        GuardRule(metric="completion_len_mean", bad="up", ratio=1.25),
        GuardRule(metric="truncated_frac", bad="up", trials=COMPLETIONS, min_change=0.1),
        GuardRule(metric="entropy", bad="down", scale="log", ratio=0.25),
        GuardRule(metric="grad_norm", bad="up", test="threshold", ratio=20.0),
    ]

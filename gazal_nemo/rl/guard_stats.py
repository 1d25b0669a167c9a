"""The collapse guard's test: is the recent window of a metric worse than the run's healthy
baseline by more than its noise allows at the stated false-alarm rate?

For one metric, with the last w step values (the window) and the b healthy step values
before them (the baseline), under "nothing changed" (steps independent, normal, one
variance sigma^2) the difference of the two means is N(0, sigma^2 (1/w + 1/b)). sigma is
not known, so it is estimated twice and the change must beat both:

  * from the baseline's own step-to-step spread s (sampling noise plus the policy's jitter):
    (mean_w - mean_b) / (s sqrt(1/w + 1/b)) is Student-t with b - 1 degrees of freedom, so
    a short baseline asks for a larger change, as it should;
  * for a proportion, from the step's sample size n alone: sigma^2 = p (1 - p) / n with p the
    baseline mean (known variance, normal quantile). This floor keeps a baseline that was
    quiet by chance from making ordinary sampling noise look like a collapse.

The quantiles are taken at 1 - level, level = false-alarm rate / number of rules: by the
union bound the expected number of false rollbacks per healthy step is at most the rate,
whatever the correlation between consecutive steps (a sequential detector such as CUSUM
promises its average run length only for independent steps, which the steps of one policy
are not). A steady drift cannot fire alone: it widens the baseline's spread as fast as the
gap (a ramp gives t of at most about 4.2 with the default windows); a break in it does.

No scipy in the dependencies: the Student-t quantile is found by bisection on its CDF, the
regularized incomplete beta function (continued fraction, Numerical Recipes 6.4).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist, fmean, stdev


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1 (Lentz's continued fraction)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below this point
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=1024)  # a run asks for a few (level, df) pairs, every step
def student_t_quantile(upper_tail: float, df: float) -> float:
    """t with P(T > t) = upper_tail (0 < upper_tail < 0.5)."""
    if not (0.0 < upper_tail < 0.5) or df <= 0:
        raise ValueError(f"student_t_quantile: upper_tail={upper_tail}, df={df}")
    low, high = 0.0, 1.0
    while student_t_sf(high, df) > upper_tail:
        low, high = high, 2.0 * high
    for _ in range(100):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if student_t_sf(mid, df) > upper_tail else (low, mid)
    return 0.5 * (low + high)


def normal_quantile(upper_tail: float) -> float:
    """z with P(Z > z) = upper_tail."""
    return NormalDist().inv_cdf(1.0 - upper_tail)


@dataclass(frozen=True)
class ChangeTest:
    """Window against baseline for one metric, in the unhealthy direction."""

    window_mean: float
    baseline_mean: float
    change: float
    """(window mean - baseline mean), signed so that positive is the unhealthy direction."""
    critical: float
    """The change the noise allows at the level; the test is breached when change > critical."""
    noise: float
    """The per-step standard deviation used (the larger of the two estimates)."""

    @property
    def significant(self) -> bool:
        return self.change > self.critical


def window_change(window: list[float], baseline: list[float], *, bad: str, level: float,
                  trials: float | None = None) -> ChangeTest:
    """The change of the window's mean from the baseline's, and the critical change at `level`
    (the chance that a healthy step passes it). `trials`: for a proportion, the step's sample
    size (its binomial noise is a floor). Needs two baseline values at least."""
    w, b = len(window), len(baseline)
    assert w >= 1 and b >= 2, (w, b)
    window_mean, baseline_mean = fmean(window), fmean(baseline)
    sign = 1.0 if bad == "up" else -1.0
    spread = stdev(baseline)
    estimated = student_t_quantile(level, b - 1) * spread
    binomial = 0.0
    if trials:
        p = min(max(baseline_mean, 0.0), 1.0)
        binomial = math.sqrt(p * (1.0 - p) / trials)
    sampled = normal_quantile(level) * binomial
    scale = math.sqrt(1.0 / w + 1.0 / b)
    return ChangeTest(window_mean=window_mean, baseline_mean=baseline_mean,
                      change=sign * (window_mean - baseline_mean), critical=max(estimated, sampled) * scale,
                      noise=max(spread, binomial))

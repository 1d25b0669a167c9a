"""Binomial intervals for attribute rates (no scipy in the environment; exact sums in log space).

* `binomial_interval(n, p, level)`: the central interval of counts a Binomial(n, p) draw lands
  in with probability >= level: the test of the sampler ("is 7,043 of 10,000 where a 70% rate
  puts it?") and the report's "planned" column;
* `wilson_interval(k, n, level)`: the Wilson score interval of a rate observed as k of n (the
  report's achieved rates among kept examples, whose rejections may have shifted them).
"""

from __future__ import annotations

import math
from statistics import NormalDist


def _log_pmf(k: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_interval(n: int, p: float, level: float = 0.99) -> tuple[int, int]:
    """Smallest lo and largest hi with P(X < lo) <= (1-level)/2 and P(X > hi) <= (1-level)/2, X ~ Bin(n, p)."""
    if n == 0 or p <= 0.0:
        return 0, 0
    if p >= 1.0:
        return n, n
    tail = (1.0 - level) / 2.0
    mode = int((n + 1) * p)
    spread = int(12 * math.sqrt(n * p * (1 - p))) + 12
    ks = range(max(0, mode - spread), min(n, mode + spread) + 1)
    pmf = {k: math.exp(_log_pmf(k, n, p)) for k in ks}
    lo, below = ks[0], 0.0
    for k in ks:  # P(X < k) accumulates until adding k would exceed the tail
        if below + pmf[k] > tail:
            lo = k
            break
        below += pmf[k]
    hi, above = ks[-1], 0.0
    for k in reversed(ks):
        if above + pmf[k] > tail:
            hi = k
            break
        above += pmf[k]
    return lo, hi


def wilson_interval(k: int, n: int, level: float = 0.99) -> tuple[float, float]:
    """Wilson score interval of a proportion observed as k successes in n trials ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    phat = k / n
    denominator = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denominator
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)

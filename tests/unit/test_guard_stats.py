"""The collapse guard's statistics: Student-t quantiles against printed tables and against a
numerical integral of torch's t density; the false-alarm rate a recipe states is kept on
healthy noise; a steady drift cannot fire alone."""

import math
import random

import pytest
import torch

from gazal_nemo.rl.guard import CollapseGuard, GuardConfig
from gazal_nemo.rl.guard_rules import GuardRule, default_rules
from gazal_nemo.rl.guard_stats import normal_quantile, student_t_quantile, student_t_sf, window_change


@pytest.mark.parametrize("upper_tail, df, table", [(0.025, 1, 12.706), (0.025, 10, 2.228), (0.005, 29, 2.756),
                                                   (0.05, 5, 2.015), (0.0005, 9, 4.781), (0.025, 1000, 1.962)])
def test_t_quantiles_match_the_printed_tables(upper_tail, df, table):
    assert student_t_quantile(upper_tail, df) == pytest.approx(table, abs=1.5e-3)


@pytest.mark.parametrize("df", [3, 9, 29])
def test_t_tail_matches_a_numerical_integral_of_torch_density(df):
    """Far tails (the guard works at 1e-5 and below): integrate torch's t density from t to 400."""
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64))
    for t in (2.0, 5.0, 8.0):
        grid = torch.linspace(t, 400.0, 400_001, dtype=torch.float64)
        integral = torch.trapezoid(density.log_prob(grid).exp(), grid).item()
        assert student_t_sf(t, df) == pytest.approx(integral, rel=2e-3), (df, t)
    assert student_t_sf(-1.0, df) == pytest.approx(1 - student_t_sf(1.0, df))
    assert normal_quantile(0.025) == pytest.approx(1.95996, abs=1e-4)


def test_binomial_noise_is_a_floor_under_a_baseline_quiet_by_chance():
    quiet = [0.5] * 10  # a proportion over 100 trials cannot really be this steady
    assert window_change([0.45], quiet, bad="down", level=0.01).significant  # spread 0: anything is a change
    floored = window_change([0.45], quiet, bad="down", level=0.01, trials=100)
    assert not floored.significant and floored.noise == pytest.approx(0.05)
    assert window_change([0.2] * 5, quiet, bad="down", level=0.01, trials=100).significant


@pytest.mark.parametrize("window, baseline", [(5, 30), (3, 10)])
def test_the_test_breaches_healthy_noise_at_its_level(window, baseline):
    """Independent normal steps: a window is called significant in `level` of the draws."""
    level, draws, rng = 0.01, 10_000, random.Random(0)
    hits = sum(window_change([rng.gauss(3, 2) for _ in range(window)], [rng.gauss(3, 2) for _ in range(baseline)],
                             bad="up", level=level).significant for _ in range(draws))
    assert hits / draws == pytest.approx(level, rel=0.3)


def test_the_stated_false_alarm_rate_holds_for_the_guard_on_healthy_noise():
    """All rules together, the guard's own bookkeeping included: rollbacks (a breach lasting
    `patience` steps; one per breach episode) stay below the rate per judged step. Breached steps
    may exceed it somewhat: a step judged in a breach stays out of the baseline (so a collapse
    never becomes its own baseline), which trims the baseline's tails (docs/GRPO.md)."""
    rate, num_rules, steps = 0.02, 4, 4000
    rules = [GuardRule(metric=f"m{i}", bad="down" if i % 2 else "up") for i in range(num_rules)]
    config = GuardConfig(false_alarm_rate=rate, min_baseline_steps=30, rules=rules)
    guard, rng = CollapseGuard(config, config.rules), random.Random(0)
    judged = breached = rollbacks = 0
    firing = False
    for _ in range(steps):
        verdict = guard.observe({f"m{i}": rng.gauss(10.0 * i, 1.0 + i) for i in range(num_rules)})
        if len(guard.baseline) >= config.min_baseline_steps:
            judged += 1
            breached += not verdict.healthy
            rollbacks += verdict.fire and not firing
        firing = verdict.fire
    assert 0.1 * rate <= rollbacks / judged <= rate, rollbacks / judged
    assert breached / judged <= 2 * rate, breached / judged


def test_a_steady_drift_the_bad_way_is_held_by_the_floor_and_a_break_in_it_fires():
    """An RL run drifts; the significance test judges noise, not drift: over 300 steps of a steady
    fall some window passes it (the test alone fires on most seeds), and the rule's floor (the
    default length rule's 0.85x) is what holds the drift. A break in it passes both."""
    def ramp_fires(rule, seed):
        # About the default rules' share of the default rate (1e-3 over 11 rules).
        config = GuardConfig(false_alarm_rate=1e-4, rules=[rule])
        guard, rng = CollapseGuard(config, config.rules), random.Random(seed)
        fired = any([guard.observe({"len": 500 - step + rng.gauss(0, 3)}).fire for step in range(300)])
        return fired, any([guard.observe({"len": 150 + rng.gauss(0, 3)}).fire for _ in range(5)])

    floored = next(r for r in default_rules() if r.metric == "completion_len_mean" and r.bad == "down")
    floored = GuardRule(metric="len", bad="down", ratio=floored.ratio)
    assert floored.ratio == 0.85
    for seed in range(5):  # falls from 500 to 200 tokens, a 60% fall over the run
        on_ramp, on_break = ramp_fires(floored, seed)
        assert not on_ramp and on_break, seed
    bare = GuardRule(metric="len", bad="down")
    assert sum(ramp_fires(bare, seed)[0] for seed in range(5)) >= 3


@pytest.mark.parametrize("healthy, collapsed", [(0.38, 0.25), (0.8, 0.65)])
def test_accuracy_collapse_is_judged_against_the_runs_own_noise(healthy, collapsed):
    """The issue's case: a run at 0.38 falling to chance (0.25), which an absolute 0.25 drop never
    shows, and a strong run at 0.8 losing 0.15; 128 completions a step."""
    def first_fire(rule, seed):
        config = GuardConfig(rules=[rule])
        guard, rng = CollapseGuard(config, config.rules), random.Random(seed)
        for _ in range(40):  # a full baseline (30 steps) after the warm-up and the window
            guard.observe({"reward/accuracy": sum(rng.random() < healthy for _ in range(128)) / 128,
                           "samples/completions": 128})
        return next((k for k in range(1, 21) if guard.observe(
            {"reward/accuracy": sum(rng.random() < collapsed for _ in range(128)) / 128,
             "samples/completions": 128}).fire), None)

    old = GuardRule(metric="reward/accuracy", bad="down", test="threshold", min_change=0.25)
    assert all(first_fire(old, seed) is None for seed in range(5))
    new = GuardRule(metric="reward/accuracy", bad="down", trials="samples/completions")
    delays = [first_fire(new, seed) for seed in range(5)]  # a 3-sigma drop a step: at the edge
    assert all(d is not None and d <= 10 for d in delays), delays


def test_log_scale_judges_a_positive_metric_by_its_relative_noise():
    rule = GuardRule(metric="entropy", bad="down", scale="log")
    rng = random.Random(3)
    baseline = [0.05 * math.exp(rng.gauss(0, 0.3)) for _ in range(30)]
    assert rule.judge([0.04] * 5, baseline, level=1e-5) is None
    reason = rule.judge([0.005] * 5, baseline, level=1e-5)
    assert reason and "in log down" in reason
    # The same fall judged on the plain values: the baseline's spread (~0.016) hides a fall to 0.02,
    # which on the log scale is a fall of 0.9, three times its spread.
    assert GuardRule(metric="entropy", bad="down").judge([0.02] * 5, baseline, level=1e-5) is None
    assert rule.judge([0.02] * 5, baseline, level=1e-5) is not None

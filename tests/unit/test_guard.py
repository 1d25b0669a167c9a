"""The collapse guard's decisions on metric streams: quiet on healthy noise and slow drift, fires
on the paper's step-526 symptom within patience steps, at once on NaN; watches only what the
recipe rewards."""

import math
import random

import pytest

from gazal_nemo.rl.guard import (
    DEGENERATE_METRIC,
    CollapseGuard,
    GuardConfig,
    GuardRule,
    default_rules,
    markup_density,
    watched_rules,
)


def _healthy(step, rng):
    return {"reward/accuracy": 0.5 + 0.002 * step + rng.gauss(0, 0.05), DEGENERATE_METRIC: max(0.0, rng.gauss(0.03, 0.01)),
            "completion_len_mean": 300 - step + rng.gauss(0, 20), "entropy": 1.0 + rng.gauss(0, 0.05),
            "grad_norm": abs(rng.gauss(1.0, 0.3)), "loss": rng.gauss(0, 0.1), "truncated_frac": 0.05}


def _guard(**config):
    cfg = GuardConfig(**config)
    return CollapseGuard(cfg, cfg.rules)


def test_degeneration_signal_separates_the_papers_symptom_from_ordinary_markdown():
    ordinary = "## Assessment\nThe **troponin** is raised and the ECG shows ST elevation in II, III and aVF: an inferior STEMI."
    collapsed = " ".join(f"**{w}**" for w in "the patient has an inferior myocardial infarction now".split())
    assert markup_density(ordinary) < 0.1 < 0.3 < markup_density(collapsed)
    assert markup_density("") == 0.0 and markup_density("** **") == 1.0


def test_quiet_on_a_healthy_run_with_noise_and_slow_drift():
    rng, guard = random.Random(0), _guard()
    verdicts = [guard.observe(_healthy(step, rng)) for step in range(200)]
    assert not any(v.fire for v in verdicts)
    assert sum(not v.healthy for v in verdicts) <= 2


def test_fires_within_patience_steps_of_an_emphasis_collapse():
    rng, guard = random.Random(1), _guard(window=5, patience=3)
    for step in range(40):
        assert not guard.observe(_healthy(step, rng)).fire
    fired_at = None
    for step in range(40, 60):
        verdict = guard.observe(dict(_healthy(step, rng), **{DEGENERATE_METRIC: 0.35}))
        if verdict.fire:
            fired_at = step
            break
    # The smoothed value crosses 0.08 above baseline after 2 collapsed steps of 5; then patience 3.
    assert fired_at is not None and fired_at - 40 <= 5, fired_at
    assert any(DEGENERATE_METRIC in reason for reason in verdict.reasons)


def test_nonfinite_grad_norm_fires_at_once_even_without_a_baseline():
    verdict = _guard().observe({"grad_norm": math.nan, "loss": 0.1})
    assert verdict.fire and "grad_norm is nan" in verdict.reasons[0]


def test_only_rewarded_components_are_watched():
    cfg = GuardConfig()
    names = {r.metric for r in watched_rules(cfg, {"accuracy": 1.0, "format": 0.0, "repetition": 0.0})}
    assert "reward/accuracy" in names and "reward/format" not in names and "reward/repetition" not in names
    assert DEGENERATE_METRIC in names
    everything = {r.metric for r in watched_rules(GuardConfig(watch_unrewarded=True), {"accuracy": 1.0})}
    assert {r.metric for r in default_rules()} == everything


@pytest.mark.parametrize("kwargs, key", [({"window": 0}, "grpo.guard.window"), ({"lr_scale": 2.0}, "grpo.guard.lr_scale"),
                                         ({"min_baseline_steps": 50}, "grpo.guard.min_baseline_steps")])
def test_bad_settings_are_refused_by_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GuardConfig(**kwargs)
    with pytest.raises(ValueError, match="set min_change or ratio"):
        GuardRule(metric="entropy", bad="down")


def test_a_guard_rebuilt_from_the_logged_rows_judges_like_the_live_one(tmp_path):
    """Resume and rollback rebuild the guard by replaying metrics.jsonl: it must then decide
    every later step exactly as the guard that lived through the run."""
    from gazal_nemo.rl.guard import RollbackGuard

    cfg = GuardConfig(window=5, patience=3)
    rng = random.Random(2)
    rows = [dict(_healthy(step, rng), step=step) for step in range(1, 61)]
    for row in rows[45:]:
        row[DEGENERATE_METRIC] = 0.4
    live = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs")
    live_fired = [live.observe(r["step"], r) for r in rows]
    resumed = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs",
                            saved_state={"guard": {"data_offset": 6, "rollbacks": 1, "lr_scale": 0.5}}, history=rows[:40])
    assert (resumed.data_offset, resumed.rollbacks, resumed.lr_scale, resumed.data_step(10)) == (6, 1, 0.5, 16)
    assert [resumed.observe(r["step"], r) for r in rows[40:]] == live_fired[40:]
    assert any(live_fired[45:]) and not any(live_fired[:45])

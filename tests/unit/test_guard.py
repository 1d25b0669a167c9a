"""The collapse guard's decisions on metric streams: quiet on healthy noise and slow drift, fires
on the paper's step-526 symptom within a few steps, at once on NaN; watches only what the
recipe rewards. Its signals measured on hand-written completions (tests/unit/test_guard_stats.py
holds the statistics)."""

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from gazal_nemo.rl.guard import CollapseGuard, GuardConfig, watched_rules
from gazal_nemo.rl.guard_rules import GuardRule, default_rules
from gazal_nemo.rl.guard_signals import (
    LETTER_BIAS_METRIC,
    MARKUP_METRIC,
    finish_signals,
    markup_density,
    repeated_ngram_share,
    rollout_signals,
)


def _healthy(step, rng):
    return {"reward/accuracy": 0.5 + 0.002 * step + rng.gauss(0, 0.05), MARKUP_METRIC: max(0.0, rng.gauss(0.03, 0.01)),
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
    rng, guard = random.Random(1), _guard(window=5, patience=2)
    for step in range(40):
        assert not guard.observe(_healthy(step, rng)).fire
    fired_at = None
    for step in range(40, 60):
        verdict = guard.observe(dict(_healthy(step, rng), **{MARKUP_METRIC: 0.35}))
        if verdict.fire:
            fired_at = step
            break
    # The window's mean leaves the markup noise (sd 0.01) after 1-2 collapsed steps of 5; then patience 2.
    assert fired_at is not None and fired_at - 40 <= 4, fired_at
    assert any(MARKUP_METRIC in reason for reason in verdict.reasons)


def test_nonfinite_grad_norm_fires_at_once_even_without_a_baseline():
    verdict = _guard().observe({"grad_norm": math.nan, "loss": 0.1})
    assert verdict.fire and "grad_norm is nan" in verdict.reasons[0]


def test_only_rewarded_components_are_watched():
    cfg = GuardConfig()
    names = {r.metric for r in watched_rules(cfg, {"accuracy": 1.0, "format": 0.0, "repetition": 0.0})}
    assert "reward/accuracy" in names and "reward/format" not in names and "reward/repetition" not in names
    assert MARKUP_METRIC in names
    everything = {r.metric for r in watched_rules(GuardConfig(watch_unrewarded=True), {"accuracy": 1.0})}
    assert {r.metric for r in default_rules()} == everything


@pytest.mark.parametrize("kwargs, key", [({"window": 0}, "grpo.guard.window"), ({"lr_scale": 2.0}, "grpo.guard.lr_scale"),
                                         ({"min_baseline_steps": 50}, "grpo.guard.min_baseline_steps"),
                                         ({"min_baseline_steps": 1}, "grpo.guard.min_baseline_steps"),
                                         ({"false_alarm_rate": 0.0}, "grpo.guard.false_alarm_rate"),
                                         ({"rules": [{"metric": "entropy", "bad": "down", "test": "z"}]}, "test='z'")])
def test_bad_settings_are_refused_by_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        GuardConfig(**kwargs)
    with pytest.raises(ValueError, match="needs min_change or ratio"):
        GuardRule(metric="entropy", bad="down", test="threshold")
    with pytest.raises(ValueError, match="needs scale 'linear'"):
        GuardRule(metric="reward/accuracy", bad="down", scale="log", trials="samples/completions")


def test_a_guard_rebuilt_from_the_logged_rows_judges_like_the_live_one(tmp_path):
    """Resume and rollback rebuild the guard by replaying metrics.jsonl: it must then decide
    every later step exactly as the guard that lived through the run."""
    from gazal_nemo.rl.guard import RollbackGuard

    cfg = GuardConfig(window=5, patience=2)
    rng = random.Random(2)
    rows = [dict(_healthy(step, rng), step=step) for step in range(1, 61)]
    for row in rows[45:]:
        row[MARKUP_METRIC] = 0.4
    live = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs")
    live_fired = [live.observe(r["step"], r) for r in rows]
    resumed = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs",
                            saved_state={"guard": {"data_offset": 6, "rollbacks": 1, "lr_scale": 0.5}}, history=rows[:40])
    assert (resumed.data_offset, resumed.rollbacks, resumed.lr_scale, resumed.data_step(10)) == (6, 1, 0.5, 16)
    assert [resumed.observe(r["step"], r) for r in rows[40:]] == live_fired[40:]
    assert any(live_fired[45:]) and not any(live_fired[:45])


def _means(sums):
    """What _global_means makes of (sum, count) pairs: 0 / 0 is NaN, sample sizes are summed."""
    with np.errstate(invalid="ignore"):
        return {k: float(v) if k.startswith("samples/") else float(np.float64(v) / c) for k, (v, c) in sums.items()}


def _prompt(gold):
    return SimpleNamespace(gold_letter=gold, option_letters=("A", "B", "C", "D"))


def _answer(letter, think="The word is chest."):
    return f"<think>{think}</think>Answer: \\boxed{{{letter}}}"


def test_signals_of_a_policy_that_answers_one_letter_whatever_the_question():
    prompts = [_prompt(gold) for gold in "ABCD"]  # 4 groups of 2 completions
    texts = [_answer("A") for _ in range(8)]
    accuracy = [1.0 if p.gold_letter == "A" else 0.0 for p in prompts for _ in range(2)]
    sums = rollout_signals(texts, prompts, accuracy=accuracy, truncated=[False] * 8, num_generations=2,
                           letters="ABCD")
    row = finish_signals(_means(sums))
    assert row[LETTER_BIAS_METRIC] == pytest.approx(0.75)  # 1 - the gold share of A
    assert row["answers/worst_gold_accuracy"] == 0.0 and row["accuracy_by_gold/A"] == 1.0
    assert row["answers/same_answer_groups"] == 1.0 and row["answers/answered"] == 1.0
    assert row["degenerate/duplicate_completions"] == 0.5  # the second of each group repeats the first
    assert not any(k.startswith("answers/_") for k in row)  # the per-letter shares are not logged

    right = [_answer(p.gold_letter) for p in prompts for _ in range(2)]
    sums = rollout_signals(right, prompts, accuracy=[1.0] * 8, truncated=[False] * 8, num_generations=2,
                           letters="ABCD")
    assert finish_signals(_means(sums))[LETTER_BIAS_METRIC] == 0.0


def test_signals_of_cut_loops_and_markup_and_the_reduction_over_ranks():
    """Two data-parallel ranks summing their (sum, count) pairs give what one rank over all the
    completions gives; a cut completion has not answered; a step where nothing answered has no
    letter bias (left out, never NaN)."""
    prompts = [_prompt("B"), _prompt("C")]
    texts = [_answer("B"), "<think>the word is the word is the word is", _answer("C", "**The** **word**"),
             "**Answer:** \\boxed{C}"]
    kwargs = dict(accuracy=[1.0, 0.0, 1.0, 1.0], truncated=[False, True, False, False])
    whole = rollout_signals(texts, prompts, num_generations=2, letters="ABCD", **kwargs)
    halves = [rollout_signals(texts[2 * r:2 * r + 2], prompts[r:r + 1], num_generations=2, letters="ABCD",
                              **{k: v[2 * r:2 * r + 2] for k, v in kwargs.items()}) for r in range(2)]
    reduced = {k: tuple(map(sum, zip(*(h[k] for h in halves)))) for k in whole}
    # sums and counts add up; sample sizes are summed as values (their count is not used)
    assert {k: v[0] if k.startswith("samples/") else v for k, v in reduced.items()} == \
        {k: v[0] if k.startswith("samples/") else v for k, v in whole.items()}
    row = finish_signals(_means(reduced))
    assert row["answers/answered"] == 0.75 and row["samples/answered"] == 3 and row["samples/groups"] == 2
    assert row["answers/same_answer_groups"] == 0.5  # the cut completion breaks group 1
    assert row["degenerate/duplicate_completions"] == 0.0
    assert row["degenerate/repeated_ngrams"] == pytest.approx(repeated_ngram_share(texts[1]) / 4)
    assert repeated_ngram_share(texts[1]) == pytest.approx(1 - 4 / 7)  # 7 word 3-grams, 4 distinct
    assert row[MARKUP_METRIC] == pytest.approx(sum(map(markup_density, texts)) / 4)
    spaced = rollout_signals([_answer("A"), _answer("A").replace(" ", "  "), _answer("B"), _answer("A")],
                             [_prompt("A")], accuracy=[1.0, 1.0, 0.0, 1.0], truncated=[False] * 4,
                             num_generations=4, letters="ABCD")
    assert finish_signals(_means(spaced))["degenerate/duplicate_completions"] == 0.5  # whitespace aside
    nothing = rollout_signals(["", ""], [_prompt("A")], accuracy=[0.0, 0.0], truncated=[True, True],
                              num_generations=2, letters="ABCD")
    assert LETTER_BIAS_METRIC not in finish_signals(_means(nothing))
    assert "accuracy_by_gold/B" not in finish_signals(_means(nothing))


@pytest.fixture
def one_rank(tmp_path):
    """A one-process gloo group: pinning a checkpoint is collective."""
    import torch.distributed as dist

    if dist.is_initialized():  # a one-process group another in-process test left behind serves as well
        assert dist.get_world_size() == 1
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fake_checkpoint(root, step):
    from gazal_nemo.training.checkpoint import TRAINER_STATE, step_dir_name, write_manifest

    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": 1}))
    write_manifest(path)
    return path


def test_a_checkpoint_becomes_last_good_only_after_a_clean_window(tmp_path, one_rank):
    """A checkpoint saved while a collapse had begun but was not yet visible is never the rollback
    target: it waits `window` judged steps as a candidate, and a breach drops it."""
    from gazal_nemo.rl.guard import RollbackGuard

    cfg = GuardConfig(window=3, baseline_window=10, min_baseline_steps=4, warmup_steps=0, patience=1,
                      rules=[GuardRule(metric="m", bad="up")])
    guard = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs")
    rng, rows = random.Random(4), {}
    for step in range(1, 16):
        rows[step] = {"m": rng.gauss(0, 1) + (0 if step < 12 else 4 * (step - 11)), "step": step}
        fired = guard.observe(step, rows[step])
        if step % 4 == 0:
            guard.after_save(step, _fake_checkpoint(tmp_path / "ckpt", step))
        if fired:
            break
    assert fired and 12 < step < 15, step  # the collapse started at 12 and showed within the window
    assert guard.last_good.name == "step_000008"  # 4 at once, 8 after a clean window; 12 dropped
    # A run resumed from step 12 takes up its candidate; one resumed later does not.
    resumed = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs",
                            history=[rows[s] for s in range(1, 13)])
    assert resumed.pending_step == 12 and resumed.last_good.name == "step_000008"
    later = RollbackGuard(cfg, cfg.rules, checkpoint_dir=tmp_path / "ckpt", events_dir=tmp_path / "logs",
                          history=[rows[s] for s in range(1, 14)])
    assert later.pending is None

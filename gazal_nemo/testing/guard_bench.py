"""The collapse-guard benchmark's cases and how a run is judged, shared by the CI test
(tests/e2e/test_grpo_guard.py: the two fastest types and one healthy run) and the benchmark
(bench/bench_guard.py: every type, healthy runs over several seeds, recorded in docs/GRPO.md).

Every case trains the same model (the tiny Qwen3 after SFT on `collapse_sft_rows`) with the
tiny GRPO recipe; a collapse case adds one reward plug-in of gazal_nemo/testing/collapse.py
that pays for its degenerate behaviour from step `first` to `last` (wall-clock steps), a
healthy case adds nothing. A run is then judged on its logs alone: when the guard first
fired after the onset, whether the policy really went into the behaviour (its signal in the
steps the rollback undid), and whether the run ended at its pre-collapse accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PLUGINS = "gazal_nemo.testing.collapse"
RESTORE_MARGIN = 0.1
"""Accuracy of the last END_STEPS steps may sit this far below its pre-collapse level and count as restored."""
END_STEPS = 5
PRE_FROM = 6
"""Pre-collapse accuracy is the mean over steps PRE_FROM .. first - 1 (the first steps are the SFT model settling)."""
SEED_OVERRIDES = ("train.seed", "grpo.data.seed")
BENCH_OVERRIDES = ("grpo.sampling.temperature=1.0",)
"""At the recipe's 0.6 the tiny SFT model is nearly deterministic (entropy ~0.02 nats a token): it
explores too little to fall into most behaviours within a few dozen steps, and has no entropy left
to lose. At 1.0 its healthy runs still learn (accuracy ~0.25 -> ~0.45 in 30 steps)."""


@dataclass(frozen=True, kw_only=True)
class CollapseCase:
    """One induced collapse type (plugin set) or a healthy run (plugin None)."""

    name: str
    plugin: str | None
    """Function name in gazal_nemo.testing.collapse; None: a healthy run."""
    weight: float = 0.0
    """The plug-in's reward weight (large enough that the behaviour beats the accuracy reward)."""
    signal: str = "reward/accuracy"
    """The logged metric that shows this collapse (plots; the check that the policy really collapsed)."""
    bad: str = "up"
    """Which way `signal` moves in the collapse."""

    @property
    def healthy(self) -> bool:
        return self.plugin is None


CASES = {case.name: case for case in (
    CollapseCase(name="markup", plugin="markup_bonus", weight=1.0, signal="degenerate/markup_density"),
    CollapseCase(name="fixed_letter", plugin="fixed_letter_bonus", weight=2.0, signal="answers/letter_bias"),
    CollapseCase(name="short", plugin="short_answer_bonus", weight=2.0, signal="completion_len_mean", bad="down"),
    CollapseCase(name="run_on", plugin="run_on_bonus", weight=2.0, signal="truncated_frac"),
    CollapseCase(name="repetition", plugin="repetition_bonus", weight=2.0, signal="degenerate/repeated_ngrams"),
    CollapseCase(name="agreement", plugin="agreement_bonus", weight=3.0, signal="entropy", bad="down"),
    CollapseCase(name="healthy", plugin=None),
)}


def grpo_overrides(case: CollapseCase, *, seed: int | None = None) -> list[str]:
    """The recipe overrides of a case (model, data and directories are the caller's)."""
    out = [] if case.healthy else [f"grpo.rewards.plugins={{{PLUGINS}:{case.plugin}: {case.weight}}}"]
    if seed is not None:
        out += [f"{key}={seed}" for key in SEED_OVERRIDES]
    return out


def collapse_env(first: int, last: int, *, prompts_per_step: int = 32, num_generations: int = 4) -> dict:
    """The environment that sets the plug-ins' window (GAZAL_TEST_COLLAPSE)."""
    return {"GAZAL_TEST_COLLAPSE": f"{first},{last},{prompts_per_step * num_generations},{num_generations}"}


def judged_steps(steps: int) -> int:
    """Steps of a run the default guard judges (it decides once its baseline is full enough)."""
    from gazal_nemo.rl.guard import GuardConfig

    config = GuardConfig()
    first = config.warmup_steps + config.window + config.min_baseline_steps  # the first judged step
    return max(0, steps - first + 1)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge_run(log_dir: str | Path, case: CollapseCase, *, first: int, last: int) -> dict:
    """What a run's logs say about the guard: detection, the collapse itself, the end state.

    `first`/`last`: the plug-in's window (for a healthy run, the steps before `first` count as
    settling, as in a collapse run). Steps are as logged (after a rollback, the kept steps).
    """
    log_dir = Path(log_dir)
    kept, undone = _rows(log_dir / "metrics.jsonl"), _rows(log_dir / "metrics_rolled_back.jsonl")
    events = _rows(log_dir / "guard_events.jsonl")
    pre = [r for r in kept if PRE_FROM <= r["step"] < first]
    out = {"case": case.name, "steps": len(kept), "rollbacks": len(events),
           "events": [{k: e[k] for k in ("from_step", "to_step", "reasons")} for e in events],
           "accuracy_pre": _mean([r["reward/accuracy"] for r in pre]),
           "accuracy_end": _mean([r["reward/accuracy"] for r in kept[-END_STEPS:]])}
    if case.healthy:
        out["false_alarms"] = len(events)
        return out
    detected = next((e for e in events if e["from_step"] >= first), None)
    out["detected_at"] = detected["from_step"] if detected else None
    out["delay"] = detected["from_step"] - first if detected else None  # steps after the onset step
    out["early_alarms"] = sum(e["from_step"] < first for e in events)
    out["rules"] = sorted({reason.split(" ")[0] for reason in detected["reasons"]}) if detected else []
    signal_pre = _mean([r[case.signal] for r in pre if case.signal in r])
    during = [r[case.signal] for r in undone + kept if r["step"] >= first and case.signal in r]
    worst = (max(during) if case.bad == "up" else min(during)) if during else None
    out.update(signal=case.signal, signal_pre=signal_pre, signal_worst=worst)
    out["accuracy_worst"] = min((r["reward/accuracy"] for r in undone + kept if r["step"] >= first), default=None)
    if out["accuracy_pre"] is not None and out["accuracy_end"] is not None:
        out["restored"] = out["accuracy_end"] >= out["accuracy_pre"] - RESTORE_MARGIN
    return out


def twin_worst(twin_log_dir: str | Path, case: CollapseCase, *, first: int, last_step: int) -> float | None:
    """The worst value of `case.signal` over steps `first` .. `last_step` of the healthy run with
    the collapse run's seed: its twin, the same run step for step until the plug-in starts paying.
    How far healthy training alone moved the signal over the same steps."""
    values = [r[case.signal] for r in _rows(Path(twin_log_dir) / "metrics.jsonl")
              if first <= r["step"] <= last_step and case.signal in r]
    return (max(values) if case.bad == "up" else min(values)) if values else None


def seen_rows(log_dir: str | Path) -> list[dict]:
    """The rows the live guard had judged when it first rolled back (the kept steps up to the
    restored checkpoint, then the undone ones), or every kept row of a run it never rolled back:
    what a replay at another false-alarm rate may judge."""
    log_dir = Path(log_dir)
    kept, events = _rows(log_dir / "metrics.jsonl"), _rows(log_dir / "guard_events.jsonl")
    if not events:
        return kept
    first = events[0]
    undone = _rows(log_dir / "metrics_rolled_back.jsonl")[:first["from_step"] - first["to_step"]]
    return [r for r in kept if r["step"] <= first["to_step"]] + undone

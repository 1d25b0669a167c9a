"""Collapse guard: notice a GRPO run degenerating and roll back to the last healthy checkpoint.

The paper's own run went unstable around step 526 (section 4.6.1: double asterisks around
nearly every word, filler, dips in the repetition and loss curves) and recovered by luck.
Public trainers log such metrics or stop on NaN; none rolls back. `CollapseGuard` decides;
`RollbackGuard` is what the training loop asks after each step, and the loop acts (restore
the last healthy checkpoint, skip the prompts seen since, optionally lower the learning rate).

How it decides, per watched metric (a rule):
  * smoothed = mean of the last `window` steps;
  * baseline = mean of the `baseline_window` healthy steps before those (the run's own
    recent past, not an absolute constant, so a slow healthy drift moves the baseline too);
  * a rule is breached when the smoothed value moved the bad way by more than `min_change`
    (absolute) or past `ratio` x baseline (relative); the guard fires when any rule is
    breached for `patience` consecutive steps, or at once on a non-finite loss/grad norm.
No decision before `min_baseline_steps` healthy steps: early RL is noisy by nature.

The degeneration signal that would have caught the paper's episode is the markup density:
the share of a completion's visible characters that are markdown markers (`*`, `_`, `#`,
`~`, backtick), averaged over the step's completions. Ordinary markdown (a heading, a bold
term or two) stays below ~0.05; "surrounding nearly every word with double asterisks" is
~0.4. A continuous signal, so a drift shows before the text is unreadable.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEGENERATE_METRIC = "degenerate/markup_density"
LAST_GOOD_DIR = "last_good"
EVENTS_FILE = "guard_events.jsonl"
MARKUP_CHARS = frozenset("*_#~`")


def markup_density(text: str) -> float:
    """Markdown marker characters over visible (non-space) characters; 0 for an empty text."""
    visible = [ch for ch in text if not ch.isspace()]
    return sum(ch in MARKUP_CHARS for ch in visible) / len(visible) if visible else 0.0


@dataclass(kw_only=True)
class GuardRule:
    """One watched metric and how far it may move the bad way from the run's recent baseline."""

    metric: str
    """A logged GRPO metric (reward/<name>, completion_len_mean, entropy, degenerate/markup_density, ...)."""
    bad: Literal["up", "down"]
    """Which direction is unhealthy."""
    min_change: float | None = None
    """Breach when |smoothed - baseline| exceeds this in the bad direction (absolute units of the metric)."""
    ratio: float | None = None
    """Breach when smoothed < ratio x baseline (bad 'down') or > ratio x baseline (bad 'up'); for positive metrics."""

    def __post_init__(self):
        if self.bad not in ("up", "down"):
            raise ValueError(f"grpo.guard.rules: {self.metric}: bad={self.bad!r}; allowed: 'up', 'down'")
        if self.min_change is None and self.ratio is None:
            raise ValueError(f"grpo.guard.rules: {self.metric}: set min_change or ratio")
        if self.min_change is not None and not (self.min_change > 0 and math.isfinite(self.min_change)):
            raise ValueError(f"grpo.guard.rules: {self.metric}: min_change={self.min_change}; allowed: finite > 0")
        if self.ratio is not None and not (self.ratio > 0 and math.isfinite(self.ratio)):
            raise ValueError(f"grpo.guard.rules: {self.metric}: ratio={self.ratio}; allowed: finite > 0")

    def breached(self, smoothed: float, baseline: float) -> bool:
        sign = 1.0 if self.bad == "up" else -1.0
        if self.min_change is not None and sign * (smoothed - baseline) > self.min_change:
            return True
        if self.ratio is not None and baseline > 0:
            return smoothed > self.ratio * baseline if self.bad == "up" else smoothed < self.ratio * baseline
        return False


def default_rules() -> list[GuardRule]:
    """Rules that stay quiet on the demo's healthy run and fire on the paper's symptoms."""
    return [
        GuardRule(metric=DEGENERATE_METRIC, bad="up", min_change=0.08),
        GuardRule(metric="reward/accuracy", bad="down", min_change=0.25),
        GuardRule(metric="reward/format", bad="down", min_change=0.3),
        GuardRule(metric="reward/repetition", bad="down", min_change=0.15),
        GuardRule(metric="truncated_frac", bad="up", min_change=0.4),
        GuardRule(metric="completion_len_mean", bad="down", ratio=0.35),
        GuardRule(metric="entropy", bad="down", ratio=0.2),
        GuardRule(metric="grad_norm", bad="up", ratio=20.0),
    ]


@dataclass(kw_only=True)
class GuardConfig:
    """Collapse guard with automatic rollback (`grpo.guard`; see gazal_nemo/rl/guard.py)."""

    enabled: bool = True
    """Watch the run and roll back on a collapse; false behaves exactly as a run without the guard."""
    window: int = 5
    """Steps averaged into the smoothed value of each metric."""
    baseline_window: int = 30
    """Healthy steps before the window that form the baseline."""
    min_baseline_steps: int = 10
    """Healthy steps needed before the guard decides anything."""
    patience: int = 3
    """Consecutive breached steps before a rollback."""
    max_rollbacks: int = 3
    """Rollbacks in one run before giving up with an error."""
    lr_scale: float = 1.0
    """Multiply the learning rate by this at each rollback (1: unchanged)."""
    watch_unrewarded: bool = False
    """Also watch reward components whose weight is 0 (a recipe that does not reward format lets it drift)."""
    rules: list[GuardRule] = field(default_factory=default_rules)
    """What is watched and how far it may move; see default_rules()."""

    def __post_init__(self):
        for key in ("window", "baseline_window", "min_baseline_steps", "patience", "max_rollbacks"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.guard.{key}={getattr(self, key)}; allowed: integers >= 1")
        if self.min_baseline_steps > self.baseline_window:
            raise ValueError(f"grpo.guard.min_baseline_steps={self.min_baseline_steps} must be <= "
                             f"grpo.guard.baseline_window={self.baseline_window}")
        if not (0 < self.lr_scale <= 1):
            raise ValueError(f"grpo.guard.lr_scale={self.lr_scale}; allowed: 0 < x <= 1")
        self.rules = [r if isinstance(r, GuardRule) else GuardRule(**r) for r in self.rules]


@dataclass
class Verdict:
    """What the guard concluded after one step."""

    healthy: bool
    """No rule breached at this step (a checkpoint taken now may serve as 'last good')."""
    fire: bool
    """Roll back now."""
    reasons: list[str]
    """Human-readable breaches, e.g. 'degenerate/markup_density 0.62 vs baseline 0.01 (up > 0.25)'."""


class CollapseGuard:
    """Keeps the recent values of the watched metrics and judges each new step."""

    def __init__(self, config: GuardConfig, rules: list[GuardRule]):
        self.config = config
        self.rules = rules
        self.recent: deque[dict] = deque(maxlen=config.window)
        self.baseline: deque[dict] = deque(maxlen=config.baseline_window)
        self.breached_steps = 0
        self.last_healthy = True

    def observe(self, row: dict) -> Verdict:
        values = {r.metric: float(row[r.metric]) for r in self.rules if r.metric in row}
        nonfinite = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(float(row[k]))]
        if nonfinite:
            self.last_healthy = False
            return Verdict(healthy=False, fire=True, reasons=[f"{k} is {row[k]}" for k in nonfinite])
        if len(self.recent) == self.recent.maxlen and self.last_healthy:
            self.baseline.append(self.recent[0])  # leaves the window having been judged healthy
        self.recent.append(values)
        reasons = self._breaches()
        self.breached_steps = self.breached_steps + 1 if reasons else 0
        self.last_healthy = not reasons
        fire = bool(reasons) and self.breached_steps >= self.config.patience
        return Verdict(healthy=not reasons, fire=fire, reasons=reasons)

    def _breaches(self) -> list[str]:
        if len(self.baseline) < self.config.min_baseline_steps:
            return []
        reasons = []
        for rule in self.rules:
            now = [v[rule.metric] for v in self.recent if rule.metric in v]
            before = [v[rule.metric] for v in self.baseline if rule.metric in v]
            if not now or not before:
                continue
            smoothed, baseline = sum(now) / len(now), sum(before) / len(before)
            if rule.breached(smoothed, baseline):
                limit = f"{rule.bad} > {rule.min_change}" if rule.min_change is not None else f"x{rule.ratio}"
                reasons.append(f"{rule.metric} {smoothed:.4g} vs baseline {baseline:.4g} ({limit})")
        return reasons


def watched_rules(config: GuardConfig, reward_weights: dict[str, float]) -> list[GuardRule]:
    """The rules that apply to this recipe: reward components with weight 0 are not watched
    (unless watch_unrewarded), since nothing holds them and their drift is not a collapse."""
    rules = []
    for rule in config.rules:
        name = rule.metric.removeprefix("reward/")
        if rule.metric.startswith("reward/") and reward_weights.get(name, 0.0) == 0 and not config.watch_unrewarded:
            continue
        rules.append(rule)
    return rules


class TrainingCollapsed(RuntimeError):
    """The run collapsed and could not be rolled back (no healthy checkpoint, or too many rollbacks)."""


class RollbackGuard:
    """What the training loop asks after every step (see training/loop.py):

      * observe(step, row) -> True when the run must roll back now;
      * after_save(step, path): keep the checkpoint as "last good" (a hard-linked copy in
        <checkpoint.dir>/last_good/, outside the keep_last rotation) if the run is healthy;
      * rolled_back(from_step, to_step, scheduler): record it, skip the data of the steps
        in between, scale the learning rate; raises TrainingCollapsed past max_rollbacks;
      * data_step(step): the data position of a step (step + the skipped steps);
      * state(): what a checkpoint keeps so a resumed run continues the same way.

    Its memory of recent metrics is rebuilt from the logged rows (a replay), on resume and
    after a rollback alike, so both continue exactly as an uninterrupted run would.
    """

    def __init__(self, config: GuardConfig, rules: list[GuardRule], *, checkpoint_dir, events_dir,
                 saved_state: dict | None = None, history: list[dict] | None = None):
        self.config, self.rules = config, rules
        self.checkpoint_dir, self.events_dir = Path(checkpoint_dir), Path(events_dir)
        saved = (saved_state or {}).get("guard", {})
        self.data_offset = int(saved.get("data_offset", 0))
        self.rollbacks = int(saved.get("rollbacks", 0))
        self.lr_scale = float(saved.get("lr_scale", 1.0))
        self.last_good = _pinned_checkpoint(self.checkpoint_dir / LAST_GOOD_DIR)
        self._replay(history or [])

    def _replay(self, rows: list[dict]) -> None:
        self.rows: list[dict] = []
        self.detector = CollapseGuard(self.config, self.rules)
        self.last_verdict = Verdict(healthy=True, fire=False, reasons=[])
        for row in rows:
            self.observe(int(row["step"]), row)

    def data_step(self, step: int) -> int:
        return step + self.data_offset

    def observe(self, step: int, row: dict) -> bool:
        self.rows.append(dict(row, step=step))
        self.last_verdict = self.detector.observe(row)
        return self.last_verdict.fire

    def after_save(self, step: int, path) -> None:
        """Pin a checkpoint taken while healthy as last good (the first one even before the
        guard can judge, so a rollback target exists; later ones only once it can)."""
        from gazal_nemo.training.checkpoint import pin_checkpoint

        # Decided from state every rank shares (never from the file system, which rank 0 writes):
        # pin_checkpoint is collective.
        judged = len(self.detector.baseline) >= self.config.min_baseline_steps
        if self.last_verdict.healthy and self.detector.breached_steps == 0 and (judged or self.last_good is None):
            self.last_good = pin_checkpoint(path, self.checkpoint_dir / LAST_GOOD_DIR)

    def rolled_back(self, from_step: int, to_step: int, scheduler) -> None:
        reasons = self.last_verdict.reasons
        self.rollbacks += 1
        if self.rollbacks > self.config.max_rollbacks:
            raise TrainingCollapsed(f"the run collapsed again at step {from_step} ({'; '.join(reasons)}) after "
                                    f"{self.config.max_rollbacks} rollbacks (grpo.guard.max_rollbacks); giving up")
        self.data_offset += from_step - to_step
        self.lr_scale *= self.config.lr_scale
        apply_lr_scale(scheduler, self.config.lr_scale)
        self._replay([r for r in self.rows if r["step"] <= to_step])
        self._event({"event": "rollback", "from_step": from_step, "to_step": to_step, "reasons": reasons,
                     "rollbacks": self.rollbacks, "data_offset": self.data_offset, "lr_scale": self.lr_scale})

    def state(self) -> dict:
        return {"guard": {"data_offset": self.data_offset, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}}

    def _event(self, event: dict) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        print(f"guard: rolled back from step {event['from_step']} to {event['to_step']} "
              f"({'; '.join(event['reasons'])}); skipping {event['from_step'] - event['to_step']} steps of data, "
              f"lr x{event['lr_scale']:.3g}, rollback {event['rollbacks']}/{self.config.max_rollbacks}", flush=True)
        self.events_dir.mkdir(parents=True, exist_ok=True)
        with open(self.events_dir / EVENTS_FILE, "a") as f:
            f.write(json.dumps(event) + "\n")


def _pinned_checkpoint(root: Path) -> Path | None:
    """The pinned last-good checkpoint of a resumed run, as rank 0 sees it (every rank gets its answer)."""
    import torch.distributed as dist

    from gazal_nemo.training.checkpoint import complete_checkpoints

    found = [str(p) for p in complete_checkpoints(root)[-1:]] if not dist.is_initialized() or dist.get_rank() == 0 else []
    holder = [found[0] if found else None]
    if dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    return Path(holder[0]) if holder[0] else None


def apply_lr_scale(scheduler, factor: float) -> None:
    """Scale megatron's OptimizerParamScheduler peak and floor, and the param groups' own copies
    (the schedule's shape is kept; the optimizer's lr follows at once)."""
    if factor == 1.0:
        return
    scheduler.max_lr *= factor
    scheduler.min_lr *= factor
    for group in scheduler.optimizer.param_groups:  # megatron keeps per-group copies that win
        for key in ("max_lr", "min_lr"):
            if key in group:
                group[key] *= factor
    scheduler.step(increment=0)

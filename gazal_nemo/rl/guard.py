"""Collapse guard: notice a GRPO run degenerating and roll back to the last healthy checkpoint.

The paper's own run went unstable around step 526 (section 4.6.1: double asterisks around
nearly every word, filler, dips in the repetition and loss curves) and recovered by luck.
Public trainers log such metrics or stop on NaN; none rolls back. `CollapseGuard` decides;
`RollbackGuard` is what the training loop asks after each step, and the loop acts (restore
the last healthy checkpoint, skip the prompts seen since, optionally lower the learning rate).

What it watches: the reward components the recipe rewards, and signals for the collapses
the paper names or cites (rl/guard_signals.py): markdown markers, repeated n-grams, answered
share, answer-letter bias against the gold letters, accuracy per gold position, completion
length both ways, truncation, entropy, grad norm (rl/guard_rules.py: default_rules).

How it decides, per watched metric (a rule):
  * window = the last `window` steps; baseline = the `baseline_window` healthy steps before
    them (the run's own recent past, not an absolute constant): steps that sat in a breached
    window and the first `warmup_steps` never join it;
  * `test: significance` (default): breached when the window's mean moved the bad way by more
    than the metric's own noise allows at the recipe's `false_alarm_rate` (rl/guard_stats.py:
    Student t on the baseline's spread, and for a proportion also the binomial noise of the
    step's sample size; the rate is split over the rules). `min_change` / `ratio`, when set,
    are floors: the change must also be that large to count (for metrics that are almost
    noiseless, where any change is significant);
  * `test: threshold`: breached when the change passes `min_change` (absolute) or `ratio`
    (relative) alone, the hand-set rule of earlier versions;
  * the guard fires when any rule is breached for `patience` consecutive steps, or at once on
    a non-finite loss/grad norm. No decision before `min_baseline_steps` healthy steps.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gazal_nemo.rl.guard_rules import GuardRule, default_rules

LAST_GOOD_DIR = "last_good"
PENDING_DIR = "last_good_pending"
EVENTS_FILE = "guard_events.jsonl"


@dataclass(kw_only=True)
class GuardConfig:
    """Collapse guard with automatic rollback (`grpo.guard`; see gazal_nemo/rl/guard.py)."""

    enabled: bool = True
    """Watch the run and roll back on a collapse; false behaves exactly as a run without the guard."""
    false_alarm_rate: float = 1.0e-3
    """Expected false rollbacks per healthy step, all rules together (1e-3: one per 1,000 steps); sets
    the significance rules' thresholds."""
    window: int = 5
    """Steps averaged into the window mean of each metric."""
    baseline_window: int = 30
    """Healthy steps before the window that form the baseline."""
    min_baseline_steps: int = 10
    """Healthy steps needed before the guard decides anything."""
    warmup_steps: int = 5
    """First steps of the run that never join the baseline (the SFT model settling into RL sampling;
    their spread would hide a later collapse)."""
    patience: int = 2
    """Consecutive breached steps before a rollback."""
    max_rollbacks: int = 3
    """Rollbacks in one run before giving up with an error."""
    lr_scale: float = 1.0
    """Multiply the learning rate by this at each rollback (1: unchanged)."""
    watch_unrewarded: bool = False
    """Also watch reward components whose weight is 0 (a recipe that does not reward format lets it drift)."""
    rules: list[GuardRule] = field(default_factory=default_rules)
    """What is watched and how; see default_rules()."""

    def __post_init__(self):
        for key in ("window", "baseline_window", "min_baseline_steps", "patience", "max_rollbacks"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.guard.{key}={getattr(self, key)}; allowed: integers >= 1")
        if self.warmup_steps < 0:
            raise ValueError(f"grpo.guard.warmup_steps={self.warmup_steps}; allowed: integers >= 0")
        if self.min_baseline_steps < 2:
            raise ValueError(f"grpo.guard.min_baseline_steps={self.min_baseline_steps}; allowed: integers >= 2 "
                             "(a baseline's noise needs two steps)")
        if self.min_baseline_steps > self.baseline_window:
            raise ValueError(f"grpo.guard.min_baseline_steps={self.min_baseline_steps} must be <= "
                             f"grpo.guard.baseline_window={self.baseline_window}")
        if not (0 < self.lr_scale <= 1):
            raise ValueError(f"grpo.guard.lr_scale={self.lr_scale}; allowed: 0 < x <= 1")
        if not (0 < self.false_alarm_rate < 0.5):
            raise ValueError(f"grpo.guard.false_alarm_rate={self.false_alarm_rate}; allowed: 0 < x < 0.5 "
                             "(false rollbacks per healthy step, e.g. 1e-4)")
        self.rules = [r if isinstance(r, GuardRule) else GuardRule(**r) for r in self.rules]


@dataclass
class Verdict:
    """What the guard concluded after one step."""

    healthy: bool
    """No rule breached at this step (a checkpoint taken now may serve as 'last good')."""
    fire: bool
    """Roll back now."""
    reasons: list[str]
    """Human-readable breaches, e.g. 'answers/letter_bias 0.62 vs baseline 0.08 (moved 0.54 up, noise allows 0.1)'."""


class CollapseGuard:
    """Keeps the recent values of the watched metrics and judges each new step."""

    def __init__(self, config: GuardConfig, rules: list[GuardRule]):
        self.config = config
        self.rules = rules
        self.recent: deque[dict] = deque(maxlen=config.window)
        self.baseline: deque[dict] = deque(maxlen=config.baseline_window)
        self.suspect: deque[bool] = deque(maxlen=config.window)
        """Per window step: it was in a breached window (it never joins the baseline, so the start
        of a collapse cannot become the baseline it is judged against)."""
        self.breached_steps = 0
        self.observed = 0
        # Union bound: each significance rule gets an equal share of the false-alarm rate.
        self.level = config.false_alarm_rate / max(1, sum(r.test == "significance" for r in rules))
        self.keys = {r.metric for r in rules} | {r.trials for r in rules if r.trials}

    def observe(self, row: dict) -> Verdict:
        nonfinite = [k for k in ("loss", "grad_norm") if k in row and not math.isfinite(float(row[k]))]
        if nonfinite:
            self.suspect = deque([True] * len(self.suspect), maxlen=self.config.window)
            return Verdict(healthy=False, fire=True, reasons=[f"{k} is {row[k]}" for k in nonfinite])
        # A signal with no data this step (nothing answered, say) is absent, never NaN.
        values = {k: float(row[k]) for k in self.keys if k in row and math.isfinite(float(row[k]))}
        self.observed += 1
        # The step leaving the window joins the baseline unless it was in a breach or in the warm-up.
        leaving = self.observed - self.config.window
        if len(self.recent) == self.recent.maxlen and not self.suspect[0] and leaving > self.config.warmup_steps:
            self.baseline.append(self.recent[0])
        self.recent.append(values)
        self.suspect.append(False)
        reasons = self._breaches()
        self.breached_steps = self.breached_steps + 1 if reasons else 0
        if reasons:
            self.suspect = deque([True] * len(self.suspect), maxlen=self.config.window)
        fire = bool(reasons) and self.breached_steps >= self.config.patience
        return Verdict(healthy=not reasons, fire=fire, reasons=reasons)

    def _breaches(self) -> list[str]:
        return [reason for rule, now, before, trials in self._judgeable()
                if (reason := rule.judge(now, before, level=self.level, trials=trials))]

    def margins(self) -> dict[str, float]:
        """Per significance rule with enough data, how much of what the noise allows the current
        window's change used (rl/guard_rules.GuardRule.margin): how close a healthy run came."""
        out = {}
        for rule, now, before, trials in self._judgeable():
            margin = rule.margin(now, before, level=self.level, trials=trials)
            if margin is not None:
                out[rule.label] = margin
        return out

    def _judgeable(self):
        """(rule, window values, baseline values, mean trials) of each rule with data to judge;
        nothing before min_baseline_steps healthy steps."""
        if len(self.baseline) < self.config.min_baseline_steps:
            return
        for rule in self.rules:
            now = [v[rule.metric] for v in self.recent if rule.metric in v]
            before = [v[rule.metric] for v in self.baseline if rule.metric in v]
            if not now or len(before) < 2:
                continue
            trials = None
            if rule.trials:
                counts = [v[rule.trials] for v in (*self.recent, *self.baseline) if v.get(rule.trials, 0) > 0]
                trials = sum(counts) / len(counts) if counts else None
            yield rule, now, before, trials


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
      * after_save(step, path): keep a checkpoint taken while healthy (a hard-linked copy,
        outside the keep_last rotation) as a candidate in <checkpoint.dir>/last_good_pending/;
        it becomes "last good" (<checkpoint.dir>/last_good/) once the `window` steps after it
        were judged without a breach, so a collapse that had begun but was not yet visible when
        it was saved never becomes the rollback target (the run's first checkpoint is last good
        at once, so a target exists);
      * rolled_back(from_step, to_step, scheduler): record it, skip the data of the steps
        in between, scale the learning rate; raises TrainingCollapsed past max_rollbacks;
      * data_step(step): the data position of a step (step + the skipped steps);
      * state(): what a checkpoint keeps so a resumed run continues the same way.

    Its memory of recent metrics is rebuilt from the logged rows (a replay), on resume and
    after a rollback alike, so both continue exactly as an uninterrupted run would.
    """

    def __init__(self, config: GuardConfig, rules: list[GuardRule], *, checkpoint_dir, events_dir,
                 saved_state: dict | None = None, history: list[dict] | None = None):
        from gazal_nemo.training.checkpoint import checkpoint_step

        self.config, self.rules = config, rules
        self.checkpoint_dir, self.events_dir = Path(checkpoint_dir), Path(events_dir)
        saved = (saved_state or {}).get("guard", {})
        self.data_offset = int(saved.get("data_offset", 0))
        self.rollbacks = int(saved.get("rollbacks", 0))
        self.lr_scale = float(saved.get("lr_scale", 1.0))
        self.last_good = _pinned_checkpoint(self.checkpoint_dir / LAST_GOOD_DIR)
        self.pending, self.pending_step = None, None
        self._replay(history or [])
        pending = _pinned_checkpoint(self.checkpoint_dir / PENDING_DIR)
        if pending is not None and history and checkpoint_step(pending) == int(history[-1]["step"]):
            # The candidate pinned at the checkpoint this run resumes from; an older one was
            # already promoted or dropped before the interruption.
            self.pending, self.pending_step = pending, checkpoint_step(pending)

    def _replay(self, rows: list[dict]) -> None:
        self.rows: list[dict] = []
        self.detector = CollapseGuard(self.config, self.rules)
        self.last_verdict = Verdict(healthy=True, fire=False, reasons=[])
        self.pending, self.pending_step = None, None
        for row in rows:
            self._judge(int(row["step"]), row)

    def data_step(self, step: int) -> int:
        return step + self.data_offset

    def _judge(self, step: int, row: dict) -> Verdict:
        self.rows.append(dict(row, step=step))
        self.last_verdict = self.detector.observe(row)
        return self.last_verdict

    def observe(self, step: int, row: dict) -> bool:
        verdict = self._judge(step, row)
        # Decided from state every rank shares (never from the file system, which rank 0 writes):
        # pin_checkpoint is collective.
        if self.pending is not None:
            if step >= self.pending_step + self.config.window:  # this window holds only later steps
                from gazal_nemo.training.checkpoint import pin_checkpoint

                self.last_good = pin_checkpoint(self.pending, self.checkpoint_dir / LAST_GOOD_DIR)
                self.pending = None
            elif not verdict.healthy:  # a breached window that reaches back before the candidate
                self.pending = None
        return verdict.fire

    def after_save(self, step: int, path) -> None:
        """A checkpoint taken while healthy becomes the candidate (or last good at once, when
        there is none yet)."""
        from gazal_nemo.training.checkpoint import pin_checkpoint

        if not (self.last_verdict.healthy and self.detector.breached_steps == 0):
            return
        if self.last_good is None:
            self.last_good = pin_checkpoint(path, self.checkpoint_dir / LAST_GOOD_DIR)
        else:
            self.pending, self.pending_step = pin_checkpoint(path, self.checkpoint_dir / PENDING_DIR), step

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

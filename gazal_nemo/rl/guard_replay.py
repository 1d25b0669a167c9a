"""What the collapse guard would have done on a finished run's logged metrics, with the recipe's
`grpo.guard` settings (`gazal guard`): when it would have rolled back, why, and how close each
rule came to firing.

How a team sets `grpo.guard.false_alarm_rate` on its own runs: replay its healthy runs at the
rate it considers (none may roll back; the closest approach says how much room is left) and the
runs that went bad without a guard (the guard should fire soon after the trouble began).
The replay feeds the rows of metrics.jsonl in order to the same CollapseGuard the trainer uses.
A run that was rolled back kept its re-run steps there, not the undone ones
(metrics_rolled_back.jsonl); replaying it judges the trajectory the run kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from gazal_nemo.rl.guard import CollapseGuard, GuardConfig
from gazal_nemo.rl.guard_rules import GuardRule


@dataclass
class ReplayReport:
    """The guard's decisions over a run's rows."""

    steps: int
    judged: int = 0
    """Steps at which the guard could decide (its baseline was full enough)."""
    breaches: list[tuple[int, list[str]]] = field(default_factory=list)
    """(step, reasons) of every breached step."""
    rollbacks: list[tuple[int, list[str]]] = field(default_factory=list)
    """(step, reasons) where it would have rolled back (the first step of each stretch that reached patience)."""
    closest: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Per significance rule: the largest share of its noise allowance a window's change used, and where."""


def read_metric_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is dropped, any other
    unreadable line is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the run's logging.dir holds metrics.jsonl)")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a metrics row (JSON with a 'step')") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def replay(rows: list[dict], config: GuardConfig, rules: list[GuardRule]) -> ReplayReport:
    """Judge `rows` in order as the trainer's guard would; after a would-be rollback it judges on
    (a real run would have restored a checkpoint and re-run those steps)."""
    guard = CollapseGuard(config, rules)
    report = ReplayReport(steps=len(rows))
    fired = False
    for row in rows:
        step = int(row["step"])
        verdict = guard.observe(row)
        report.judged += len(guard.baseline) >= config.min_baseline_steps
        for label, margin in guard.margins().items():
            if label not in report.closest or margin > report.closest[label][0]:
                report.closest[label] = (margin, step)
        if verdict.reasons:
            report.breaches.append((step, verdict.reasons))
        if verdict.fire and not fired:
            report.rollbacks.append((step, verdict.reasons))
        fired = verdict.fire
    return report


def format_report(report: ReplayReport, *, source: str, config: GuardConfig, rules: list[GuardRule]) -> str:
    """The report as a person reads it: the breaches, the would-be rollbacks, the closest approaches."""
    lines = [f"guard replay of {source}: {report.steps} steps, {report.judged} judged; "
             f"false_alarm_rate {config.false_alarm_rate:g}, {len(rules)} rules, window {config.window}, "
             f"patience {config.patience}"]
    lines += [f"  step {step}: breached: {'; '.join(reasons)}" for step, reasons in report.breaches]
    lines.append("closest approach per significance rule (the window's change / what the noise allows; "
                 ">= 1 is significant, the rule's floors decide the rest):")
    width = max((len(label) for label in report.closest), default=0)
    for label, (margin, step) in sorted(report.closest.items(), key=lambda item: -item[1][0]):
        shown = "inf" if math.isinf(margin) else f"{margin:.2f}"
        lines.append(f"  {label:<{width}}  {shown} (step {step})")
    if report.rollbacks:
        lines += [f"would roll back at step {step}: {'; '.join(reasons)}" for step, reasons in report.rollbacks]
    else:
        lines.append("no rollback")
    return "\n".join(lines)

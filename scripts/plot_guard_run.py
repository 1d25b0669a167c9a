"""Plot a GRPO run's guard events: metrics over steps, the rolled-back stretch, the rollback.

    python scripts/plot_guard_run.py RUN_LOG_DIR OUT.svg [--metrics reward/accuracy,degenerate/markup_density]
                                     [--window FIRST,LAST]

Reads metrics.jsonl (the run as it stands, one row per step), metrics_rolled_back.jsonl (the
steps a rollback undid) and guard_events.jsonl from a run's logging.dir, and writes an SVG
(no plotting library needed): one panel per metric, the kept run as a solid line, the
rolled-back steps dashed, each rollback a vertical marker from the step it fired at to the
step it restored; `--window` shades the steps an induced collapse was paid for, up to the
first rollback (the window counts wall-clock steps; bench/bench_guard.py draws its plots with it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WIDTH, PANEL_HEIGHT, MARGIN = 720, 170, 48
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _polyline(points, scale_x, scale_y, colour, dashed=False) -> str:
    coords = " ".join(f"{scale_x(x):.1f},{scale_y(y):.1f}" for x, y in points)
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.8"{dash} points="{coords}"/>'


def _undone_stretches(undone: list[dict], events: list[dict]) -> list[list[dict]]:
    """The undone rows of each rollback: metrics_rolled_back.jsonl holds them in the order the
    rollbacks happened, each stretch counting up from the step after the one restored (two
    rollbacks over the same steps are two stretches, never one zigzag line)."""
    stretches, previous = [], None
    for row in undone:
        if previous is None or row["step"] <= previous:
            stretches.append([])
        stretches[-1].append(row)
        previous = row["step"]
    if len(stretches) == len(events):
        return stretches
    return [[r for r in undone if e["to_step"] < r["step"] <= e["from_step"]] for e in events]


def _panel(index, metric, kept, undone, events, steps, colour, window=None) -> list[str]:
    top = MARGIN + index * (PANEL_HEIGHT + MARGIN)
    values = [r[metric] for r in kept + undone if metric in r]
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    first, last = min(steps), max(steps)

    def scale_x(step):
        return MARGIN + (step - first) / max(last - first, 1) * (WIDTH - 2 * MARGIN)

    def scale_y(value):
        return top + PANEL_HEIGHT - (value - low) / (high - low) * PANEL_HEIGHT

    out = [f'<rect x="{MARGIN}" y="{top}" width="{WIDTH - 2 * MARGIN}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>',
           f'<text x="{MARGIN}" y="{top - 8}" font-size="13">{metric}</text>',
           f'<text x="{MARGIN - 6}" y="{top + 10}" font-size="10" text-anchor="end">{high:.3g}</text>',
           f'<text x="{MARGIN - 6}" y="{top + PANEL_HEIGHT}" font-size="10" text-anchor="end">{low:.3g}</text>']
    if window is not None:  # wall-clock steps: they are logged steps only until the first rollback
        end = min(window[1], last, *(e["from_step"] for e in events[:1]))
        left, right = scale_x(max(window[0], first)), scale_x(end)
        out.append(f'<rect x="{left:.1f}" y="{top}" width="{max(right - left, 1):.1f}" height="{PANEL_HEIGHT}" '
                   'fill="#f4c7c3" fill-opacity="0.45"/>')
    out.append(_polyline([(r["step"], r[metric]) for r in kept if metric in r], scale_x, scale_y, colour))
    stretches = _undone_stretches(undone, events)
    for event, stretch in zip(events, stretches):  # the steps this rollback undid, from the step it went back to
        start = [r for r in kept if r["step"] == event["to_step"] and metric in r]
        stretch = [r for r in stretch if metric in r]
        out.append(_polyline([(r["step"], r[metric]) for r in start + stretch], scale_x, scale_y, colour, dashed=True))
        for step, label in ((event["from_step"], f"rollback at {event['from_step']}"), (event["to_step"], None)):
            out.append(f'<line x1="{scale_x(step):.1f}" y1="{top}" x2="{scale_x(step):.1f}" y2="{top + PANEL_HEIGHT}" '
                       f'stroke="#555" stroke-dasharray="2,3"/>')
            if label and index == 0:
                out.append(f'<text x="{scale_x(step) + 4:.1f}" y="{top + 12}" font-size="11">{label} '
                           f'-> step {event["to_step"]}</text>')
    out.append(f'<text x="{MARGIN}" y="{top + PANEL_HEIGHT + 14}" font-size="10">step {first}</text>')
    out.append(f'<text x="{WIDTH - MARGIN}" y="{top + PANEL_HEIGHT + 14}" font-size="10" text-anchor="end">step {last}</text>')
    return out


def render(log_dir: Path, metrics: list[str], window: tuple[int, int] | None = None) -> str:
    kept, undone = _rows(log_dir / "metrics.jsonl"), _rows(log_dir / "metrics_rolled_back.jsonl")
    events = _rows(log_dir / "guard_events.jsonl")
    if not kept:
        raise ValueError(f"{log_dir / 'metrics.jsonl'}: no rows")
    steps = [r["step"] for r in kept + undone]
    height = MARGIN + len(metrics) * (PANEL_HEIGHT + MARGIN)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">',
             '<rect width="100%" height="100%" fill="white"/>']
    for i, metric in enumerate(metrics):
        if not any(metric in r for r in kept):
            raise ValueError(f"{log_dir / 'metrics.jsonl'}: no metric {metric!r}")
        parts += _panel(i, metric, kept, undone, events, steps, COLOURS[i % len(COLOURS)], window)
    shaded = "; shaded: steps an induced collapse paid for, up to the first rollback" if window is not None else ""
    parts.append(f'<text x="{WIDTH - MARGIN}" y="{height - 12}" font-size="10" text-anchor="end">solid: the run as kept; '
                 f'dashed: steps undone by a rollback{shaded}</text></svg>')
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", type=Path, help="the run's logging.dir")
    parser.add_argument("out", type=Path, help="SVG file to write")
    parser.add_argument("--metrics", default="reward/accuracy,degenerate/markup_density,truncated_frac",
                        help="comma-separated metrics, one panel each")
    parser.add_argument("--window", default=None, help="FIRST,LAST: shade the steps an induced collapse was paid for")
    args = parser.parse_args(argv)
    try:
        window = None
        if args.window:
            try:
                first, last = (int(x) for x in args.window.split(","))
            except ValueError:
                raise ValueError(f"--window {args.window!r}: expected FIRST,LAST (two step numbers)") from None
            window = (first, last)
        svg = render(args.log_dir, [m for m in args.metrics.split(",") if m], window)
    except (ValueError, OSError) as e:
        print(f"plot_guard_run: error: {e}", file=sys.stderr)
        return 2
    args.out.write_text(svg)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The run report: attribute rates against their targets, acceptance, rejections, throughput,
duplicates and contamination; as report.json, report.md and one chart (rates.svg).

Rates are given twice. "Planned" counts the draws of all num_examples indices: a check of the
sampler, with the central binomial interval of the count a correct sampler lands in.
"Kept" counts the examples of the final dataset (after rejections, duplicates and
contamination), with the Wilson interval of the observed rate: when rejections hit some
attributes more than others (rare conditions fail validation more often, say), the target
falls outside it, and the report marks it.

The intervals are 99% for the whole family of m rates (Bonferroni: each at 1 - 0.01/m;
m = 34 for the paper's design). At 99% each, a correct sampler would show one rate outside
its interval in about 3 runs of 10 (1 - 0.99^34 = 0.29), and a reader would chase noise.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from pathlib import Path

from gazal_nemo.synth.attributes import tally
from gazal_nemo.synth.stats import binomial_interval, wilson_interval

FAMILY_LEVEL = 0.99


def per_rate_level(num_rates: int, family_level: float = FAMILY_LEVEL) -> float:
    """Bonferroni: each of num_rates intervals at this level covers all of them with >= family_level."""
    return 1.0 - (1.0 - family_level) / max(num_rates, 1)


def attribute_rates(design, planned: list[dict], kept: list[dict]) -> list[dict]:
    rows = []
    planned_rows, kept_rows = tally(design, planned), tally(design, kept)
    level = per_rate_level(len(planned_rows))
    for plan, final in zip(planned_rows, kept_rows):
        lo, hi = binomial_interval(plan["num_cases"], plan["target"], level)
        wlo, whi = wilson_interval(final["num_with"], final["num_cases"], level)
        rows.append({
            "key": plan["key"], "target": plan["target"], "module": plan["module"],
            "planned": {"num_with": plan["num_with"], "num_cases": plan["num_cases"],
                        "rate": plan["num_with"] / plan["num_cases"] if plan["num_cases"] else None,
                        "interval": [lo, hi], "within": lo <= plan["num_with"] <= hi},
            "kept": {"num_with": final["num_with"], "num_cases": final["num_cases"],
                     "rate": final["num_with"] / final["num_cases"] if final["num_cases"] else None,
                     "wilson": [wlo, whi], "target_inside": final["num_cases"] == 0 or wlo <= plan["target"] <= whi},
        })
    return rows


def acceptance(examples: list[dict], rejected: list[dict]) -> dict:
    per_module = defaultdict(lambda: {"examples": 0, "kept": 0, "failed": 0, "rejected_attempts": 0})
    for example in examples:
        row = per_module[example["module"]]
        row["examples"] += 1
        row["kept" if example["status"] == "kept" else "failed"] += 1
    reasons = defaultdict(Counter)
    for attempt in rejected:
        per_module[attempt["module"]]["rejected_attempts"] += 1
        for reason in attempt["reasons"]:
            reasons[f"{attempt['stage']}/{reason.split(':', 1)[0]}"][attempt["module"]] += 1
    for row in per_module.values():
        row["acceptance"] = row["kept"] / row["examples"] if row["examples"] else None
    total = len(examples)
    kept = sum(row["kept"] for row in per_module.values())
    return {"examples": total, "kept": kept, "failed": total - kept,
            "acceptance": kept / total if total else None,
            "rejected_attempts": len(rejected), "per_module": dict(sorted(per_module.items())),
            "rejection_reasons": {code: dict(counts) for code, counts in sorted(reasons.items())}}


def throughput(footers: list[dict], backend_stats: dict | None = None) -> dict:
    sums = Counter()
    for footer in footers:
        sums.update({k: v for k, v in footer["counters"].items() if isinstance(v, (int, float))})
    seconds = sums.get("seconds", 0.0)
    out = {"chunks": len(footers), "requests": sums["requests"], "prompt_tokens": sums["prompt_tokens"],
           "completion_tokens": sums["completion_tokens"], "generation_seconds": round(seconds, 3),
           "completion_tokens_per_s": sums["completion_tokens"] / seconds if seconds else None,
           "examples_per_hour": 3600 * sum(f["stop"] - f["start"] for f in footers) / seconds if seconds else None}
    if backend_stats:
        out["backend"] = backend_stats
    return out


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(report: dict) -> str:
    acc, thr = report["acceptance"], report["throughput"]
    lines = [f"# Synthesis report: {report['name']}", "",
             f"- examples: {acc['examples']} planned, {acc['kept']} kept by validation ({_pct(acc['acceptance'])}%), "
             f"{acc['failed']} failed after retries, {acc['rejected_attempts']} rejected attempts",
             f"- duplicates removed: {report['dedup']['exact']} exact, {report['dedup']['near']} near "
             f"(field {report['dedup']['field']})",
             f"- contamination: {report['decontam']['summary']}",
             f"- final dataset: {report['final_rows']} rows in {report['data_dir']}",
             f"- throughput (per replica): {thr['completion_tokens']} completion tokens in {thr['generation_seconds']:.1f}s"
             + (f" = {thr['completion_tokens_per_s']:.1f} tokens/s, {thr['examples_per_hour']:.0f} examples/hour"
                if thr["completion_tokens_per_s"] else "")
             + f"; {thr['requests']} requests",
             f"- validation enforced: {report['validation_enforced']}", "",
             "## Acceptance per module", "", "| module | examples | kept | failed | acceptance % | rejected attempts |",
             "|---|---|---|---|---|---|"]
    for module, row in acc["per_module"].items():
        lines.append(f"| {module} | {row['examples']} | {row['kept']} | {row['failed']} | {_pct(row['acceptance'])} | "
                     f"{row['rejected_attempts']} |")
    lines += ["", "## Rejection reasons (stage/reason: count per module)", ""]
    if acc["rejection_reasons"]:
        lines += ["| reason | count | per module |", "|---|---|---|"]
        for code, counts in acc["rejection_reasons"].items():
            lines.append(f"| {code} | {sum(counts.values())} | "
                         + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())) + " |")
    else:
        lines.append("none")
    num_rates = len(report["attribute_rates"])
    lines += ["", "## Attribute rates against targets", "",
              "Planned: all indices' draws, with the binomial interval of a correct sampler's count. "
              "Kept: the final dataset, with the Wilson interval of the observed rate. Intervals are 99% for all "
              f"{num_rates} rates together (each at {100 * per_rate_level(num_rates):.3f}%, Bonferroni).", "",
              "| attribute | of | target % | planned % | planned count in interval | kept % | kept CI | "
              "target in CI |", "|---|---|---|---|---|---|---|---|"]
    for row in report["attribute_rates"]:
        plan, kept = row["planned"], row["kept"]
        lines.append(f"| {row['key']} | {row['module'] or 'all'} | {100 * row['target']:.0f} | {_pct(plan['rate'])} | "
                     f"{plan['num_with']}/{plan['num_cases']} in [{plan['interval'][0]}, {plan['interval'][1]}]: "
                     f"{'yes' if plan['within'] else 'NO'} | {_pct(kept['rate'])} | "
                     f"[{_pct(kept['wilson'][0])}, {_pct(kept['wilson'][1])}] | "
                     f"{'yes' if kept['target_inside'] else 'NO'} |")
    lines += ["", "Chart: rates.svg (target: black tick; kept rate: bar with its interval; red: target outside)."]
    return "\n".join(lines) + "\n"


def rates_svg(rows: list[dict], title: str) -> str:
    """Horizontal bars: each attribute's kept rate with its Wilson interval, and the target as a tick."""
    label_w, plot_w, row_h, top = 420, 420, 18, 44  # labels up to ~75 characters at 10 px
    width, height = label_w + plot_w + 60, top + row_h * len(rows) + 40
    x = lambda rate: label_w + rate * plot_w  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14">{html.escape(title)}: kept rate (bar, family-wise 99% interval) vs target (tick)</text>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{x(tick):.1f}" y1="{top - 6}" x2="{x(tick):.1f}" y2="{height - 34}" stroke="#ddd"/>')
        out.append(f'<text x="{x(tick):.1f}" y="{height - 20}" font-size="10" text-anchor="middle">{int(tick * 100)}%</text>')
    for n, row in enumerate(rows):
        y = top + n * row_h
        kept = row["kept"]
        colour = "#4c78a8" if kept["target_inside"] else "#e45756"
        out.append(f'<text x="{label_w - 8}" y="{y + 12}" font-size="10" text-anchor="end">{html.escape(row["key"])}</text>')
        if kept["rate"] is not None:
            out.append(f'<rect x="{label_w}" y="{y + 3}" width="{kept["rate"] * plot_w:.1f}" height="{row_h - 6}" '
                       f'fill="{colour}" fill-opacity="0.75"/>')
            lo, hi = kept["wilson"]
            out.append(f'<line x1="{x(lo):.1f}" y1="{y + row_h / 2:.1f}" x2="{x(hi):.1f}" y2="{y + row_h / 2:.1f}" '
                       'stroke="#333" stroke-width="1.5"/>')
        out.append(f'<line x1="{x(row["target"]):.1f}" y1="{y + 1}" x2="{x(row["target"]):.1f}" y2="{y + row_h - 1}" '
                   'stroke="black" stroke-width="2.5"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_report(output_dir: Path, report: dict) -> None:
    output_dir = Path(output_dir)
    files = {"report.json": json.dumps(report, indent=1) + "\n", "report.md": markdown(report),
             "rates.svg": rates_svg(report["attribute_rates"], report["name"])}
    for name, text in files.items():
        tmp = output_dir / f".{name}.partial"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(output_dir / name)

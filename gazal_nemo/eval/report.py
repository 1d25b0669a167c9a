"""The results table (markdown and JSON), with the paper's published numbers beside ours.

PAPER_TABLE_2 is copied from Gazal-R1 (arXiv 2506.21594), Table 2 "Accuracy (%) on Medical
Benchmarks": the final Gazal-R1 32B and its base, Qwen 3 32B, as the authors report them.
"""

from __future__ import annotations

import json
from pathlib import Path

PAPER_TABLE_2 = {
    "Gazal-R1 (Final) 32B": {"mmlu_pro_medical": 81.6, "medmcqa": 71.9, "medqa": 87.1, "pubmedqa": 79.6},
    "Qwen 3 32B": {"mmlu_pro_medical": 78.4, "medmcqa": 71.6, "medqa": 84.4, "pubmedqa": 76.7},
}
PAPER_CITATION = "Gazal-R1 paper (arXiv 2506.21594), Table 2"
COLUMNS = ("benchmark", "n", "accuracy % [95% CI]", "extraction fail %", "truncated %", "mean tokens", "q/s",
           *(f"paper {name}" for name in PAPER_TABLE_2))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        qps = "-" if r["questions_per_s"] is None else f"{r['questions_per_s']:.2f}"
        rows.append([name, str(r["records"]), f"{_pct(r['accuracy'])} [{_pct(r['ci95_low'])}, {_pct(r['ci95_high'])}]",
                     _pct(r["extraction_failure_rate"]), _pct(r["truncation_rate"]),
                     f"{r['mean_completion_tokens']:.0f}", qps,
                     *(f"{paper[name]:.1f}" if name in paper else "-" for paper in PAPER_TABLE_2.values())])
    return rows


def markdown_table(results: dict[str, dict], *, title: str) -> str:
    lines = [f"## {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", f"Accuracy: last \\boxed{{X}} after </think>, permutation 0 (the file's option order); "
                  f"95% CI: Wilson score interval. Paper columns: {PAPER_CITATION}."]
    permuted = {n: r for n, r in results.items() if "consistent_accuracy" in r}
    if permuted:
        lines += ["", "| benchmark | permutations | right under all % | mean over permutations % | "
                      "accuracy by gold position % |", "|---|---|---|---|---|"]
        for name, r in permuted.items():
            positions = ", ".join(f"{k} {_pct(v)}" for k, v in r["accuracy_by_gold_position"].items())
            lines.append(f"| {name} | {r['num_permutations']} | {_pct(r['consistent_accuracy'])} | "
                         f"{_pct(r['mean_accuracy_over_permutations'])} | {positions} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def write_results(out_dir: Path, results: dict[str, dict], *, title: str, settings: dict) -> tuple[Path, Path]:
    """results.json (ours, the settings, the paper's numbers) and results.md, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "results": results, "settings": settings,
               "paper_table_2": {"source": PAPER_CITATION, "accuracy_percent": PAPER_TABLE_2}}
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    _atomic_write(json_path, json.dumps(payload, indent=2) + "\n")
    _atomic_write(md_path, markdown_table(results, title=title))
    return json_path, md_path

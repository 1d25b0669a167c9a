"""Run the whole Gazal-R1 pipeline on a tiny CPU Qwen3 made on the spot (no downloads):
make a 2-layer Qwen3 + tokenizer -> convert HF to a Megatron checkpoint -> SFT with a
DoRA + rsLoRA adapter -> export (PEFT adapter + merged HF model) -> GRPO on a synthetic
verifiable MCQ task -> export -> `gazal eval` of the SFT adapter and the GRPO model on a
held-out MedQA-format file. Same code as the 32B recipes, with recipes/tiny_cpu_*.yaml."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where the demo writes everything (default runs/demo)")
    parser.add_argument("--sft-steps", type=int, default=130, help="SFT optimizer steps (default 130)")
    parser.add_argument("--grpo-steps", type=int, default=60, help="GRPO optimizer steps (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep an existing workdir (default: start clean)")


def _stage(stage: str, recipe: Path, overrides: list[str]) -> None:
    from gazal_nemo.commands.stage import run_stage

    print(f"\n== gazal {stage} --recipe {recipe.relative_to(RECIPES.parent)} {' '.join(overrides)}", flush=True)
    if run_stage(stage, str(recipe), overrides, dry_run=False) != 0:  # e.g. 75: stopped by Ctrl-C, no export
        raise ValueError(f"gazal {stage} ended before its last step; the demo stops here")


def _first_last(path: Path, key: str) -> tuple[float, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[0][key], rows[-1][key]


def run(args) -> int:
    from gazal_nemo.commands.demo_data import write_demo_benchmark, write_demo_data
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron
    from gazal_nemo.models.tiny import make_tiny_qwen3

    work = Path(args.workdir)
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    t0 = time.time()
    base = make_tiny_qwen3(work / "base", seed=0, head_dim=32)  # 32: the smallest head vLLM's CPU kernels take
    print(f"== tiny Qwen3 written to {base}", flush=True)
    data = write_demo_data(work / "data", base)
    megatron_ckpt = work / "base_megatron"
    convert_hf_to_megatron(base, megatron_ckpt, overwrite=True)
    print(f"== converted to Megatron dist checkpoint {megatron_ckpt}", flush=True)
    sft_dir = work / "sft"
    _stage("sft", RECIPES / "tiny_cpu_sft.yaml", [
        f"model.hf_path={base}", f"model.megatron_ckpt={megatron_ckpt}",
        f"sft_data.sources.0.path={data['sft']}", f"train.max_steps={args.sft_steps}",
        f"checkpoint.dir={sft_dir / 'checkpoints'}", f"logging.dir={sft_dir / 'logs'}",
        f"export_dir={sft_dir / 'export'}",
    ])
    grpo_dir = work / "grpo"
    _stage("grpo", RECIPES / "tiny_cpu_grpo.yaml", [
        f"model.hf_path={sft_dir / 'export' / 'merged'}", f"grpo.data.path={data['grpo']}",
        f"train.max_steps={args.grpo_steps}", f"checkpoint.dir={grpo_dir / 'checkpoints'}",
        f"logging.dir={grpo_dir / 'logs'}", f"export_dir={grpo_dir / 'export'}",
    ])
    benchmark = write_demo_benchmark(data["grpo"].parent / "medqa_demo_test.jsonl")
    evaluated = {"SFT (PEFT adapter on the base)": ("sft", sft_dir / "export" / "adapter"),
                 "GRPO (merged export)": ("grpo", grpo_dir / "export" / "merged"),
                 "GRPO (last step checkpoint)": ("grpo_step", grpo_dir / "checkpoints")}
    results = {label: _evaluate(model, benchmark, work / "eval" / name) for label, (name, model) in evaluated.items()}
    sft_first, sft_last = _first_last(sft_dir / "logs" / "metrics.jsonl", "loss")
    acc_first, acc_last = _first_last(grpo_dir / "logs" / "metrics.jsonl", "reward/accuracy")
    print("\n== demo finished in %.0fs" % (time.time() - t0))
    print(f"   SFT loss {sft_first:.3f} -> {sft_last:.3f}; adapter (PEFT) at {sft_dir / 'export' / 'adapter'}, "
          f"merged HF model at {sft_dir / 'export' / 'merged'}")
    print(f"   GRPO accuracy reward {acc_first:.2f} -> {acc_last:.2f}; metrics in {grpo_dir / 'logs' / 'metrics.jsonl'}")
    print(f"\n{_results_table(results, benchmark)}", flush=True)
    return 0


def _evaluate(model: Path, benchmark: Path, out: Path) -> dict:
    """`gazal eval` of one model on the demo benchmark (megatron engine, greedy); its results row."""
    import argparse

    from gazal_nemo.commands import evaluate
    from gazal_nemo.commands.demo_data import TINY_SYSTEM_PROMPT

    print(f"\n== gazal eval --model {model} --benchmarks medqa --data {benchmark}", flush=True)
    parser = argparse.ArgumentParser(prog="gazal eval")
    evaluate.add_arguments(parser)  # the command's own arguments and defaults, as `gazal eval` parses them
    args = parser.parse_args(["--model", str(model), "--benchmarks", "medqa", "--data", str(benchmark),
                              "--system-prompt", TINY_SYSTEM_PROMPT, "--max-new-tokens", "40", "--batch-size", "64",
                              "--permutations", "2", "--out", str(out), "--overwrite"])
    code = evaluate.run(args)
    if code != 0:
        raise ValueError(f"evaluation of {model} failed (exit {code})")
    return json.loads((out / "results.json").read_text())["results"]["medqa"]


def _results_table(results: dict[str, dict], benchmark: Path) -> str:
    """The demo's closing table: one row per model, as `gazal eval` scores it."""
    lines = [f"== evaluation on {benchmark.name} (MedQA US layout, greedy, last \\boxed{{X}} after </think>)",
             "| model | accuracy % [95% CI] | right in both option orders % | extraction fail % | mean tokens |",
             "|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {100 * r['accuracy']:.1f} [{100 * r['ci95_low']:.1f}, {100 * r['ci95_high']:.1f}]"
                     f" | {100 * r['consistent_accuracy']:.1f} | {100 * r['extraction_failure_rate']:.1f} | "
                     f"{r['mean_completion_tokens']:.0f} |")
    return "\n".join(lines)
